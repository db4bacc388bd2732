"""The synthetic world's evaluation CLIP: a locked pretrained text tower and an image tower tuned to it.

Locked-image-text tuning turned around (LiT, Zhai et al. 2022, locks the image tower; here the
pretrained side is the text): the text tower is the frozen sentence encoder the world reads
text with (all-MiniLM-L6-v2 through :meth:`TextEncoder.from_minilm`), its global feature the
attention-masked mean of its last hidden states. Only a small convolutional image tower, a
linear projection of the text feature and the temperature are trained, contrastively
(``python -m world.clip_training``). It scores text-image agreement for CLIP R-Precision and
MSC in ``train.evaluate --clip``.

The file (:data:`LIT_CLIP_FILE`, one safetensors file, ``kind=lit-clip``) holds the image tower,
the projection and the temperature; the text tower is not stored: the config records its identity
(name, weights sha256, feature fingerprint), loading rebuilds it through
:meth:`TextEncoder.from_identity` (which verifies the hash) and refuses any other encoder.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import CheckpointError, load_model_file, save_model_file
from ..text_encoder import MeanPooledBert, TextEncoder
from .judge import check_image_tower, tower_input

KIND = "lit-clip"
LIT_CLIP_FILE = "lit_clip.safetensors"
MAX_LOGIT_SCALE = math.log(100)  # CLIP's cap on the inverse temperature


@dataclass
class LitClipConfig:
    """The image tower's architecture, the embedding size and the locked text tower's identity."""
    text_encoder: dict                     # TextEncoder.describe() of the locked text tower
    resolution: int = 64
    channels: tuple = (32, 64, 128, 256)   # one stage each: stride-2 conv, then a residual block
    embed_dim: int = 256
    norm_groups: int = 8

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if not isinstance(self.text_encoder, dict) or "width" not in self.text_encoder:
            raise ValueError("text_encoder must be the locked text tower's identity (TextEncoder.describe())")
        check_image_tower(self.resolution, self.channels, self.norm_groups)

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), channels=list(self.channels))


class ResidualBlock(nn.Module):
    """Pre-activation residual block: x + conv(SiLU(GN(conv(SiLU(GN(x))))))."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class LitClip(nn.Module):
    """Images in [-1, 1] and prompts -> unit embeddings in one space; ``logit_scale`` is log(1 / temperature).

    ``text_encoder`` is the locked tower (a mean-pooled BERT: :meth:`TextEncoder.from_minilm` or
    :meth:`TextEncoder.from_bert`); it must be the one ``config.text_encoder`` describes.
    """

    def __init__(self, config: LitClipConfig, text_encoder: TextEncoder):
        super().__init__()
        if not isinstance(text_encoder.tower, MeanPooledBert):
            raise ValueError("LitClip's locked text tower is a mean-pooled BERT: build it with "
                             "TextEncoder.from_minilm() (or from_bert for a test model)")
        text_encoder.check_matches(config.text_encoder, "this CLIP's config")
        self.config, self.text_encoder, self.name = config, text_encoder, "lit-clip"
        cfg = config
        layers, c_in = [], 3
        for c in cfg.channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), ResidualBlock(c, cfg.norm_groups)]
            c_in = c
        side = cfg.resolution // 2 ** len(cfg.channels)
        # Flatten rather than pool: where something is (mouth, earrings, beard) matters.
        self.image_tower = nn.Sequential(*layers, nn.GroupNorm(cfg.norm_groups, c_in), nn.SiLU(), nn.Flatten(),
                                         nn.Linear(c_in * side * side, cfg.embed_dim))
        self.text_projection = nn.Linear(text_encoder.width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything but the locked text tower: what the file stores."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("text_encoder.")}

    # ---- embeddings ---------------------------------------------------------------------

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W), resized to the tower's resolution -> unit embeddings (B, D)."""
        x = tower_input(images, self.config.resolution, self.device, "the CLIP")
        return F.normalize(self.image_tower(x), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str], batch: int = 256) -> torch.Tensor:
        """The locked tower's global feature (B, width): :meth:`TextEncoder.__call__`'s ``eot``, computed
        in batches of similar length with the padding cut (the masked mean ignores it)."""
        ids, counts = self.text_encoder.tokenize(prompts)
        lengths = (ids != self.text_encoder.tower.pad_id).sum(1)
        order = lengths.argsort()
        out = torch.empty(len(prompts), self.text_encoder.width, device=self.device)
        for start in range(0, len(prompts), batch):
            rows = order[start:start + batch]
            out[rows.to(out.device)] = self.text_encoder.encode_ids(ids[rows, :int(lengths[rows].max())],
                                                                    counts[rows]).eot.float()
        return out

    def encode_text_features(self, features: torch.Tensor) -> torch.Tensor:
        """Locked text features (B, width) -> unit embeddings (B, D)."""
        return F.normalize(self.text_projection(features.to(self.device, torch.float32)), dim=-1)

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings, no gradient (the evaluation CLIP interface of ``train.evaluate``)."""
        return self.encode_image(images)

    @torch.no_grad()
    def texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit text embeddings of prompts, no gradient."""
        return self.encode_text_features(self.text_features(prompts))

    # ---- files --------------------------------------------------------------------------

    def save_pretrained(self, path, extra: dict | None = None) -> Path:
        """Write the trained weights and the config (not the text tower) atomically; ``path`` is a
        folder (the file goes in as :data:`LIT_CLIP_FILE`) or a ``.safetensors`` file."""
        file = _file(path)
        save_model_file(file, self.trainable_state(), self.config.to_dict(), KIND, extra)
        return file

    @classmethod
    def from_pretrained(cls, path, device="cpu", text_encoder: TextEncoder | None = None) -> "LitClip":
        """Load a CLIP written by :meth:`save_pretrained`. The text tower is rebuilt from its recorded
        identity (for MiniLM: from the package, hash checked) unless ``text_encoder`` is given, which
        must then be the recorded one."""
        file = _file(path)
        meta = load_model_file(file, expected_kind=KIND, device="cpu")
        try:
            config = LitClipConfig(**meta.config)
        except TypeError as exc:
            raise CheckpointError(f"{file} has an unknown config ({exc}); update DreamPortrait or retrain the CLIP") from exc
        encoder = text_encoder or TextEncoder.from_identity(config.text_encoder)
        model = cls(config, encoder)
        mine = model.trainable_state()
        problem = sorted(set(mine) ^ set(meta.tensors)) or [k for k in mine if mine[k].shape != meta.tensors[k].shape]
        if problem:
            raise CheckpointError(f"{file} does not fit this DreamPortrait's CLIP architecture ({problem[:3]}); "
                                  "retrain it")
        model.load_state_dict(meta.tensors, strict=False)
        model.name = str(path)
        return model.to(device).eval()


def _file(path) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / LIT_CLIP_FILE
