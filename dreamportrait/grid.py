"""Image tensors -> uint8 arrays, grids and PNG files."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

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


def labelled_grid(images: torch.Tensor, labels: Sequence[str], columns: int, scale: int = 2,
                  label_width: int = 260) -> np.ndarray:
    """Images in [-1, 1] (N, C, H, W), ``columns`` to a row, each row's label written on its left
    (one label per row), tiles upscaled ``scale`` times: a (H', W', 3) uint8 array."""
    rows = -(-len(images) // columns)
    if len(labels) != rows:
        raise ValueError(f"{len(labels)} labels for {rows} rows of {columns} images")
    pixels = to_uint8(images)
    size, pad = images.shape[-1] * scale, 2
    grid = Image.new("RGB", (label_width + columns * (size + pad), rows * (size + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(pixels):
        row, col = divmod(i, columns)
        grid.paste(Image.fromarray(image).resize((size, size), Image.NEAREST),
                   (label_width + col * (size + pad), row * (size + pad)))
    for row, label in enumerate(labels):
        draw.multiline_text((4, row * (size + pad) + 4), "\n".join(textwrap.wrap(label, int(label_width / 6.5))),
                            fill="black")
    return np.asarray(grid)
