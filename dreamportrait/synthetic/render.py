"""Vectorised CPU sphere tracer for the synthetic heads.

Rays come from EG3D 25-d camera labels exactly as EG3D's RaySampler builds them (OpenCV
camera, pixel centres (i + 0.5) / res, normalised intrinsics), so renders agree pixel for
pixel with the generator's cameras. All rays of a batch of heads are traced together:

- each ray is tested once against every shape's bounding box; a shape is evaluated only on
  rays that enter its box (and whose head has the part), rays start at the first box they
  enter and rays that enter none are background without a single SDF evaluation;
- each step evaluates only the rays still marching, and records which part is nearest, so
  materials need no second pass;
- normals come from four tetrahedral finite differences of the hit part only;
- shading is ambient + diffuse from one fixed world-space light; 2x2 supersampling
  anti-aliases edges.

Output: RGB in [0, 1], depth (world distance along the ray, EG3D's convention; 0 where
nothing is hit) and a soft foreground mask (hit fraction).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dreamportrait.cameras import split_label

from . import sdf
from .attributes import Identity
from .heads import HEAD_ORIGIN, HEAD_SCALE, PARTS, SCENE_BOX, Part, PartPoints
from .proportions import background_colour, head_parameters

Tensor = torch.Tensor

LIGHT = (-0.35, 0.45, 0.82)  # toward the light, world frame (upper left of the frontal view)
AMBIENT = 0.42
MAX_STEPS = 40
CHUNK_RAYS = 1 << 16
FAR = 1e3  # "no surface" distance; finite so that smooth unions with it stay exact
_TETRA = ((1.0, -1.0, -1.0), (-1.0, -1.0, 1.0), (-1.0, 1.0, -1.0), (1.0, 1.0, 1.0))
# Shape index ranges of every part in the flat list of shapes.
_SHAPE_RANGES = np.cumsum([0] + [len(p.shapes) for p in PARTS])


def _shape_boxes() -> tuple[Tensor, Tensor, Tensor]:
    """Every shape's box (and its mirror image), as lo/hi (N, 3) and the owning shape (N,)."""
    lo, hi, owner = [], [], []
    shapes = [s for p in PARTS for s in p.shapes]
    for k, s in enumerate(shapes):
        (x0, y0, z0), (x1, y1, z1) = s.box
        lo.append((x0, y0, z0)), hi.append((x1, y1, z1)), owner.append(k)
        if s.mirror:
            lo.append((-x1, y0, z0)), hi.append((-x0, y1, z1)), owner.append(k)
    return torch.tensor(lo), torch.tensor(hi), torch.tensor(owner)


_BOX_LO, _BOX_HI, _BOX_SHAPE = _shape_boxes()


