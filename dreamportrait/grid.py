"""Image tensors -> uint8 arrays, grids and PNG files."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) or (C, H, W) in [-1, 1] -> (N, H, W, C) or (H, W, C) uint8; 1 channel -> 3."""
    x = images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
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
    """Write a uint8 HxWx3 array as PNG atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_grid(images: torch.Tensor, path: str | Path, ncol: int) -> Path:
    return save_png(make_grid(images, ncol), path)
