"""The synthetic world's small CLIP: an open_clip model trained contrastively on the world.

It plays three parts, like OpenCLIP ViT-H at paper scale: the generator's frozen text encoder
(penultimate-layer EOT and word tokens, via :meth:`TextEncoder.from_clip_folder`), the small
teacher's text encoder, and with its image tower the evaluation CLIP (R-Precision, MSC) of
``train/evaluate.py --clip``. The model is a stock open_clip ``CLIP`` built from a custom config
(towers sized for 64x64 images and the captions' small vocabulary, CLIP's BPE tokenizer with
context 77) and trained with open_clip's ``ClipLoss``. Saved as an open_clip folder
(``open_clip_config.json`` + ``open_clip_model.safetensors``), which open_clip itself loads as
``local-dir:FOLDER``.

    python -m world.clip_training train --data data/synthetic-64-12k --run-dir runs/clip --kimg 80 \\
        --out checkpoints/synthetic-clip
    python -m world.clip_training evaluate --clip checkpoints/synthetic-clip --data data/heldout-ids-64
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from dreamportrait.checkpoints import atomic_folder
from dreamportrait.synthetic.captions import make_caption, mentionable
from train.run_files import RunFiles
from world.data import WorldData

# Towers for 64x64 portraits: 8x8 patches (64 image tokens); a narrow text tower, since CLIP's
# 49408-token embedding dominates its size (the folder is stored in float16, < 40 MB).
SMALL_CLIP_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 192, "layers": 4, "head_width": 48,
                   "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP's
FRESH_CAPTION_RATE = 0.5  # share of captions drawn fresh from the true attributes (any length)


def build_clip(model_cfg: dict, seed: int = 0):
    """A randomly initialised open_clip ``CLIP`` (seeded) for ``model_cfg``."""
    from open_clip.model import CLIP
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIP(**model_cfg)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> CLIP's input normalisation."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def training_captions(data: WorldData, idx: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Half data-set captions (2-6 attributes), half fresh captions naming 2..all attributes, so the
    model also learns to bind long descriptions (retrieval queries name every attribute)."""
    out = []
    for i in idx.tolist():
        if rng.random() < FRESH_CAPTION_RATE:
            attrs = data.attributes[i]
            out.append(make_caption(attrs, rng, mentions=int(rng.integers(2, len(mentionable(attrs)) + 1))))
        else:
            out.append(data.captions[i][int(rng.integers(len(data.captions[i])))])
    return out


def save_clip_folder(model, model_cfg: dict, folder: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write an open_clip folder atomically (staged next to it, then renamed over the old one).

    Weights are stored in float16 (open_clip casts them back to the model's float32 on loading)."""
    from safetensors.torch import save_file
    with atomic_folder(folder) as staging:
        config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(MEAN), "std": list(STD)},
                  "dreamportrait": extra or {}}
        (staging / "open_clip_config.json").write_text(json.dumps(config, indent=1))
        state = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
                 for k, v in model.state_dict().items()}
        save_file(state, str(staging / "open_clip_model.safetensors"))
    return folder


