"""A synthetic-world data set held in memory: images, captions and true attributes.

The judge, the small CLIP and the small teacher all train on the synthetic world's data sets
(written by ``python -m dreamportrait.synthetic``). At 64x64 a data set of ten thousand images
is 120 MB as uint8, so it is decoded once and every batch is an index into memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from train.data import DatasetError, PortraitDataset


@dataclass
class WorldData:
    """N images (uint8, N x 3 x H x W) with their captions, attributes, identities and views."""

    path: str
    images: torch.Tensor
    captions: list[list[str]]
    attributes: list[dict]
    identity_seeds: np.ndarray
    yaw: np.ndarray
    pitch: np.ndarray

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WorldData":
        """Decode a synthetic data set (folder or zip); it must carry ``attributes.json``."""
        if not os.path.exists(path):
            raise DatasetError(f"data set {path} not found; write one with `python -m dreamportrait.synthetic "
                               f"--out {path} --num 10000 --res 64`")
        ds = PortraitDataset(path, train=False)
        if ds.attributes is None:
            raise DatasetError(f"{path} has no attributes.json: only synthetic-world data sets (written by "
                               "`python -m dreamportrait.synthetic`) carry the true attributes these models need")
        images = ds.uint8_images()
        records = [ds.attributes[name] for name in ds.names]
        return cls(path=str(path), images=images, captions=ds.captions,
                   attributes=[r["attributes"] for r in records],
                   identity_seeds=np.array([r["identity_seed"] for r in records], dtype=np.int64),
                   yaw=np.array([r["yaw"] for r in records]), pitch=np.array([r["pitch"] for r in records]))

    def __len__(self) -> int:
        return len(self.images)

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def float_images(self, idx) -> torch.Tensor:
        """Images ``idx`` as float32 in [-1, 1]."""
        return self.images[idx].to(torch.float32) / 127.5 - 1.0

    def random_captions(self, idx, rng: np.random.Generator) -> list[str]:
        """One of each image's captions, drawn with ``rng``."""
        return [self.captions[i][int(rng.integers(len(self.captions[i])))] for i in np.asarray(idx).tolist()]
