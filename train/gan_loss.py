"""EG3D's GAN objective: non-saturating logistic loss with the dual discriminator, lazy R1 on
real image and raw image, density regularisation, blurring at the start of training and
generator pose conditioning with a fading swap probability. Each term returns its loss (and
the scalars to log); the training loop weighs, sums and backpropagates them.

The neural rendering resolution belongs to the generator (``GeneratorConfig``): training
renders at it, or fades from it to ``neural_rendering_resolution_final`` as EG3D's fine-tuning
does, and the loop exports the value it trained at.

The generator may be a plain :class:`~dreamportrait.generator.TriPlaneGenerator` (prior
training) or the text-conditioned generator; text reaches it through ``cond`` keyword
arguments of ``mapping``/``synthesis``/``sample_mixed``. EG3D's discriminator never sees it; one
with the text projection (an extension, ``DiscriminatorConfig.text_dim`` > 0) reads the sentence
feature of each image's caption: the fakes' prompts and the reals' own captions, and is also
shown reals with another real's caption as fakes (the matching-aware loss of Reed et al. 2016):
without them a D that tells fakes by their looks has no reason to read the text at all.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dreamportrait.ops import resize, upfirdn2d


@dataclass
class GANLossConfig:
    """Defaults are EG3D's FFHQ values (batch 32)."""
    r1_gamma: float = 1.0
    density_reg: float = 0.25                      # 0: no density regularisation phase
    density_reg_p_dist: float = 0.004
    density_reg_points: int = 1000
    blur_init_sigma: float = 10.0
    blur_fade_kimg: float = 200.0
    gpc_reg_prob: float | None = 0.5               # None: no generator pose conditioning (c = 0)
    gpc_reg_fade_kimg: float = 1000.0
    neural_rendering_resolution_final: int | None = None   # None: the generator's own, throughout
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


class GANLoss:
    """EG3D's loss terms for the generator G and the discriminator D, on one micro-batch."""

    def __init__(self, G, D, cfg: GANLossConfig):
        self.G, self.D, self.cfg = G, D, cfg
        self.initial_resolution = G.config.neural_rendering_resolution
        self.reads_text = D.config.text_dim > 0  # the discriminator's text projection (an extension)

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
        c, start = self.cfg, self.initial_resolution
        if c.neural_rendering_resolution_final is None:
            return start
        alpha = min(cur_nimg / (c.neural_rendering_resolution_fade_kimg * 1e3), 1)
        return int(round(start * (1 - alpha) + c.neural_rendering_resolution_final * alpha))

    # Pieces ------------------------------------------------------------------------------
    def conditioning(self, c: torch.Tensor, swapping_prob: float | None, per_sample: bool = True) -> torch.Tensor:
        """Generator pose conditioning: each label swapped with its neighbour's with probability p."""
        if swapping_prob is None:
            return torch.zeros_like(c)
        swapped = torch.roll(c, 1, 0)
        shape = (c.shape[0], 1) if per_sample else ()
        return torch.where(torch.rand(shape, device=c.device) < swapping_prob, swapped, c)

    def fakes(self, z, c, cond: dict, cur_nimg: int, update_emas: bool = False) -> dict:
        """Generated images {'image', 'image_raw', ...} for (z, camera c, text ``cond``)."""
        ws = self.G.mapping(z, self.conditioning(c, self.swapping_prob(cur_nimg)), update_emas=update_emas, **cond)
        return self.G.synthesis(ws, c, neural_rendering_resolution=self.neural_rendering_resolution(cur_nimg),
                                **cond)

    def logits(self, img: dict, c: torch.Tensor, cur_nimg: int, cond: dict | None = None) -> torch.Tensor:
        """D's logits; ``cond`` is the images' text condition, read only by a text-reading D."""
        img = dict(img, image=blur(img["image"], self.blur_sigma(cur_nimg)))
        if not self.reads_text:
            return self.D(img, c)
        if not cond:
            raise ValueError("the discriminator reads text (text_dim > 0) but no text condition was given")
        return self.D(img, c, cond["text"].eot)

    def reals(self, real_img: torch.Tensor, cur_nimg: int) -> dict:
        raw = resize(real_img, self.neural_rendering_resolution(cur_nimg))
        return {"image": real_img, "image_raw": blur(raw, self.blur_sigma(cur_nimg))}

    # Terms -------------------------------------------------------------------------------
    def generator_loss(self, fake: dict, c: torch.Tensor, cur_nimg: int, cond: dict | None = None) -> torch.Tensor:
        """Non-saturating: softplus(-D(G(z)))."""
        return F.softplus(-self.logits(fake, c, cur_nimg, cond)).mean()

    def density_loss(self, z, c, cond: dict, cur_nimg: int) -> torch.Tensor:
        """L1 between densities at random points and at slightly perturbed copies."""
        ws = self.G.mapping(z, self.conditioning(c, self.swapping_prob(cur_nimg), per_sample=False), **cond)
        pts = torch.rand(ws.shape[0], self.cfg.density_reg_points, 3, device=ws.device) * 2 - 1
        perturbed = pts + torch.randn_like(pts) * self.cfg.density_reg_p_dist
        sigma = self.G.sample_mixed(torch.cat([pts, perturbed], dim=1), ws, **cond)["sigma"]
        half = sigma.shape[1] // 2
        return F.l1_loss(sigma[:, :half], sigma[:, half:]) * self.cfg.density_reg

    def discriminator_loss(self, gen_z, gen_c, cond: dict, real_img, real_c, cur_nimg: int,
                           real_cond: dict | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """softplus(D(G(z))) + softplus(-D(x)); G only supplies the fakes. ``real_cond``: the reals'
        captions' text condition; a text-reading D also gets softplus(D(x, a neighbour's caption))."""
        with torch.no_grad():
            fake = self.fakes(gen_z, gen_c, cond, cur_nimg, update_emas=True)
        loss_fake = F.softplus(self.logits(fake, gen_c, cur_nimg, cond)).mean()
        reals = self.reals(real_img, cur_nimg)
        loss_real = F.softplus(-self.logits(reals, real_c, cur_nimg, real_cond)).mean()
        stats = {"loss/D_fake": loss_fake.item(), "loss/D_real": loss_real.item()}
        if not self.reads_text:
            return loss_fake + loss_real, stats
        text = real_cond["text"]
        mismatched = {"text": dataclasses.replace(text, eot=text.eot.roll(1, 0))}  # each real, its neighbour's caption
        loss_mismatch = F.softplus(self.logits(reals, real_c, cur_nimg, mismatched)).mean()
        stats["loss/D_mismatch"] = loss_mismatch.item()
        return loss_fake + loss_real + loss_mismatch, stats

    def r1_loss(self, real_img, real_c, cur_nimg: int, real_cond: dict | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """R1: gamma / 2 * |grad_x D(x)|^2 over the real image and its raw version."""
        real = self.reals(real_img, cur_nimg)
        image = real["image"].detach().requires_grad_(True)
        raw = real["image_raw"].detach().requires_grad_(True)
        logits = self.logits({"image": image, "image_raw": raw}, real_c, cur_nimg, real_cond)
        g_img, g_raw = torch.autograd.grad(logits.sum(), [image, raw], create_graph=True)
        penalty = g_img.square().sum([1, 2, 3]) + g_raw.square().sum([1, 2, 3])
        return (penalty * (self.cfg.r1_gamma / 2)).mean(), {"loss/r1": penalty.mean().item()}
