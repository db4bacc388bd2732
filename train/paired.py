"""The paired warm start of the synthetic world's prior: G(z) learns to draw the world's head(z).

The world's sampler is ours, so a latent can *be* an identity: the first
:data:`~dreamportrait.synthetic.attributes.LATENT_DIMS` components of z pick its attributes by
their normal quantiles (:func:`~dreamportrait.synthetic.attributes.attributes_from_latent`), so
z ~ N(0, I) gives the world's attribute distribution exactly. Each step draws z (the training
split only: a latent whose attributes form a held-out pair is drawn again), FFHQ-like cameras
and identity seeds (the small continuous variation of proportions and colours, which z does not
encode), renders head(z) with the world's ray tracer, and trains G(z, c) to reproduce the render:
L1 on the final image plus ``raw_weight`` x L1 on the neural-rendering-resolution image against
the render resized to it. Every view of every identity is a fresh render, so the generator learns
one 3D head per z rather than a data set.

There is no discriminator: this stage only warm-starts the generator. The prior stage then starts
from this run folder (``prior.init=runs/PRESET/paired``) and finishes with EG3D's GAN objective,
which sharpens the samples, uses the latent's free components for variation and trains the
discriminator the later stages need.

Batches are a pure function of (seed, step), rendered by ``workers`` single-threaded processes,
so a resumed run (``--resume``) continues exactly. One process (no torchrun).
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dreamportrait.cameras import camera_label
from dreamportrait.checkpoints import GENERATOR_FILE
from dreamportrait.generator import TriPlaneGenerator
from dreamportrait.synthetic.attributes import Identity, attributes_from_latent, in_split
from dreamportrait.synthetic.cameras import sample_labels
from dreamportrait.synthetic.dataset_writer import single_thread_worker
from dreamportrait.synthetic.render import render
from train.config import TrainConfig
from train.ema import ema_beta, update_ema
from train.loop import image_l1, param_groups
from train.models import generator_config, init_folder
from train.run_files import RunFiles


@dataclass
class PairedBatch:
    z: torch.Tensor          # (n, z_dim)
    c: torch.Tensor          # (n, 25) the cameras the targets were rendered from
    target: torch.Tensor     # (n, 3, R, R) the world's renders of head(z), in [-1, 1]


def train_latents(rng: np.random.Generator, n: int, z_dim: int) -> np.ndarray:
    """``n`` latents z ~ N(0, I) of the training split (those naming a held-out pair are redrawn)."""
    out = []
    while len(out) < n:
        z = rng.standard_normal(z_dim)
        if in_split(attributes_from_latent(z), "train"):
            out.append(z)
    return np.stack(out).astype(np.float32)


def paired_batch(seed: int, step: int, n: int, z_dim: int, resolution: int) -> PairedBatch:
    """Batch ``step`` of the stream of ``seed``: latents, cameras and the world's renders."""
    rng = np.random.default_rng([seed, step])
    z = train_latents(rng, n, z_dim)
    identities = [Identity(int(s), attributes_from_latent(v))
                  for s, v in zip(rng.integers(0, 2 ** 63, n), z)]
    labels = sample_labels(rng, n)[0]
    target = render(identities, labels, resolution)["rgb"] * 2 - 1
    return PairedBatch(torch.from_numpy(z), labels, target)


class PairedStream(torch.utils.data.IterableDataset):
    """Batches ``first``, ``first + 1``, ... of a seed's stream. Under a DataLoader with W workers,
    worker w renders batches first + w, first + w + W, ..., which the loader yields in order."""

    def __init__(self, seed: int, first: int, n: int, z_dim: int, resolution: int):
        self.seed, self.first, self.n, self.z_dim, self.resolution = seed, first, n, z_dim, resolution

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.first + worker
        while True:
            yield paired_batch(self.seed, step, self.n, self.z_dim, self.resolution)
            step += workers


def _as_is(batch: PairedBatch) -> PairedBatch:
    return batch


