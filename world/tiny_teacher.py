"""Tiny, randomly initialised Stable-Diffusion-style teacher: components and pipeline folder.

Used by the tests and as the starting point of the synthetic world's own teacher. The
components have SD's structure and conventions at a few hundred thousand parameters each:
``UNet2DConditionModel`` (epsilon prediction), ``AutoencoderKL``, a ``DDPMScheduler`` with
SD's ``scaled_linear`` betas (0.00085 -> 0.012 over 1000 steps), a ``CLIPTextModel`` and a
``CLIPTokenizer`` with the real CLIP BPE vocabulary.

The tokenizer is built offline from the BPE merges file that ``open_clip_torch`` ships inside
its package (``bpe_simple_vocab_16e6.txt.gz``): the vocabulary is laid out as OpenAI CLIP does
(256 byte characters, the same with ``</w>``, one token per merge, then ``<|startoftext|>``
and ``<|endoftext|>``: 49408 ids), so token ids equal OpenCLIP's ``SimpleTokenizer`` and SD2's
tokenizer. As in SD2, the pad token is ``"!"`` (id 0, OpenCLIP's zero padding); like SD2's
tokenizer under transformers, a literal ``"!"`` in a prompt is therefore read as padding.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dreamportrait.checkpoints import atomic_folder

# Merges used by CLIP: all lines of the BPE file after its header, up to 49152 - 256 - 2 tokens.
_CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_VOCAB_SIZE = 2 * 256 + _CLIP_NUM_MERGES + 2


@dataclass(frozen=True)
class TinyTeacherConfig:
    """Sizes of the tiny teacher; the VAE downsamples by 2 ** (len(vae_channels) - 1)."""

    image_size: int = 16
    unet_channels: tuple[int, ...] = (32, 64)
    vae_channels: tuple[int, ...] = (32, 64)
    latent_channels: int = 4
    norm_groups: int = 8
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 2
    context_length: int = 77
    seed: int = 0

    def __post_init__(self):
        factor = 2 ** (len(self.vae_channels) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by the VAE downsampling factor {factor} "
                f"(vae_channels has {len(self.vae_channels)} levels)")
        for name in ("unet_channels", "vae_channels"):
            bad = [c for c in getattr(self, name) if c % self.norm_groups]
            if bad:
                raise ValueError(f"{name} {bad} not divisible by norm_groups={self.norm_groups}")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width {self.text_width} not divisible by text_heads {self.text_heads}")

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def clip_bpe_tokenizer(context_length: int = 77):
    """A transformers ``CLIPTokenizer`` with CLIP's real vocabulary, built from open_clip's file."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + _CLIP_NUM_MERGES]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=context_length)


def unet_kwargs(channels, cross_attention_dim: int, latent_size: int, latent_channels: int = 4,
                norm_groups: int = 8, layers_per_block: int = 1, attention_heads=4) -> dict:
    """``UNet2DConditionModel`` arguments in SD's layout: one level per entry of ``channels``,
    cross-attention at every level but the coarsest, epsilon prediction on ``latent_size`` latents.

    ``attention_heads`` (int or one per level) is diffusers' ``attention_head_dim``, which
    UNet2DConditionModel reads as the number of heads.
    """
    levels = len(channels)
    return dict(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        layers_per_block=layers_per_block, block_out_channels=tuple(channels),
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_heads if isinstance(attention_heads, int) else tuple(attention_heads),
        norm_num_groups=norm_groups)


def vae_kwargs(channels, image_size: int, latent_channels: int = 4, norm_groups: int = 8,
               layers_per_block: int = 1) -> dict:
    """``AutoencoderKL`` arguments: one encoder/decoder level per entry of ``channels``, so
    ``image_size`` images become ``image_size / 2 ** (len(channels) - 1)`` latents."""
    return dict(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels), layers_per_block=layers_per_block,
        latent_channels=latent_channels, norm_num_groups=norm_groups, sample_size=image_size)


def build_tiny_components(config: TinyTeacherConfig = TinyTeacherConfig()) -> dict:
    """Randomly initialised components (seeded, global RNG untouched), keyed like an SD folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_bpe_tokenizer(config.context_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        unet = UNet2DConditionModel(**unet_kwargs(
            config.unet_channels, config.text_width, config.latent_size, config.latent_channels,
            config.norm_groups))
        vae = AutoencoderKL(**vae_kwargs(
            config.vae_channels, config.image_size, config.latent_channels, config.norm_groups))
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=config.text_width,
            intermediate_size=4 * config.text_width,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.context_length,
            hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=config.text_width,
        ))
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, steps_offset=1)
    return dict(unet=unet, vae=vae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)


def save_teacher_folder(components: dict, folder: str | os.PathLike) -> Path:
    """Write components as a diffusers ``StableDiffusionPipeline`` folder, atomically.

    The folder is assembled next to its destination and renamed into place, so a reader never
    sees a half-written teacher. Refuses to replace an existing folder.
    """
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with atomic_folder(folder, replace=False) as staging:
        pipeline.save_pretrained(staging)
    return Path(folder)


def write_tiny_teacher_folder(folder: str | os.PathLike, config: TinyTeacherConfig = TinyTeacherConfig()) -> Path:
    """Build the tiny teacher and save it as a Stable-Diffusion-style pipeline folder."""
    return save_teacher_folder(build_tiny_components(config), folder)


def main(argv=None) -> int:
    """``python -m world.tiny_teacher --out DIR [--image-size 32]``: write a randomly initialised tiny teacher."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m world.tiny_teacher", description=main.__doc__)
    ap.add_argument("--out", required=True, help="folder to create (must not exist)")
    ap.add_argument("--image-size", type=int, default=TinyTeacherConfig.image_size, help="teacher image size")
    ap.add_argument("--seed", type=int, default=0, help="initialisation seed")
    args = ap.parse_args(argv)
    folder = write_tiny_teacher_folder(args.out, TinyTeacherConfig(image_size=args.image_size, seed=args.seed))
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
