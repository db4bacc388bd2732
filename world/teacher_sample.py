"""Sample image grids from a Stable-Diffusion-style teacher folder (rows: prompts, columns: seeds).

    python -m world.teacher_sample --teacher checkpoints/synthetic-teacher \\
        --prompt "A bald man wearing earrings" --prompt "A young woman with white hair" \\
        --seeds 0-7 --guidance 7.5 --steps 50 --out assets/teacher_samples.png

The folder is loaded exactly as distribution SDS loads its teacher (``DiffusionTeacher``) and
sampled with DDIM and classifier-free guidance (``--guidance 1``: no guidance). Each seed fixes
the initial latent, so a column shares its noise across prompts.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import torch

from dreamportrait.grid import labelled_grid, save_png


def parse_seeds(text: str) -> list[int]:
    """``"0-7"``, ``"3"`` or ``"1,4,9"`` (ranges inclusive) -> a list of seeds."""
    seeds = []
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            seeds += list(range(int(low), int(high) + 1)) if high else [int(low)]
    except ValueError as error:
        raise ValueError(f"--seeds {text!r}: use a seed (3), a range (0-7) or a list (1,4,9)") from error
    if not seeds:
        raise ValueError(f"--seeds {text!r} names no seed")
    return seeds


def sample_teacher(teacher, prompts: Sequence[str], seeds: Sequence[int], guidance: float,
                   steps: int) -> torch.Tensor:
    """Images in [-1, 1], prompt-major, from a loaded ``DiffusionTeacher``."""
    from world.teacher_training import sample_images
    return sample_images(teacher.unet, teacher.vae, teacher.encode_prompts, prompts, seeds, guidance, steps)


def main(argv: Sequence[str] | None = None) -> Path:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap = argparse.ArgumentParser(prog="python -m world.teacher_sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="Stable-Diffusion-style pipeline folder")
    ap.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for more rows)")
    ap.add_argument("--seeds", default="0-3", help="columns: 0-7, 3 or 1,4,9")
    ap.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (1 = none)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ap.add_argument("--out", required=True, help="PNG file to write")
    args = ap.parse_args(argv)
    from train.teacher import DiffusionTeacher
    try:
        seeds = parse_seeds(args.seeds)
        if args.steps < 1:
            raise ValueError(f"--steps {args.steps}: need at least one step")
        teacher = DiffusionTeacher.from_pretrained(args.teacher)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
    images = sample_teacher(teacher, args.prompt, seeds, args.guidance, args.steps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(labelled_grid(images, args.prompt, len(seeds)), out)
    print(f"wrote {out} ({len(args.prompt)} prompts x {len(seeds)} seeds, guidance {args.guidance}, "
          f"{args.steps} DDIM steps)")
    return out


if __name__ == "__main__":
    main()
