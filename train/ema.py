"""Exponential moving average of a model's weights (the generator's G_ema; the world's teacher U-Net)."""
from __future__ import annotations

import torch


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, beta: float) -> None:
    """Parameters: ema <- beta * ema + (1 - beta) * model. Buffers (running statistics such as
    the mapping's w_avg) are copied, as EG3D does."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def ema_beta(batch: int, half_life_kimg: float, rampup: float | None, cur_nimg: int) -> float:
    """EG3D's decay per step of ``batch`` images: half-life ``half_life_kimg`` thousand images,
    limited to ``rampup`` x images seen early in training."""
    ema_nimg = half_life_kimg * 1000
    if rampup is not None:
        ema_nimg = min(ema_nimg, cur_nimg * rampup)
    return 0.5 ** (batch / max(ema_nimg, 1e-8))
