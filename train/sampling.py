"""Training batches: reals from this rank's shard of the data set, and the fakes' latent codes,
cameras and captions. Every random draw of a batch comes from the sampler's own generators,
which its state dict holds, so a resumed run draws the same batches as an uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from train.data import PortraitDataset


def open_data(path: str) -> PortraitDataset:
    """The training data set (EG3D layout with captions), checked before any work starts."""
    if not path or not Path(path).exists():
        raise FileNotFoundError(f"data set {path!r} not found; create one with `python -m dreamportrait.synthetic "
                                "--out DIR ...` or `python -m train.prepare ...`, then pass data=DIR")
    return PortraitDataset(path, train=False)


@dataclass
class Batch:
    real_img: torch.Tensor       # (n, 3, R, R) in [-1, 1]
    real_c: torch.Tensor         # (n, 25) their cameras
    gen_z: torch.Tensor          # (n, z_dim) the fakes' latent codes
    gen_c: torch.Tensor          # (n, 25) the fakes' cameras, drawn from the data set
    gen_captions: list[str]      # the fakes' captions, drawn from the same images' captions


class BatchSampler:
    """Endless batches for one rank, from the data set held in memory as uint8.

    Reals walk a shuffled order of the images: the same permutation on every rank, each rank
    taking its own stride, so the shards are disjoint. Fakes take the (camera, caption) of further
    images, so their poses and prompts follow the data, and z ~ N(0, I). Two generators: ``order``
    (one seed for all ranks) and ``draws`` (per rank: captions and z)."""

    def __init__(self, data: PortraitDataset, z_dim: int, seed: int, rank: int = 0, world_size: int = 1):
        self.images, self.labels, self.captions = data.uint8_images(), data.labels, data.captions
        self.z_dim, self.rank, self.world = z_dim, rank, world_size
        self.order_gen = torch.Generator().manual_seed(seed)
        self.draws = torch.Generator().manual_seed(seed * 1000 + 500 + rank)
        self.order, self.pos = self._new_order(), 0

    def _new_order(self) -> torch.Tensor:
        perm = torch.randperm(len(self.labels), generator=self.order_gen)
        return perm[self.rank::self.world] if len(self.labels) >= self.world else perm

    def _take(self, k: int) -> torch.Tensor:
        out = []
        while len(out) < k:
            if self.pos >= len(self.order):
                self.order, self.pos = self._new_order(), 0
            out.append(int(self.order[self.pos]))
            self.pos += 1
        return torch.tensor(out)

    def _caption(self, i: int) -> str:
        caps = self.captions[i]
        return caps[int(torch.randint(len(caps), (1,), generator=self.draws))]

    def next_batch(self, n: int, device) -> Batch:
        idx, gen_idx = self._take(n), self._take(n)
        captions = [self._caption(int(i)) for i in gen_idx]
        z = torch.randn(n, self.z_dim, generator=self.draws)
        real = self.images[idx].to(device, torch.float32) / 127.5 - 1
        return Batch(real, self.labels[idx].to(device), z.to(device), self.labels[gen_idx].to(device), captions)

    def state_dict(self) -> dict:
        return {"order_gen": self.order_gen.get_state(), "draws": self.draws.get_state(),
                "order": self.order, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.order_gen.set_state(state["order_gen"])
        self.draws.set_state(state["draws"])
        self.order, self.pos = state["order"], int(state["pos"])
