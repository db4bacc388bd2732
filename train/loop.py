"""The training loop, top to bottom: set-up, phases, EMA, logging, atomic checkpoints, resume.

One loop serves all three stages. Each optimiser step runs EG3D's phases — G main (plus
distribution SDS in stage 2), G density regularisation every ``g_reg_interval`` steps, D main,
D R1 every ``d_reg_interval`` steps — with lazy-regularisation learning-rate/beta adjustment,
gradient accumulation over micro-batches and gradient averaging across ranks.
"""
from __future__ import annotations

import copy
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from train import setup
from train.config import TrainConfig
from train.distributed import (DistInfo, average_buffers, average_gradients, broadcast_module, cleanup,
                               init_distributed)
from train.gan_loss import GANLoss

STATE_FILE = "training-state.pt"


@dataclass
class TrainResult:
    generator_file: Path
    G: torch.nn.Module
    G_ema: torch.nn.Module
    D: torch.nn.Module
    cur_nimg: int


@dataclass
class Phase:
    name: str
    module: str          # 'G' or 'D'
    interval: int


def make_optimizer(params, lr: float, betas, eps: float, reg_interval: int) -> torch.optim.Adam:
    """Adam with EG3D's lazy-regularisation adjustment: lr * r/(r+1), betas ** (r/(r+1))."""
    ratio = reg_interval / (reg_interval + 1) if reg_interval > 0 else 1.0
    return torch.optim.Adam(params, lr=lr * ratio, betas=tuple(b ** ratio for b in betas), eps=eps)


def ema_beta(cfg: TrainConfig, cur_nimg: int) -> float:
    """EG3D's EMA: half-life ema_kimg * batch / 32 thousand images, ramped up early in training."""
    ema_nimg = cfg.optim.ema_kimg * 1000 * cfg.batch / 32
    if cfg.optim.ema_rampup is not None:
        ema_nimg = min(ema_nimg, cur_nimg * cfg.optim.ema_rampup)
    return 0.5 ** (cfg.batch / max(ema_nimg, 1e-8))


@torch.no_grad()
def update_ema(G_ema: torch.nn.Module, G: torch.nn.Module, beta: float) -> None:
    for p_ema, p in zip(G_ema.parameters(), G.parameters()):
        p_ema.copy_(p.detach().lerp(p_ema, beta))
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):
        b_ema.copy_(b)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
             "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state_atomic(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(cfg: TrainConfig, stage: str, run_dir: str | Path, resume: bool = False, progress: bool = True) -> TrainResult:
    """Run ``stage`` of ``cfg`` into ``run_dir`` (rank 0 writes); returns the trained models."""
    info = init_distributed(cfg.device)
    try:
        return _train(cfg, stage, Path(run_dir), resume, progress, info)
    finally:
        cleanup(info)


