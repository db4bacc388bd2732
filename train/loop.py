"""The training loop of every stage, top to bottom.

Each optimiser step runs EG3D's phases: G main (the generator's objective ``gan_weight * GAN +
guidance``; the guidance is distribution SDS in stage 2, or its variational extension, none
before), G density regularisation every ``g_reg_interval`` steps, D main, D R1 every
``d_reg_interval`` steps, with lazy-regularisation learning-rate/beta adjustment and gradient
averaging across ranks; then the generator's EMA. Draws follow EG3D's schedule: per step, one
micro-batch of reals for each of the ``grad_accum`` micro-batches, shared by all phases; per
phase that generates (G main, G reg, D main), fresh fakes (z, camera, caption) for each
micro-batch and their captions' text condition, so D main never judges the samples G main has
just optimised. The run folder (:class:`RunFiles`) logs every step and checkpoints atomically,
so ``resume=True`` continues exactly.
"""
from __future__ import annotations

import contextlib
import copy
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dreamportrait.cameras import camera_label
from dreamportrait.checkpoints import GENERATOR_FILE
from dreamportrait.layers import FullyConnectedLayer
from dreamportrait.ops import resize
from dreamportrait.synthetic.render import coarser
from train.config import TrainConfig
from train.distributed import (BufferAverager, DistInfo, average_gradients, broadcast_module, cleanup,
                               init_distributed)
from train.ema import ema_beta, update_ema
from train.gan_loss import GANLoss
from train.guidance import Guidance
from train.models import build_models, export
from train.run_files import RunFiles
from train.sampling import BatchSampler, Fakes, Reals, open_data


@dataclass
class TrainResult:
    generator_file: Path
    G: torch.nn.Module
    G_ema: torch.nn.Module
    D: torch.nn.Module
    cur_nimg: int


@dataclass
class Phase:
    name: str            # 'Gmain', 'Greg', 'Dmain' or 'Dreg'
    module: str          # 'G' or 'D'
    interval: int
    generates: bool      # draws fresh fakes for each micro-batch (all but R1, which sees reals only)


def param_groups(G: torch.nn.Module, params: list[torch.nn.Parameter], lr: float, mapping_full_rate: bool) -> list[dict]:
    """Adam groups of ``params`` (G's trainable ones). EG3D's mapping layers (and the semantics
    mapping's) learn at lr x 0.01 (their equalised-lr multiplier), which steadies a GAN; with
    ``mapping_full_rate`` (``STAGE.mapping_full_rate``, the paired warm start's default) those layers
    get lr / multiplier, so their weights move at the rate of every other layer's: z then comes to
    name attributes through the mapping in thousands of images rather than hundreds of thousands."""
    if not mapping_full_rate:
        return [{"params": params, "lr": lr}]
    trainable = {id(p) for p in params}
    slow = [m for m in G.modules() if isinstance(m, FullyConnectedLayer) and m.lr_multiplier != 1
            and any(id(p) in trainable for p in m.parameters())]
    ids = {id(p) for m in slow for p in m.parameters()}
    groups = [{"params": [p for p in params if id(p) not in ids], "lr": lr}]
    return groups + [{"params": [p for p in m.parameters() if id(p) in trainable], "lr": lr / m.lr_multiplier}
                     for m in slow]


def make_optimizer(groups: list[dict], betas, eps: float, reg_interval: int) -> torch.optim.Adam:
    """Adam over ``groups`` (:func:`param_groups`) with EG3D's lazy-regularisation adjustment:
    each lr x r/(r+1), betas ** (r/(r+1))."""
    ratio = reg_interval / (reg_interval + 1) if reg_interval > 0 else 1.0
    return torch.optim.Adam([dict(g, lr=g["lr"] * ratio) for g in groups], betas=tuple(b ** ratio for b in betas),
                            eps=eps)


