"""Vectorised CPU sphere tracer for the synthetic heads.

Rays come from EG3D 25-d camera labels exactly as EG3D's RaySampler builds them (OpenCV
camera, pixel centres (i + 0.5) / res, normalised intrinsics), so renders agree pixel for
pixel with the generator's cameras. All rays of a batch of heads are traced together; each
step evaluates only the rays still marching, and each part only on rays of heads that have
it. Rays start and end at the scene box, normals come from finite differences at hit
points only, shading is ambient + diffuse from one fixed world-space light, and 2x2
supersampling anti-aliases edges. Output: RGB in [0, 1], depth (distance along the ray,
EG3D's convention; 0 where nothing is hit) and a soft foreground mask.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dreamportrait.cameras import split_label

from .attributes import Identity
from .heads import PARTS, SCENE_BOX, Part, PartPoints
from .proportions import background_colour, head_parameters

Tensor = torch.Tensor

LIGHT = (-0.35, 0.45, 0.82)  # toward the light, world frame (upper left of the frontal view)
AMBIENT = 0.42
MAX_STEPS = 48
CHUNK_RAYS = 1 << 16
_TETRA = ((1.0, -1.0, -1.0), (-1.0, -1.0, 1.0), (-1.0, 1.0, -1.0), (1.0, 1.0, 1.0))


class HeadBatch:
    """The parameters of a batch of heads, one (K, B) table per part, ready for tracing."""

    def __init__(self, identities: Sequence[Identity]):
        if not identities:
            raise ValueError("HeadBatch needs at least one identity")
        params = [head_parameters(ident) for ident in identities]
        self.size = len(identities)
        self.tables: list[Tensor] = []
        self.slots: list[dict[str, slice]] = []
        self.flags: list[Tensor | None] = []
        for part in PARTS:
            slots, k = {}, 0
            for name, n in part.layout:
                slots[name] = slice(k, k + n)
                k += n
            table = np.zeros((k, self.size), dtype=np.float32)
            for j, p in enumerate(params):
                values = p[part.name]
                if set(values) != set(slots):
                    raise KeyError(f"part {part.name!r}: parameters {sorted(values)} do not match "
                                   f"its layout {sorted(slots)}")
                for name, sl in slots.items():
                    table[sl, j] = np.asarray(values[name], dtype=np.float64).reshape(-1)
            tensor = torch.from_numpy(table)
            self.tables.append(tensor)
            self.slots.append(slots)
            self.flags.append(tensor[slots[part.flag].start] > 0.5 if part.flag else None)
        self.background = torch.tensor(np.stack([background_colour(i) for i in identities]),
                                       dtype=torch.float32)

    def _points(self, i: int, x: Tensor, y: Tensor, z: Tensor, b: Tensor) -> PartPoints:
        return PartPoints(x, y, z, self.tables[i][:, b], self.slots[i])

    def _selection(self, i: int, b: Tensor) -> Tensor | None:
        """Indices of the points whose head has part i (None: all of them)."""
        flag = self.flags[i]
        if flag is None or bool(flag.all()):
            return None
        return flag[b].nonzero().squeeze(1)

    def distance(self, x: Tensor, y: Tensor, z: Tensor, b: Tensor) -> Tensor:
        """Signed distance of the whole head at points (x, y, z) of heads b."""
        d = torch.full_like(x, math.inf)
        for i, part in enumerate(PARTS):
            idx = self._selection(i, b)
            if idx is None:
                d = torch.minimum(d, part.distance(self._points(i, x, y, z, b)))
            elif idx.numel():
                q = self._points(i, x[idx], y[idx], z[idx], b[idx])
                d[idx] = torch.minimum(d[idx], part.distance(q))
        return d

    def part_distances(self, x: Tensor, y: Tensor, z: Tensor, b: Tensor) -> Tensor:
        """(num_parts, M) distances, +inf where a head lacks the part."""
        out = torch.full((len(PARTS), x.shape[0]), math.inf)
        for i, part in enumerate(PARTS):
            idx = self._selection(i, b)
            if idx is None:
                out[i] = part.distance(self._points(i, x, y, z, b))
            elif idx.numel():
                out[i, idx] = part.distance(self._points(i, x[idx], y[idx], z[idx], b[idx]))
        return out

    def shade(self, x: Tensor, y: Tensor, z: Tensor, b: Tensor) -> Tensor:
        """(M, 3) shaded colour of surface points: the nearest part's albedo, lit."""
        owner = self.part_distances(x, y, z, b).argmin(dim=0)
        light = torch.tensor(LIGHT) / math.sqrt(sum(v * v for v in LIGHT))
        rgb = torch.zeros(x.shape[0], 3)
        for i, part in enumerate(PARTS):
            idx = (owner == i).nonzero().squeeze(1)
            if not idx.numel():
                continue
            q = self._points(i, x[idx], y[idx], z[idx], b[idx])
            normal = _normal(part, q)
            lambert = (normal @ light).clamp_min(0.0)
            rgb[idx] = part.albedo(q) * (AMBIENT + (1.0 - AMBIENT) * lambert).unsqueeze(-1)
        return rgb


