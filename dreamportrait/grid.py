"""Image tensors -> uint8 arrays, grids and PNG files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoints import atomic_file


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """(N, C, H, W) or (C, H, W) images -> (N, H, W, C) or (H, W, C) uint8; 1 channel -> 3.

    ``value_range`` (low, high) maps to 0 and 255: (-1, 1) for the generator's images, (0, 1) for
    the synthetic renderer's. Values are clamped and rounded to the nearest level (halves up).
    """
    low, high = value_range
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    x = (images.detach().float().cpu() - low) * (255.0 / (high - low))
    x = (x + 0.5).clamp(0, 255).to(torch.uint8)
    if x.shape[-3] == 1:
        x = x.repeat_interleave(3, dim=-3)
    return x.movedim(-3, -1).numpy()


def make_grid(images: torch.Tensor, ncol: int) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one (rows*H, ncol*W, 3) uint8 array."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    rows = -(-n // ncol)
    grid = np.zeros((rows * h, ncol * w, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = arr[i]
    return grid


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 HxWx3 array as PNG atomically."""
    path = Path(path)
    with atomic_file(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return path


def save_grid(images: torch.Tensor, path: str | Path, ncol: int) -> Path:
    return save_png(make_grid(images, ncol), path)
