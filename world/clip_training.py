"""Train and evaluate the world's CLIP (:mod:`dreamportrait.synthetic.lit_clip`): a locked
all-MiniLM-L6-v2 text tower and a small image tower tuned to it (LiT, Zhai et al. 2022).

    python -m world.clip_training train --data data/synthetic-64-12k --run-dir runs/lit-clip --kimg 300 \\
        [--val-data data/heldout-ids-64] [--resume] [--out checkpoints/synthetic-lit-clip]
    python -m world.clip_training evaluate --clip checkpoints/synthetic-lit-clip \\
        --data data/heldout-ids-64 data/heldout-combos-64 --num 100 --groups 3 --pairs 100

Training. The text tower never changes, so the global feature of every caption is computed
once, before the first step, and kept in the run folder (``text_features.pt``): a step runs
only the image tower and the projection. Each image's captions are the data set's ten (2-6
attributes) plus ``fresh_captions`` drawn from its true attributes naming 2 to all of them
(retrieval queries name every attribute); a step draws one per image, fresh with probability
1/2. The loss is CLIP's symmetric contrastive loss with the world's ground truth removing false
negatives: every image a caption is true of (same values for every attribute it mentions) is a
positive of that caption, with equal weight. Augmentation: shifts of up to ``shift`` pixels.
AdamW, warm-up then cosine decay. Batches, captions and shifts are functions of (seed, step),
so a resumed run (``--resume``) ends with exactly the weights of an uninterrupted one; the run
folder (train/run_files.py) is checkpointed atomically every couple of minutes.

Evaluation on held-out renders: text->image and image->text top-1/top-5 retrieval among ``num``
identities, each queried by a caption naming every visible attribute (identities with identical
attribute sets count as correct); and per attribute, whether the text side separates it:
each image's full caption against the same caption with only that attribute's value changed
(the same words elsewhere wherever the grammar allows; the parser confirms the one difference). Reported:
how often the image prefers its true caption (chance 50 %), and how far apart the two captions'
embeddings are (1 - cosine), for the locked text features as well.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dreamportrait.checkpoints import atomic_file, atomic_write
from dreamportrait.synthetic.attributes import ATTRIBUTES
from dreamportrait.synthetic.captions import make_caption, mentionable, parse_caption
from dreamportrait.synthetic.lit_clip import MAX_LOGIT_SCALE, LitClip, LitClipConfig
from dreamportrait.text_encoder import MINILM_NAME, TextEncoder
from train.data import DatasetError
from train.run_files import RunFiles
from world.data import WorldData
from world.judge_training import batch_indices, learning_rate, random_shift

FRESH_CAPTION_RATE = 0.5       # share of steps' captions drawn from the fresh ones
TEXT_CACHE = "text_features.pt"
CHECKPOINT_SECONDS = 120.0
_NAMES = list(ATTRIBUTES)
_NOT_MENTIONED, _INVISIBLE = -1, -2


def training_config(data: str, kimg: float, text_encoder: dict, batch: int = 128, lr: float = 1e-3,
                    weight_decay: float = 0.05, warmup_kimg: float = 2.0, shift: int = 3, seed: int = 0,
                    fresh_captions: int = 4, val_data: str | None = None, val_every_kimg: float = 5.0,
                    clip: Mapping | None = None) -> dict:
    """The settings of a run (what config.json holds; a resume must match them). ``text_encoder`` is
    the locked tower's identity; ``clip`` overrides :class:`LitClipConfig`'s architecture fields."""
    if kimg <= 0 or batch < 2 or lr <= 0 or shift < 0 or fresh_captions < 0:
        raise ValueError(f"need kimg > 0, batch >= 2 (a contrastive batch), lr > 0, shift >= 0 and "
                         f"fresh_captions >= 0 (got kimg={kimg}, batch={batch}, lr={lr}, shift={shift}, "
                         f"fresh_captions={fresh_captions})")
    arch = LitClipConfig(text_encoder=text_encoder, **(clip or {})).to_dict()
    return {"data": str(data), "kimg": kimg, "batch": batch, "lr": lr, "weight_decay": weight_decay,
            "warmup_kimg": warmup_kimg, "shift": shift, "seed": seed, "fresh_captions": fresh_captions,
            "val_data": val_data and str(val_data), "val_every_kimg": val_every_kimg, "clip": arch}


# ---- captions, their ground truth and their cached features ---------------------------------------

def caption_sets(data: WorldData, fresh: int) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """(unique captions, per image the rows of its data set captions, per image the rows of its
    ``fresh`` captions naming 2..all attributes, drawn from its identity seed)."""
    rows: dict[str, int] = {}
    own, new = [], []
    for i, attrs in enumerate(data.attributes):
        own.append([rows.setdefault(c, len(rows)) for c in data.captions[i]])
        rng = np.random.default_rng([int(data.identity_seeds[i]), 11])
        names = len(mentionable(attrs))
        new.append([rows.setdefault(make_caption(attrs, rng, mentions=int(rng.integers(min(2, names), names + 1))),
                                    len(rows)) for _ in range(fresh)])
    return list(rows), own, new


def mention_matrix(captions: Sequence[str]) -> torch.Tensor:
    """(N, attributes) long: the value index each caption states, -1 where it states none."""
    out = torch.full((len(captions), len(_NAMES)), _NOT_MENTIONED, dtype=torch.long)
    for row, caption in enumerate(captions):
        for name, values in parse_caption(caption).items():
            if len(values) != 1:
                raise ValueError(f"caption {caption!r} states {len(values)} values of {name}: {sorted(values)}")
            out[row, _NAMES.index(name)] = ATTRIBUTES[name].index(next(iter(values)))
    return out


def attribute_matrix(attributes: Sequence[Mapping]) -> torch.Tensor:
    """(N, attributes) long: each image's value index, -2 where the attribute is invisible."""
    return torch.tensor([[_INVISIBLE if a[name] is None else ATTRIBUTES[name].index(a[name]) for name in _NAMES]
                         for a in attributes], dtype=torch.long)