def _slab(o: Tensor, inv: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Entry/exit distances of rays (M, 3) through boxes (N, 3): (M, N) each."""
    t_a = (lo.unsqueeze(0) - o.unsqueeze(1)) * inv.unsqueeze(1)
    t_b = (hi.unsqueeze(0) - o.unsqueeze(1)) * inv.unsqueeze(1)
    return torch.minimum(t_a, t_b).amax(dim=-1), torch.maximum(t_a, t_b).amin(dim=-1)


class HeadBatch:
    """The parameters of a batch of heads, ready for tracing.

    Per part, one entry per parameter row: a float when all heads share it, else a (B,)
    tensor; plus a (B,) bool flag for parts that not every head has.
    """

    def __init__(self, identities: Sequence[Identity]):
        if not identities:
            raise ValueError("HeadBatch needs at least one identity")
        params = [head_parameters(ident) for ident in identities]
        self.size = len(identities)
        self.rows: list[list[float | Tensor]] = []
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
            self.rows.append([float(r[0]) if (r == r[0]).all() else torch.from_numpy(r.copy())
                              for r in table])
            self.slots.append(slots)
            self.flags.append(torch.from_numpy(table[slots[part.flag].start] > 0.5) if part.flag else None)
        self.background = torch.tensor(np.stack([background_colour(i) for i in identities]),
                                       dtype=torch.float32)

    def candidates(self, o: Tensor, d: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Which shapes each ray may meet: (S, M) bool, and the first entry / last exit t."""
        inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
        t_in, t_out = _slab(o, inv, _BOX_LO, _BOX_HI)
        crosses = (t_in < t_out) & (t_out > 0)
        enabled = torch.ones(int(_SHAPE_RANGES[-1]), o.shape[0], dtype=torch.bool)
        for i, flag in enumerate(self.flags):
            if flag is not None:
                enabled[_SHAPE_RANGES[i]:_SHAPE_RANGES[i + 1]] = flag[b].unsqueeze(0)
        usable = crosses & enabled[_BOX_SHAPE].t()  # (M, boxes)
        cand = torch.zeros_like(enabled)
        for j, k in enumerate(_BOX_SHAPE.tolist()):
            cand[k] |= usable[:, j]
        first = torch.where(usable, t_in, torch.full_like(t_in, math.inf)).amin(dim=1)
        last = torch.where(usable, t_out, torch.full_like(t_out, -math.inf)).amax(dim=1)
        return cand, first.clamp_min(0.0), last

    def part_distance(self, i: int, q: PartPoints, cand: Tensor) -> Tensor:
        """Distance of part i at points q, using only the shapes each point's ray may meet."""
        part = PARTS[i]
        if len(part.shapes) == 1:
            return part.shapes[0].distance(q)
        d = torch.full_like(q.x, FAR)
        for k, shape in enumerate(part.shapes):
            sel = cand[k]
            if bool(sel.all()):
                idx, qk = None, q
            else:
                idx = sel.nonzero().squeeze(1)
                if not idx.numel():
                    continue
                qk = _subset(q, idx)
            dk = shape.distance(qk)
            old = d if idx is None else d[idx]
            new = sdf.smooth_union(old, dk, shape.blend) if shape.blend > 0 else torch.minimum(old, dk)
            if idx is None:
                d = new
            else:
                d[idx] = new
        return d

    def points(self, i: int, x: Tensor, y: Tensor, z: Tensor, b: Tensor) -> PartPoints:
        return PartPoints(x, y, z, b, self.rows[i], self.slots[i])

    def distance(self, x: Tensor, y: Tensor, z: Tensor, b: Tensor, cand: Tensor) -> tuple[Tensor, Tensor]:
        """Distance of the whole head and the index of the nearest part, at points of heads b."""
        d = torch.full_like(x, FAR)
        owner = torch.zeros_like(b)
        for i in range(len(PARTS)):
            cp = cand[_SHAPE_RANGES[i]:_SHAPE_RANGES[i + 1]]
            anywhere = cp.any(dim=0) if cp.shape[0] > 1 else cp[0]
            idx = anywhere.nonzero().squeeze(1)
            if not idx.numel():
                continue
            dp = self.part_distance(i, self.points(i, x[idx], y[idx], z[idx], b[idx]), cp[:, idx])
            cur = d[idx]
            better = dp < cur
            d[idx] = torch.where(better, dp, cur)
            owner[idx] = torch.where(better, i, owner[idx])
        return d, owner

    def shade(self, x: Tensor, y: Tensor, z: Tensor, b: Tensor, cand: Tensor, owner: Tensor) -> Tensor:
        """(M, 3) lit colour of surface points whose nearest part is ``owner``."""
        light = torch.tensor(LIGHT) / math.sqrt(sum(v * v for v in LIGHT))
        rgb = torch.zeros(x.shape[0], 3)
        for i in range(len(PARTS)):
            idx = (owner == i).nonzero().squeeze(1)
            if not idx.numel():
                continue
            q = self.points(i, x[idx], y[idx], z[idx], b[idx])
            cp = cand[_SHAPE_RANGES[i]:_SHAPE_RANGES[i + 1], idx]
            normal = _normal(lambda p: self.part_distance(i, p, cp), q)
            lambert = (normal @ light).clamp_min(0.0)
            rgb[idx] = PARTS[i].albedo(q) * (AMBIENT + (1.0 - AMBIENT) * lambert).unsqueeze(-1)
        return rgb


def _subset(q: PartPoints, idx: Tensor) -> PartPoints:
    return PartPoints(q.x[idx], q.y[idx], q.z[idx], q.b[idx], q.rows, q.slots)


def _normal(distance, q: PartPoints, h: float = 1e-3) -> Tensor:
    """Unit normals from four tetrahedral finite differences of ``distance``."""
    n = torch.zeros(q.x.shape[0], 3)
    for e in _TETRA:
        n += distance(q.moved(e[0] * h, e[1] * h, e[2] * h)).unsqueeze(-1) * torch.tensor(e)
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


def _scene_interval(o: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Model-space entry/exit of rays through :data:`SCENE_BOX`."""
    origin = torch.tensor(HEAD_ORIGIN)
    lo = (torch.tensor(SCENE_BOX[0]) - origin) / HEAD_SCALE + origin
    hi = (torch.tensor(SCENE_BOX[1]) - origin) / HEAD_SCALE + origin
    inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    t_in, t_out = _slab(o, inv, lo.unsqueeze(0), hi.unsqueeze(0))
    return t_in.squeeze(1), t_out.squeeze(1)


def _trace(heads: HeadBatch, o: Tensor, d: Tensor, b: Tensor, eps_per_t: float):
    """Sphere-trace model-space rays (M, 3) of heads b.

    Returns (hit (M,), t (M,), owner part (M,), shape candidates (S, M)).
    """
    cand, t0, t1 = heads.candidates(o, d, b)
    s0, s1 = _scene_interval(o, d)
    t0, t1 = torch.maximum(t0, s0), torch.minimum(t1, s1)
    t = t0.clone()
    hit = torch.zeros_like(t, dtype=torch.bool)
    owner = torch.zeros_like(b)
    alive = (t0 < t1).nonzero().squeeze(1)
    ox, oy, oz, dx, dy, dz = (c[alive] for c in (*o.unbind(1), *d.unbind(1)))
    ta, ba, end, ca = t[alive], b[alive], t1[alive], cand[:, alive]
    for step in range(MAX_STEPS):
        if not alive.numel():
            break
        dist, own = heads.distance(ox + dx * ta, oy + dy * ta, oz + dz * ta, ba, ca)
        # The last step accepts a looser tolerance: grazing rays at silhouettes converge slowly.
        tol = eps_per_t * ta * (1.0 if step < MAX_STEPS - 1 else 6.0)
        done = dist < tol
        done_idx = alive[done]
        hit[done_idx] = True
        t[done_idx] = ta[done]
        owner[done_idx] = own[done]
        ta = ta + dist
        keep = ~done & (ta < end)
        alive, ox, oy, oz, dx, dy, dz, ta, ba, end = (
            v[keep] for v in (alive, ox, oy, oz, dx, dy, dz, ta, ba, end))
        ca = ca[:, keep]
    return hit, t, owner, cand


def render(identities: Sequence[Identity] | HeadBatch, labels: Tensor, resolution: int = 64,
           supersample: int = 2) -> dict[str, Tensor]:
    """Render heads from EG3D camera labels (B, 25), one label per head.

    Returns 'rgb' (B, 3, R, R) in [0, 1], 'depth' (B, 1, R, R) (mean world ray distance of
    the hit subsamples, 0 where nothing is hit) and 'mask' (B, 1, R, R) (hit fraction).
    """
    heads = identities if isinstance(identities, HeadBatch) else HeadBatch(identities)
    labels = torch.as_tensor(labels, dtype=torch.float32)
    if labels.ndim != 2 or labels.shape != (heads.size, 25):
        raise ValueError(f"need one 25-d camera label per head: {heads.size} heads, "
                         f"labels of shape {tuple(labels.shape)}")
    if resolution < 1 or supersample < 1:
        raise ValueError(f"resolution and supersample must be >= 1, got {resolution}, {supersample}")
    res = resolution * supersample
    n, B = res * res, heads.size
    origins, dirs = camera_rays(labels, res)
    head_origin = torch.tensor(HEAD_ORIGIN)
    origins = (origins - head_origin) / HEAD_SCALE + head_origin  # into the model frame
    focal = split_label(labels)[1][:, 0, 0].min().item()
    eps_per_t = 0.35 / (focal * res)  # about a third of a (supersampled) pixel footprint
    rgb = heads.background.repeat_interleave(n, dim=0)
    depth = torch.zeros(B * n)
    hit = torch.zeros(B * n, dtype=torch.bool)
    all_dirs = dirs.reshape(-1, 3)
    all_b = torch.arange(B).repeat_interleave(n)
    for start in range(0, B * n, CHUNK_RAYS):
        sl = slice(start, min(start + CHUNK_RAYS, B * n))
        b, d = all_b[sl], all_dirs[sl]
        o = origins[b]
        h, t, owner, cand = _trace(heads, o, d, b, eps_per_t)
        idx = h.nonzero().squeeze(1)
        p = o[idx] + d[idx] * t[idx].unsqueeze(-1)
        rgb[start + idx] = heads.shade(p[:, 0], p[:, 1], p[:, 2], b[idx], cand[:, idx], owner[idx])
        depth[start + idx] = t[idx] * HEAD_SCALE
        hit[start + idx] = True

    def pool(img: Tensor, c: int) -> Tensor:
        img = img.reshape(B, res, res, c).permute(0, 3, 1, 2)
        return F.avg_pool2d(img, supersample) if supersample > 1 else img

    mask = pool(hit.float(), 1)
    depth = torch.where(mask > 0, pool(depth, 1) / mask.clamp_min(1e-6), torch.zeros_like(mask))
    return {"rgb": pool(rgb, 3).clamp(0.0, 1.0), "depth": depth, "mask": mask}


def to_uint8(rgb: Tensor) -> np.ndarray:
    """(B, 3, R, R) in [0, 1] -> (B, R, R, 3) uint8 (round to nearest)."""
    return (rgb.permute(0, 2, 3, 1) * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
