"""Classifier score distillation (Yu et al. 2023, "Text-to-3D with Classifier Score Distillation"):
distribution SDS whose baseline is the teacher's unconditional prediction. An extension, not the
paper's recipe (``guidance=classifier_score``).

Distribution SDS's direction splits in two: w(t) [(eps_uncond - eps) + s (eps_text - eps_uncond)].
The first part denoises towards what the teacher draws for no prompt at all, the second is the
gradient of the teacher's implicit classifier, -sigma_t grad log p(y | x_t): what makes the render
more likely to be described by its prompt. Comparing the guided prediction with eps_uncond in
place of the noise draw keeps only the second part,

    g = w(t) (eps_hat - eps_uncond) = w(t) s (eps_text - eps_uncond),

so the text pulls each render along what the prompt says and leaves the rest of the image to the
GAN term, which alone keeps the renders like the world's: the stage-2 generator objective is
``gan_weight * GAN + CSD``. There is no noise draw in g (the noise only sets x_t), so the step has
far less variance than SDS's. Noise rescaling, when on, scales eps_hat and eps_uncond by eps_hat's
one factor (to a unit Gaussian's norm), so the step keeps the classifier direction exactly (scaling
each by its own factor would add a multiple of eps_uncond to it). Everything else (timesteps, w(t),
clamping, the loss's form, the VAE encoder's Jacobian kept and the U-Net's excluded) is
:mod:`train.distribution_sds`'s. The guidance costs what distribution SDS costs: eps_uncond comes
from the same batched U-Net call as eps_text.
"""
from __future__ import annotations

import torch

from train.distribution_sds import DistributionSDS, gaussian_norm_factor


class ClassifierScoreDistillation(DistributionSDS):
    """Distribution SDS with the unconditional prediction as its baseline (the guidance term alone)."""

    name = "csd"

    def baseline(self, noisy, timesteps, text_emb, noise, eps_uncond):
        """The teacher's unconditional prediction for this x_t."""
        return eps_uncond

    def difference(self, eps_hat: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
        """eps_hat - eps_uncond, both scaled by the factor that gives eps_hat a unit Gaussian's norm
        when rescaling is on."""
        if self.config.rescale_noise:
            return (eps_hat - baseline) * gaussian_norm_factor(eps_hat)
        return eps_hat - baseline
