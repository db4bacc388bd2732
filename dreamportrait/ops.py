"""Numerical primitives of the StyleGAN2/EG3D family, in plain PyTorch (no compiled extensions).

- :func:`upfirdn2d`: upsample by zero insertion, pad/crop, FIR-filter, downsample.
- :func:`bias_act`: bias add, activation, gain and optional clamp.
- :func:`conv2d_resample`: convolution fused with 2x up/downsampling through a FIR filter,
  in the same operation order as EG3D's so that released weights give the same numbers.
- :func:`resize`: antialiased image resizing that also runs on bfloat16/float16 images.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LRELU_ALPHA = 0.2
ACT_GAIN = {"linear": 1.0, "lrelu": math.sqrt(2.0)}


def setup_filter(taps=(1, 3, 3, 1)) -> torch.Tensor:
    """Normalised 2-D FIR filter: the outer product of ``taps`` with itself, summing to 1."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    f = torch.outer(f, f)
    return f / f.sum()


def upfirdn2d(x: torch.Tensor, f: torch.Tensor, up: int = 1, down: int = 1,
              padding=(0, 0, 0, 0), gain: float = 1.0) -> torch.Tensor:
    """Upsample (zero insertion), pad (negative = crop), filter with ``f * gain``, downsample.

    ``padding`` is (left, right, top, bottom). The filter is symmetric in this project, so
    convolution and correlation coincide.
    """
    n, c, h, w = x.shape
    if up > 1:
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, c, h * up, w * up)
    px0, px1, py0, py1 = padding
    x = F.pad(x, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    x = x[:, :, max(-py0, 0): x.shape[2] - max(-py1, 0), max(-px0, 0): x.shape[3] - max(-px1, 0)]
    weight = (f * gain).to(x.dtype).flip([0, 1])[None, None].repeat(c, 1, 1, 1)
    x = F.conv2d(x, weight, groups=c)
    if down > 1:
        x = x[:, :, ::down, ::down]
    return x


def upsample2d(x: torch.Tensor, f: torch.Tensor, up: int = 2) -> torch.Tensor:
    """2x (or ``up``x) FIR upsampling that keeps the image centred."""
    fw = f.shape[-1]
    p = [(fw + up - 1) // 2, (fw - up) // 2] * 2
    return upfirdn2d(x, f, up=up, padding=p, gain=up * up)


def bias_act(x: torch.Tensor, b: torch.Tensor | None = None, act: str = "linear",
             gain: float | None = None, clamp: float | None = None) -> torch.Tensor:
    """x + b (broadcast over dim 1), then activation, gain (default: the activation's) and clamp."""
    if b is not None:
        x = x + b.reshape([1, -1] + [1] * (x.ndim - 2))
    if act == "lrelu":
        x = F.leaky_relu(x, LRELU_ALPHA)
    elif act != "linear":
        raise ValueError(f"unknown activation {act!r}; use 'linear' or 'lrelu'")
    gain = ACT_GAIN[act] if gain is None else gain
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def conv2d_resample(x: torch.Tensor, w: torch.Tensor, f: torch.Tensor | None = None, up: int = 1,
                    down: int = 1, padding: int = 0, groups: int = 1) -> torch.Tensor:
    """2-D convolution (cross-correlation with ``w``) combined with FIR up/downsampling.

    Upsampling runs as a stride-2 transposed convolution followed by the FIR filter;
    downsampling as the FIR filter followed by a strided convolution (1x1 kernels filter and
    decimate first), the same arrangement as EG3D's ``conv2d_resample``.
    """
    out_ch, in_ch_per_group, kh, kw = w.shape
    fw = f.shape[-1] if f is not None else 1
    px0 = px1 = padding
    if up > 1:
        px0 += (fw + up - 1) // 2
        px1 += (fw - up) // 2
    if down > 1:
        px0 += (fw - down + 1) // 2
        px1 += (fw - down) // 2
    pad4 = [px0, px1, px0, px1]

    if kw == 1 and kh == 1 and down > 1 and up == 1:
        x = upfirdn2d(x, f, down=down, padding=pad4)
        return F.conv2d(x, w, groups=groups)
    if down > 1 and up == 1:
        x = upfirdn2d(x, f, padding=pad4)
        return F.conv2d(x, w, stride=down, groups=groups)
    if up > 1 and down == 1:
        # Transposed convolution expects (in, out/groups, kh, kw).
        if groups == 1:
            wt = w.transpose(0, 1)
        else:
            wt = w.reshape(groups, out_ch // groups, in_ch_per_group, kh, kw).transpose(1, 2)
            wt = wt.reshape(groups * in_ch_per_group, out_ch // groups, kh, kw)
        px0 -= kw - 1
        px1 -= kw - up
        pt = max(min(-px0, -px1), 0)
        x = F.conv_transpose2d(x, wt, stride=up, padding=pt, groups=groups)
        return upfirdn2d(x, f, padding=[px0 + pt, px1 + pt, px0 + pt, px1 + pt], gain=up * up)
    if up == 1 and down == 1 and px0 >= 0:
        return F.conv2d(x, w, padding=px0, groups=groups)
    raise ValueError(f"unsupported resampling up={up} down={down}")


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """Scale to unit mean square along ``dim``."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def resize(x: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear",
           antialias: bool = True) -> torch.Tensor:
    """Resize (N, C, H, W) images to ``size`` (an int for square), antialiased by default (EG3D's
    'filtered' resizing: ``F.interpolate`` with ``align_corners=False``). bfloat16/float16 inputs
    are resized in float32 (PyTorch's antialiased kernels lack them) and returned in their dtype.
    """
    low_precision = x.dtype in (torch.bfloat16, torch.float16)
    y = F.interpolate(x.float() if low_precision else x, size=size, mode=mode, align_corners=False,
                      antialias=antialias)
    return y.to(x.dtype) if low_precision else y