def positives(mentions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(captions, images) bool: caption c is true of image i (every value it states is i's)."""
    stated = mentions[:, None, :]
    return ((stated == _NOT_MENTIONED) | (stated == values[None, :, :])).all(dim=-1)


def text_cache(clip: LitClip, captions: list[str], path: Path, progress: bool = True) -> torch.Tensor:
    """The locked text features (N, width) of ``captions``: read from ``path`` when it holds the same
    captions and encoder, else computed (in chunks) and written there atomically."""
    identity = clip.text_encoder.describe()
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached["encoder"] == identity and cached["captions"] == captions:
            return cached["features"]
    chunk = 4096
    parts = []
    t0 = time.time()
    for start in range(0, len(captions), chunk):
        parts.append(clip.text_features(captions[start:start + chunk]).cpu())
        if progress:
            done = start + len(parts[-1])
            print(f"text features: {done}/{len(captions)} captions, {done / (time.time() - t0):.0f}/s",
                  file=sys.stderr, flush=True)
    features = torch.cat(parts)
    with atomic_file(path) as tmp:
        torch.save({"encoder": identity, "captions": captions, "features": features}, tmp)
    return features


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     pos: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy with soft targets: for each caption its positive images (``pos``
    (captions, images), diagonal included), for each image the captions true of it, equally weighted."""
    pos = pos | torch.eye(len(pos), dtype=torch.bool, device=pos.device)
    logits = logit_scale * text_emb @ image_emb.T  # (captions, images)

    def soft_ce(lg, target):
        target = target.float()
        return -(target / target.sum(1, keepdim=True) * lg.log_softmax(1)).sum(1).mean()
    return 0.5 * (soft_ce(logits, pos) + soft_ce(logits.T, pos.T))


# ---- training -------------------------------------------------------------------------------------

def train(data_path: str, run_dir: str, kimg: float, out: str | None = None,
          text_encoder: TextEncoder | None = None, resume: bool = False, progress: bool = True,
          checkpoint_seconds: float = CHECKPOINT_SECONDS, stop_after: int | None = None, **settings) -> LitClip:
    """Train (or continue) a run; returns the CLIP. ``text_encoder`` defaults to all-MiniLM-L6-v2;
    ``settings``: see :func:`training_config`. ``stop_after`` (images) ends early after a checkpoint,
    as a kill would (time-boxed sessions, tests); ``resume=True`` later continues the same schedule."""
    encoder = text_encoder or TextEncoder.from_minilm()
    cfg = training_config(data_path, kimg, encoder.describe(), **settings)
    data = WorldData.load(data_path)
    arch = LitClipConfig(**cfg["clip"])
    if data.resolution != arch.resolution:
        raise ValueError(f"{data_path} holds {data.resolution}px images but the CLIP's image tower takes "
                         f"{arch.resolution}px; write a data set at that resolution or set clip.resolution")
    run = RunFiles(run_dir, cfg, total=round(kimg * 1000), resume=resume, progress=progress, desc="lit-clip")
    try:
        torch.manual_seed(cfg["seed"])
        clip = LitClip(arch, encoder).to(memory_format=torch.channels_last)
        params = [p for p in clip.parameters() if p.requires_grad]
        opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg["weight_decay"]},
                                 {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                lr=cfg["lr"], betas=(0.9, 0.98), eps=1e-6)
        if run.state is not None:
            clip.load_state_dict(run.state["model"], strict=False)
            opt.load_state_dict(run.state["optimizer"])
        captions, own, fresh = caption_sets(data, cfg["fresh_captions"])
        features = text_cache(clip, captions, run.dir / TEXT_CACHE, progress)
        mentions, values = mention_matrix(captions), attribute_matrix(data.attributes)
        val = _validation_set(clip, cfg["val_data"]) if cfg["val_data"] else None
        run.t0, run.n0 = time.time(), run.nimg  # the log's images/s: training only, not the text features
        batch, total_steps = cfg["batch"], math.ceil(run.total / cfg["batch"])
        val_every = max(1, round(cfg["val_every_kimg"] * 1000 / batch))
        step, last_save = run.nimg // batch, time.time()
        clip.train()
        while not run.done and not (stop_after is not None and run.nimg >= stop_after):
            idx = batch_indices(len(data), batch, cfg["seed"], step)
            rng = np.random.default_rng([cfg["seed"], step])
            rows = [int(rng.choice(fresh[i] if fresh[i] and rng.random() < FRESH_CAPTION_RATE else own[i]))
                    for i in idx.tolist()]
            gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + step)
            images = random_shift(data.float_images(torch.as_tensor(idx)), cfg["shift"], gen)
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step, total_steps)
            loss = contrastive_loss(clip.encode_image(images.contiguous(memory_format=torch.channels_last)),
                                    clip.encode_text_features(features[rows]), clip.logit_scale.exp(),
                                    positives(mentions[rows], values[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            step += 1
            stats = {"clip/loss": float(loss.detach()), "clip/logit_scale": float(clip.logit_scale.detach().exp()),
                     "clip/lr": opt.param_groups[0]["lr"]}
            if val is not None and (step % val_every == 0 or step == total_steps):
                stats.update(_validate(clip, *val))
            run.step(batch, stats)
            if run.done or time.time() - last_save >= checkpoint_seconds or \
                    (stop_after is not None and run.nimg >= stop_after):
                run.save({"model": clip.trainable_state(), "optimizer": opt.state_dict()})
                last_save = time.time()
        clip.to(memory_format=torch.contiguous_format).eval()  # computes what a loaded copy computes
        if run.done:
            extra = {"trained_on": cfg["data"], "nimg": run.nimg, "seed": cfg["seed"]}
            clip.save_pretrained(run.dir, extra)
    finally:
        run.close()
    if out and run.done:
        clip.save_pretrained(out, extra)
        logs = Path(out) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run.dir / "log.jsonl", logs / "clip-log.jsonl")
        shutil.copyfile(run.dir / "config.json", logs / "clip-config.json")
    return clip


def _validation_set(clip: LitClip, path: str, num: int = 100) -> tuple:
    data = WorldData.load(path)
    sel = np.arange(min(num, len(data)))
    attrs = [data.attributes[i] for i in sel]
    same = torch.tensor([[a == b for b in attrs] for a in attrs])
    return data.float_images(torch.as_tensor(sel)), clip.text_features(full_captions(data)[:len(sel)]), same


@torch.no_grad()
def _validate(clip: LitClip, images: torch.Tensor, features: torch.Tensor, same: torch.Tensor) -> dict:
    clip.eval()
    r = retrieval(torch.cat([clip.encode_image(images[i:i + 256]) for i in range(0, len(images), 256)]),
                  clip.encode_text_features(features), same)
    clip.train()
    return {"val/text_to_image_top1": r["text_to_image"]["top1"], "val/image_to_text_top1": r["image_to_text"]["top1"]}


# ---- evaluation -----------------------------------------------------------------------------------

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


class _CallSeededDraws:
    """The random draws :func:`make_caption` makes (``integers``, ``random``, ``permutation``), the k-th
    call from its own stream seeded with (seed, k): what one call draws never depends on how many
    numbers an earlier call used (a word picked among two options or one), so two captions of
    identities that differ in one value pick the same words and order everywhere else."""

    def __init__(self, seed: Sequence[int]):
        self.seed, self.calls = [int(s) for s in seed], 0

    def _next(self) -> np.random.Generator:
        self.calls += 1
        return np.random.default_rng([*self.seed, self.calls])

    def integers(self, *args, **kwargs):
        return self._next().integers(*args, **kwargs)

    def random(self, *args, **kwargs):
        return self._next().random(*args, **kwargs)

    def permutation(self, n):
        return self._next().permutation(n)


def one_attribute_pairs(attributes: Mapping, identity_seed: int, seed: int = 7) -> list[tuple[str, str, str]]:
    """(attribute, true full caption, the same caption with that attribute's value changed) for every
    visible attribute and every other value of it. Both captions are drawn with
    :class:`_CallSeededDraws` from the same seed, so they share their other words unless the grammar
    says the two values in different sentence forms ("is smiling" / "has an open mouth", a pronoun,
    an added accessory). The parser checks that they state the same values for every other
    attribute (a bald head has no hair colour, so a change to or from bald may also drop it)."""
    def caption(attrs):
        return make_caption(attrs, _CallSeededDraws([identity_seed, seed]), mentions=len(mentionable(attrs)))
    true = caption(attributes)
    stated = parse_caption(true)
    out = []
    for name, values in ATTRIBUTES.items():
        if attributes[name] is None:
            continue
        for value in values:
            if value == attributes[name]:
                continue
            changed = caption(dict(attributes, **{name: value}))
            other = parse_caption(changed)
            free = {name, "hair_color"} if name == "hair_style" else {name}
            if any(other.get(k) != v for k, v in stated.items() if k not in free) or other.get(name) == stated.get(name):
                raise RuntimeError(f"the caption grammar changed more than {name}: {true!r} -> {changed!r}")
            out.append((name, true, changed))
    return out


@torch.no_grad()
def attribute_separation(clip, data: WorldData, num: int = 100) -> dict:
    """Per attribute, over the first ``num`` images: how often the image prefers its full caption to the
    caption with only that attribute changed (``choice``), and the mean 1 - cosine between the two
    captions' embeddings (``text_distance``) and, for a :class:`LitClip`, its locked text features
    (``locked_distance``)."""
    pairs = [(i, *p) for i in range(min(num, len(data)))
             for p in one_attribute_pairs(data.attributes[i], data.identity_seeds[i])]
    texts = sorted({t for _, _, a, b in pairs for t in (a, b)})
    row = {t: k for k, t in enumerate(texts)}
    images = torch.cat([clip.images(data.float_images(torch.arange(s, min(s + 256, num, len(data)))))
                        for s in range(0, min(num, len(data)), 256)])
    emb = clip.texts(texts)
    locked = clip.text_features(texts) if isinstance(clip, LitClip) else None
    out: dict[str, dict] = {}
    for name in ATTRIBUTES:
        sel = [(i, row[a], row[b]) for i, n, a, b in pairs if n == name]
        if not sel:
            continue
        i, a, b = (torch.tensor(c) for c in zip(*sel))
        true, wrong = (images[i] * emb[a]).sum(1), (images[i] * emb[b]).sum(1)
        out[name] = {"pairs": len(sel),
                     "choice": float(((true > wrong).float() + 0.5 * (true == wrong).float()).mean()),
                     "text_distance": float((1 - F.cosine_similarity(emb[a], emb[b])).mean())}
        if locked is not None:
            out[name]["locked_distance"] = float((1 - F.cosine_similarity(locked[a], locked[b])).mean())
    out["mean"] = {k: float(np.mean([v[k] for v in out.values()])) for k in next(iter(out.values())) if k != "pairs"}
    return out


def evaluate(clip_spec: str, data_path: str, num: int = 100, groups: int = 1, pairs: int = 100,
             clip=None) -> dict:
    """Retrieval among ``num`` identities (``groups`` disjoint groups of ``num``, averaged) and, over the
    first ``pairs`` images, :func:`attribute_separation`. ``clip`` is an already loaded CLIP."""
    from train.evaluate import load_clip
    clip = clip or load_clip(clip_spec)
    data = WorldData.load(data_path)
    if len(data) < num * groups:
        raise DatasetError(f"{data_path} holds {len(data)} images; {groups} group(s) of {num} need more")
    captions = full_captions(data)
    results = []
    for g in range(groups):
        sel = np.arange(g * num, (g + 1) * num)
        attrs = [data.attributes[i] for i in sel]
        same = torch.tensor([[a == b for b in attrs] for a in attrs])
        img = torch.cat([clip.images(data.float_images(torch.as_tensor(sel[i:i + 256]))) for i in range(0, num, 256)])
        results.append(retrieval(img, clip.texts([captions[j] for j in sel]), same))
    mean = {d: {k: float(np.mean([r[d][k] for r in results])) for k in ("top1", "top5")} for d in results[0]}
    return {"data": str(data_path), "clip": str(clip_spec), "identities": num, "groups": groups, **mean,
            "example_query": captions[0], "attributes": attribute_separation(clip, data, pairs)}


def markdown(results: Sequence[dict]) -> str:
    """The retrieval table and the per-attribute table (one column pair per data set)."""
    lines = ["| data set | identities | image→text top-1 | top-5 | text→image top-1 | top-5 |", "|---|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['data']} | {r['identities']}×{r['groups']} | {r['image_to_text']['top1']:.1%} | "
                     f"{r['image_to_text']['top5']:.1%} | {r['text_to_image']['top1']:.1%} | "
                     f"{r['text_to_image']['top5']:.1%} |")
    head = "| attribute | " + " | ".join(f"choice ({Path(r['data']).name}) | text dist. | locked dist." for r in results)
    lines += ["", head + " |", "|---" + "|---:|---:|---:" * len(results) + "|"]
    for name in results[0]["attributes"]:
        cells = []
        for r in results:
            a = r["attributes"].get(name, {})
            cells += [f"{a['choice']:.1%}" if "choice" in a else "–", f"{a['text_distance']:.3f}" if a else "–",
                      f"{a['locked_distance']:.3f}" if "locked_distance" in a else "–"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m world.clip_training", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or --resume) the world's CLIP")
    t.add_argument("--data", required=True)
    t.add_argument("--run-dir", required=True)
    t.add_argument("--kimg", type=float, required=True, help="thousands of images to train on")
    t.add_argument("--out", help="at the end, write the CLIP folder here (lit_clip.safetensors and logs/)")
    t.add_argument("--text-encoder", default=MINILM_NAME,
                   help=f"all-MiniLM-L6-v2's name or folder (default {MINILM_NAME}, from its package; hash checked)")
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup-kimg", type=float, default=2.0)
    t.add_argument("--fresh-captions", type=int, default=4, help="captions per image drawn beside the data set's")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--val-data", help="held-out data set: log retrieval top-1 among its first 100 images")
    t.add_argument("--val-every-kimg", type=float, default=5.0)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--stop-after-kimg", type=float, help="stop early (after a checkpoint); --resume continues")
    e = sub.add_parser("evaluate", help="retrieval and per-attribute separation on held-out renders")
    e.add_argument("--clip", required=True, help="a CLIP for train.evaluate --clip (this CLIP's folder, or open_clip)")
    e.add_argument("--data", required=True, nargs="+")
    e.add_argument("--num", type=int, default=100, help="identities per retrieval group")
    e.add_argument("--groups", type=int, default=1)
    e.add_argument("--pairs", type=int, default=100, help="images whose one-attribute caption pairs are scored")
    e.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if args.command == "train":
        train(args.data, args.run_dir, args.kimg, args.out, TextEncoder.from_minilm(args.text_encoder),
              resume=args.resume, batch=args.batch, lr=args.lr, warmup_kimg=args.warmup_kimg,
              fresh_captions=args.fresh_captions, seed=args.seed, val_data=args.val_data,
              val_every_kimg=args.val_every_kimg,
              stop_after=None if args.stop_after_kimg is None else round(args.stop_after_kimg * 1000))
        return 0
    from train.evaluate import load_clip
    clip = load_clip(args.clip)
    results = [evaluate(args.clip, d, args.num, args.groups, args.pairs, clip=clip) for d in args.data]
    print(markdown(results))
    if args.out:
        atomic_write(args.out, json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except (FileNotFoundError, ValueError, DatasetError) as err:
        sys.exit(f"error: {err}")
