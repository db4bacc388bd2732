"""EG3D's style-modulated super-resolution: raw render (rgb + features) -> final image.

EG3D's three modules are instances of one shape: resize the neural render to an input
resolution (bilinear, antialiased), then two synthesis blocks, each optionally upsampling 2x,
all modulated by the generator's last style vector.

| EG3D module                 | input | blocks (channels, upsample)   | output |
|-----------------------------|-------|-------------------------------|--------|
| SuperresolutionHybrid2X     | 64    | (128, no), (64, yes)          | 128    |
| SuperresolutionHybrid4X     | 128   | (128, no), (64, yes)          | 256    |
| SuperresolutionHybrid8X     | 128   | (128, yes), (64, yes)         | 512    |
| SuperresolutionHybrid8XDC   | 128   | (256, yes), (128, yes)        | 512    |

(EG3D's 4X resizes only inputs smaller than 128; for the neural resolutions it is used with,
at most 128, that is the same as resizing any other size.)
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import SynthesisBlock
from .ops import resize

EG3D_SR_MODULES = {
    "training.superresolution.SuperresolutionHybrid2X": dict(sr_input_resolution=64, sr_channels=(128, 64),
                                                             sr_upsample=(False, True)),
    "training.superresolution.SuperresolutionHybrid4X": dict(sr_input_resolution=128, sr_channels=(128, 64),
                                                             sr_upsample=(False, True)),
    "training.superresolution.SuperresolutionHybrid8X": dict(sr_input_resolution=128, sr_channels=(128, 64),
                                                             sr_upsample=(True, True)),
    "training.superresolution.SuperresolutionHybrid8XDC": dict(sr_input_resolution=128, sr_channels=(256, 128),
                                                               sr_upsample=(True, True)),
}


class SuperResolution(nn.Module):
    """Two modulated synthesis blocks on the resized neural render, using the last w only."""

    def __init__(self, feature_channels: int, input_resolution: int, channels=(256, 128), upsample=(True, True),
                 w_dim: int = 512, img_channels: int = 3, antialias: bool = True):
        super().__init__()
        if len(channels) != 2 or len(upsample) != 2:
            raise ValueError("super-resolution takes exactly two blocks: sr_channels and sr_upsample of length 2")
        self.input_resolution, self.antialias = input_resolution, antialias
        res = input_resolution
        in_ch = feature_channels
        for i, (ch, up) in enumerate(zip(channels, upsample)):
            res = res * 2 if up else res
            setattr(self, f"block{i}", SynthesisBlock(in_ch, ch, w_dim, res, img_channels, upsample=up))
            in_ch = ch

    def forward(self, rgb: torch.Tensor, features: torch.Tensor, ws: torch.Tensor, noise_mode: str = "none"):
        ws = ws[:, -1:, :].repeat(1, 3, 1)
        if features.shape[-1] != self.input_resolution:
            features = resize(features, self.input_resolution, antialias=self.antialias)
            rgb = resize(rgb, self.input_resolution, antialias=self.antialias)
        x, rgb = self.block0(features, rgb, ws, noise_mode=noise_mode)
        _, rgb = self.block1(x, rgb, ws, noise_mode=noise_mode)
        return rgb
