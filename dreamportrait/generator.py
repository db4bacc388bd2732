"""The tri-plane 3D-aware generator (EG3D architecture) with its configuration and presets.

``TriPlaneGenerator`` keeps EG3D's module names (``backbone.mapping``, ``backbone.synthesis``,
``superresolution``, ``decoder``) so that EG3D's weights load by name, and exposes the stages
separately — mapping, tri-plane synthesis, rendering — so that callers can cache planes and
re-render new cameras cheaply. All sizes come from :class:`GeneratorConfig`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .checkpoints import config_from_dict, load_model_file, save_model_file
from .cameras import FFHQ_DATASET_FOCAL, camera_label, camera_rays
from .layers import MappingNetwork, SynthesisBlock
from .renderer import ImportanceRenderer, OSGDecoder, RenderOptions
from .superresolution import SuperResolution

BlockHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class GeneratorConfig:
    """Architecture and rendering settings; the defaults are EG3D's FFHQ 512 model."""
    z_dim: int = 512
    c_dim: int = 25
    w_dim: int = 512
    mapping_layers: int = 2
    triplane_resolution: int = 256
    triplane_channels: int = 32
    channel_base: int = 32768
    channel_max: int = 512
    decoder_hidden: int = 64
    decoder_lr_mul: float = 1.0
    sr_input_resolution: int = 128
    sr_channels: tuple = (256, 128)
    sr_upsample: tuple = (True, True)
    sr_antialias: bool = True
    neural_rendering_resolution: int = 128
    depth_resolution: int = 48
    depth_resolution_importance: int = 48
    ray_start: float = 2.25
    ray_end: float = 3.3
    box_warp: float = 1.0
    white_back: bool = False
    avg_camera_radius: float = 2.7
    avg_camera_pivot: tuple = (0.0, 0.0, 0.2)
    c_gen_conditioning_zero: bool = False
    c_scale: float = 1.0

    def __post_init__(self):
        self.sr_channels = tuple(self.sr_channels)
        self.sr_upsample = tuple(bool(u) for u in self.sr_upsample)
        self.avg_camera_pivot = tuple(float(p) for p in self.avg_camera_pivot)
        res = self.triplane_resolution
        if res < 4 or 2 ** int(round(math.log2(res))) != res:
            raise ValueError(f"triplane_resolution must be a power of two >= 4, got {res}")
        if self.depth_resolution < 2:
            raise ValueError("depth_resolution must be at least 2")

    @property
    def img_resolution(self) -> int:
        return self.sr_input_resolution * 2 ** sum(self.sr_upsample)

    def block_channels(self) -> dict[int, int]:
        """Backbone width per resolution: min(channel_base // res, channel_max)."""
        res_log2 = int(math.log2(self.triplane_resolution))
        return {2 ** i: min(self.channel_base // 2 ** i, self.channel_max) for i in range(2, res_log2 + 1)}

    def render_options(self, deterministic: bool = False, depth_multiplier: int = 1) -> RenderOptions:
        return RenderOptions(self.depth_resolution * depth_multiplier,
                             self.depth_resolution_importance * depth_multiplier,
                             self.ray_start, self.ray_end, self.box_warp, self.white_back, deterministic)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "GeneratorConfig":
        return config_from_dict(cls, d, "generator")


PRESETS: dict[str, GeneratorConfig] = {
    # EG3D's FFHQ 512 model (ffhq512-128.pkl): 256^2 x 3 x 32 planes, NRR 128, 48+48 samples, SR 8XDC.
    "eg3d-ffhq-512": GeneratorConfig(),
    # Small CPU model: 64^2 planes, 32^2 neural render, 64^2 output; widths shrink with resolution;
    # a 32-wide decoder and 12+12 depth samples (1.2x the training images/s of 64 and 16+16 at no
    # visible loss after 1.6 kimg: benchmarks/RESULTS.md, training throughput).
    "tiny": GeneratorConfig(z_dim=64, w_dim=128, triplane_resolution=64, triplane_channels=16,
                            channel_base=2048, channel_max=128, sr_input_resolution=32, sr_channels=(32, 16),
                            sr_upsample=(False, True), neural_rendering_resolution=32, decoder_hidden=32,
                            depth_resolution=12, depth_resolution_importance=12),
}


def preset(name: str, **overrides) -> GeneratorConfig:
    """A named configuration, optionally with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown generator preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


class SynthesisNetwork(nn.Module):
    """StyleGAN2 'skip' synthesis over the resolutions of ``channels`` (4^2 up to the tri-plane
    resolution), emitting 3 x C planes."""

    def __init__(self, w_dim: int, img_channels: int, channels: dict[int, int]):
        super().__init__()
        self.resolutions = sorted(channels)
        self.num_ws = 0
        for res in self.resolutions:
            in_ch = channels[res // 2] if res > 4 else 0
            block = SynthesisBlock(in_ch, channels[res], w_dim, res, img_channels)
            setattr(self, f"b{res}", block)
            self.num_ws += block.num_conv
        self.num_ws += 1  # the last ToRGB

    def forward(self, ws: torch.Tensor, noise_mode: str = "random", block_hook: BlockHook | None = None):
        """``block_hook(res, x)`` may transform the features after each block (text adapters)."""
        ws = ws.to(torch.float32)
        x = img = None
        w_idx = 0
        for res in self.resolutions:
            block = getattr(self, f"b{res}")
            cur = ws.narrow(1, w_idx, block.num_conv + block.num_torgb)
            w_idx += block.num_conv
            adapter = None if block_hook is None else (lambda h, r=res: block_hook(r, h))
            x, img = block(x, img, cur, noise_mode=noise_mode, adapter=adapter)
        return img


class Backbone(nn.Module):
    """Mapping + synthesis, named as EG3D's ``StyleGAN2Backbone`` (``backbone.*`` keys)."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.synthesis = SynthesisNetwork(cfg.w_dim, 3 * cfg.triplane_channels, cfg.block_channels())
        self.mapping = MappingNetwork(cfg.z_dim, cfg.c_dim, cfg.w_dim, self.synthesis.num_ws,
                                      num_layers=cfg.mapping_layers)


class TriPlaneGenerator(nn.Module):
    """EG3D's tri-plane generator: (z, c) -> ws -> tri-planes -> volume render -> super-resolution."""

    def __init__(self, config: GeneratorConfig | str = "eg3d-ffhq-512"):
        super().__init__()
        self.config = preset(config) if isinstance(config, str) else config
        cfg = self.config
        self.backbone = Backbone(cfg)
        self.superresolution = SuperResolution(cfg.triplane_channels, cfg.sr_input_resolution, cfg.sr_channels,
                                               cfg.sr_upsample, cfg.w_dim, antialias=cfg.sr_antialias)
        self.decoder = OSGDecoder(cfg.triplane_channels, cfg.decoder_hidden, cfg.triplane_channels,
                                  cfg.decoder_lr_mul)
        self.renderer = ImportanceRenderer()

    @property
    def num_ws(self) -> int:
        return self.backbone.synthesis.num_ws

    def mapping(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, update_emas: bool = False) -> torch.Tensor:
        """(B, z_dim), (B, 25) -> ws (B, num_ws, w_dim); c is the conditioning (not rendering) camera."""
        if self.config.c_gen_conditioning_zero:
            c = torch.zeros_like(c)
        return self.backbone.mapping(z, c * self.config.c_scale, truncation_psi=truncation_psi,
                                     truncation_cutoff=truncation_cutoff, update_emas=update_emas)

    def synthesize_planes(self, ws: torch.Tensor, noise_mode: str = "random",
                          block_hook: BlockHook | None = None) -> torch.Tensor:
        """ws -> tri-planes (B, 3, C, H, W)."""
        planes = self.backbone.synthesis(ws, noise_mode=noise_mode, block_hook=block_hook)
        c = self.config.triplane_channels
        return planes.view(planes.shape[0], 3, c, planes.shape[-2], planes.shape[-1])

    def render(self, planes: torch.Tensor, ws: torch.Tensor, c: torch.Tensor,
               neural_rendering_resolution: int | None = None, deterministic: bool = False,
               depth_multiplier: int = 1, sr_noise_mode: str = "none") -> dict[str, torch.Tensor]:
        """Render cached planes from cameras c (B, 25): {'image', 'image_raw', 'image_depth'}."""
        res = neural_rendering_resolution or self.config.neural_rendering_resolution
        origins, dirs = camera_rays(c, res)
        opts = self.config.render_options(deterministic, depth_multiplier)
        features, depth, _ = self.renderer(planes, self.decoder, origins, dirs, opts)
        n = planes.shape[0]
        feature_image = features.permute(0, 2, 1).reshape(n, features.shape[-1], res, res).contiguous()
        depth_image = depth.permute(0, 2, 1).reshape(n, 1, res, res)
        rgb = feature_image[:, :3]
        image = self.superresolution(rgb, feature_image, ws, noise_mode=sr_noise_mode)
        return {"image": image, "image_raw": rgb, "image_depth": depth_image}

    def synthesis(self, ws: torch.Tensor, c: torch.Tensor, noise_mode: str = "random",
                  neural_rendering_resolution: int | None = None, deterministic: bool = False,
                  depth_multiplier: int = 1, **cond) -> dict[str, torch.Tensor]:
        """ws -> planes -> render from c. ``cond`` goes to :meth:`synthesize_planes`."""
        planes = self.synthesize_planes(ws, noise_mode=noise_mode, **cond)
        out = self.render(planes, ws, c, neural_rendering_resolution, deterministic, depth_multiplier)
        out["planes"] = planes
        return out

    def forward(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, c_render: torch.Tensor | None = None,
                **synthesis_kwargs) -> dict[str, torch.Tensor]:
        """Generate from z conditioned on camera c, rendered from ``c_render`` (default: c)."""
        ws = self.mapping(z, c, truncation_psi, truncation_cutoff)
        return self.synthesis(ws, c if c_render is None else c_render, **synthesis_kwargs)

    def sample_planes(self, planes: torch.Tensor, points: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw density (N, M, 1) and features (N, M, C) of world points (N, M, 3) from planes."""
        return self.renderer.query(planes, self.decoder, points, self.config.box_warp)

    def sample_mixed(self, points: torch.Tensor, ws: torch.Tensor, noise_mode: str = "random", **cond):
        """EG3D's ``sample_mixed``: synthesise planes from ws and sample density/features at points."""
        return self.sample_planes(self.synthesize_planes(ws, noise_mode=noise_mode, **cond), points)

    # Checkpoints -------------------------------------------------------------------------
    KIND = "triplane-generator"

    def checkpoint_config(self) -> dict:
        return {"generator": self.config.to_dict()}

    def save_pretrained(self, path, extra: dict | None = None) -> None:
        """Write one .safetensors file with the architecture config in its metadata (atomic)."""
        save_model_file(path, self.state_dict(), self.checkpoint_config(), self.KIND, extra)

    @classmethod
    def from_checkpoint_config(cls, config: dict) -> "TriPlaneGenerator":
        return cls(GeneratorConfig.from_dict(config["generator"]))

    @classmethod
    def from_pretrained(cls, path, device="cpu") -> "TriPlaneGenerator":
        f = load_model_file(path, expected_kind=cls.KIND, device=device)
        model = cls.from_checkpoint_config(f.config)
        model.load_state_dict(f.tensors, strict=True)
        return model.to(device).eval()

    def conditioning_label(self, batch: int = 1, device=None) -> torch.Tensor:
        """The frontal camera EG3D's inference scripts condition the mapping on."""
        c = camera_label(0.0, 0.0, FFHQ_DATASET_FOCAL, self.config.avg_camera_pivot, self.config.avg_camera_radius)
        return c.repeat(batch, 1).to(device)
