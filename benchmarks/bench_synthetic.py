"""Rendering speed of the synthetic portrait world at 64x64 on this CPU.

    python -m benchmarks.bench_synthetic [--repeats 5] [--batch 64]

Prints images per minute (median of repeated runs, wall clock and process CPU time) for:
the renderer alone with frontal and with FFHQ-like poses, at the default torch thread count
and with one thread, and the data set writer end to end (poses, captions, PNG encoding),
in-process and with two single-threaded worker processes (wall clock includes their
start-up). The machine may be shared: the load average is printed with the table, since
other processes slow multi-threaded torch down much more than single-threaded.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch

from dreamportrait.cameras import camera_label
from dreamportrait.synthetic.attributes import sample_identities
from dreamportrait.synthetic.dataset_writer import identity_views, write_dataset
from dreamportrait.synthetic.render import HeadBatch, render


def _timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``fn`` over ``repeats`` runs (after one warm-up)."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    n = args.batch
    identities = sample_identities(0, n, "train")
    poses = {"frontal": camera_label([0.0] * n, [0.0] * n),
             "FFHQ-like": torch.cat([identity_views(i, 1)[0] for i in identities])}
    default_threads = torch.get_num_threads()
    rows = []
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        for name, labels in poses.items():
            wall, cpu = _timed(lambda: render(HeadBatch(identities), labels, 64), args.repeats)
            rows.append((f"render, {name} poses", threads, n / wall * 60, n / cpu * 60))
        with tempfile.TemporaryDirectory() as tmp:
            counter = iter(range(10 ** 6))
            wall, cpu = _timed(lambda: write_dataset(os.path.join(tmp, str(next(counter))), n, 64, seed=0,
                                                     batch=n, progress=False), args.repeats)
        rows.append(("write_dataset (PNG + captions)", threads, n / wall * 60, n / cpu * 60))
    torch.set_num_threads(default_threads)
    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(10 ** 6))
        big = 4 * n  # several batches, so that both workers stay busy past their start-up
        wall, _ = _timed(lambda: write_dataset(os.path.join(tmp, str(next(counter))), big, 64, seed=0,
                                               batch=n, progress=False, workers=2), args.repeats)
    rows.append(("write_dataset, 2 worker processes", "2 x 1", big / wall * 60, None))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}; "
          f"64x64, 2x2 supersampling, batch {n}, median of {args.repeats}")
    print(f"| {'what':34} | threads | images/min (wall clock) | images per CPU-minute |")
    print(f"|{'-' * 36}|---------|-------------------------|-----------------------|")
    for what, threads, per_min, per_cpu_min in rows:
        cpu = "-" if per_cpu_min is None else f"{per_cpu_min:.0f}"  # workers' CPU is not this process's
        print(f"| {what:34} | {threads:>7} | {per_min:23.0f} | {cpu:>21} |")


if __name__ == "__main__":
    main()
