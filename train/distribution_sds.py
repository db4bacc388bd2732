"""Distribution score distillation (the paper's "D-SDS", Eq. 4/5 and appendix).

Named distribution SDS here because "D-SDS" is also an unrelated debiasing method. One step,
for rendered images x = g(theta, z, y) in [-1, 1]:

1. x' = teacher.encode_images(x), keeping the VAE encoder's Jacobian (paper Eq. 5);
2. one t per sample, integer, uniform in [int(T * t_min), int(T * t_max)], then eps ~ N(0, I);
3. x_t = scheduler.add_noise(sg(x'), eps, t);
4. eps_hat = classifier-free-guided teacher prediction, under no_grad (the U-Net Jacobian is
   excluded, Eq. 4);
5. noise rescaling (on by default), the paper's "rescale the predicted noise and Gaussian
   noise to prevent overflow", done as StyleGANFusion's SDS on EG3D does it: eps_hat (after
   guidance) and eps are each scaled to the L2 norm sqrt(C*H*W) of a unit Gaussian sample,
   per sample. Guidance scale 100 inflates eps_hat ~100x; after rescaling, (eps_hat - eps) has
   the magnitude of a unit-variance difference and the step keeps only the guided direction,
   so the gradient stays far inside fp16 range for any scale (StyleGANFusion normalises over
   the whole batch, "no batch support"; here each sample is normalised on its own);
6. g = w(t) * (eps_hat - eps), then nan_to_num and an optional element-wise clamp (eps is the
   step's baseline, :meth:`DistributionSDS.baseline`: the noise draw here, a learnt prediction in
   :mod:`train.variational_sds`);
7. surrogate loss = loss_weight * 0.5 * sum((x' - sg(x' - g))^2) / B: a per-sample sum over
   latent elements and a batch mean, so d loss / d x' = loss_weight * g / B (up to fp32
   rounding of x' - (x' - g)) and the loss value is loss_weight * 0.5 * ||g||^2 / B, which is
   informative to log (threestudio's form). Computed in fp32 whatever the teacher dtype.

As a :class:`train.guidance.Guidance` it takes prompts and images: it encodes the prompts with
the teacher's own text encoder and keeps the embeddings of recent prompts (captions repeat from
step to step). Precision is the teacher's, never the caller's: the teacher runs with autocast
off (VAE in its ``vae_dtype``, float32 by default, since the gradient flows through it; U-Net and
text encoder in its ``dtype``), and the images are taken in float32.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from train.guidance import Guidance, GuidanceOutput

# w(t) as a function of alpha_bar_t: DreamFusion's 1 - alpha_bar (= sigma_t^2), uniform, Fantasia3D's.
WEIGHTINGS = {
    "1-alpha_bar": lambda alpha_bar: 1.0 - alpha_bar,
    "uniform": lambda alpha_bar: torch.ones_like(alpha_bar),
    "sqrt_alpha_bar*(1-alpha_bar)": lambda alpha_bar: alpha_bar.sqrt() * (1.0 - alpha_bar),
}


@dataclass(frozen=True)
class DistributionSDSConfig:
    """Settings of the distribution SDS loss (defaults: DreamFusion-style SDS on SD 2.0-base)."""

    t_range: tuple[float, float] = (0.02, 0.98)  # fractions of the schedule's num_train_timesteps
    guidance_scale: float = 100.0
    weighting: str = "1-alpha_bar"
    rescale_noise: bool = True
    grad_clamp: float | None = None  # element-wise bound on g; None disables it
    loss_weight: float = 1.0

    def __post_init__(self):
        low, high = self.t_range
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"t_range {self.t_range} must satisfy 0 <= min < max <= 1 (fractions of the schedule)")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting {self.weighting!r} unknown; choose one of {sorted(WEIGHTINGS)}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale {self.guidance_scale} must be >= 0")
        if self.grad_clamp is not None and self.grad_clamp <= 0:
            raise ValueError(f"grad_clamp {self.grad_clamp} must be > 0, or None to disable clamping")
        if self.loss_weight < 0:
            raise ValueError(f"loss_weight {self.loss_weight} must be >= 0")


@dataclass(kw_only=True)
class DistributionSDSOutput(GuidanceOutput):
    """The differentiable loss and detached statistics, plus the sampled timesteps and the
    renders' latents (detached)."""

    timesteps: torch.Tensor
    latents: torch.Tensor


def gaussian_norm_factor(noise: torch.Tensor) -> torch.Tensor:
    """Per sample of (B, C, H, W), the factor that scales it to L2 norm sqrt(C*H*W), the norm of a
    unit Gaussian draw; shape (B, 1, 1, 1)."""
    norm = noise.flatten(1).norm(dim=1).clamp_min(torch.finfo(noise.dtype).tiny)
    return (noise[0].numel() ** 0.5 / norm).view(-1, *([1] * (noise.ndim - 1)))


def rescale_to_gaussian_norm(noise: torch.Tensor) -> torch.Tensor:
    """Scale each sample (B, C, H, W) to L2 norm sqrt(C*H*W), the norm of a unit Gaussian draw."""
    return noise * gaussian_norm_factor(noise)


