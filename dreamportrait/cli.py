"""Command line: render portraits, orbit videos and meshes with the same pipeline as the app.

    python -m dreamportrait generate --prompt "A bald man with sunglasses." --seeds 0-3 --views 5 --out out/
    python -m dreamportrait generate --prompt "An old woman with white hair." --seeds 1,5,9 --yaw 20 --video --mesh
    python -m dreamportrait generate --prompt "A smiling man." --prompt "A woman with red hair." --seeds 0-2 \
        --views 3 --grid out/figure.png

File names state the prompt, seed and view: ``{prompt-slug}_seed{seed}_yaw{yaw}_pitch{pitch}.png``,
``{prompt-slug}_seed{seed}_orbit.mp4`` and ``{prompt-slug}_seed{seed}_mesh{res}.glb``. ``--grid FILE`` also
writes every still into one labelled figure: a row per prompt and seed, a column per view.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .app_logic import (
    PITCH_LIMIT, YAW_LIMIT, InputError, StartupError, check_prompt, load_pipeline, parse_number, parse_seed,
)
from .cameras import yaw_sweep
from .grid import labelled_grid, save_png, to_uint8
from .mesh import DEFAULT_THRESHOLD, MESH_SUFFIXES, extract_mesh
from .video import orbit_video

MAX_SEEDS = 10_000


def parse_seeds(text: str) -> list[int]:
    """'0-3' -> [0, 1, 2, 3]; '1,5,9' -> [1, 5, 9]; both mix ('0-2,7'); duplicates dropped, order kept."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if match:
            lo, hi = (parse_seed(v) for v in match.groups())
            if lo > hi:
                raise InputError(f"seed range {part!r} runs backwards: write it low-high, e.g. {hi}-{lo}")
            if hi - lo + 1 > MAX_SEEDS:
                raise InputError(f"seed range {part!r} has {hi - lo + 1} seeds; at most {MAX_SEEDS} per run")
            seeds.extend(range(lo, hi + 1))
        else:
            seeds.append(parse_seed(part))
    seeds = list(dict.fromkeys(seeds))
    if len(seeds) > MAX_SEEDS:
        raise InputError(f"{len(seeds)} seeds given; at most {MAX_SEEDS} per run")
    return seeds


def slug(prompt: str, max_len: int = 48) -> str:
    """A file-name-safe prompt: lower-case words joined by '-', cut at a word boundary."""
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    out = ""
    for word in words:
        if len(out) + len(word) + 1 > max_len:
            break
        out = f"{out}-{word}" if out else word
    return out or "portrait"


