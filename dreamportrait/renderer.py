"""Neural volume rendering of tri-planes, numerically matching EG3D's renderer.

Rays come from a 25-d camera label (:func:`dreamportrait.cameras.camera_rays`); features are
sampled from the planes (:mod:`dreamportrait.triplane`), decoded by a small MLP into raw density
and 32 features, and composited MipNeRF-style on interval midpoints. A coarse stratified pass
is followed by an importance pass drawn from the coarse weights. ``deterministic=True`` puts
the coarse samples at bin midpoints and draws importance samples at evenly spaced quantiles,
so a fixed camera renders the same pixels every time (flicker-free orbits).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import FullyConnectedLayer
from .triplane import sample_from_planes


@dataclass
class RenderOptions:
    """Depth sampling and box settings (EG3D's ``rendering_kwargs`` that affect rendering)."""
    depth_resolution: int = 48
    depth_resolution_importance: int = 48
    ray_start: float = 2.25
    ray_end: float = 3.3
    box_warp: float = 1.0
    white_back: bool = False
    deterministic: bool = False


class OSGDecoder(nn.Module):
    """Plane-averaged features -> raw density (channel 0) and ``out_features`` colour features."""

    def __init__(self, in_features: int = 32, hidden: int = 64, out_features: int = 32, lr_multiplier: float = 1.0):
        super().__init__()
        self.net = nn.Sequential(FullyConnectedLayer(in_features, hidden, lr_multiplier=lr_multiplier),
                                 nn.Softplus(),
                                 FullyConnectedLayer(hidden, 1 + out_features, lr_multiplier=lr_multiplier))

    def forward(self, plane_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """plane_features: (N, 3, M, C) -> {'sigma': (N, M, 1) raw, 'rgb': (N, M, out_features)}."""
        x = plane_features.mean(1)
        n, m, c = x.shape
        x = self.net(x.reshape(n * m, c)).reshape(n, m, -1)
        rgb = torch.sigmoid(x[..., 1:]) * (1 + 2 * 0.001) - 0.001
        return {"rgb": rgb, "sigma": x[..., 0:1]}


def march_rays(colors: torch.Tensor, densities: torch.Tensor, depths: torch.Tensor, white_back: bool = False):
    """Composite samples (B, M, S, ·) on interval midpoints with softplus(sigma - 1) density.

    Returns rgb in [-1, 1] (B, M, C), depth (B, M, 1) clamped to the sampled range, weights (B, M, S-1, 1).
    """
    deltas = depths[:, :, 1:] - depths[:, :, :-1]
    colors_mid = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
    densities_mid = F.softplus((densities[:, :, :-1] + densities[:, :, 1:]) / 2 - 1)
    depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2
    alpha = 1 - torch.exp(-densities_mid * deltas)
    shifted = torch.cat([torch.ones_like(alpha[:, :, :1]), 1 - alpha + 1e-10], -2)
    weights = alpha * torch.cumprod(shifted, -2)[:, :, :-1]
    rgb = torch.sum(weights * colors_mid, -2)
    total = weights.sum(2)
    depth = torch.nan_to_num(torch.sum(weights * depths_mid, -2) / total, float("inf"))
    depth = torch.clamp(depth, torch.min(depths), torch.max(depths))
    if white_back:
        rgb = rgb + 1 - total
    return rgb * 2 - 1, depth, weights


def sample_pdf(bins: torch.Tensor, weights: torch.Tensor, n_samples: int, deterministic: bool,
               eps: float = 1e-5) -> torch.Tensor:
    """Inverse-CDF samples (R, n_samples) from piecewise-constant ``weights`` (R, K) over ``bins``."""
    n_rays, k = weights.shape
    weights = weights + eps
    pdf = weights / torch.sum(weights, -1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, -1)], -1)
    if deterministic:
        u = torch.linspace(0, 1, n_samples, device=bins.device).expand(n_rays, n_samples)
    else:
        u = torch.rand(n_rays, n_samples, device=bins.device)
    u = u.contiguous()
    inds = torch.searchsorted(cdf, u, right=True)
    below = torch.clamp_min(inds - 1, 0)
    above = torch.clamp_max(inds, k)
    gather = torch.stack([below, above], -1).view(n_rays, 2 * n_samples)
    cdf_g = torch.gather(cdf, 1, gather).view(n_rays, n_samples, 2)
    bins_g = torch.gather(bins, 1, gather).view(n_rays, n_samples, 2)
    denom = cdf_g[..., 1] - cdf_g[..., 0]
    denom = torch.where(denom < eps, torch.ones_like(denom), denom)
    return bins_g[..., 0] + (u - cdf_g[..., 0]) / denom * (bins_g[..., 1] - bins_g[..., 0])


class ImportanceRenderer(nn.Module):
    """Coarse stratified + importance sampling of tri-plane radiance fields."""

    def query(self, planes: torch.Tensor, decoder: OSGDecoder, points: torch.Tensor, box_warp: float):
        """Raw density and features at world points (N, M, 3)."""
        return decoder(sample_from_planes(planes, points, box_warp))

    def forward(self, planes: torch.Tensor, decoder: OSGDecoder, origins: torch.Tensor, dirs: torch.Tensor,
                opts: RenderOptions):
        n, m, _ = origins.shape
        d = opts.depth_resolution
        depths = torch.linspace(opts.ray_start, opts.ray_end, d, device=origins.device).reshape(1, 1, d, 1)
        depths = depths.repeat(n, m, 1, 1)
        delta = (opts.ray_end - opts.ray_start) / (d - 1)
        depths = depths + (0.5 if opts.deterministic else torch.rand_like(depths)) * delta
        colors, densities = self._run(planes, decoder, origins, dirs, depths, opts)
        if opts.depth_resolution_importance > 0:
            _, _, weights = march_rays(colors, densities, depths, opts.white_back)
            fine = self._importance_depths(depths, weights, opts.depth_resolution_importance, opts.deterministic)
            colors_f, densities_f = self._run(planes, decoder, origins, dirs, fine, opts)
            depths = torch.cat([depths, fine], dim=-2)
            colors = torch.cat([colors, colors_f], dim=-2)
            densities = torch.cat([densities, densities_f], dim=-2)
            depths, order = torch.sort(depths, dim=-2)
            colors = torch.gather(colors, -2, order.expand(-1, -1, -1, colors.shape[-1]))
            densities = torch.gather(densities, -2, order)
        rgb, depth, weights = march_rays(colors, densities, depths, opts.white_back)
        return rgb, depth, weights.sum(2)

    def _run(self, planes, decoder, origins, dirs, depths, opts):
        n, m, s, _ = depths.shape
        points = (origins.unsqueeze(-2) + depths * dirs.unsqueeze(-2)).reshape(n, -1, 3)
        out = self.query(planes, decoder, points, opts.box_warp)
        return out["rgb"].reshape(n, m, s, -1), out["sigma"].reshape(n, m, s, 1)

    @staticmethod
    @torch.no_grad()
    def _importance_depths(depths: torch.Tensor, weights: torch.Tensor, n_importance: int,
                           deterministic: bool) -> torch.Tensor:
        n, m, s, _ = depths.shape
        z = depths.reshape(n * m, s)
        w = weights.reshape(n * m, -1).unsqueeze(1).float()
        w = F.avg_pool1d(F.max_pool1d(w, 2, 1, padding=1), 2, 1).squeeze(1) + 0.01
        z_mid = 0.5 * (z[:, :-1] + z[:, 1:])
        fine = sample_pdf(z_mid, w[:, 1:-1], n_importance, deterministic)
        return fine.reshape(n, m, n_importance, 1)
