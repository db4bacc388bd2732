"""Vectorised CPU sphere tracer for the synthetic heads.

Rays come from EG3D 25-d camera labels through the generator's own ray sampler
(:func:`dreamportrait.cameras.camera_rays`), so renders agree pixel for pixel with the
generator's cameras. Rays of a whole group of heads are traced together:

- a cone pass traces one cone per 4x4 block of (supersampled) rays: each cone is tested once
  against every shape's bounding box (grown by the cone radius) and marches while the whole
  cone is free space. Its shape list and free-space distance start every ray of its block;
  blocks whose cone meets nothing are background without a single ray traced;
- a ray evaluates only the shapes its cone may meet and whose part its head has; a shape is
  evaluated densely when many marching rays may meet it, else on the gathered subset;
- rays take over-relaxed steps (factor 1.5, undone where the two spheres do not overlap);
  finished rays are compacted away only when a third of them are done, and each step records
  the nearest part, so materials need no second pass;
- normals come from forward finite differences of the hit part only; shading is ambient +
  diffuse from one fixed world-space light; 2x2 supersampling anti-aliases.

Output: RGB in [0, 1], depth (world distance along the ray, EG3D's convention; 0 where
nothing is hit) and a soft foreground mask (hit fraction).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..cameras import camera_rays, split_label

from . import sdf
from .attributes import Identity
from .heads import HEAD_ANCHOR, HEAD_POSITION, HEAD_SCALE, PARTS, SCENE_BOX, PartPoints
from .proportions import background_colour, head_parameters

Tensor = torch.Tensor

LIGHT = (-0.35, 0.45, 0.82)  # toward the light, world frame (upper left of the frontal view)
AMBIENT = 0.42
MAX_STEPS = 20
CONE_STEPS = 12
OVER_RELAXATION = 1.5  # step factor of plain rays (with the sphere-overlap safety check)
CHUNK_RAYS = 1 << 19  # rays traced together (whole heads: at least one head per group)
CONE_BLOCK = 4  # the cone pass traces one cone per CONE_BLOCK x CONE_BLOCK rays
FAR = 1e3  # "no surface" distance; finite so that smooth unions with it stay exact
_STEPS = ((1e-3, 0.0, 0.0), (0.0, 1e-3, 0.0), (0.0, 0.0, 1e-3))  # forward differences for normals


_SHAPES = [(i, shape) for i, part in enumerate(PARTS) for shape in part.shapes]


def _shape_boxes() -> tuple[Tensor, Tensor, Tensor]:
    """Every shape's box (and its mirror image) as lo/hi (N, 3), and the shape's index (N,)."""
    lo, hi, owner = [], [], []
    for k, (_, s) in enumerate(_SHAPES):
        (x0, y0, z0), (x1, y1, z1) = s.box
        lo.append((x0, y0, z0)), hi.append((x1, y1, z1)), owner.append(k)
        if s.mirror:
            lo.append((-x1, y0, z0)), hi.append((-x0, y1, z1)), owner.append(k)
    return torch.tensor(lo), torch.tensor(hi), torch.tensor(owner)


_BOX_LO, _BOX_HI, _BOX_SHAPE = _shape_boxes()
_SHAPE_PART = torch.tensor([i for i, _ in _SHAPES])


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

    def candidates(self, o: Tensor, d: Tensor, b: Tensor, dilate: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        """Which shapes each ray may meet, (S, M) bool, and its first box entry / last exit t.

        A ray may meet a shape when its head has the shape's part and the ray crosses the
        shape's box (grown by ``dilate``, for cones).
        """
        inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
        t_in, t_out = _slab(o, inv, _BOX_LO - dilate, _BOX_HI + dilate)
        crosses = (t_in < t_out) & (t_out > 0)
        enabled = torch.ones(len(PARTS), o.shape[0], dtype=torch.bool)
        for i, flag in enumerate(self.flags):
            if flag is not None:
                enabled[i] = flag[b]
        usable = crosses & enabled[_SHAPE_PART[_BOX_SHAPE]].t()  # (M, boxes)
        cand = torch.zeros(len(_SHAPES), o.shape[0], dtype=torch.bool)
        for j, k in enumerate(_BOX_SHAPE.tolist()):
            cand[k] |= usable[:, j]
        first = torch.where(usable, t_in, torch.full_like(t_in, math.inf)).amin(dim=1)
        last = torch.where(usable, t_out, torch.full_like(t_out, -math.inf)).amax(dim=1)
        return cand, first.clamp_min(0.0), last

    def shade(self, x: Tensor, y: Tensor, z: Tensor, b: Tensor, owner: Tensor, dist: Tensor) -> Tensor:
        """(M, 3) lit colour of surface points: the albedo of the nearest part ``owner``
        (whose distance there is ``dist``), lit through finite-difference normals."""
        light = torch.tensor(LIGHT) / math.sqrt(sum(v * v for v in LIGHT))
        rgb = torch.zeros(x.shape[0], 3)
        for i, part in enumerate(PARTS):
            idx = (owner == i).nonzero().squeeze(1)
            if not idx.numel():
                continue
            q = self.points(i, x[idx], y[idx], z[idx], b[idx])
            d0 = dist[idx]
            normal = torch.stack([part.distance(q.moved(*step)) - d0 for step in _STEPS], dim=-1)
            lambert = (F.normalize(normal, dim=-1) @ light).clamp_min(0.0)
            rgb[idx] = part.albedo(q) * (AMBIENT + (1.0 - AMBIENT) * lambert).unsqueeze(-1)
        return rgb


class _Marching:
    """The rays of a chunk still being traced, compacted only when a third of them finished.

    Between compactions finished rays are carried along (their t frozen). Each shape is
    evaluated densely when many marching rays may meet it, else on the gathered subset of
    those rays; the heads' parameters are gathered once per compaction, not once per step.
    """

    DENSE = 0.4  # evaluate a shape densely when at least this fraction of rays may meet it

    def __init__(self, heads: HeadBatch, ids: Tensor, o: Tensor, d: Tensor, b: Tensor,
                 t: Tensor, end: Tensor, cand: Tensor):
        self.heads, self.ids = heads, ids
        self.ox, self.oy, self.oz = o[:, 0], o[:, 1], o[:, 2]
        self.dx, self.dy, self.dz = d[:, 0], d[:, 1], d[:, 2]
        self.b, self.t, self.end, self.cand = b, t, end, cand
        self.marching = torch.ones_like(t, dtype=torch.bool)
        # Over-relaxation state: distance at the previous point, length of the last step, and
        # whether the ray still takes relaxed steps.
        self.prev_d, self.prev_step = torch.zeros_like(t), torch.zeros_like(t)
        self.relaxed = torch.ones_like(self.marching)
        m = t.shape[0]
        counts = cand.sum(dim=1).tolist()
        dense_points: dict[int, PartPoints] = {}
        self.plans = []  # (part, [(shape, mask or None, sparse indices or None, points)])
        for i in range(len(PARTS)):
            shapes = []
            for k in range(len(_SHAPES)):
                if _SHAPES[k][0] != i or counts[k] == 0:
                    continue
                if counts[k] >= self.DENSE * m:
                    if i not in dense_points:
                        dense_points[i] = heads.points(i, self.ox, self.oy, self.oz, b)
                    mask = None if counts[k] == m else cand[k]
                    shapes.append((_SHAPES[k][1], mask, None, dense_points[i]))
                else:
                    idx = cand[k].nonzero().squeeze(1)
                    shapes.append((_SHAPES[k][1], None, idx, heads.points(i, self.ox, self.oy, self.oz, b[idx])))
            if shapes:
                self.plans.append((i, shapes))

    def compacted(self) -> "_Marching":
        keep = self.marching.nonzero().squeeze(1)
        o = torch.stack((self.ox, self.oy, self.oz), dim=1)[keep]
        d = torch.stack((self.dx, self.dy, self.dz), dim=1)[keep]
        rays = _Marching(self.heads, self.ids[keep], o, d, self.b[keep], self.t[keep], self.end[keep],
                         self.cand[:, keep])
        rays.prev_d, rays.prev_step, rays.relaxed = self.prev_d[keep], self.prev_step[keep], self.relaxed[keep]
        return rays

    def distance(self) -> tuple[Tensor, Tensor]:
        """Distance to the nearest part and its index, at the current points of all rays."""
        t = self.t
        x, y, z = self.ox + self.dx * t, self.oy + self.dy * t, self.oz + self.dz * t
        d = torch.full_like(t, FAR)
        owner = torch.zeros_like(self.b)
        for i, shapes in self.plans:
            if len(shapes) == 1 and shapes[0][2] is not None:  # one sparse shape: update in place
                shape, _, idx, q = shapes[0]
                dp = shape.distance(q.at(x[idx], y[idx], z[idx]))
                cur = d[idx]
                better = dp < cur
                d[idx] = torch.where(better, dp, cur)
                owner[idx] = torch.where(better, i, owner[idx])
                continue
            dp = torch.full_like(t, FAR)
            for shape, mask, idx, q in shapes:
                if idx is None:
                    dk = shape.distance(q.at(x, y, z))
                    if mask is not None:
                        dk = torch.where(mask, dk, FAR)
                    dp = _union(dp, dk, shape.blend)
                else:
                    dp[idx] = _union(dp[idx], shape.distance(q.at(x[idx], y[idx], z[idx])), shape.blend)
            better = dp < d
            d = torch.where(better, dp, d)
            owner = torch.where(better, i, owner)
        return d, owner


def _union(a: Tensor, b: Tensor, blend: float) -> Tensor:
    return sdf.smooth_union(a, b, blend) if blend > 0 else torch.minimum(a, b)


def _bounds(heads: HeadBatch, o: Tensor, d: Tensor, b: Tensor, cone_per_t: float = 0.0):
    """Shape candidates (S, M) and the t interval (M,) each ray (or cone) has to search."""
    s0, s1 = _scene_interval(o, d)
    dilate = cone_per_t * float(s1.max()) if cone_per_t > 0 else 0.0  # widest cone inside the scene
    cand, t0, t1 = heads.candidates(o, d, b, dilate)
    return cand, torch.maximum(t0, s0), torch.minimum(t1, s1)


def _trace(heads: HeadBatch, o: Tensor, d: Tensor, b: Tensor, cand: Tensor, t0: Tensor, t1: Tensor,
           eps_per_t: float, cone_per_t: float = 0.0, steps: int = MAX_STEPS):
    """Sphere-trace model-space rays (M, 3) of heads b over [t0, t1], evaluating the shapes
    ``cand`` (S, M) allows.

    Returns (stopped on a surface (M,), t (M,), nearest part (M,), its distance (M,)).
    With ``cone_per_t`` > 0 each ray is the axis of a cone of radius cone_per_t * t: it
    advances by (distance - radius), which keeps the whole cone in free space, and stops
    where a surface may touch the cone; a cone still marching after ``steps`` steps counts
    as stopped where it is (its t is still a free-space bound). A plain ray still marching
    then counts as a hit if it is within six tolerances of a surface.
    """
    t_hit, d_hit = torch.zeros_like(t0), torch.zeros_like(t0)
    hit = torch.zeros_like(t0, dtype=torch.bool)
    owner = torch.zeros_like(b)
    live = (t0 < t1).nonzero().squeeze(1)
    rays = _Marching(heads, live, o[live], d[live], b[live], t0[live], t1[live], cand[:, live])
    omega = OVER_RELAXATION if cone_per_t == 0 else 1.0
    for step in range(steps):
        if not rays.ids.numel():
            break
        dist, own = rays.distance()
        radius = cone_per_t * rays.t
        last = step == steps - 1
        # A relaxed step is only safe if the spheres around its two ends overlap; where they
        # do not, go back to a plain step from the previous point and stop relaxing.
        revert = rays.marching & (rays.prev_step > rays.prev_d) & (dist.abs() + rays.prev_d < rays.prev_step)
        ok = rays.marching & ~revert
        tol = radius + eps_per_t * rays.t * (6.0 if last else 1.0)
        done = ok & ((dist < tol) | (last and cone_per_t > 0))
        done_idx = done.nonzero().squeeze(1)
        ids = rays.ids[done_idx]
        hit[ids] = True
        t_hit[ids] = rays.t[done_idx]
        d_hit[ids] = dist[done_idx]
        owner[ids] = own[done_idx]
        rays.marching &= ~done
        advance = ok & rays.marching
        step_len = torch.where(rays.relaxed, omega, 1.0) * (dist - radius)
        back = rays.prev_d - rays.prev_step
        rays.t = torch.where(advance, rays.t + step_len, torch.where(revert, rays.t + back, rays.t))
        rays.prev_step = torch.where(advance, step_len, torch.where(revert, rays.prev_d, rays.prev_step))
        rays.prev_d = torch.where(advance, dist - radius, rays.prev_d)
        rays.relaxed &= ~revert
        rays.marching &= rays.t < rays.end
        if int(rays.marching.sum()) < 0.7 * rays.t.shape[0]:
            rays = rays.compacted()
    return hit, t_hit, owner, d_hit


def _scene_interval(o: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Model-space entry/exit of rays through :data:`SCENE_BOX`."""
    lo, hi = _to_model(torch.tensor(SCENE_BOX[0])), _to_model(torch.tensor(SCENE_BOX[1]))
    inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    t_in, t_out = _slab(o, inv, lo.unsqueeze(0), hi.unsqueeze(0))
    return t_in.squeeze(1), t_out.squeeze(1)