def _normal(part: Part, q: PartPoints, h: float = 1e-3) -> Tensor:
    """Unit normals from four tetrahedral finite differences of the part's distance."""
    n = torch.zeros(q.x.shape[0], 3)
    for e in _TETRA:
        n += part.distance(q.moved(e[0] * h, e[1] * h, e[2] * h)).unsqueeze(-1) * torch.tensor(e)
    return F.normalize(n, dim=-1)


def camera_rays(labels: Tensor, resolution: int) -> tuple[Tensor, Tensor]:
    """EG3D RaySampler: (B, 25) labels -> origins (B, 3), unit directions (B, R*R, 3).

    Ray index = row * R + column; u (camera x, right) follows the column, v (camera y, down)
    the row; camera z is forward.
    """
    cam2world, K = split_label(labels.float())
    idx = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution
    v, u = torch.meshgrid(idx, idx, indexing="ij")
    u, v = u.reshape(1, -1), v.reshape(1, -1)
    fx, fy, cx, cy, sk = (K[:, 0, 0:1], K[:, 1, 1:2], K[:, 0, 2:3], K[:, 1, 2:3], K[:, 0, 1:2])
    x_cam = (u - cx + cy * sk / fy - sk * v / fy) / fx
    y_cam = (v - cy) / fy
    cam = torch.stack((x_cam, y_cam, torch.ones_like(x_cam)), dim=-1)  # (B, N, 3)
    origins = cam2world[:, :3, 3]
    world = cam @ cam2world[:, :3, :3].transpose(1, 2) + origins.unsqueeze(1)
    return origins, F.normalize(world - origins.unsqueeze(1), dim=-1)


