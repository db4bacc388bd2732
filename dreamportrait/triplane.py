"""Tri-plane geometry: EG3D's plane axes, projection of points onto the planes, and sampling.

EG3D defines three plane-axis matrices and projects a point p onto plane i by ``p @ inv(A_i)``,
keeping the first two components. With its matrices this gives (x, y), (x, z) and (z, x):
the known "bi-plane" quirk (EG3D issue #67) that the released weights depend on. Everything
in this project that needs to know where a point lands on a plane (the renderer, the
3D-aware adapters, the mesh tests) derives it from :data:`PLANE_AXES`.

In ``grid_sample`` the first projected component indexes the width (last) axis of a plane and
the second the height axis.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PLANE_AXES = torch.tensor([
    [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
    [[1, 0, 0], [0, 0, 1], [0, 1, 0]],
    [[0, 0, 1], [1, 0, 0], [0, 1, 0]],
], dtype=torch.float32)


def plane_coordinate_axes() -> list[tuple[int, int]]:
    """For each plane, the world axes (0=x, 1=y, 2=z) that index its (width, height) axes.

    Derived from :data:`PLANE_AXES`: [(0, 1), (0, 2), (2, 0)] for EG3D's planes.
    """
    inv = torch.linalg.inv(PLANE_AXES)
    axes = []
    for m in inv:
        # Column j of inv(A) says which world axis feeds projected component j.
        axes.append((int(m[:, 0].abs().argmax()), int(m[:, 1].abs().argmax())))
    return axes


def project_onto_planes(coords: torch.Tensor) -> torch.Tensor:
    """(N, M, 3) points -> (N * 3, M, 2) plane coordinates, plane-major per batch item."""
    n, m, _ = coords.shape
    inv = torch.linalg.inv(PLANE_AXES.to(coords.device, coords.dtype))
    proj = torch.einsum("nmk,pkj->npmj", coords, inv)[..., :2]
    return proj.reshape(n * 3, m, 2)


def sample_from_planes(planes: torch.Tensor, coords: torch.Tensor, box_warp: float = 1.0) -> torch.Tensor:
    """Bilinear features of world points from tri-planes.

    planes: (N, 3, C, H, W); coords: (N, M, 3) in world units. The box [-box_warp/2, box_warp/2]^3
    maps to the planes' extent (align_corners=False); outside it features are zero.
    Returns (N, 3, M, C).
    """
    n, p, c, h, w = planes.shape
    grid = project_onto_planes((2.0 / box_warp) * coords).unsqueeze(1)
    out = F.grid_sample(planes.reshape(n * p, c, h, w), grid.to(planes.dtype), mode="bilinear",
                        padding_mode="zeros", align_corners=False)
    return out.permute(0, 3, 2, 1).reshape(n, p, -1, c)
