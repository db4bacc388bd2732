"""Training batches, drawn on EG3D's schedule: every optimiser step draws one micro-batch of
reals (images and their cameras) per ``grad_accum`` micro-batch, shared by all phases of the
step, and every phase that generates (G main, G density regularisation, D main) draws fresh
fakes for each micro-batch: latent codes z ~ N(0, I) and the camera and a caption of data-set
images drawn uniformly at random (EG3D draws its fakes' cameras so). D's R1 phase sees the reals only. Every draw comes from the sampler's own
generators, which its state dict holds, so a resumed run draws the same batches as an
uninterrupted one.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dreamportrait.synthetic.attributes import LATENT_DIMS, Identity, attributes_from_latent
from dreamportrait.synthetic.captions import complete_caption, named_values
from dreamportrait.synthetic.render import render
from train.data import PortraitDataset


def open_data(path: str) -> PortraitDataset:
    """The training data set (EG3D layout with captions), checked before any work starts."""
    if not path or not Path(path).exists():
        raise FileNotFoundError(f"data set {path!r} not found; create one with `python -m dreamportrait.synthetic "
                                "--out DIR ...` or `python -m train.prepare ...`, then pass data=DIR")
    return PortraitDataset(path, train=False)


@dataclass
class Reals:
    img: torch.Tensor            # (n, 3, R, R) in [-1, 1]
    c: torch.Tensor              # (n, 25) their cameras
    captions: list[str]          # one caption of each (read by a text-reading discriminator only)


@dataclass
class Fakes:
    z: torch.Tensor              # (n, z_dim) latent codes
    c: torch.Tensor              # (n, 25) cameras, those of data-set images drawn at random
    captions: list[str]          # one caption of each of those images

    def in_pairs(self) -> "Fakes":
        """The same fakes with items 2k and 2k+1 sharing item 2k's camera and caption, so that each
        pair differs only in z (for the mode-seeking term, ``STAGE.mode_seeking_weight``)."""
        if len(self.captions) % 2:
            raise ValueError(f"pairs need an even micro-batch, got {len(self.captions)} fakes")
        first = [k - k % 2 for k in range(len(self.captions))]
        return Fakes(self.z, self.c[first], [self.captions[k] for k in first])

    def completed_captions(self, mentions: int, share: float = 1.0) -> list[str]:
        """Each caption completed from its own z to ``mentions`` attributes
        (:func:`~dreamportrait.synthetic.captions.complete_caption`; ``STAGE.latent_prompt_mentions``):
        what the guidance reads, so that the teacher asks each latent for the unnamed attributes it
        stands for. With ``share`` < 1 (``STAGE.latent_prompt_share``) only that share of the
        captions, on average, is completed, and the others are kept as written. The choices (which
        to complete, the wording) are seeded by z's bytes, so a resumed run makes them alike."""
        self._check_latents("latent_prompt_mentions")
        out = []
        for caption, z in zip(self.captions, self.z.detach().cpu().numpy()):
            seed = _latent_seed(z)
            if share < 1 and np.random.default_rng([seed, 1]).random() >= share:
                out.append(caption)
                continue
            out.append(complete_caption(caption, z, np.random.default_rng(seed), mentions))
        return out

    def world_view(self, resolution: int) -> dict[str, torch.Tensor]:
        """The world's render of each fake's person, seen from its camera (``STAGE.world_depth_weight``,
        ``STAGE.world_colour_weight``): 'depth' and 'mask' (each (n, 1, R, R): ray distance, hit
        fraction) and 'rgb' ((n, 3, R, R) in [-1, 1]) of the head whose attributes are the caption's,
        completed from z as :meth:`completed_captions` completes them
        (:func:`~dreamportrait.synthetic.attributes.attributes_from_latent`), its proportions drawn
        from a seed of z's bytes."""
        self._check_latents("world_depth_weight / world_colour_weight")
        identities = [Identity(_latent_seed(z), attributes_from_latent(z, named_values(caption)))
                      for caption, z in zip(self.captions, self.z.detach().cpu().numpy())]
        out = render(identities, self.c.detach().cpu().float(), resolution, supersample=2)
        return {"depth": out["depth"].to(self.z.device), "mask": out["mask"].to(self.z.device),
                "rgb": (out["rgb"] * 2 - 1).to(self.z.device)}

    def _check_latents(self, setting: str):
        if self.z.shape[1] < LATENT_DIMS:
            raise ValueError(f"STAGE.{setting} reads the attributes z's first {LATENT_DIMS} components stand "
                             f"for, but this generator's z has {self.z.shape[1]}: set it to 0")


def _latent_seed(z: np.ndarray) -> int:
    """A seed from a latent's bytes: what a fake's completed caption and world head draw from, so a
    resumed run draws them alike."""
    return zlib.crc32(np.ascontiguousarray(z, dtype=np.float32).tobytes())


class BatchSampler:
    """Endless reals and fakes for one rank, from the data set held in memory as uint8.

    Reals walk a shuffled order of the images: the same permutation on every rank, each rank
    taking its own stride, so the shards are disjoint, and every image is a real once per pass.
    Fakes take the (camera, caption) of images drawn uniformly at random, so their poses and
    prompts follow the data without using up the reals' walk, and z ~ N(0, I). Three generators:
    ``order`` (one seed for all ranks), ``draws`` (per rank: the fakes' images, captions and z) and
    ``real_captions`` (per rank: which caption of each real, so drawing them changes no other draw)."""

    def __init__(self, data: PortraitDataset, z_dim: int, seed: int, rank: int = 0, world_size: int = 1):
        self.images, self.labels, self.captions = data.uint8_images(), data.labels, data.captions
        self.z_dim, self.rank, self.world = z_dim, rank, world_size
        self.order_gen = torch.Generator().manual_seed(seed)
        self.draws = torch.Generator().manual_seed(seed * 1000 + 500 + rank)
        self.real_captions = torch.Generator().manual_seed(seed * 1000 + 700 + rank)
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

    def _caption(self, i: int, generator: torch.Generator) -> str:
        caps = self.captions[i]
        return caps[int(torch.randint(len(caps), (1,), generator=generator))]

    def next_reals(self, n: int, device) -> Reals:
        """One micro-batch of reals: drawn once per step, shared by all its phases."""
        idx = self._take(n)
        return Reals(self.images[idx].to(device, torch.float32) / 127.5 - 1, self.labels[idx].to(device),
                     [self._caption(int(i), self.real_captions) for i in idx])

    def next_fakes(self, n: int, device) -> Fakes:
        """One micro-batch of fakes: drawn afresh for every phase that generates."""
        idx = torch.randint(len(self.labels), (n,), generator=self.draws)
        captions = [self._caption(int(i), self.draws) for i in idx]
        z = torch.randn(n, self.z_dim, generator=self.draws)
        return Fakes(z.to(device), self.labels[idx].to(device), captions)

    def state_dict(self) -> dict:
        return {"order_gen": self.order_gen.get_state(), "draws": self.draws.get_state(),
                "real_captions": self.real_captions.get_state(), "order": self.order, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.order_gen.set_state(state["order_gen"])
        self.draws.set_state(state["draws"])
        if "real_captions" in state:  # runs checkpointed before the reals carried captions start it afresh
            self.real_captions.set_state(state["real_captions"])
        self.order, self.pos = state["order"], int(state["pos"])
