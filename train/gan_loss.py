"""EG3D's GAN objective: non-saturating logistic loss with the dual discriminator, lazy R1 on
real image and raw image, density regularisation, blurring at the start of training and
generator pose conditioning with a fading swap probability.

The generator may be a plain :class:`~dreamportrait.generator.TriPlaneGenerator` (prior
training) or the text-conditioned generator; text reaches it through ``cond`` keyword
arguments of ``mapping``/``synthesis``/``sample_mixed`` and is never seen by the discriminator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dreamportrait.ops import upfirdn2d


@dataclass
class GANLossConfig:
    """Defaults are EG3D's FFHQ values (batch 32)."""
    r1_gamma: float = 1.0
    density_reg: float = 0.25
    density_reg_p_dist: float = 0.004
    density_reg_points: int = 1000
    blur_init_sigma: float = 10.0
    blur_fade_kimg: float = 200.0
    gpc_reg_prob: float | None = 0.5       # None: no generator pose conditioning (c = 0)
    gpc_reg_fade_kimg: float = 1000.0
    neural_rendering_resolution_initial: int = 64
    neural_rendering_resolution_final: int | None = None
    neural_rendering_resolution_fade_kimg: float = 1000.0


def blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """EG3D's start-of-training blur: f(x) = 2^-(x/sigma)^2 on [-3 sigma, 3 sigma], normalised."""
    size = int(math.floor(sigma * 3))
    if size <= 0:
        return img
    x = torch.arange(-size, size + 1, device=img.device, dtype=torch.float32)
    f = (x / sigma).square().neg().exp2()
    f = torch.outer(f, f)
    pad = [size, size, size, size]
    return upfirdn2d(img, f / f.sum(), padding=pad)