def batches(seed: int, first: int, n: int, z_dim: int, resolution: int, workers: int):
    """The stream from batch ``first`` on, rendered in ``workers`` processes (0: in this one)."""
    stream = PairedStream(seed, first, n, z_dim, resolution)
    if workers == 0:
        return iter(stream)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                         worker_init_fn=single_thread_worker, prefetch_factor=2, collate_fn=_as_is,
                                         generator=torch.Generator())  # leaves the global RNG (G's noise) alone
    return iter(loader)


def paired_loss(G, batch: PairedBatch, raw_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 between G(z, c) and the render, on the final image and on the raw (neural) image."""
    image, raw = image_l1(G(batch.z, batch.c), batch.target)
    return image + raw_weight * raw, {"loss/l1_image": image.item(), "loss/l1_raw": raw.item()}


@torch.no_grad()
def comparison_grid(G_ema, seed: int, resolution: int, num: int = 6) -> torch.Tensor:
    """Fixed latents: the world's frontal render (top row) above G_ema's (bottom row)."""
    batch = paired_batch(seed + 10_000, 0, num, G_ema.config.z_dim, resolution)
    c = camera_label(0.0, 0.0).repeat(num, 1)
    target = render([Identity(i, attributes_from_latent(v)) for i, v in enumerate(batch.z)], c, resolution)["rgb"]
    return torch.cat([target * 2 - 1, G_ema(batch.z, c, noise_mode="const", deterministic=True)["image"]])


def train_paired(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True):
    """Run the paired stage of ``cfg`` into ``run_dir``; returns (G_ema, images seen)."""
    run_dir = Path(run_dir)
    st = cfg.paired
    if st.workers < 0:
        raise ValueError(f"paired.workers must be >= 0, got {st.workers}")
    torch.manual_seed(cfg.seed)
    folder = init_folder(cfg, "paired")
    G = (TriPlaneGenerator.from_pretrained(folder / GENERATOR_FILE) if folder is not None
         else TriPlaneGenerator(generator_config(cfg.generator))).train()
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    for seed in (torch.manual_seed, np.random.seed, random.seed):
        seed(cfg.seed * 1000)
    opt = torch.optim.Adam(param_groups(G, list(G.parameters()), st.lr, st.mapping_full_rate), betas=tuple(st.betas),
                           eps=cfg.optim.eps)

    settings = {"stage": "paired", **cfg.to_dict()}
    del settings["paired"]["kimg"]
    run = RunFiles(run_dir, settings, total=int(st.kimg * 1000), resume=resume, progress=progress, desc="paired")
    if run.state is not None:
        for module, key in ((G, "G"), (G_ema, "G_ema"), (opt, "opt")):
            module.load_state_dict(run.state[key])
    resolution = G.config.img_resolution

    def checkpoint():
        run.save({"G": G.state_dict(), "G_ema": G_ema.state_dict(), "opt": opt.state_dict()})
        G_ema.save_pretrained(run_dir / GENERATOR_FILE, extra={
            "stage": "paired", "kimg": run.nimg / 1000, "kimg_total": run.nimg / 1000, "train_preset": cfg.preset,
            "data": "the synthetic world, rendered for each step"})

    stream = batches(cfg.seed, run.steps, cfg.batch, G.config.z_dim, resolution, st.workers) if not run.done else None
    while not run.done:
        batch = next(stream)
        loss, stats = paired_loss(G, batch, st.raw_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(G_ema, G, ema_beta(cfg.batch, cfg.optim.ema_kimg * cfg.batch / 32, cfg.optim.ema_rampup, run.nimg))
        before = run.nimg
        run.step(cfg.batch, stats)
        if run.crossed(cfg.image_every_kimg, before):
            run.image_grid("paired", comparison_grid(G_ema, cfg.seed, resolution), nrow=6)
        if run.crossed(cfg.snapshot_every_kimg, before):
            checkpoint()
    if run.steps == 0:
        checkpoint()
    run.close()
    return G_ema, run.nimg
