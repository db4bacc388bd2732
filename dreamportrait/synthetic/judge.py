"""The synthetic world's judge: a small CNN that reads every attribute of a 64x64 portrait.

One softmax head per attribute of :data:`dreamportrait.synthetic.attributes.ATTRIBUTES`. An
attribute that cannot be seen (``None``, e.g. hair colour when bald) has no target: it is
encoded as :data:`IGNORE` and skipped by the loss. The judge measures text-to-3D alignment
(per-attribute accuracy) and, in the synthetic world, its penultimate features stand in for
Inception's in FID. Its file stores the vocabulary it was trained on, so a judge from an older
world fails loudly instead of silently reading attributes by the wrong index. Trained by
``python -m world.judge_training``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import CheckpointError, load_model_file, save_model_file
from ..ops import resize
from .attributes import ATTRIBUTES

KIND = "attribute-classifier"
IGNORE = -100  # target index of an invisible attribute (torch's default ignore_index)


def _current_vocabulary() -> dict[str, list[str]]:
    return {name: list(values) for name, values in ATTRIBUTES.items()}


def check_image_tower(resolution: int, channels: Sequence[int], norm_groups: int) -> None:
    """A stride-2 conv tower's config (the judge's and the world's CLIP's image towers): one halving
    per entry of ``channels``, GroupNorm groups dividing every width."""
    if resolution % 2 ** len(channels):
        raise ValueError(f"resolution {resolution} is not divisible by 2^{len(channels)} "
                         f"(one halving per entry of channels {tuple(channels)})")
    if any(c % norm_groups for c in channels):
        raise ValueError(f"every channel count {tuple(channels)} must be divisible by norm_groups={norm_groups}")


def tower_input(images: torch.Tensor, resolution: int, device, who: str) -> torch.Tensor:
    """Check an RGB batch in [-1, 1] (B, 3, H, W); float32 on ``device`` at the tower's resolution."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{who} takes RGB images (B, 3, H, W) in [-1, 1], got {shape}")
    images = images.to(device, torch.float32)
    return images if images.shape[-2:] == (resolution, resolution) else resize(images, resolution)


@dataclass
class JudgeConfig:
    """Architecture of the judge and the attribute vocabulary its heads read."""
    vocabulary: dict = field(default_factory=_current_vocabulary)
    resolution: int = 64
    channels: tuple = (32, 64, 128, 256)   # one stride-2 stage each: 64 -> 4 pixels
    feature_dim: int = 256
    norm_groups: int = 8

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        self.vocabulary = {str(k): [str(v) for v in vals] for k, vals in self.vocabulary.items()}
        if not self.vocabulary or any(len(v) < 2 for v in self.vocabulary.values()):
            raise ValueError("the vocabulary needs at least one attribute, each with at least two values")
        check_image_tower(self.resolution, self.channels, self.norm_groups)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        return d


def vocabulary_difference(have: Mapping, want: Mapping) -> list[str]:
    """Human-readable differences between two vocabularies (empty when equal, order included)."""
    notes = []
    for name in sorted(set(have) - set(want)):
        notes.append(f"attribute {name!r} is no longer in the world")
    for name in sorted(set(want) - set(have)):
        notes.append(f"attribute {name!r} is new")
    for name in sorted(set(have) & set(want)):
        if list(have[name]) != list(want[name]):
            notes.append(f"{name}: {list(have[name])} -> {list(want[name])}")
    return notes


