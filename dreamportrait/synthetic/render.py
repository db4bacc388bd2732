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


def _part_boxes() -> tuple[Tensor, Tensor, Tensor]:
    """Every shape's box (and its mirror image) as lo/hi (N, 3), and the owning part (N,)."""
    lo, hi, owner = [], [], []
    for i, part in enumerate(PARTS):
        for s in part.shapes:
            (x0, y0, z0), (x1, y1, z1) = s.box
            lo.append((x0, y0, z0)), hi.append((x1, y1, z1)), owner.append(i)
            if s.mirror:
                lo.append((-x1, y0, z0)), hi.append((-x0, y1, z1)), owner.append(i)
    return torch.tensor(lo), torch.tensor(hi), torch.tensor(owner)


_BOX_LO, _BOX_HI, _BOX_PART = _part_boxes()


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

    def points(self, i: int, x: Tensor, y: Tensor, z: Tensor, b: Tensor) -> PartPoints:
        return PartPoints(x, y, z, b, self.rows[i], self.slots[i])

    def candidates(self, o: Tensor, d: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Which parts each ray may meet, (P, M) bool, and its first box entry / last exit t.

        A ray may meet a part when its head has the part and the ray crosses one of the
        part's shape boxes.
        """
        inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
        t_in, t_out = _slab(o, inv, _BOX_LO, _BOX_HI)
        crosses = (t_in < t_out) & (t_out > 0)
        enabled = torch.ones(len(PARTS), o.shape[0], dtype=torch.bool)
        for i, flag in enumerate(self.flags):
            if flag is not None:
                enabled[i] = flag[b]
        usable = crosses & enabled[_BOX_PART].t()  # (M, boxes)
        cand = torch.zeros_like(enabled)
        for j, i in enumerate(_BOX_PART.tolist()):
            cand[i] |= usable[:, j]
        first = torch.where(usable, t_in, torch.full_like(t_in, math.inf)).amin(dim=1)
        last = torch.where(usable, t_out, torch.full_like(t_out, -math.inf)).amax(dim=1)
        return cand, first.clamp_min(0.0), last

    def shade(self, x: Tensor, y: Tensor, z: Tensor, b: Tensor, owner: Tensor) -> Tensor:
        """(M, 3) lit colour of surface points whose nearest part is ``owner``."""
        light = torch.tensor(LIGHT) / math.sqrt(sum(v * v for v in LIGHT))
        rgb = torch.zeros(x.shape[0], 3)
        for i, part in enumerate(PARTS):
            idx = (owner == i).nonzero().squeeze(1)
            if not idx.numel():
                continue
            q = self.points(i, x[idx], y[idx], z[idx], b[idx])
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


class _Marching:
    """The rays of a chunk still being traced, compacted only when a third of them finished.

    Between compactions finished rays are carried along (their t frozen). Each part is
    evaluated densely when most marching rays may meet it, else on the gathered subset; the
    heads' parameters are gathered once per compaction, not once per step.
    """

    DENSE = 0.4  # evaluate a part densely when at least this fraction of rays may meet it

    def __init__(self, heads: HeadBatch, ids: Tensor, o: Tensor, d: Tensor, b: Tensor,
                 t: Tensor, end: Tensor, cand: Tensor):
        self.heads, self.ids = heads, ids
        self.ox, self.oy, self.oz = o[:, 0], o[:, 1], o[:, 2]
        self.dx, self.dy, self.dz = d[:, 0], d[:, 1], d[:, 2]
        self.b, self.t, self.end, self.cand = b, t, end, cand
        self.marching = torch.ones_like(t, dtype=torch.bool)
        self.plans = []
        m = t.shape[0]
        for i, mask in enumerate(cand):
            count = int(mask.sum())
            if count == 0:
                continue
            if count >= self.DENSE * m:
                sel = None if count == m else mask
                self.plans.append((i, True, sel, heads.points(i, self.ox, self.oy, self.oz, b)))
            else:
                idx = mask.nonzero().squeeze(1)
                self.plans.append((i, False, idx, heads.points(i, self.ox, self.oy, self.oz, b[idx])))

    def compacted(self) -> "_Marching":
        keep = self.marching.nonzero().squeeze(1)
        o = torch.stack((self.ox, self.oy, self.oz), dim=1)[keep]
        d = torch.stack((self.dx, self.dy, self.dz), dim=1)[keep]
        return _Marching(self.heads, self.ids[keep], o, d, self.b[keep], self.t[keep], self.end[keep],
                         self.cand[:, keep])

    def distance(self) -> tuple[Tensor, Tensor]:
        """Distance to the nearest part and its index, at the current points of all rays."""
        t = self.t
        x, y, z = self.ox + self.dx * t, self.oy + self.dy * t, self.oz + self.dz * t
        d = torch.full_like(t, FAR)
        owner = torch.zeros_like(self.b)
        for i, dense, sel, q in self.plans:
            if dense:
                dp = PARTS[i].distance(q.at(x, y, z))
                if sel is not None:
                    dp = torch.where(sel, dp, FAR)
                better = dp < d
                d = torch.where(better, dp, d)
                owner = torch.where(better, i, owner)
            else:
                dp = PARTS[i].distance(q.at(x[sel], y[sel], z[sel]))
                cur = d[sel]
                better = dp < cur
                d[sel] = torch.where(better, dp, cur)
                owner[sel] = torch.where(better, i, owner[sel])
        return d, owner


def _trace(heads: HeadBatch, o: Tensor, d: Tensor, b: Tensor, eps_per_t: float):
    """Sphere-trace model-space rays (M, 3) of heads b: (hit (M,), t (M,), owner part (M,))."""
    cand, t0, t1 = heads.candidates(o, d, b)
    s0, s1 = _scene_interval(o, d)
    t0, t1 = torch.maximum(t0, s0), torch.minimum(t1, s1)
    t_hit = torch.zeros_like(t0)
    hit = torch.zeros_like(t0, dtype=torch.bool)
    owner = torch.zeros_like(b)
    start = (t0 < t1).nonzero().squeeze(1)
    rays = _Marching(heads, start, o[start], d[start], b[start], t0[start], t1[start], cand[:, start])
    for step in range(MAX_STEPS):
        if not rays.ids.numel():
            break
        dist, own = rays.distance()
        # The last step accepts a looser tolerance: grazing rays at silhouettes converge slowly.
        tol = eps_per_t * rays.t * (1.0 if step < MAX_STEPS - 1 else 6.0)
        done = rays.marching & (dist < tol)
        done_idx = done.nonzero().squeeze(1)
        ids = rays.ids[done_idx]
        hit[ids] = True
        t_hit[ids] = rays.t[done_idx]
        owner[ids] = own[done_idx]
        rays.marching &= ~done
        rays.t = torch.where(rays.marching, rays.t + dist, rays.t)
        rays.marching &= rays.t < rays.end
        if int(rays.marching.sum()) < 0.7 * rays.t.shape[0]:
            rays = rays.compacted()
    return hit, t_hit, owner


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
        h, t, owner = _trace(heads, o, d, b, eps_per_t)
        idx = h.nonzero().squeeze(1)
        p = o[idx] + d[idx] * t[idx].unsqueeze(-1)
        rgb[start + idx] = heads.shade(p[:, 0], p[:, 1], p[:, 2], b[idx], owner[idx])
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
