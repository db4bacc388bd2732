"""Timings of the text-conditioning modules (median over repeats), CPU or CUDA.

    python -m benchmarks.bench_text_adapters                    # CPU: tiny widths + paper widths
    python -m benchmarks.bench_text_adapters --device cuda --batch 4

One 3D-aware gated cross-attention adapter per row (77 word tokens, gate open), forward alone
and forward + backward, at the backbone widths of the ``tiny`` generator preset (text width 64)
and of EG3D's FFHQ model (512 up to 64^2, 256 at 128^2, 128 at 256^2; OpenCLIP ViT-H text
width 1024); plus the semantics mapping network. Random weights: timings do not depend on them.
"""
from __future__ import annotations

import argparse
import platform

import torch

from benchmarks.timing import timed
from dreamportrait.generator import preset
from dreamportrait.text_conditioning import GatedCrossAttention3D, SemanticsMapping

CONTEXT = 77


def bench_adapter(res: int, channels: int, text_dim: int, batch: int, device: str, repeats: int) -> dict:
    torch.manual_seed(0)
    adapter = GatedCrossAttention3D(channels, text_dim).to(device)
    with torch.no_grad():
        adapter.gamma.fill_(0.5)
    x = torch.randn(batch, channels, res, res, device=device, requires_grad=True)
    tokens = torch.randn(batch, CONTEXT, text_dim, device=device)
    mask = (torch.arange(CONTEXT, device=device) < 12).expand(batch, CONTEXT)

    def step():
        adapter(x, tokens, mask).square().mean().backward()

    with torch.no_grad():
        fwd = timed(lambda: adapter(x, tokens, mask), device, repeats)
    out = {"forward": fwd, "forward+backward": timed(step, device, repeats)}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        out["peak GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--paper-resolutions", type=int, nargs="+", default=[4, 16, 64, 128, 256])
    args = ap.parse_args()
    machine = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"device: {args.device} ({machine}); torch {torch.__version__}; batch {args.batch}; "
          f"{CONTEXT} tokens; median of {args.repeats}")
    tiny = preset("tiny").block_channels()
    paper = preset("eg3d-ffhq-512").block_channels()
    rows = [("tiny", r, tiny[r], 64) for r in sorted(tiny)]
    rows += [("paper", r, paper[r], 1024) for r in args.paper_resolutions]
    print(f"{'widths':<7}{'res':>5}{'C':>6}{'C_plane':>8}{'text':>6}{'forward ms':>12}{'fwd+bwd ms':>12}"
          + ("   peak GiB" if args.device == "cuda" else ""))
    for name, res, channels, text_dim in rows:
        t = bench_adapter(res, channels, text_dim, args.batch, args.device, args.repeats)
        line = (f"{name:<7}{res:>5}{channels:>6}{-(-channels // 3):>8}{text_dim:>6}"
                f"{1e3 * t['forward']:>12.2f}{1e3 * t['forward+backward']:>12.2f}")
        print(line + (f"{t['peak GiB']:>11.2f}" if "peak GiB" in t else ""))
    for name, text_dim, w_dim, num_ws in (("tiny", 64, preset("tiny").w_dim, 10), ("paper", 1024, 512, 14)):
        torch.manual_seed(0)
        sm = SemanticsMapping(text_dim, w_dim).to(args.device)
        w = torch.randn(args.batch, num_ws, w_dim, device=args.device)
        eot = torch.randn(args.batch, text_dim, device=args.device)
        with torch.no_grad():
            t = timed(lambda: sm(w, eot), args.device, args.repeats)
        print(f"semantics mapping ({name}: text {text_dim}, w {w_dim} x {num_ws}): forward {1e3 * t:.3f} ms")


if __name__ == "__main__":
    main()