def mode_seeking_loss(z: torch.Tensor, images: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """MSGAN's mode-seeking term (Mao et al., CVPR 2019) on pairs (2k, 2k+1) that share camera and
    caption: the mean over pairs of mean|z_a - z_b| / (mean|G(z_a) - G(z_b)| + eps). Minimising it
    keeps a prompt's images apart as their latents are apart, against a collapse onto one image
    per prompt. An extension (``STAGE.mode_seeking_weight``), not part of the paper's recipe."""
    dz = (z[0::2] - z[1::2]).abs().flatten(1).mean(1)
    di = (images[0::2] - images[1::2]).abs().flatten(1).mean(1)
    return (dz / (di + eps)).mean()


def world_depth_loss(depth: torch.Tensor, world_depth: torch.Tensor, world_mask: torch.Tensor) -> torch.Tensor:
    """G's rendered depth (n, 1, R, R) against the world's for the same person and camera
    (:meth:`Fakes.world_view`): mean |depth - world depth| over the world's head pixels
    (weighted by their hit fraction), plus, over the pixels that miss it, how far G's depth comes
    nearer than the head's farthest visible point (so the background lies behind the head, not on
    a sheet in front of it). An extension (``STAGE.world_depth_weight``) against the flat heads that the GAN and
    guidance terms alone leave at 64 px: it gives the geometry only, never the colours."""
    head = world_mask.to(depth.dtype)
    far = (world_depth * (head > 0.5)).flatten(1).amax(1).view(-1, 1, 1, 1)
    on_head = (head * (depth - world_depth).abs()).sum() / head.sum().clamp_min(1.0)
    missed = (head == 0).to(depth.dtype)
    behind = (missed * torch.relu(far - depth)).sum() / missed.sum().clamp_min(1.0)
    return on_head + behind


def image_l1(images: dict, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 between G's final images and ``target`` (at their resolution, in [-1, 1]), and between its
    raw (volume-rendered) images and ``target`` resized to theirs: what the paired warm start and
    the world colour term (``STAGE.world_colour_weight``) measure."""
    raw = (images["image_raw"] - resize(target, images["image_raw"].shape[-1])).abs().mean()
    return (images["image"] - target).abs().mean(), raw


def phase_loss(phase: str, reals: Reals, fakes: Fakes | None, cond: dict, gan: GANLoss, guidance: Guidance | None,
               gan_weight: float, cur_nimg: int, mode_seeking_weight: float = 0.0,
               real_cond: dict | None = None, latent_prompt_mentions: int = 0,
               latent_prompt_share: float = 1.0, world_depth_weight: float = 0.0,
               world_colour_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """One phase's loss on one micro-batch (``cond``: the fakes' text condition; ``real_cond``: the
    reals' captions', for a text-reading discriminator), and the scalars to log.
    With ``mode_seeking_weight`` > 0, G main's fakes come in pairs (:meth:`Fakes.in_pairs`); with
    ``latent_prompt_mentions`` > 0 the guidance reads each caption (or ``latent_prompt_share`` of
    them) completed from its z (:meth:`Fakes.completed_captions`) while G reads the caption itself;
    with ``world_depth_weight`` > 0 G's depth is also held to the world's (:func:`world_depth_loss`), and
    with ``world_colour_weight`` > 0 its images to the world's render (:func:`image_l1`)."""
    if phase == "Gmain":
        img = gan.fakes(fakes.z, fakes.c, cond, cur_nimg)
        loss, stats = 0.0, {}
        if mode_seeking_weight > 0:
            ms = mode_seeking_loss(fakes.z, img["image"])
            loss, stats = mode_seeking_weight * ms, {"loss/mode_seeking": ms.item()}
        if world_depth_weight > 0 or world_colour_weight > 0:  # one world render per step, at the finest
            # resolution a term reads: the final one for colour (so the SR's detail counts), the depth's else
            world = fakes.world_view(img["image" if world_colour_weight > 0 else "image_depth"].shape[-1])
        if world_depth_weight > 0:
            coarse = coarser(world, img["image_depth"].shape[-1])
            geometry = world_depth_loss(img["image_depth"], coarse["depth"], coarse["mask"])
            loss, stats["loss/world_depth"] = loss + world_depth_weight * geometry, geometry.item()
        if world_colour_weight > 0:
            colour = sum(image_l1(img, world["rgb"]))
            loss, stats["loss/world_colour"] = loss + world_colour_weight * colour, colour.item()
        if gan_weight > 0:  # without the GAN term (the ablation) D is neither run nor trained
            gan_loss = gan.generator_loss(img, fakes.c, cur_nimg, cond)
            loss = loss + gan_weight * gan_loss
            stats["loss/G"] = gan_loss.item()
        prompts = (fakes.completed_captions(latent_prompt_mentions, latent_prompt_share) if latent_prompt_mentions
                   else fakes.captions)
        guided = guidance(prompts, img["image"]) if guidance is not None else None
        if guided is not None:
            loss = loss + guided.loss
            stats[f"loss/{guidance.name}"] = guided.loss.item()
            stats.update({f"{guidance.name}/{k}": float(v) for k, v in guided.stats.items()})
        return loss, stats
    if phase == "Greg":
        loss = gan.density_loss(fakes.z, fakes.c, cond, cur_nimg)
        return loss, {"loss/density_reg": loss.item()}
    if phase == "Dmain":
        return gan.discriminator_loss(fakes.z, fakes.c, cond, reals.img, reals.c, cur_nimg, real_cond)
    if phase == "Dreg":
        return gan.r1_loss(reals.img, reals.c, cur_nimg, real_cond)
    raise ValueError(f"unknown phase {phase!r}")


@torch.no_grad()
def sample_grid(G_ema, text_encoder, prompts) -> torch.Tensor:
    """Fixed seeds x fixed prompts (none without a text encoder), each from three yaws: 6 per row."""
    device = next(G_ema.parameters()).device
    rows = []
    for prompt in (list(prompts) if text_encoder is not None and prompts else [None]):
        z = torch.randn(2, G_ema.config.z_dim, generator=torch.Generator().manual_seed(0)).to(device)
        cond = {} if prompt is None else {"text": text_encoder([prompt] * 2).to(device)}
        ws = G_ema.mapping(z, G_ema.conditioning_label(2, device), truncation_psi=0.7, **cond)
        planes = G_ema.synthesize_planes(ws, noise_mode="const", **cond)
        for yaw in (-30.0, 0.0, 30.0):
            rows.append(G_ema.render(planes, ws, camera_label(yaw, 0.0).repeat(2, 1).to(device),
                                     deterministic=True)["image"])
    return torch.cat(rows)


def train(cfg: TrainConfig, stage: str, run_dir: str | Path, resume: bool = False, progress: bool = True) -> TrainResult:
    """Run ``stage`` of ``cfg`` into ``run_dir`` (rank 0 writes); returns the trained models."""
    if stage == "paired":
        raise ValueError("the paired warm start has its own loop: train.paired.train_paired")
    info = init_distributed(cfg.device)
    try:
        return _train(cfg, stage, Path(run_dir), resume, progress, info)
    finally:
        cleanup(info)


def _train(cfg: TrainConfig, stage: str, run_dir: Path, resume: bool, progress: bool, info: DistInfo) -> TrainResult:
    st = cfg.stage(stage)
    if cfg.batch % (info.world_size * st.grad_accum) != 0:
        raise ValueError(f"batch {cfg.batch} must be divisible by world size {info.world_size} x "
                         f"grad_accum {st.grad_accum}")
    micro = cfg.batch // (info.world_size * st.grad_accum)
    if st.mode_seeking_weight > 0 and micro % 2:
        raise ValueError(f"{stage}.mode_seeking_weight needs pairs of fakes: the micro-batch ({micro}) must be even")

    # Data and models; everything that can fail on bad input fails here, before any training work.
    data = open_data(cfg.data)
    torch.manual_seed(cfg.seed)  # the same new modules on every rank and in every run
    models = build_models(cfg, stage, info.device, data.resolution,
                          average_gradients=lambda params: average_gradients(params, info))
    G, D, text_encoder, guidance = models.G, models.D, models.text_encoder, models.guidance
    broadcast_module(G, info)
    broadcast_module(D, info)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    for seed in (torch.manual_seed, np.random.seed, random.seed):  # per rank: G's noise, GAN and SDS draws
        seed(cfg.seed * 1000 + info.rank)
    sampler = BatchSampler(data, G.config.z_dim, cfg.seed, info.rank, info.world_size)
    gan = GANLoss(G, D, cfg.gan)

    # Optimisers and phases (a frozen module has neither).
    G_params = [] if st.freeze_G else [p for p in G.parameters() if p.requires_grad]
    D_params = [] if st.freeze_D or st.gan_weight == 0 else [p for p in D.parameters() if p.requires_grad]
    o = cfg.optim
    opt_G = (make_optimizer(param_groups(G, G_params, o.g_lr, st.mapping_full_rate), o.betas, o.eps, o.g_reg_interval)
             if G_params else None)
    opt_D = make_optimizer([{"params": D_params, "lr": o.d_lr}], o.betas, o.eps, o.d_reg_interval) if D_params else None
    phases = []
    if opt_G:
        phases += [Phase("Gmain", "G", 1, generates=True)]
        phases += [Phase("Greg", "G", o.g_reg_interval, generates=True)] if cfg.gan.density_reg > 0 else []
    if opt_D:
        phases += [Phase("Dmain", "D", 1, generates=True), Phase("Dreg", "D", o.d_reg_interval, generates=False)]
    precision = (lambda: torch.autocast(info.device.type, dtype=torch.bfloat16)) if cfg.bf16 else contextlib.nullcontext

    # The run folder: a resumed run gets its weights, optimisers, sampler and RNG states back.
    settings = {"stage": stage, **cfg.to_dict()}
    del settings[stage]["kimg"]  # the one setting a resumed run may change: how long to train
    run = RunFiles(run_dir, settings, total=int(st.kimg * 1000), resume=resume, progress=progress, desc=stage,
                   defaults={"stage": stage, **TrainConfig().to_dict()})
    if run.state is not None:
        for module, key in ((G, "G"), (G_ema, "G_ema"), (D, "D"), (opt_G, "opt_G"), (opt_D, "opt_D")):
            if module is not None:
                module.load_state_dict(run.state[key])
        if guidance is not None:  # a run saved before guidances had state holds none
            guidance.load_state_dict(run.state.get("guidance", {}))
        sampler.load_state_dict(run.rank_state["sampler"])
    average_buffers = BufferAverager(G, info)  # only what training changes (w_avg), not the constants

    def checkpoint():
        run.save({"G": G.state_dict(), "G_ema": G_ema.state_dict(), "D": D.state_dict(),
                  "opt_G": opt_G.state_dict() if opt_G else {}, "opt_D": opt_D.state_dict() if opt_D else {},
                 "guidance": guidance.state_dict() if guidance is not None else {}},
                 rank_state={"sampler": sampler.state_dict()})
        if run.is_main:
            export(run_dir, G_ema, D, text_encoder, cfg, stage, run.nimg, models.init_kimg_total)

    def text_condition(captions: list[str] | None) -> dict:  # the text encoder is frozen
        if text_encoder is None or captions is None:
            return {}
        with torch.no_grad():
            return {"text": text_encoder(captions).to(info.device)}

    while not run.done:
        reals = [sampler.next_reals(micro, info.device) for _ in range(st.grad_accum)]  # shared by all phases
        stats = {}
        for phase in phases:
            if run.steps % phase.interval != 0:
                continue
            opt, params = (opt_G, G_params) if phase.module == "G" else (opt_D, D_params)
            for p in G_params:  # only the phase's own module accumulates gradients
                p.requires_grad_(phase.module == "G")
            for p in D_params:
                p.requires_grad_(phase.module == "D")
            opt.zero_grad(set_to_none=True)
            for real in reals:
                fakes = sampler.next_fakes(micro, info.device) if phase.generates else None  # this phase's own
                if phase.name == "Gmain" and st.mode_seeking_weight > 0:
                    fakes = fakes.in_pairs()
                cond = text_condition(fakes.captions if fakes else None)
                real_cond = text_condition(real.captions if gan.reads_text and phase.module == "D" else None)
                with precision():
                    loss, s = phase_loss(phase.name, real, fakes, cond, gan, guidance, st.gan_weight, run.nimg,
                                         st.mode_seeking_weight, real_cond, st.latent_prompt_mentions,
                                         st.latent_prompt_share, st.world_depth_weight,
                                         st.world_colour_weight)
                (loss * (phase.interval / len(reals))).backward()
                for k, v in s.items():
                    stats[k] = stats.get(k, 0.0) + v / len(reals)
            for p in params:
                if p.grad is not None:
                    torch.nan_to_num_(p.grad, nan=0, posinf=1e5, neginf=-1e5)
            average_gradients(params, info)
            opt.step()
        average_buffers()
        update_ema(G_ema, G, ema_beta(cfg.batch, o.ema_kimg * cfg.batch / 32, o.ema_rampup, run.nimg))
        G_ema.config.neural_rendering_resolution = gan.neural_rendering_resolution(run.nimg)  # as trained; exported
        before = run.nimg
        run.step(cfg.batch, stats)
        if run.is_main and run.crossed(cfg.image_every_kimg, before):
            run.image_grid(stage, sample_grid(G_ema, text_encoder, cfg.eval_prompts), nrow=6)
        if run.crossed(cfg.snapshot_every_kimg, before):
            checkpoint()
    if run.steps == 0:  # nothing to train (kimg=0): still write the models
        checkpoint()
    run.close()
    return TrainResult(run_dir / GENERATOR_FILE, G, G_ema, D, run.nimg)
