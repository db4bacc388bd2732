"""Train and evaluate the synthetic world's judge (the attribute classifier of
dreamportrait/synthetic/judge.py).

    python -m world.judge_training --data data/synthetic-64-12k --run-dir runs/judge --kimg 200 \\
        [--batch 64] [--lr 1e-3] [--seed 0] [--resume] [--export checkpoints/synthetic-judge/judge.safetensors]
    python -m world.judge_training evaluate --judge checkpoints/synthetic-judge/judge.safetensors \\
        --num 300 --seed 3 --out checkpoints/synthetic-judge/eval.json

Training reads a synthetic-world data set with its true attributes (an invisible attribute has
no target). The last ~5 % of the data set's identities are held out for validation, whose
per-attribute accuracy is logged every few kimg. The only augmentation is a random shift of a
few pixels (edges replicated): it changes no attribute, unlike a horizontal flip, which would
mirror the world's upper-left lighting. AdamW with a short warm-up and cosine decay. The run
folder (train/run_files.py) is checkpointed atomically every couple of minutes and at the end;
batches and shifts are functions of (seed, step), so a resumed run ends with exactly the
weights of an uninterrupted one. At the end the judge is written to RUN_DIR/judge.safetensors
and, with --export, to that path with the run's log.jsonl as logs/judge-log.jsonl beside it.

Evaluation renders new identities (a seed the training data did not use) at fixed views,
frontal and yaw -30 / +30 degrees (positive yaw moves the camera toward +x, the person's left;
dreamportrait/cameras.py), and reports the judge's accuracy per attribute and view over the
images where the attribute is visible.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dreamportrait.cameras import camera_label
from dreamportrait.checkpoints import CheckpointError
from dreamportrait.grid import save_png, to_uint8
from dreamportrait.synthetic.attributes import heldout_pairs, sample_identities
from dreamportrait.synthetic.judge import AttributeClassifier, JudgeConfig
from dreamportrait.synthetic.render import HeadBatch, render
from train.data import DatasetError
from train.evaluate import attribute_accuracy, write_json
from train.run_files import RunFiles
from world.data import WorldData

VIEWS = {"frontal": (0.0, 0.0), "yaw -30": (-30.0, 0.0), "yaw +30": (30.0, 0.0)}  # name -> (yaw, pitch)
CHECKPOINT_SECONDS = 90.0


def training_config(data: str, kimg: float, batch: int = 64, lr: float = 1e-3, seed: int = 0,
                    weight_decay: float = 0.01, warmup_kimg: float = 2.0, shift: int = 3,
                    val_fraction: float = 0.05, val_every_kimg: float = 10.0, log_every_kimg: float = 1.0,
                    judge: Mapping | None = None) -> dict:
    """The settings of a judge run (what config.json holds; a resume must match them)."""
    if kimg <= 0 or batch < 1 or lr <= 0 or shift < 0 or not 0 < val_fraction < 1:
        raise ValueError(f"need kimg > 0, batch >= 1, lr > 0, shift >= 0 and 0 < val_fraction < 1 "
                         f"(got kimg={kimg}, batch={batch}, lr={lr}, shift={shift}, val_fraction={val_fraction})")
    return {"data": str(data), "kimg": kimg, "batch": batch, "lr": lr, "seed": seed,
            "weight_decay": weight_decay, "warmup_kimg": warmup_kimg, "shift": shift,
            "val_fraction": val_fraction, "val_every_kimg": val_every_kimg, "log_every_kimg": log_every_kimg,
            "judge": JudgeConfig(**(judge or {})).to_dict()}


def split_identities(identity_seeds: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Image indices (train, validation): the last ``val_fraction`` of identities (in data set order)."""
    _, first = np.unique(identity_seeds, return_index=True)
    ordered = identity_seeds[np.sort(first)]
    num_val = max(1, int(round(len(ordered) * val_fraction)))
    if num_val >= len(ordered):
        raise DatasetError(f"{len(ordered)} identities leave none for training after holding out "
                           f"{num_val} for validation; use a larger data set")
    is_val = np.isin(identity_seeds, ordered[-num_val:])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def batch_indices(num: int, batch: int, seed: int, step: int) -> np.ndarray:
    """Positions (into a set of ``num``) of batch ``step``: consecutive slices of per-epoch permutations."""
    out, pos = [], step * batch
    while len(out) < batch:
        epoch, offset = divmod(pos, num)
        take = np.random.default_rng([seed, epoch]).permutation(num)[offset:offset + batch - len(out)]
        out.extend(take.tolist())
        pos += len(take)
    return np.array(out)