class AttributeClassifier(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) -> one logit vector per attribute."""

    def __init__(self, config: JudgeConfig | None = None):
        super().__init__()
        self.config = config or JudgeConfig()
        cfg = self.config
        layers, c_in = [], 3
        for c in cfg.channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(cfg.norm_groups, c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, stride=2, padding=1), nn.GroupNorm(cfg.norm_groups, c), nn.SiLU()]
            c_in = c
        self.trunk = nn.Sequential(*layers)
        side = cfg.resolution // 2 ** len(cfg.channels)
        # Flatten rather than pool: where something is (mouth, earrings, beard) matters.
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, cfg.feature_dim), nn.SiLU())
        # All heads in one linear layer; its outputs are laid out as (attribute, value) on a grid
        # padded with -inf, so the loss and argmax of every attribute are single tensor ops.
        self.sizes = [len(values) for values in cfg.vocabulary.values()]
        self.heads = nn.Linear(cfg.feature_dim, sum(self.sizes))
        valid = torch.arange(max(self.sizes))[None, :] < torch.tensor(self.sizes)[:, None]
        self.register_buffer("valid", valid, persistent=False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Check the batch and resize it to the judge's resolution (antialiased bilinear)."""
        return tower_input(images, self.config.resolution, next(self.parameters()).device, "the judge")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim): what the heads read, and FID's features here."""
        return self.embed(self.trunk(self.prepare(images)))

    def grid_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, attributes, max values), -inf where an attribute has fewer values."""
        flat = self.heads(self.features(images))
        grid = flat.new_full((flat.shape[0], *self.valid.shape), float("-inf"))
        grid[:, self.valid] = flat
        return grid

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute: name -> (B, number of values)."""
        logits = self.heads(self.features(images)).split(self.sizes, dim=1)
        return dict(zip(self.config.vocabulary, logits))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Most likely value index (B,) per attribute."""
        return dict(zip(self.config.vocabulary, self.grid_logits(images).argmax(dim=2).unbind(dim=1)))

    def decode(self, indices: Mapping[str, torch.Tensor]) -> list[dict[str, str]]:
        """Value names per image from :meth:`predict`'s indices."""
        vocab = self.config.vocabulary
        columns = {name: [vocab[name][int(i)] for i in idx] for name, idx in indices.items()}
        count = len(next(iter(columns.values())))
        return [{name: col[b] for name, col in columns.items()} for b in range(count)]

    def read(self, images: torch.Tensor, batch: int = 256) -> list[dict[str, str]]:
        """The value names the judge reads in each image (float images in [-1, 1]), in batches and
        in eval mode (the module's mode is restored)."""
        was_training = self.training
        self.eval()
        readings = []
        for start in range(0, len(images), batch):
            readings += self.decode(self.predict(images[start:start + batch]))
        self.train(was_training)
        return readings

    def encode_targets(self, attributes: Sequence[Mapping[str, str | None]]) -> dict[str, torch.Tensor]:
        """Attribute dicts (one per image, every attribute present; None if invisible) -> indices (B,)."""
        vocab = self.config.vocabulary
        out = {}
        for name, values in vocab.items():
            column = []
            for i, attrs in enumerate(attributes):
                if name not in attrs:
                    raise ValueError(f"image {i} has no {name!r} entry; give every attribute "
                                     "(None for one that cannot be seen)")
                value = attrs[name]
                if value is not None and value not in values:
                    raise ValueError(f"image {i}: {name}={value!r} is not in the judge's vocabulary {values}")
                column.append(IGNORE if value is None else values.index(value))
            out[name] = torch.tensor(column, dtype=torch.long)
        return out

    def loss(self, images: torch.Tensor, targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sum over attributes of the cross-entropy, averaged over the images where it is visible."""
        missing = sorted(set(self.config.vocabulary) - set(targets))
        if missing:
            raise ValueError(f"targets lack attributes {missing}; build them with encode_targets()")
        grid = self.grid_logits(images)
        target = torch.stack([targets[name] for name in self.config.vocabulary], dim=1).to(grid.device)
        ce = F.cross_entropy(grid.transpose(1, 2), target, ignore_index=IGNORE, reduction="none")  # (B, A)
        visible = (target != IGNORE).sum(dim=0).clamp(min=1)
        return (ce.sum(dim=0) / visible).sum()

    # ---- files ------------------------------------------------------------------------

    def save_pretrained(self, path, extra: dict | None = None) -> None:
        """Write weights + config (vocabulary included) atomically to one .safetensors file."""
        save_model_file(path, self.state_dict(), self.config.to_dict(), KIND, extra)

    @classmethod
    def from_pretrained(cls, path, device="cpu", vocabulary: Mapping | None = None) -> "AttributeClassifier":
        """Load a judge; its vocabulary must equal ``vocabulary`` (default: the current ATTRIBUTES)."""
        file = load_model_file(path, expected_kind=KIND, device=device)
        want = _current_vocabulary() if vocabulary is None else {k: list(v) for k, v in vocabulary.items()}
        notes = vocabulary_difference(file.config.get("vocabulary", {}), want)
        if notes:
            raise CheckpointError(f"judge {path} was trained on another attribute vocabulary than the current "
                                  f"synthetic world ({'; '.join(notes)}); retrain the judge on this world")
        try:
            model = cls(JudgeConfig(**file.config))
        except TypeError as exc:
            raise CheckpointError(f"judge {path} has an unknown config ({exc}); "
                                  "update DreamPortrait or retrain the judge") from exc
        try:
            missing, unexpected = model.load_state_dict(file.tensors, strict=False)
            problem = missing and f"missing {missing[:3]}" or unexpected and f"unexpected {unexpected[:3]}"
        except RuntimeError as exc:  # a tensor of the wrong shape
            problem = str(exc).strip().splitlines()[-1].strip()
        if problem:
            raise CheckpointError(f"judge {path} does not fit this DreamPortrait's judge architecture "
                                  f"({problem}); retrain it")
        return model.to(device).eval()

