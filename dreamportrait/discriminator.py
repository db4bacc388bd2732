"""EG3D's dual discriminator: a pose-conditioned StyleGAN2 ResNet discriminator that judges the
final image together with the (upsampled) raw neural render, stacked as 6 channels.

Module names follow EG3D (``b{res}.fromrgb/conv0/conv1/skip``, ``mapping``, ``b4.*``) so that
EG3D's pretrained discriminator loads by name. A model file's config holds either
``discriminator`` (a :class:`DiscriminatorConfig` dict, written by
:meth:`DualDiscriminator.save_pretrained`) or ``eg3d_init_kwargs`` (EG3D's constructor kwargs,
written by ``python -m dreamportrait.eg3d.convert``).

An extension, not EG3D's nor the paper's: with ``text_dim`` > 0 the discriminator also reads a
sentence feature and adds its embedding to the camera embedding the output is projected on
(projection conditioning, Miyato & Koyama 2018, as text-to-image GANs condition D). The
embedding's last layer starts at zero, so a discriminator that gains it judges exactly as before.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoints import CheckpointError, config_from_dict, load_model_file, save_model_file
from .layers import Conv2dLayer, FullyConnectedLayer, MappingNetwork
from .ops import normalize_2nd_moment, resize


@dataclass
class DiscriminatorConfig:
    """Defaults are EG3D's FFHQ 512 discriminator."""
    img_resolution: int = 512
    img_channels: int = 3
    c_dim: int = 25
    channel_base: int = 32768
    channel_max: int = 512
    mapping_layers: int = 8
    mbstd_group_size: int = 4
    mbstd_num_channels: int = 1
    disc_c_noise: float = 0.0
    text_dim: int = 0             # extension: width of the sentence feature D also reads (0: text-blind, EG3D's)

    def channels(self, res: int) -> int:
        return min(self.channel_base // res, self.channel_max)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiscriminatorConfig":
        return config_from_dict(cls, d, "discriminator")

    @classmethod
    def from_eg3d_kwargs(cls, kw: dict) -> "DiscriminatorConfig":
        """Build from EG3D's ``DualDiscriminator`` constructor kwargs (as in a pickle's init_kwargs)."""
        epilogue = kw.get("epilogue_kwargs", {})
        return cls(img_resolution=kw["img_resolution"], img_channels=kw.get("img_channels", 3),
                   c_dim=kw.get("c_dim", 25), channel_base=kw.get("channel_base", 32768),
                   channel_max=kw.get("channel_max", 512),
                   mapping_layers=kw.get("mapping_kwargs", {}).get("num_layers", 8),
                   mbstd_group_size=kw.get("mbstd_group_size", epilogue.get("mbstd_group_size", 4)),
                   disc_c_noise=kw.get("disc_c_noise", 0.0))


class DiscriminatorBlock(nn.Module):
    """ResNet block: (fromRGB at the top resolution) conv3x3, conv3x3 + 2x down, 1x1 down skip."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, img_channels: int):
        super().__init__()
        self.in_channels = in_channels
        if in_channels == 0:
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, 1, activation="lrelu")
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, activation="lrelu")
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, 3, activation="lrelu", down=2)
        self.skip = Conv2dLayer(tmp_channels, out_channels, 1, bias=False, down=2)

    def forward(self, x: torch.Tensor | None, img: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 0:
            y = self.fromrgb(img)
            x = y if x is None else x + y
        y = self.skip(x, gain=math.sqrt(0.5))
        x = self.conv1(self.conv0(x), gain=math.sqrt(0.5))
        return y + x


def minibatch_stddev(x: torch.Tensor, group_size: int, num_channels: int = 1) -> torch.Tensor:
    """Append the per-group standard deviation of features as extra channels."""
    n, c, h, w = x.shape
    g = min(group_size, n)
    if n % g != 0:
        raise ValueError(f"batch size {n} must be a multiple of the minibatch-stddev group size {g}")
    y = x.reshape(g, -1, num_channels, c // num_channels, h, w)
    y = (y - y.mean(dim=0)).square().mean(dim=0)
    y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4]).reshape(-1, num_channels, 1, 1)
    return torch.cat([x, y.repeat(g, 1, h, w)], dim=1)


class DiscriminatorEpilogue(nn.Module):
    """4x4 head: minibatch stddev, conv, fc, output projected onto the camera embedding."""

    def __init__(self, in_channels: int, cmap_dim: int, group_size: int, num_channels: int):
        super().__init__()
        self.cmap_dim, self.group_size, self.num_channels = cmap_dim, group_size, num_channels
        self.conv = Conv2dLayer(in_channels + num_channels, in_channels, 3, activation="lrelu")
        self.fc = FullyConnectedLayer(in_channels * 16, in_channels, activation="lrelu")
        self.out = FullyConnectedLayer(in_channels, cmap_dim if cmap_dim > 0 else 1)

    def forward(self, x: torch.Tensor, cmap: torch.Tensor | None) -> torch.Tensor:
        x = x.to(torch.float32)
        if self.num_channels > 0:
            x = minibatch_stddev(x, self.group_size, self.num_channels)
        x = self.out(self.fc(self.conv(x).flatten(1)))
        if cmap is not None:
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / math.sqrt(self.cmap_dim))
        return x


class TextProjection(nn.Module):
    """Sentence feature -> an embedding added to the camera embedding; zero until trained. The
    feature is normalised to unit second moment first, as StyleGAN's mapping normalises its inputs
    (MiniLM's mean-pooled features have an RMS of about 0.27)."""

    def __init__(self, text_dim: int, cmap_dim: int):
        super().__init__()
        self.fc0 = FullyConnectedLayer(text_dim, cmap_dim, activation="lrelu")
        self.fc1 = FullyConnectedLayer(cmap_dim, cmap_dim)
        nn.init.zeros_(self.fc1.weight)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.fc1(self.fc0(normalize_2nd_moment(text)))


class DualDiscriminator(nn.Module):
    """D({'image', 'image_raw'}, c[, text]) -> logits (B, 1); ``text`` (B, text_dim) only when
    ``config.text_dim`` > 0."""

    def __init__(self, config: DiscriminatorConfig | None = None):
        super().__init__()
        self.config = cfg = config or DiscriminatorConfig()
        res_log2 = int(math.log2(cfg.img_resolution))
        self.resolutions = [2 ** i for i in range(res_log2, 2, -1)]
        img_channels = cfg.img_channels * 2
        for res in self.resolutions:
            in_ch = cfg.channels(res) if res < cfg.img_resolution else 0
            setattr(self, f"b{res}", DiscriminatorBlock(in_ch, cfg.channels(res), cfg.channels(res // 2), img_channels))
        cmap_dim = cfg.channels(4) if cfg.c_dim > 0 else 0
        if cfg.c_dim > 0:
            self.mapping = MappingNetwork(0, cfg.c_dim, cmap_dim, num_ws=None, num_layers=cfg.mapping_layers,
                                          w_avg_beta=None)
        if cfg.text_dim > 0:
            if cfg.c_dim <= 0:
                raise ValueError("a discriminator's text_dim > 0 adds to its camera embedding: it needs c_dim > 0")
            self.text_mapping = TextProjection(cfg.text_dim, cmap_dim)
        self.b4 = DiscriminatorEpilogue(cfg.channels(4), cmap_dim, cfg.mbstd_group_size, cfg.mbstd_num_channels)

    def forward(self, img: dict[str, torch.Tensor], c: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        if (text is not None) != (self.config.text_dim > 0):
            raise ValueError(f"this discriminator reads a sentence feature of width {self.config.text_dim} "
                             f"(0: none); got {'none' if text is None else tuple(text.shape)}")
        size = img["image"].shape[-1]
        raw = resize(img["image_raw"], size)
        x_img = torch.cat([img["image"], raw], dim=1)
        x = None
        for res in self.resolutions:
            x = getattr(self, f"b{res}")(x, x_img)
        cmap = None
        if self.config.c_dim > 0:
            if self.config.disc_c_noise > 0:
                c = c + torch.randn_like(c) * c.std(0) * self.config.disc_c_noise
            cmap = self.mapping(None, c)
        if text is not None:
            cmap = cmap + self.text_mapping(text.to(cmap.dtype))
        return self.b4(x, cmap)

    # Checkpoints -------------------------------------------------------------------------
    KIND = "dual-discriminator"
    CONFIG_KEYS = ("eg3d_init_kwargs", "discriminator")

    def save_pretrained(self, path, extra: dict | None = None) -> None:
        """Write one .safetensors file with the DiscriminatorConfig in its metadata (atomic)."""
        save_model_file(path, self.state_dict(), {"discriminator": self.config.to_dict()}, self.KIND, extra)

    @classmethod
    def config_from_checkpoint(cls, config: dict, path) -> DiscriminatorConfig:
        """The DiscriminatorConfig a model file's config describes (exactly one of CONFIG_KEYS)."""
        present = [key for key in cls.CONFIG_KEYS if key in config]
        if len(present) != 1:
            raise CheckpointError(
                f"{path} config must hold exactly one of {list(cls.CONFIG_KEYS)}, found keys {sorted(config)}; "
                "write it with DualDiscriminator.save_pretrained or `python -m dreamportrait.eg3d.convert`")
        try:
            if present[0] == "eg3d_init_kwargs":
                return DiscriminatorConfig.from_eg3d_kwargs(config["eg3d_init_kwargs"])
            return DiscriminatorConfig.from_dict(config["discriminator"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path} has an invalid discriminator config ({exc!r}); "
                                  "re-convert or re-save it") from exc

    @classmethod
    def from_pretrained(cls, path, device="cpu") -> "DualDiscriminator":
        """A DualDiscriminator loaded strictly from a 'dual-discriminator' model file, in eval mode."""
        path = Path(path)
        f = load_model_file(path, expected_kind=cls.KIND, device=device)
        model = cls(cls.config_from_checkpoint(f.config, path))
        try:
            model.load_state_dict(f.tensors, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path} does not fit the discriminator its config describes: {exc}") from exc
        return model.to(device).eval()