def random_shift(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``shift`` pixels in x and y, replicating the edges."""
    if shift == 0:
        return images
    h, w = images.shape[-2:]
    padded = F.pad(images, (shift, shift, shift, shift), mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([p[:, dy:dy + h, dx:dx + w] for p, (dy, dx) in zip(padded, offsets)])


def train_step(model: AttributeClassifier, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               targets: Mapping[str, torch.Tensor]) -> float:
    """One optimisation step on a batch; returns the loss before the step."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = model.loss(images, targets)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def learning_rate(cfg: Mapping, step: int, total_steps: int) -> float:
    """Linear warm-up over ``warmup_kimg``, then cosine decay to 0 at the last step."""
    warmup = max(1, round(cfg["warmup_kimg"] * 1000 / cfg["batch"]))
    return cfg["lr"] * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total_steps))


@torch.no_grad()
def judge_accuracy(judge: AttributeClassifier, images: torch.Tensor, attributes: Sequence[Mapping],
                   batch: int = 256) -> dict:
    """Per-attribute accuracy over the images where the attribute is visible (float images in [-1, 1])."""
    visible = [{k: v for k, v in attrs.items() if v is not None} for attrs in attributes]
    return attribute_accuracy(judge.read(images, batch), visible)


def misses_sheet(images: torch.Tensor, attributes: Sequence[Mapping], readings: Sequence[Mapping],
                 per_row: int = 8, view: str = "") -> np.ndarray | None:
    """A contact sheet of the judge's misses: one row per attribute with any (the attribute's name
    and ``view``, then up to ``per_row`` missed images, each captioned with the true value over the
    reading); None when there is no miss."""
    from PIL import Image, ImageDraw
    rows = {}
    for i, (truth, read) in enumerate(zip(attributes, readings)):
        for name, value in truth.items():
            if value is not None and read[name] != value and len(rows.setdefault(name, [])) < per_row:
                rows[name].append((i, value, read[name]))
    if not rows:
        return None
    size, label, text = images.shape[-1], 110, 22
    sheet = Image.new("RGB", (label + per_row * size, len(rows) * (size + text)), "white")
    draw = ImageDraw.Draw(sheet)
    pixels = to_uint8(images)
    for r, (name, misses) in enumerate(sorted(rows.items())):
        top = r * (size + text)
        draw.text((4, top + size // 2 - 12), name, fill="black")
        draw.text((4, top + size // 2 + 2), view, fill="black")
        for k, (i, value, read) in enumerate(misses):
            left = label + k * size
            sheet.paste(Image.fromarray(pixels[i]), (left, top))
            draw.text((left + 1, top + size), value[:11], fill=(0, 110, 0))
            draw.text((left + 1, top + size + 10), read[:11], fill=(170, 0, 0))
    return np.asarray(sheet)


def train_judge(data: str, run_dir: str | Path, kimg: float, resume: bool = False, export: str | None = None,
                progress: bool = True, checkpoint_seconds: float = CHECKPOINT_SECONDS, **settings) -> Path:
    """Train (or continue) a judge run; returns RUN_DIR/judge.safetensors. ``settings``: see training_config."""
    cfg = training_config(data, kimg, **settings)
    world = WorldData.load(data)
    train_idx, val_idx = split_identities(world.identity_seeds, cfg["val_fraction"])
    run = RunFiles(run_dir, cfg, total=round(cfg["kimg"] * 1000), resume=resume, progress=progress, desc="judge")
    try:
        torch.manual_seed(cfg["seed"])
        # NHWC convolutions run ~25 % faster on CPU (oneDNN); the weights and their file are unchanged.
        judge = AttributeClassifier(JudgeConfig(**cfg["judge"])).to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(judge.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        if run.state is not None:
            judge.load_state_dict(run.state["model"])
            opt.load_state_dict(run.state["optimizer"])
        targets = judge.encode_targets(world.attributes)
        val_images = world.float_images(torch.as_tensor(val_idx))
        val_attrs = [world.attributes[i] for i in val_idx]
        batch, total_steps = cfg["batch"], math.ceil(run.total / cfg["batch"])
        log_every = max(1, round(cfg["log_every_kimg"] * 1000 / batch))
        val_every = max(1, round(cfg["val_every_kimg"] * 1000 / batch))
        step, sums, last_save = run.nimg // batch, [], time.time()
        while not run.done:
            idx = torch.as_tensor(train_idx[batch_indices(len(train_idx), batch, cfg["seed"], step)])
            gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + step)
            images = random_shift(world.float_images(idx), cfg["shift"], gen).contiguous(
                memory_format=torch.channels_last)
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step, total_steps)
            sums.append(train_step(judge, opt, images, {name: t[idx] for name, t in targets.items()}))
            step += 1
            logged = step % log_every == 0 or step == total_steps
            stats = {"train/loss": sum(sums) / len(sums), "train/lr": opt.param_groups[0]["lr"]}
            if step % val_every == 0 or step == total_steps:
                val = judge_accuracy(judge, val_images, val_attrs)
                stats["val/mean_accuracy"] = val["mean"]
                stats.update({f"val/accuracy/{k}": v for k, v in val["per_attribute"].items()})
            run.step(batch, stats, log=logged or "val/mean_accuracy" in stats)
            if logged:
                sums = []
            if run.done or time.time() - last_save >= checkpoint_seconds:
                run.save({"model": judge.state_dict(), "optimizer": opt.state_dict()})
                last_save = time.time()
        out = run.dir / "judge.safetensors"
        extra = {"kimg": run.nimg / 1000, "data": cfg["data"],
                 "validation": judge_accuracy(judge, val_images, val_attrs)}
        judge.save_pretrained(out, extra)
    finally:
        run.close()
    if export:
        export = Path(export)
        judge.save_pretrained(export, extra)
        (export.parent / "logs").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run.dir / "log.jsonl", export.parent / "logs" / "judge-log.jsonl")
    return out


# ---- evaluation on new renders ---------------------------------------------------------------------

def render_views(identities, views: Mapping[str, tuple[float, float]], resolution: int = 64,
                 batch: int = 32, progress: bool = True) -> dict[str, torch.Tensor]:
    """Render every identity at every view, quantised to uint8 like a data set, as floats in [-1, 1]."""
    from tqdm import tqdm
    out = {}
    with tqdm(total=len(identities) * len(views), unit="img", desc="rendering", disable=not progress) as bar:
        for name, (yaw, pitch) in views.items():
            chunks = []
            for start in range(0, len(identities), batch):
                heads = identities[start:start + batch]
                labels = camera_label([yaw] * len(heads), [pitch] * len(heads))
                rgb = render(HeadBatch(heads), labels, resolution)["rgb"]
                rgb = torch.from_numpy(to_uint8(rgb, value_range=(0, 1)))
                chunks.append(rgb.permute(0, 3, 1, 2).float() / 127.5 - 1.0)
                bar.update(len(heads))
            out[name] = torch.cat(chunks)
    return out


def evaluate_judge(judge: AttributeClassifier | str, num: int = 300, seed: int = 3, split: str = "all",
                   resolution: int = 64, views: Mapping[str, tuple[float, float]] = VIEWS,
                   progress: bool = True, misses: str | Path | None = None) -> dict:
    """Accuracy per view and attribute on ``num`` new identities of ``seed`` (and on those with held-out
    pairs). ``misses``: write every view's misses there as one PNG contact sheet (:func:`misses_sheet`);
    when there is none, a file already there (an earlier judge's sheet) is removed."""
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    path = None
    if not isinstance(judge, AttributeClassifier):
        path, judge = str(judge), AttributeClassifier.from_pretrained(judge)
    identities = sample_identities(seed, num, split)
    attrs = [ident.attributes for ident in identities]
    combo = [i for i, a in enumerate(attrs) if heldout_pairs(a)]
    images = render_views(identities, views, resolution, progress=progress)
    results = {"judge": path, "num": num, "seed": seed, "split": split, "resolution": resolution,
               "views": {name: {"yaw": y, "pitch": p} for name, (y, p) in views.items()},
               "per_view": {}, "heldout_combinations": {"num": len(combo), "per_view": {}}}
    sheets = []
    for name, imgs in images.items():
        results["per_view"][name] = judge_accuracy(judge, imgs, attrs)
        if misses:
            sheets.append(misses_sheet(imgs, attrs, judge.read(imgs), view=name))
        if combo:
            results["heldout_combinations"]["per_view"][name] = judge_accuracy(
                judge, imgs[combo], [attrs[i] for i in combo])
    sheets = [sheet for sheet in sheets if sheet is not None]
    if sheets:
        save_png(np.concatenate(sheets), misses)
    elif misses:
        Path(misses).unlink(missing_ok=True)
    return results


def markdown_table(results: Mapping) -> str:
    """Attribute rows x view columns, accuracy in %, with the mean (and held-out pairs' mean) last."""
    views = list(results["per_view"])
    lines = ["| attribute | " + " | ".join(views) + " |", "|---|" + "---:|" * len(views)]
    names = list(next(iter(results["per_view"].values()))["per_attribute"])
    for name in names:
        lines.append(f"| {name} | " + " | ".join(
            f"{100 * results['per_view'][v]['per_attribute'][name]:.1f}" for v in views) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{100 * results['per_view'][v]['mean']:.1f}**" for v in views) + " |")
    combo = results["heldout_combinations"]
    if combo["per_view"]:
        lines.append(f"| mean, the {combo['num']} identities with a held-out pair | " + " | ".join(
            f"{100 * combo['per_view'][v]['mean']:.1f}" for v in views) + " |")
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------------

def _train_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m world.judge_training", description="Train the judge.",
                                 epilog="`python -m world.judge_training evaluate --help` for evaluation.")
    ap.add_argument("--data", required=True, help="synthetic-world data set (folder or .zip) with attributes.json")
    ap.add_argument("--run-dir", required=True, help="run folder (state.pt, log.jsonl, tensorboard, judge.safetensors)")
    ap.add_argument("--kimg", type=float, required=True, help="thousands of training images to see")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (cosine decay)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    ap.add_argument("--export", help="also write the judge here (and its log as logs/judge-log.jsonl beside it)")
    ap.add_argument("--checkpoint-seconds", type=float, default=CHECKPOINT_SECONDS,
                    help=f"wall time between checkpoints (default {CHECKPOINT_SECONDS:g})")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the machine is shared)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = train_judge(args.data, args.run_dir, args.kimg, resume=args.resume, export=args.export,
                      progress=not args.no_progress, checkpoint_seconds=args.checkpoint_seconds,
                      batch=args.batch, lr=args.lr, seed=args.seed)
    print(f"done: {out}" + (f" and {args.export}" if args.export else ""))
    return 0


def _evaluate_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m world.judge_training evaluate",
                                 description="Judge accuracy on new renders, frontal and at yaw -30 / +30.")
    ap.add_argument("--judge", required=True, help="judge .safetensors")
    ap.add_argument("--num", type=int, default=300, help="identities to render (default 300)")
    ap.add_argument("--seed", type=int, default=3, help="identity seed; not the training data set's (default 3)")
    ap.add_argument("--split", default="all", choices=("train", "heldout", "all"),
                    help="identities without / with held-out attribute pairs, or all (default)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--misses", help="write a PNG contact sheet of every view's misses here (true value in "
                    "green over the judge's reading in red; none, and an earlier file removed, when there is no miss)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    results = evaluate_judge(args.judge, args.num, args.seed, args.split, progress=not args.no_progress,
                             misses=args.misses)
    if args.out:
        write_json(results, args.out)
    print(markdown_table(results))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["evaluate"]:
            return _evaluate_main(argv[1:])
        return _train_main(argv)
    except (DatasetError, CheckpointError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