def learning_rate(step: int, total_steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def train(data_path: str, run_dir: str, kimg: float, out: str | None = None, batch: int = 128,
          lr: float = 1e-3, weight_decay: float = 0.1, warmup: int = 50, seed: int = 0,
          model_cfg: dict | None = None, resume: bool = False, checkpoint_seconds: float = 120,
          progress: bool = True, bf16: bool = False, stop_after: int | None = None):
    """Train the small CLIP; returns the model. Resumable from the run folder's last checkpoint.

    ``stop_after`` (images) ends the process early, after a checkpoint, as a kill would (time-boxed
    sessions, tests); ``resume=True`` later continues the same schedule."""
    import open_clip
    model_cfg = model_cfg or SMALL_CLIP_CONFIG
    data = WorldData.load(data_path)
    if data.resolution != model_cfg["vision_cfg"]["image_size"]:
        raise ValueError(f"{data_path} holds {data.resolution}px images but the CLIP's image tower takes "
                         f"{model_cfg['vision_cfg']['image_size']}px; write a data set at that resolution")
    total = int(kimg * 1000)
    config = {"data": str(data_path), "kimg": kimg, "batch": batch, "lr": lr, "weight_decay": weight_decay,
              "warmup": warmup, "seed": seed, "model_cfg": model_cfg, "bf16": bf16}
    run = RunFiles(run_dir, config, total, resume, progress, desc="clip")
    model = build_clip(model_cfg, seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng(seed)
    if run.state:
        model.load_state_dict(run.state["model"])
        opt.load_state_dict(run.state["opt"])
        rng.bit_generator.state = run.state["numpy_rng"]
    loss_fn = open_clip.ClipLoss()
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=model_cfg["text_cfg"]["context_length"])
    total_steps = math.ceil(total / batch)
    last_save = time.time()

    def checkpoint():
        run.save({"model": model.state_dict(), "opt": opt.state_dict(), "numpy_rng": rng.bit_generator.state})

    model.train()
    while not run.done and not (stop_after is not None and run.nimg >= stop_after):
        step = run.nimg // batch
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, total_steps, lr, warmup)
        idx = rng.choice(len(data), size=batch, replace=False)
        images = normalize(data.float_images(idx))
        texts = tokenizer(training_captions(data, idx, rng))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            img_f, txt_f, scale = model(images, texts)
            loss = loss_fn(img_f.float(), txt_f.float(), scale.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's cap on the temperature
        run.step(batch, {"clip/loss": float(loss.detach()), "clip/logit_scale": float(model.logit_scale.detach().exp()),
                         "clip/lr": opt.param_groups[0]["lr"]})
        if time.time() - last_save > checkpoint_seconds or run.done or (stop_after is not None and run.nimg >= stop_after):
            checkpoint()
            last_save = time.time()
    run.close()
    model.eval()
    if out and run.done:
        save_clip_folder(model, model_cfg, out, {"trained_on": str(data_path), "nimg": run.nimg, "seed": seed})
        logs = Path(out) / "logs"
        logs.mkdir(exist_ok=True)
        shutil.copy(Path(run_dir) / "log.jsonl", logs / "clip-log.jsonl")
        shutil.copy(Path(run_dir) / "config.json", logs / "clip-config.json")
    return model


# ---- evaluation ------------------------------------------------------------------------------

def full_captions(data: WorldData, seed: int = 7) -> list[str]:
    """One caption per image naming every visible attribute (the retrieval queries)."""
    return [make_caption(a, np.random.default_rng([int(s), seed]), mentions=len(mentionable(a)))
            for a, s in zip(data.attributes, data.identity_seeds)]


def retrieval(image_emb: torch.Tensor, text_emb: torch.Tensor, same: torch.Tensor) -> dict:
    """Top-1/top-5 retrieval both ways; ``same[i, j]`` marks pairs that count as correct (identical
    attribute sets), always including i == j."""
    sim = image_emb @ text_emb.T
    out = {}
    for name, s in (("image_to_text", sim), ("text_to_image", sim.T)):
        ranks = s.argsort(dim=1, descending=True)
        hit = same.gather(1, ranks)
        out[name] = {"top1": float(hit[:, 0].float().mean()), "top5": float(hit[:, :5].any(1).float().mean())}
    return out


@torch.no_grad()
def evaluate(clip_folder: str, data_path: str, num: int = 100, groups: int = 1) -> dict:
    """Retrieval among ``num`` identities (``groups`` disjoint groups of ``num``, averaged)."""
    from train.evaluate import load_clip
    clip = load_clip(clip_folder)
    data = WorldData.load(data_path)
    if len(data) < num * groups:
        raise ValueError(f"{data_path} holds {len(data)} images; {groups} group(s) of {num} need more")
    captions = full_captions(data)
    results = []
    for g in range(groups):
        sel = np.arange(g * num, (g + 1) * num)
        attrs = [data.attributes[i] for i in sel]
        same = torch.tensor([[a == b for b in attrs] for a in attrs])
        img = torch.cat([clip.images(data.float_images(sel[i:i + 100])) for i in range(0, num, 100)])
        txt = torch.cat([clip.texts([captions[j] for j in sel[i:i + 100]]) for i in range(0, num, 100)])
        results.append(retrieval(img, txt, same))
    mean = {d: {k: float(np.mean([r[d][k] for r in results])) for k in ("top1", "top5")} for d in results[0]}
    return {"data": str(data_path), "identities": num, "groups": groups, **mean,
            "example_query": captions[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m world.clip_training", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or --resume) the small CLIP")
    t.add_argument("--data", required=True)
    t.add_argument("--run-dir", required=True)
    t.add_argument("--kimg", type=float, required=True, help="thousands of images to train on")
    t.add_argument("--out", help="write the trained CLIP folder here at the end")
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--stop-after-kimg", type=float, help="stop early (after a checkpoint); --resume continues")
    t.add_argument("--bf16", action="store_true",
                   help="bf16 autocast (default float32: on this CPU it was 20x slower, see world/RESULTS.md)")
    e = sub.add_parser("evaluate", help="top-1/top-5 retrieval on held-out identities")
    e.add_argument("--clip", required=True)
    e.add_argument("--data", required=True, nargs="+")
    e.add_argument("--num", type=int, default=100)
    e.add_argument("--groups", type=int, default=1)
    e.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if args.command == "train":
        train(args.data, args.run_dir, args.kimg, args.out, args.batch, args.lr, warmup=args.warmup, seed=args.seed,
              resume=args.resume, bf16=args.bf16,
              stop_after=None if args.stop_after_kimg is None else int(args.stop_after_kimg * 1000))
        return 0
    results = [evaluate(args.clip, d, args.num, args.groups) for d in args.data]
    print("| data set | identities | image→text top-1 | top-5 | text→image top-1 | top-5 |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['data']} | {r['identities']}×{r['groups']} | {r['image_to_text']['top1']:.1%} | "
              f"{r['image_to_text']['top5']:.1%} | {r['text_to_image']['top1']:.1%} | {r['text_to_image']['top5']:.1%} |")
    if args.out:
        tmp = Path(args.out + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