def _to_model(p: Tensor) -> Tensor:
    """World-frame points -> the heads' model frame (directions are unchanged)."""
    return (p - torch.tensor(HEAD_POSITION)) / HEAD_SCALE + torch.tensor(HEAD_ANCHOR)


def _model_rays(labels: Tensor, resolution: int) -> tuple[Tensor, Tensor]:
    """Camera rays (B * R * R, 3), head-major, moved into the heads' model frame (see :data:`HEAD_SCALE`)."""
    origins, dirs = camera_rays(labels, resolution)
    return _to_model(origins).reshape(-1, 3), dirs.reshape(-1, 3)


def render(identities: Sequence[Identity] | HeadBatch, labels: Tensor, resolution: int = 64,
           supersample: int = 2, parts: bool = False) -> dict[str, Tensor]:
    """Render heads from EG3D camera labels (B, 25), one label per head.

    Returns 'rgb' (B, 3, R, R) in [0, 1], 'depth' (B, 1, R, R) (mean world ray distance of
    the hit subsamples, 0 where nothing is hit) and 'mask' (B, 1, R, R) (hit fraction); with
    ``parts``, also 'parts' (B, len(PARTS), R, R): the fraction of each pixel's subsamples that
    hit each part of :data:`heads.PARTS` (what covers what, e.g. hair over the eyebrows).
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
    block = CONE_BLOCK if res % CONE_BLOCK == 0 else 1
    coarse = res // block
    focal = split_label(labels)[1][:, 0, 0].min().item()
    eps_per_t = 0.35 / (focal * res)  # about a third of a (supersampled) pixel footprint
    # Angle from a block's centre ray to its outermost ray centre, with 5 % to spare.
    cone_per_t = 1.05 * (block - 1) / 2 * math.sqrt(2.0) / (focal * res)
    rgb = heads.background.repeat_interleave(n, dim=0)
    depth = torch.zeros(B * n)
    hit = torch.zeros(B * n, dtype=torch.bool)
    part = torch.full((B * n,), len(PARTS), dtype=torch.long)  # len(PARTS): background
    group = max(1, CHUNK_RAYS // n)
    for g0 in range(0, B, group):
        heads_g = torch.arange(g0, min(g0 + group, B))
        lab = labels[heads_g]
        o, d = _model_rays(lab, res)
        b = heads_g.repeat_interleave(n)
        if block > 1:
            # Cone pass: one cone per block of rays. Its shape candidates (boxes grown by the
            # cone radius) and its free-space t serve every ray of the block; blocks whose
            # cone meets nothing stay background.
            oc, dc = _model_rays(lab, coarse)
            bc = heads_g.repeat_interleave(coarse * coarse)
            cand, t0, t1 = _bounds(heads, oc, dc, bc, cone_per_t)
            touched, t_cone, _, _ = _trace(heads, oc, dc, bc, cand, t0, t1, eps_per_t, cone_per_t,
                                           CONE_STEPS)
            t_cone = torch.where(touched, t_cone, torch.full_like(t_cone, math.inf))
            row = torch.arange(res) // block
            block_of = (row.view(-1, 1) * coarse + row.view(1, -1)).reshape(-1)
            block_of = (torch.arange(len(heads_g)).view(-1, 1) * coarse * coarse + block_of).reshape(-1)
            s0, s1 = _scene_interval(o, d)
            cand, t0, t1 = cand[:, block_of], torch.maximum(t_cone[block_of], s0), torch.minimum(t1[block_of], s1)
        else:
            cand, t0, t1 = _bounds(heads, o, d, b)
        h, t, owner, d_hit = _trace(heads, o, d, b, cand, t0, t1, eps_per_t)
        idx = h.nonzero().squeeze(1)
        p = o[idx] + d[idx] * t[idx].unsqueeze(-1)
        out = g0 * n + idx
        rgb[out] = heads.shade(p[:, 0], p[:, 1], p[:, 2], b[idx], owner[idx], d_hit[idx])
        depth[out] = t[idx] * HEAD_SCALE
        hit[out] = True
        part[out] = owner[idx]

    def pool(img: Tensor, c: int) -> Tensor:
        img = img.reshape(B, res, res, c).permute(0, 3, 1, 2)
        return F.avg_pool2d(img, supersample) if supersample > 1 else img

    mask = pool(hit.float(), 1)
    depth = torch.where(mask > 0, pool(depth, 1) / mask.clamp_min(1e-6), torch.zeros_like(mask))
    result = {"rgb": pool(rgb, 3).clamp(0.0, 1.0), "depth": depth, "mask": mask}
    if parts:
        result["parts"] = pool(F.one_hot(part, len(PARTS) + 1)[:, :-1].float(), len(PARTS))
    return result


def coarser(view: dict[str, Tensor], resolution: int) -> dict[str, Tensor]:
    """A :func:`render` result ('depth', 'mask' and any of 'rgb', 'parts') at a coarser
    ``resolution`` that divides its own, without tracing again: hit fractions, colours and parts
    averaged over each block, depth averaged over the block's hits (0 where none). It is what
    :func:`render` returns at that resolution with ``supersample`` times the factor, up to float
    rounding (the same rays)."""
    size = view["mask"].shape[-1]
    if resolution < 1 or size % resolution:
        raise ValueError(f"a {size}^2 render pools only to a resolution that divides {size}, got {resolution}")
    factor = size // resolution
    if factor == 1:
        return dict(view)
    out = {k: F.avg_pool2d(v, factor) for k, v in view.items() if k != "depth"}
    hits = F.avg_pool2d(view["depth"] * view["mask"], factor)
    out["depth"] = torch.where(out["mask"] > 0, hits / out["mask"].clamp_min(1e-6), torch.zeros_like(hits))
    return out
