"""Signed-distance primitives on structure-of-arrays points (x, y, z are separate (M,) tensors).

Keeping coordinates and parameters as contiguous 1-D tensors makes every operation a plain
element-wise kernel, which is what makes CPU sphere tracing fast in torch. Parameters are
tensors of the same shape (per point) or Python floats.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def length3(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    return torch.sqrt(x * x + y * y + z * z)


def ellipsoid(x, y, z, c, r) -> Tensor:
    """Approximate distance to an axis-aligned ellipsoid (centre c, radii r: 3-tuples).

    Uses the k0 * (k0 - 1) / k1 bound, accurate near the surface, which is where it matters.
    """
    qx, qy, qz = (x - c[0]) / r[0], (y - c[1]) / r[1], (z - c[2]) / r[2]
    k0 = length3(qx, qy, qz)
    k1 = length3(qx / r[0], qy / r[1], qz / r[2])
    return k0 * (k0 - 1.0) / k1.clamp_min(1e-6)


def sphere(x, y, z, c, radius) -> Tensor:
    return length3(x - c[0], y - c[1], z - c[2]) - radius


def capsule(x, y, z, a, b, radius) -> Tensor:
    """Distance to the segment a-b thickened by ``radius``."""
    bax, bay, baz = b[0] - a[0], b[1] - a[1], b[2] - a[2]
    pax, pay, paz = x - a[0], y - a[1], z - a[2]
    h = ((pax * bax + pay * bay + paz * baz) / (bax * bax + bay * bay + baz * baz)).clamp(0.0, 1.0)
    return length3(pax - bax * h, pay - bay * h, paz - baz * h) - radius


def polyline(x, y, z, points, radius) -> Tensor:
    """Union of capsules through consecutive points (an eyebrow, a lip, a mustache)."""
    d = capsule(x, y, z, points[0], points[1], radius)
    for a, b in zip(points[1:-1], points[2:]):
        d = torch.minimum(d, capsule(x, y, z, a, b, radius))
    return d


def round_rect_2d(u: Tensor, v: Tensor, half_w, half_h, corner) -> Tensor:
    """2-D distance to a rounded rectangle centred at the origin."""
    qx = u.abs() - half_w + corner
    qy = v.abs() - half_h + corner
    outside = torch.sqrt(qx.clamp_min(0.0) ** 2 + qy.clamp_min(0.0) ** 2)
    return outside + torch.maximum(qx, qy).clamp_max(0.0) - corner


def smooth_union(a: Tensor, b: Tensor, k: float) -> Tensor:
    """Polynomial smooth minimum with blend radius ``k``: exactly min(a, b) where |a - b| >= k
    (so a far-away or absent shape, at distance FAR, leaves the other untouched)."""
    h = (k - (a - b).abs()).clamp_min(0.0) / k
    return torch.minimum(a, b) - 0.25 * k * h * h