class DistributionSDS(Guidance):
    """Distribution SDS loss against a frozen :class:`train.teacher.DiffusionTeacher`; keeps the
    teacher's embeddings of the last ``cache_size`` prompts."""

    name = "sds"

    def __init__(self, teacher, config: DistributionSDSConfig = DistributionSDSConfig(), cache_size: int = 1024):
        self.teacher, self.config = teacher, config
        steps = teacher.num_train_timesteps
        self.min_step, self.max_step = int(steps * config.t_range[0]), int(steps * config.t_range[1])
        self.max_step = min(self.max_step, steps - 1)
        self.cache_size, self._embeddings = cache_size, OrderedDict()

    def state_dict(self) -> dict:
        """The teacher's identity (its files' digest), so that a resumed run refuses another teacher."""
        digest = getattr(self.teacher, "files_sha256", None)
        return {"teacher_sha256": digest} if digest else {}

    def load_state_dict(self, state: dict) -> None:
        self.check_same_teacher(state)
        super().load_state_dict({k: v for k, v in state.items() if k != "teacher_sha256"})

    def check_same_teacher(self, state: dict) -> None:
        """Refuse a saved state made with another teacher (a run saved before teachers were recorded
        holds no digest, and passes)."""
        saved, digest = state.get("teacher_sha256"), getattr(self.teacher, "files_sha256", None)
        if saved and digest and saved != digest:
            folder = getattr(self.teacher, "folder", None)
            raise ValueError(f"--resume: the teacher's files in {folder} are not the ones the run was trained with "
                             f"(sha256 {digest[:12]}... against {saved[:12]}...): the folder was replaced since. "
                             "Resume with the teacher the run was started with, or start a new --run-dir")

    def embed(self, prompts: list[str]) -> torch.Tensor:
        """The teacher's text embeddings (B, L, D) of ``prompts``, encoding only those not cached."""
        new = list(dict.fromkeys(p for p in prompts if p not in self._embeddings))
        if new:
            self._embeddings.update((p, e.clone()) for p, e in zip(new, self.teacher.encode_prompts(new).split(1)))
        out = torch.cat([self._embeddings[p] for p in prompts])
        for p in prompts:
            self._embeddings.move_to_end(p)
        while len(self._embeddings) > self.cache_size:
            self._embeddings.popitem(last=False)
        return out

    def __call__(self, prompts: list[str], images: torch.Tensor,
                 generator: torch.Generator | None = None) -> DistributionSDSOutput:
        """Loss for images (B, 3, H, W) in [-1, 1] rendered for ``prompts`` (see :meth:`from_embeddings`)."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images; give one prompt per image")
        return self.from_embeddings(images, self.embed(prompts), generator=generator)

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One integer timestep per sample, uniform in [min_step, max_step] inclusive."""
        return torch.randint(self.min_step, self.max_step + 1, (batch,), generator=generator,
                             device=self.teacher.device)

    def baseline(self, noisy: torch.Tensor, timesteps: torch.Tensor, text_emb: torch.Tensor,
                 noise: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
        """What the guided prediction is compared with: SDS's own noise draw (variational score
        distillation, :mod:`train.variational_sds`, replaces it with a learnt prediction, classifier
        score distillation, :mod:`train.classifier_score`, with the unconditional one)."""
        return noise

    def direction(self, eps_hat: torch.Tensor, eps_uncond: torch.Tensor, noise: torch.Tensor, noisy: torch.Tensor,
                  timesteps: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """The step's direction before w(t): eps_hat - :meth:`baseline`, each rescaled to a unit
        Gaussian's norm first when configured."""
        baseline = self.baseline(noisy, timesteps, text_emb, noise, eps_uncond)
        if self.config.rescale_noise:
            eps_hat, baseline = rescale_to_gaussian_norm(eps_hat), rescale_to_gaussian_norm(baseline)
        return eps_hat - baseline

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """w(t) for the configured weighting, shape (B,)."""
        return WEIGHTINGS[self.config.weighting](self.teacher.alphas_cumprod[timesteps])

    def from_embeddings(self, images: torch.Tensor, text_emb: torch.Tensor, uncond_emb: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> DistributionSDSOutput:
        """Loss for rendered images (B, 3, H, W) in [-1, 1] and their text embeddings (B, L, D).

        ``uncond_emb`` defaults to the teacher's empty-prompt embedding. With a ``generator``
        (on the teacher's device) the draws are reproducible: timesteps first, then the noise.
        """
        config, teacher = self.config, self.teacher
        latents = teacher.encode_images(images.float())
        batch = latents.shape[0]
        if uncond_emb is None:
            uncond_emb = teacher.uncond_embedding()
        timesteps = self.sample_timesteps(batch, generator)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        noisy = teacher.scheduler.add_noise(latents.detach(), noise, timesteps)
        eps_uncond, eps_text = teacher.predict_noise_pair(noisy, timesteps, text_emb, uncond_emb)
        eps_hat = teacher.guide(eps_uncond, eps_text, config.guidance_scale)
        eps_hat_norm = eps_hat.flatten(1).norm(dim=1).mean()
        direction = self.direction(eps_hat, eps_uncond, noise, noisy, timesteps, text_emb)
        grad = self.weights(timesteps).view(-1, 1, 1, 1) * direction
        grad = torch.nan_to_num(grad)
        if config.grad_clamp is not None:
            grad = grad.clamp(-config.grad_clamp, config.grad_clamp)
        target = (latents - grad).detach()
        loss = config.loss_weight * 0.5 * (latents - target).square().sum() / batch
        stats = {
            "t_mean": timesteps.float().mean(),
            "grad_norm": grad.flatten(1).norm(dim=1).mean(),
            "eps_hat_norm": eps_hat_norm,
        }
        return DistributionSDSOutput(loss=loss, timesteps=timesteps, latents=latents.detach(), stats=stats)