def _train(cfg: TrainConfig, stage: str, run_dir: Path, resume: bool, progress: bool, info: DistInfo) -> TrainResult:
    stage_cfg = cfg.stage(stage)
    if cfg.batch % (info.world_size * stage_cfg.grad_accum) != 0:
        raise ValueError(f"batch {cfg.batch} must be divisible by world size {info.world_size} x "
                         f"grad_accum {stage_cfg.grad_accum}")
    micro = cfg.batch // (info.world_size * stage_cfg.grad_accum)
    state_path = run_dir / STATE_FILE
    if resume and not state_path.exists():
        raise FileNotFoundError(f"--resume: no {STATE_FILE} in {run_dir}; start without --resume")
    # Everything that can fail on bad input is checked before any training work starts.
    torch.manual_seed(cfg.seed)  # same initialisation of new modules on every rank and every run
    built = setup.build(cfg, stage, info.device)
    data, G, D, text_encoder, sds = built.data, built.G, built.D, built.text_encoder, built.sds
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    torch.manual_seed(cfg.seed * 1000 + info.rank)
    np.random.seed(cfg.seed * 1000 + info.rank)
    random.seed(cfg.seed * 1000 + info.rank)
    broadcast_module(G, info)
    broadcast_module(D, info)
    G_params = [p for p in G.parameters() if p.requires_grad] if not stage_cfg.freeze_G else []
    D_params = [p for p in D.parameters() if p.requires_grad] if not stage_cfg.freeze_D else []
    opt_G = make_optimizer(G_params, cfg.optim.g_lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.g_reg_interval) if G_params else None
    opt_D = make_optimizer(D_params, cfg.optim.d_lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.d_reg_interval) if D_params else None
    phases = []
    if opt_G:
        phases += [Phase("Gmain", "G", 1), Phase("Greg", "G", cfg.optim.g_reg_interval)]
    if opt_D:
        phases += [Phase("Dmain", "D", 1), Phase("Dreg", "D", cfg.optim.d_reg_interval)]
    loss = GANLoss(G, D, cfg.gan, gan_weight=stage_cfg.gan_weight if sds is not None else 1.0)
    sampler = data.sampler(info.rank, info.world_size, seed=cfg.seed)
    cur_nimg, step = 0, 0
    if resume:
        state = torch.load(state_path, map_location=info.device, weights_only=True)
        if state["stage"] != stage:
            raise ValueError(f"{state_path} belongs to stage {state['stage']!r}, not {stage!r}")
        G.load_state_dict(state["G"]); G_ema.load_state_dict(state["G_ema"]); D.load_state_dict(state["D"])
        if opt_G: opt_G.load_state_dict(state["opt_G"])
        if opt_D: opt_D.load_state_dict(state["opt_D"])
        cur_nimg, step = state["cur_nimg"], state["step"]
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"][min(info.rank, len(state["rng"]) - 1)])
    total_nimg = int(stage_cfg.kimg * 1000)
    log = setup.Logger(run_dir, info, cfg, stage, total_nimg, cur_nimg, progress, text_encoder)

    def snapshot(final: bool = False):
        rngs = setup.gather_rng(rng_state(), info)
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_state_atomic(state_path, {
                "stage": stage, "config": json.dumps(cfg.to_dict()), "cur_nimg": cur_nimg, "step": step,
                "G": G.state_dict(), "G_ema": G_ema.state_dict(), "D": D.state_dict(),
                "opt_G": opt_G.state_dict() if opt_G else {}, "opt_D": opt_D.state_dict() if opt_D else {},
                "sampler": sampler.state_dict(), "rng": rngs})
            setup.export(run_dir, G_ema, D, text_encoder, cfg, stage, cur_nimg, built.init_kimg_total)

    next_snapshot = (cur_nimg // int(cfg.snapshot_every_kimg * 1000) + 1) * int(cfg.snapshot_every_kimg * 1000)
    while cur_nimg < total_nimg:
        batches = [setup.next_batch(data, sampler, micro, G, text_encoder, info.device)
                   for _ in range(stage_cfg.grad_accum)]
        stats = {}
        for phase in phases:
            if step % phase.interval != 0:
                continue
            opt = opt_G if phase.module == "G" else opt_D
            params = G_params if phase.module == "G" else D_params
            # Only the phase's own module accumulates gradients (EG3D toggles requires_grad likewise).
            for p in G_params:
                p.requires_grad_(phase.module == "G")
            for p in D_params:
                p.requires_grad_(phase.module == "D")
            opt.zero_grad(set_to_none=True)
            for b in batches:
                extra = setup.sds_loss(sds, b.gen_captions) if (phase.name == "Gmain" and sds is not None) else None
                with setup.autocast(cfg, info.device):
                    s = loss.accumulate(phase.name, b.real_img, b.real_c, b.gen_z, b.gen_c,
                                        gain=phase.interval / len(batches), cur_nimg=cur_nimg, gen_cond=b.gen_cond,
                                        extra_G_loss=extra)
                for k, v in s.items():
                    stats[k] = stats.get(k, 0.0) + v / len(batches)
            for p in params:
                if p.grad is not None:
                    torch.nan_to_num_(p.grad, nan=0, posinf=1e5, neginf=-1e5)
            average_gradients(params, info)
            opt.step()
        average_buffers(G, info)
        update_ema(G_ema, G, ema_beta(cfg, cur_nimg))
        cur_nimg += cfg.batch
        step += 1
        log.step(step, cur_nimg, stats, G_ema)
        if cur_nimg >= next_snapshot or cur_nimg >= total_nimg:
            snapshot()
            next_snapshot += int(cfg.snapshot_every_kimg * 1000)
    if step == 0:
        snapshot()
    log.close()
    return TrainResult(run_dir / setup.GENERATOR_FILE, G, G_ema, D, cur_nimg)