def resize_antialiased(img: torch.Tensor, size: int) -> torch.Tensor:
    """EG3D's 'antialiased' filtered resizing (bilinear, antialias=True)."""
    return F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class GANLoss:
    """Computes and backpropagates one phase ('Gmain', 'Greg', 'Dmain', 'Dreg') of EG3D's loss."""

    def __init__(self, G, D, cfg: GANLossConfig, gan_weight: float = 1.0):
        self.G, self.D, self.cfg, self.gan_weight = G, D, cfg, gan_weight

    # Schedules ---------------------------------------------------------------------------
    def blur_sigma(self, cur_nimg: int) -> float:
        if self.cfg.blur_fade_kimg <= 0:
            return 0.0
        return max(1 - cur_nimg / (self.cfg.blur_fade_kimg * 1e3), 0) * self.cfg.blur_init_sigma

    def swapping_prob(self, cur_nimg: int) -> float | None:
        if self.cfg.gpc_reg_prob is None:
            return None
        fade = self.cfg.gpc_reg_fade_kimg
        alpha = min(cur_nimg / (fade * 1e3), 1) if fade > 0 else 1
        return (1 - alpha) + alpha * self.cfg.gpc_reg_prob

    def neural_rendering_resolution(self, cur_nimg: int) -> int:
        c = self.cfg
        if c.neural_rendering_resolution_final is None:
            return c.neural_rendering_resolution_initial
        alpha = min(cur_nimg / (c.neural_rendering_resolution_fade_kimg * 1e3), 1)
        return int(round(c.neural_rendering_resolution_initial * (1 - alpha) + c.neural_rendering_resolution_final * alpha))

    # Pieces ------------------------------------------------------------------------------
    def conditioning(self, c: torch.Tensor, swapping_prob: float | None, per_sample: bool = True) -> torch.Tensor:
        """Generator pose conditioning: each label swapped with its neighbour's with probability p."""
        if swapping_prob is None:
            return torch.zeros_like(c)
        swapped = torch.roll(c, 1, 0)
        shape = (c.shape[0], 1) if per_sample else ()
        return torch.where(torch.rand(shape, device=c.device) < swapping_prob, swapped, c)

    def run_G(self, z, c, swapping_prob, nrr, cond: dict, update_emas: bool = False):
        ws = self.G.mapping(z, self.conditioning(c, swapping_prob), update_emas=update_emas, **cond)
        return self.G.synthesis(ws, c, neural_rendering_resolution=nrr, **cond), ws

    def run_D(self, img: dict, c: torch.Tensor, blur_sigma: float):
        img = dict(img, image=blur(img["image"], blur_sigma))
        return self.D(img, c)

    def real_pair(self, real_img: torch.Tensor, nrr: int, blur_sigma: float) -> dict:
        return {"image": real_img, "image_raw": blur(resize_antialiased(real_img, nrr), blur_sigma)}

    # Phases ------------------------------------------------------------------------------
    def accumulate(self, phase: str, real_img, real_c, gen_z, gen_c, gain: float, cur_nimg: int,
                   gen_cond: dict | None = None, extra_G_loss=None) -> dict[str, float]:
        """Backpropagate ``phase`` scaled by ``gain``; returns the scalar losses for logging.

        ``extra_G_loss(gen_img) -> (loss, stats)`` is added to the G main loss (distribution SDS in
        stage 2, on the same rendered fakes); the GAN term is then weighted by ``gan_weight``.
        """
        gen_cond = gen_cond or {}
        sigma = self.blur_sigma(cur_nimg)
        p = self.swapping_prob(cur_nimg)
        nrr = self.neural_rendering_resolution(cur_nimg)
        stats = {}
        if phase == "Gmain":
            gen_img, _ = self.run_G(gen_z, gen_c, p, nrr, gen_cond)
            loss = F.softplus(-self.run_D(gen_img, gen_c, sigma)).mean()
            total = loss * self.gan_weight
            if extra_G_loss is not None:
                extra, extra_stats = extra_G_loss(gen_img)
                total = total + extra
                stats.update(extra_stats)
            total.mul(gain).backward()
            stats["loss/G"] = loss.item()
        elif phase == "Greg":
            if self.cfg.density_reg > 0:
                ws = self.G.mapping(gen_z, self.conditioning(gen_c, p, per_sample=False), **gen_cond)
                pts = torch.rand(ws.shape[0], self.cfg.density_reg_points, 3, device=ws.device) * 2 - 1
                perturbed = pts + torch.randn_like(pts) * self.cfg.density_reg_p_dist
                sigma_all = self.G.sample_mixed(torch.cat([pts, perturbed], dim=1), ws, **gen_cond)["sigma"]
                half = sigma_all.shape[1] // 2
                loss = F.l1_loss(sigma_all[:, :half], sigma_all[:, half:]) * self.cfg.density_reg
                loss.mul(gain).backward()
                stats["loss/density_reg"] = loss.item()
        elif phase == "Dmain":
            with torch.no_grad():
                gen_img, _ = self.run_G(gen_z, gen_c, p, nrr, gen_cond, update_emas=True)
            loss_fake = F.softplus(self.run_D(gen_img, gen_c, sigma))
            loss_fake.mean().mul(gain).backward()
            real = self.real_pair(real_img, nrr, sigma)
            loss_real = F.softplus(-self.run_D(real, real_c, sigma))
            loss_real.mean().mul(gain).backward()
            stats["loss/D_fake"], stats["loss/D_real"] = loss_fake.mean().item(), loss_real.mean().item()
        elif phase == "Dreg":
            real = self.real_pair(real_img, nrr, sigma)
            image = real["image"].detach().requires_grad_(True)
            raw = real["image_raw"].detach().requires_grad_(True)
            logits = self.run_D({"image": image, "image_raw": raw}, real_c, sigma)
            g_img, g_raw = torch.autograd.grad(logits.sum(), [image, raw], create_graph=True)
            penalty = g_img.square().sum([1, 2, 3]) + g_raw.square().sum([1, 2, 3])
            (penalty * (self.cfg.r1_gamma / 2)).mean().mul(gain).backward()
            stats["loss/r1"] = penalty.mean().item()
        else:
            raise ValueError(f"unknown phase {phase!r}")
        return stats
