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
one factor k (to a unit Gaussian's norm), so the step keeps the classifier direction exactly (scaling
each by its own factor would add a multiple of eps_uncond to it).

``csd.denoise_share`` (lambda, default 0) adds back that share of SDS's denoising part:

    g = w(t) [k (eps_hat - eps_uncond) + lambda (k eps_uncond - r(eps))],

with r the rescaling (identity when off), i.e. (1 - lambda) times the classifier score plus lambda
times SDS's own step r(eps_hat) - r(eps): lambda = 1 is distribution SDS exactly. Everything else
(timesteps, w(t), clamping, the loss's form, the VAE encoder's Jacobian kept and the U-Net's
excluded) is :mod:`train.distribution_sds`'s. The guidance costs what distribution SDS costs:
eps_uncond comes from the same batched U-Net call as eps_text.
"""

from __future__ import annotations

from dataclasses import dataclass

from train.distribution_sds import (DistributionSDS, DistributionSDSConfig, gaussian_norm_factor,
                                    rescale_to_gaussian_norm)


@dataclass(frozen=True)
class ClassifierScoreConfig:
    """On top of the distribution SDS settings (``sds.*``)."""

    denoise_share: float = 0.0  # lambda: 0 the classifier score alone, 1 distribution SDS

    def __post_init__(self):
        if not 0.0 <= self.denoise_share <= 1.0:
            raise ValueError(f"csd.denoise_share {self.denoise_share} must be in [0, 1] (0: the classifier "
                             "score alone, 1: distribution SDS)")


class ClassifierScoreDistillation(DistributionSDS):
    """Distribution SDS with the unconditional prediction as its baseline (the guidance term alone),
    plus ``denoise_share`` of SDS's denoising part."""

    name = "csd"

    def __init__(self, teacher, config: DistributionSDSConfig = DistributionSDSConfig(),
                 csd: ClassifierScoreConfig = ClassifierScoreConfig(), cache_size: int = 1024):
        super().__init__(teacher, config, cache_size)
        self.csd = csd

    def direction(self, eps_hat, eps_uncond, noise, noisy, timesteps, text_emb):
        """k (eps_hat - eps_uncond) + lambda (k eps_uncond - r(eps)), k the factor that gives eps_hat a
        unit Gaussian's norm and r the rescaling to it (both identity when rescaling is off)."""
        rescale = self.config.rescale_noise
        k = gaussian_norm_factor(eps_hat) if rescale else 1.0
        step = k * (eps_hat - eps_uncond)
        share = self.csd.denoise_share
        if share:
            step = step + share * (k * eps_uncond - (rescale_to_gaussian_norm(noise) if rescale else noise))
        return step
