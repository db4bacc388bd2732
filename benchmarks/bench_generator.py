"""Per-stage timings of the tri-plane generator (median over repeats), CPU or CUDA.

    python -m benchmarks.bench_generator                       # tiny + eg3d-ffhq-512 on the CPU
    python -m benchmarks.bench_generator --device cuda         # + frames/s and peak memory, fp32 and fp16

Stages at batch 1: mapping, backbone (tri-plane synthesis), volume rendering, super-resolution,
the full forward pass, and a re-render from cached tri-planes (camera-only change, the app's
orbit path). Random weights: timings do not depend on the weight values.
"""
from __future__ import annotations

import argparse
import contextlib
import platform

import torch

from benchmarks.timing import timed
from dreamportrait.cameras import camera_label, camera_rays
from dreamportrait.generator import TriPlaneGenerator, preset


def bench(name: str, device: str, repeats: int, half: bool = False) -> dict:
    torch.manual_seed(0)
    G = TriPlaneGenerator(preset(name)).eval().to(device)
    cfg = G.config
    z = torch.randn(1, cfg.z_dim, device=device)
    c = camera_label(0.0, 0.0).to(device)
    c2 = camera_label(20.0, 5.0).to(device)
    autocast = torch.autocast(device, dtype=torch.float16) if half else contextlib.nullcontext()
    res = {}
    with torch.no_grad(), autocast:
        ws = G.mapping(z, c)
        planes = G.synthesize_planes(ws, noise_mode="const")
        nrr = G.config.neural_rendering_resolution
        origins, dirs = camera_rays(c, nrr)
        opts = cfg.render_options(deterministic=True)
        feats, _, _ = G.renderer(planes, G.decoder, origins, dirs, opts)
        feat_img = feats.permute(0, 2, 1).reshape(1, -1, nrr, nrr)
        res["mapping"] = timed(lambda: G.mapping(z, c), device, repeats)
        res["backbone"] = timed(lambda: G.synthesize_planes(ws, noise_mode="const"), device, repeats)
        res["rendering"] = timed(lambda: G.renderer(planes, G.decoder, origins, dirs, opts), device, repeats)
        res["super-resolution"] = timed(lambda: G.superresolution(feat_img[:, :3], feat_img, ws), device, repeats)
        res["full forward"] = timed(lambda: G(z, c, noise_mode="const", deterministic=True), device, repeats)
        res["re-render (cached planes)"] = timed(lambda: G.render(planes, ws, c2, deterministic=True), device, repeats)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            G(z, c, noise_mode="const", deterministic=True)
            res["peak memory GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
    res["resolution"] = f"{cfg.img_resolution} (neural {cfg.neural_rendering_resolution}, "
    res["resolution"] += f"{cfg.depth_resolution}+{cfg.depth_resolution_importance} samples)"
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--presets", nargs="+", default=["tiny", "eg3d-ffhq-512"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {args.device} ({machine}); torch {torch.__version__}; batch 1; median of {args.repeats}")
    precisions = [False, True] if args.device == "cuda" else [False]
    stages = ["mapping", "backbone", "rendering", "super-resolution", "full forward", "re-render (cached planes)"]
    for name in args.presets:
        for half in precisions:
            r = bench(name, args.device, args.repeats, half)
            print(f"\n{name} [{'fp16 autocast' if half else 'fp32'}] output {r['resolution']}")
            print("| stage | ms | frames/s |\n|---|---|---|")
            for s in stages:
                print(f"| {s} | {r[s] * 1e3:.1f} | {1 / r[s]:.2f} |")
            if "peak memory GiB" in r:
                print(f"| peak memory (full forward) | {r['peak memory GiB']:.2f} GiB | |")


if __name__ == "__main__":
    main()