def views(args) -> list[tuple[float, float]]:
    """(yaw, pitch) in degrees of every still to write."""
    pitch = parse_number(args.pitch, "--pitch", -PITCH_LIMIT, PITCH_LIMIT)
    if args.views is None:
        return [(parse_number(0.0 if args.yaw is None else args.yaw, "--yaw", -YAW_LIMIT, YAW_LIMIT), pitch)]
    if args.yaw is not None:
        raise InputError("--yaw and --views exclude each other: give one camera with --yaw/--pitch, "
                         "or N views spread over ±--max-yaw with --views N")
    if args.views < 1:
        raise InputError(f"--views must be at least 1, got {args.views}")
    if args.views == 1:
        return [(0.0, pitch)]
    yaws, _ = yaw_sweep(args.views, parse_number(args.max_yaw, "--max-yaw", 0.0, YAW_LIMIT))
    return [(round(float(y), 2), pitch) for y in yaws]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dreamportrait", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="render portraits (PNG), and optionally orbit videos and meshes",
                       description="Render portraits for one or more prompts and seeds into --out.")
    g.add_argument("--prompt", action="append", required=True,
                   help="text description of the portrait; repeat the flag for several prompts")
    g.add_argument("--seeds", default="0", help="seeds: a range '0-3', a list '1,5,9' or both '0-2,7' (default 0)")
    g.add_argument("--psi", type=float, default=0.7, help="truncation psi in [0, 1]; lower: more typical faces (default 0.7)")
    g.add_argument("--yaw", type=float, default=None, help=f"camera yaw in degrees, ±{YAW_LIMIT:g} (default 0)")
    g.add_argument("--pitch", type=float, default=0.0, help=f"camera pitch in degrees, ±{PITCH_LIMIT:g} (default 0)")
    g.add_argument("--views", type=int, default=None,
                   help="instead of --yaw: N views with yaws evenly spread over ±--max-yaw")
    g.add_argument("--max-yaw", type=float, default=30.0, help="yaw extent of --views in degrees (default 30)")
    g.add_argument("--video", action="store_true", help="also write an orbit video (EG3D's ellipse) per seed")
    g.add_argument("--frames", type=int, default=60, help="orbit video length in frames (default 60)")
    g.add_argument("--fps", type=float, default=30.0, help="orbit video frame rate (default 30)")
    g.add_argument("--mesh", action="store_true", help="also write a marching-cubes mesh with vertex colours")
    g.add_argument("--mesh-resolution", type=int, default=128, help="mesh grid points per side (default 128)")
    g.add_argument("--mesh-threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"raw density level of the surface (default {DEFAULT_THRESHOLD:g}, as EG3D)")
    g.add_argument("--mesh-format", default=".glb", choices=MESH_SUFFIXES, help="mesh file format (default .glb)")
    g.add_argument("--checkpoint", default=None,
                   help="generator.safetensors or its folder (default: the app's model under checkpoints/)")
    g.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda if present)")
    g.add_argument("--out", required=True, help="output folder (created if missing)")
    g.add_argument("--grid", default=None, help="also write all stills into this labelled PNG figure "
                   "(a row per prompt and seed, a column per view)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def generate(args) -> list[Path]:
    """Write every requested file; returns their paths."""
    prompts = [check_prompt(p) for p in args.prompt]
    seeds, cameras = parse_seeds(args.seeds), views(args)
    psi = parse_number(args.psi, "--psi", 0.0, 1.0)
    if args.video and args.frames < 1:
        raise InputError(f"--frames must be at least 1, got {args.frames}")
    if args.mesh and args.mesh_resolution < 2:
        raise InputError(f"--mesh-resolution must be at least 2, got {args.mesh_resolution}")
    pipeline = load_pipeline(args.checkpoint, args.device)
    out = Path(args.out)
    written: list[Path] = []
    figure, labels = [], []
    steps = len(prompts) * len(seeds) * (len(cameras) + args.video + args.mesh)
    with tqdm(total=steps, unit="file", disable=args.no_progress, file=sys.stderr) as bar:
        for prompt in prompts:
            for seed in seeds:
                portrait = pipeline.portrait(prompt, seed, psi)
                for message in portrait.warnings:
                    bar.write(f"warning: {message}")
                stem = f"{slug(prompt)}_seed{seed}"
                labels.append(f"{prompt} (seed {seed})")
                for yaw, pitch in cameras:
                    image = pipeline.render(portrait, yaw, pitch)["image"]
                    figure.append(image)
                    written.append(save_png(to_uint8(image[0]), out / f"{stem}_yaw{yaw:+g}_pitch{pitch:+g}.png"))
                    bar.update()
                if args.video:
                    written.append(orbit_video(pipeline.G, portrait.planes, portrait.ws,
                                               out / f"{stem}_orbit.mp4", args.frames, args.fps))
                    bar.update()
                if args.mesh:
                    mesh = extract_mesh(pipeline.G, portrait.planes, args.mesh_resolution, args.mesh_threshold)
                    written.append(mesh.save(out / f"{stem}_mesh{args.mesh_resolution}{args.mesh_format}"))
                    bar.update()
    if args.grid:
        written.append(save_png(labelled_grid(torch.cat(figure), labels, len(cameras)), args.grid))
    return written


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = generate(args)
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # InputError, and e.g. a mesh threshold with no surface
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
