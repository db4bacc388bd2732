"""Variational score distillation (ProlificDreamer, Wang et al. 2023): distribution SDS whose
baseline is learnt. An extension, not the paper's recipe (``guidance=variational_sds``).

Distribution SDS compares the teacher's guided prediction with the noise it drew, so every
render of a prompt is pulled towards the teacher's mode for that prompt, whatever its latent z:
the seeds of a prompt collapse onto one head (train/RESULTS.md). Variational score distillation
compares it instead with a *particle* network's prediction, eps_phi(x_t, t, y): a trainable copy
of the teacher's U-Net that keeps fitting the generator's own renders (their detached VAE latents,
with their prompts, by the standard denoising loss at t uniform over the whole schedule). Its
gradient w(t) (eps_hat - eps_phi) is the gradient of the KL divergence between the distribution
of renders and the teacher's, so it pulls the renders of a prompt towards the teacher's
distribution for it rather than towards its mode: where every seed already wears glasses, the
particle predicts glasses and the pull towards them cancels.

One step, for rendered images x in [-1, 1] (everything else as in :mod:`train.distribution_sds`,
noise rescaling included, applied to eps_hat and eps_phi alike):

1. the distribution SDS step with the baseline eps_phi(x_t, t, y) (conditional, no guidance,
   no gradient) in place of the noise draw;
2. then one optimiser step of the particle on sg(x') with its own draws (timesteps uniform in
   [0, T), then noise), gradients averaged over ranks.

The particle starts as the teacher's U-Net, so before it has learnt anything the step is guidance
alone: (s - 1)(eps_text - eps_uncond) (rescaled). Its weights and optimiser are part of the run's
state (:meth:`state_dict`), so a resumed run continues exactly; an exported generator does not carry
them, and a run started from it (``stage2.init``) starts a new particle.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from train.distribution_sds import DistributionSDS, DistributionSDSConfig, DistributionSDSOutput


@dataclass(frozen=True)
class VariationalSDSConfig:
    """The particle's optimiser (Adam), on top of the distribution SDS settings (``sds.*``)."""

    particle_lr: float = 1e-4
    particle_betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self):
        if self.particle_lr <= 0:
            raise ValueError(f"vsd.particle_lr {self.particle_lr} must be > 0")
        if not all(0.0 <= b < 1.0 for b in self.particle_betas) or len(self.particle_betas) != 2:
            raise ValueError(f"vsd.particle_betas {self.particle_betas} must be two numbers in [0, 1)")


class VariationalSDS(DistributionSDS):
    """Distribution SDS with a learnt baseline: a copy of the teacher's U-Net fitting the renders.

    ``average_gradients(params)`` averages the particle's gradients over ranks (torchrun), so every
    rank keeps the same particle."""

    name = "vsd"

    def __init__(self, teacher, config: DistributionSDSConfig = DistributionSDSConfig(),
                 vsd: VariationalSDSConfig = VariationalSDSConfig(), cache_size: int = 1024,
                 average_gradients: Callable[[list[torch.nn.Parameter]], None] | None = None):
        super().__init__(teacher, config, cache_size)
        self.vsd = vsd
        self.particle = copy.deepcopy(teacher.unet).train().requires_grad_(True)
        if any(p.dtype != torch.float32 for p in self.particle.parameters()):  # trained in fp32 whatever the teacher's
            self.particle.to(dtype=torch.float32)
        self.particle_params = list(self.particle.parameters())
        self.optimizer = torch.optim.Adam(self.particle_params, lr=vsd.particle_lr, betas=tuple(vsd.particle_betas))
        self.average_gradients = average_gradients

    @torch.no_grad()
    def baseline(self, noisy, timesteps, text_emb, noise, eps_uncond):
        """The particle's conditional noise prediction (fp32, no gradient)."""
        with self.teacher.own_precision():
            return self.particle(noisy.float(), timesteps, encoder_hidden_states=text_emb.float()).sample.float()

    def fit_particle(self, latents: torch.Tensor, text_emb: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """One optimiser step of the denoising loss on (detached) latents; returns the loss."""
        teacher, batch = self.teacher, latents.shape[0]
        timesteps = torch.randint(0, teacher.num_train_timesteps, (batch,), generator=generator, device=teacher.device)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        noisy = teacher.scheduler.add_noise(latents, noise, timesteps)
        with torch.enable_grad(), teacher.own_precision():
            pred = self.particle(noisy, timesteps, encoder_hidden_states=text_emb.float()).sample.float()
            loss = torch.nn.functional.mse_loss(pred, noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.average_gradients is not None:
            self.average_gradients(self.particle_params)
        self.optimizer.step()
        return loss.detach()

    def from_embeddings(self, images, text_emb, uncond_emb=None, generator=None) -> DistributionSDSOutput:
        """The distribution SDS loss against the particle, then one particle step on these renders."""
        out = super().from_embeddings(images, text_emb, uncond_emb, generator)
        out.stats["particle_loss"] = self.fit_particle(out.latents, text_emb, generator)
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "particle": self.particle.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.check_same_teacher(state)
        self.particle.load_state_dict(state["particle"])
        self.optimizer.load_state_dict(state["optimizer"])
