"""Shared timing helper for the benchmark scripts."""
from __future__ import annotations

import statistics
import time

import torch


def timed(fn, device: str, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds (CUDA work synchronised around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