def _box_interval(o: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Entry and exit distances of rays (M, 3) through :data:`SCENE_BOX` (exit < entry: miss)."""
    lo, hi = torch.tensor(SCENE_BOX[0]), torch.tensor(SCENE_BOX[1])
    inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    t_a, t_b = (lo - o) * inv, (hi - o) * inv
    return torch.minimum(t_a, t_b).amax(dim=-1).clamp_min(0.0), torch.maximum(t_a, t_b).amin(dim=-1)


def _trace(heads: HeadBatch, o: Tensor, d: Tensor, b: Tensor, eps_per_t: float) -> tuple[Tensor, Tensor]:
    """Sphere-trace rays (M, 3) of heads b; returns (hit mask, distance t) per ray."""
    t0, t1 = _box_interval(o, d)
    t = t0.clone()
    hit = torch.zeros_like(t, dtype=torch.bool)
    alive = (t0 < t1).nonzero().squeeze(1)
    ox, oy, oz, dx, dy, dz = (o[:, 0][alive], o[:, 1][alive], o[:, 2][alive],
                              d[:, 0][alive], d[:, 1][alive], d[:, 2][alive])
    ta, ba, end = t[alive], b[alive], t1[alive]
    for step in range(MAX_STEPS):
        if not alive.numel():
            break
        dist = heads.distance(ox + dx * ta, oy + dy * ta, oz + dz * ta, ba)
        # The last step accepts a looser tolerance: grazing rays at silhouettes converge slowly.
        tol = eps_per_t * ta * (1.0 if step < MAX_STEPS - 1 else 8.0)
        done = dist < tol
        hit[alive[done]] = True
        t[alive[done]] = ta[done]
        ta = ta + dist
        keep = ~done & (ta < end)
        alive, ox, oy, oz, dx, dy, dz, ta, ba, end = (
            v[keep] for v in (alive, ox, oy, oz, dx, dy, dz, ta, ba, end))
    return hit, t


def render(identities: Sequence[Identity] | HeadBatch, labels: Tensor, resolution: int = 64,
           supersample: int = 2) -> dict[str, Tensor]:
    """Render heads from EG3D camera labels (B, 25), one label per head.

    Returns 'rgb' (B, 3, R, R) in [0, 1], 'depth' (B, 1, R, R) (mean ray distance of the hit
    subsamples, 0 where nothing is hit) and 'mask' (B, 1, R, R) (hit fraction).
    """
    heads = identities if isinstance(identities, HeadBatch) else HeadBatch(identities)
    labels = torch.as_tensor(labels, dtype=torch.float32)
    if labels.ndim != 2 or labels.shape != (heads.size, 25):
        raise ValueError(f"need one 25-d camera label per head: {heads.size} heads, "
                         f"labels of shape {tuple(labels.shape)}")
    if resolution < 1 or supersample < 1:
        raise ValueError(f"resolution and supersample must be >= 1, got {resolution}, {supersample}")
    res = resolution * supersample
    origins, dirs = camera_rays(labels, res)
    n = res * res
    B = heads.size
    focal = split_label(labels)[1][:, 0, 0].min().item()
    eps_per_t = 0.35 / (focal * res)  # a third of a (supersampled) pixel footprint
    rgb = heads.background.repeat_interleave(n, dim=0)
    depth = torch.zeros(B * n)
    hit = torch.zeros(B * n, dtype=torch.bool)
    all_dirs = dirs.reshape(-1, 3)
    all_b = torch.arange(B).repeat_interleave(n)
    for start in range(0, B * n, CHUNK_RAYS):
        sl = slice(start, min(start + CHUNK_RAYS, B * n))
        b = all_b[sl]
        o = origins[b]
        h, t = _trace(heads, o, all_dirs[sl], b, eps_per_t)
        idx = h.nonzero().squeeze(1)
        p = o[idx] + all_dirs[sl][idx] * t[idx].unsqueeze(-1)
        rgb[start + idx] = heads.shade(p[:, 0], p[:, 1], p[:, 2], b[idx])
        depth[start + idx] = t[idx]
        hit[start + idx] = True

    def pool(img: Tensor, c: int) -> Tensor:
        img = img.reshape(B, res, res, c).permute(0, 3, 1, 2)
        return F.avg_pool2d(img, supersample) if supersample > 1 else img

    mask = pool(hit.float(), 1)
    depth_sum = pool(depth, 1)
    return {"rgb": pool(rgb, 3).clamp(0.0, 1.0),
            "depth": torch.where(mask > 0, depth_sum / mask.clamp_min(1e-6), torch.zeros_like(mask)),
            "mask": mask}


def to_uint8(rgb: Tensor) -> np.ndarray:
    """(B, 3, R, R) in [0, 1] -> (B, R, R, 3) uint8 (round to nearest)."""
    return (rgb.permute(0, 2, 3, 1) * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
