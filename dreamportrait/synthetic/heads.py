"""The procedural head: parts made of signed-distance shapes, with materials.

A head is a fixed list of parts (skin, eyes, eyebrows, lips, mouth, four hair styles,
mustache, beard, glasses, lenses, earrings, clothing). A part is a union of shapes (smooth or
hard) plus an albedo function evaluated only at hit points; parts an identity lacks are
switched off by a per-identity flag. Every shape has an axis-aligned bounding box (mirrored
across x = 0 for left/right pairs) that contains it, dilated by its blend radius: the tracer
skips a shape for every ray that never enters its box.

Shapes are modelled in a canonical frame and placed in EG3D's FFHQ world frame by a uniform
scale :data:`HEAD_SCALE` that takes :data:`HEAD_ANCHOR` (eye height) to :data:`HEAD_POSITION`,
sized like an aligned FFHQ crop (eyes 1/4 of the frame apart, eyes at 0.47 and mouth at 0.73
of the frame height under EG3D's FFHQ camera): y up, the face looks toward
+z, eyes near the frame centre, chin in the lower part of the frame, shoulders at the bottom
edge, everything inside :data:`SCENE_BOX` and hence inside the tri-plane box [-0.5, 0.5]^3.
Sizes are chosen so that every attribute is readable at 64x64 (one pixel is about 0.009
world units at the face): thick dark glasses rims, large bright earrings, strong lipstick,
wrinkle lines a pixel wide.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import sdf

Tensor = torch.Tensor

HEAD_SCALE = 1.1
HEAD_ANCHOR = (0.0, 0.032, 0.0)  # model-frame point (eye height) ...
HEAD_POSITION = (0.0, 0.015, 0.0)  # ... placed here in the world frame
# World-frame bounds of every head (min corner, max corner); nothing outside is rendered.
SCENE_BOX = ((-0.36, -0.48, -0.34), (0.36, 0.4, 0.34))

SKIN = {"fair": (0.96, 0.80, 0.69), "medium": (0.84, 0.62, 0.46),
        "brown": (0.60, 0.40, 0.25), "dark": (0.34, 0.21, 0.13)}
HAIR = {"black": (0.06, 0.05, 0.05), "brown": (0.38, 0.21, 0.09), "blond": (0.95, 0.80, 0.42),
        "red": (0.80, 0.24, 0.05), "gray": (0.50, 0.50, 0.52), "white": (0.97, 0.97, 0.96)}
IRIS = {"blue": (0.10, 0.45, 1.00), "green": (0.10, 0.72, 0.18), "brown": (0.40, 0.18, 0.04)}
CLOTHING = {"red": (0.82, 0.08, 0.08), "blue": (0.10, 0.22, 0.72), "green": (0.08, 0.50, 0.18),
            "yellow": (0.98, 0.82, 0.08), "black": (0.07, 0.07, 0.07), "white": (0.96, 0.96, 0.96)}
BACKGROUND = {"blue": (0.55, 0.70, 0.95), "green": (0.58, 0.82, 0.55), "pink": (0.96, 0.72, 0.82),
              "purple": (0.70, 0.60, 0.90), "teal": (0.40, 0.74, 0.74)}
LIPSTICK = (0.86, 0.04, 0.10)
GOLD = (1.0, 0.80, 0.10)
FRAME = (0.03, 0.03, 0.035)
LENS = (0.02, 0.02, 0.03)
MOUTH_INSIDE = (0.22, 0.03, 0.04)
TEETH = (0.97, 0.97, 0.94)
WRINKLE = {"young": 0, "middle-aged": 1, "old": 2}


class PartPoints:
    """Points (structure of arrays) of heads ``b``, with lazily gathered part parameters.

    ``rows`` holds one entry per parameter row: a float when every head of the batch shares
    the value (no gather, cheap broadcasting), else a (B,) tensor gathered at ``b``.
    """

    def __init__(self, x: Tensor, y: Tensor, z: Tensor, b: Tensor,
                 rows: Sequence[float | Tensor], slots: dict[str, slice]):
        self.x, self.y, self.z, self.b, self.rows, self.slots = x, y, z, b, rows, slots
        self._cache: dict[int, float | Tensor] = {}

    def _row(self, j: int) -> float | Tensor:
        if j not in self._cache:
            r = self.rows[j]
            self._cache[j] = r if isinstance(r, float) else r[self.b]
        return self._cache[j]

    def __getitem__(self, name: str):
        """A scalar parameter (float or (M,) tensor), or a tuple of them for vectors."""
        sl = self.slots[name]
        if sl.stop - sl.start == 1:
            return self._row(sl.start)
        return tuple(self._row(j) for j in range(sl.start, sl.stop))

    def rgb(self, name: str) -> Tensor:
        """A colour parameter as an (M, 3) tensor."""
        m = self.x.shape[0]
        return torch.stack([torch.as_tensor(c, dtype=torch.float32).expand(m) for c in self[name]], dim=-1)

    def at(self, x: Tensor, y: Tensor, z: Tensor) -> "PartPoints":
        """Other points of the same heads, sharing the gathered parameters."""
        q = PartPoints(x, y, z, self.b, self.rows, self.slots)
        q._cache = self._cache
        return q

    def moved(self, dx: float, dy: float, dz: float) -> "PartPoints":
        return self.at(self.x + dx, self.y + dy, self.z + dz)

    @property
    def ax(self) -> Tensor:
        """|x|: left/right pairs are modelled once, on the +x side."""
        return self.x.abs()


Box = tuple[tuple[float, float, float], tuple[float, float, float]]


@dataclass(frozen=True)
class Shape:
    """A distance function, its bounding box (mirrored in x if ``mirror``) and its blend radius
    with the shapes listed before it in the part (0: hard union)."""

    distance: Callable[[PartPoints], Tensor]
    box: Box
    mirror: bool = False
    blend: float = 0.0


@dataclass(frozen=True)
class Part:
    """One material region of the head."""

    name: str
    layout: tuple[tuple[str, int], ...]
    shapes: tuple[Shape, ...]
    albedo: Callable[[PartPoints], Tensor]
    flag: str | None = None  # parameter (0/1) enabling the part; None: every head has it

    def distance(self, q: PartPoints) -> Tensor:
        """Union of the part's shapes (smooth where a shape has a blend radius) at points q."""
        d = self.shapes[0].distance(q)
        for shape in self.shapes[1:]:
            dk = shape.distance(q)
            d = sdf.smooth_union(d, dk, shape.blend) if shape.blend > 0 else torch.minimum(d, dk)
        return d


def _gauss(d: Tensor, width: float) -> Tensor:
    return torch.exp(-(d / width) ** 2)


def _segment_distance_2d(u: Tensor, v: Tensor, a: Sequence[float], b: Sequence[float]) -> Tensor:
    bu, bv = b[0] - a[0], b[1] - a[1]
    pu, pv = u - a[0], v - a[1]
    h = ((pu * bu + pv * bv) / (bu * bu + bv * bv)).clamp(0.0, 1.0)
    return torch.sqrt((pu - bu * h) ** 2 + (pv - bv * h) ** 2)


def _constant(colour: Sequence[float]) -> Callable[[PartPoints], Tensor]:
    return lambda q: torch.tensor(colour, dtype=torch.float32).expand(q.x.shape[0], 3)


def _parameter(name: str) -> Callable[[PartPoints], Tensor]:
    return lambda q: q.rgb(name)


# ----------------------------------------------------------------------------- skin
def _skull(q: PartPoints) -> Tensor:
    d = sdf.ellipsoid(q.x, q.y, q.z, q["cranium_c"], q["cranium_r"])
    return sdf.smooth_union(d, sdf.ellipsoid(q.x, q.y, q.z, q["jaw_c"], q["jaw_r"]), 0.05)


def _jaw_angles(q):
    return sdf.ellipsoid(q.ax, q.y, q.z, q["angle_c"], q["angle_r"])


def _chin(q):
    return sdf.ellipsoid(q.x, q.y, q.z, q["chin_c"], q["chin_r"])


def _cheeks(q):
    return sdf.ellipsoid(q.ax, q.y, q.z, q["cheek_c"], q["cheek_r"])


def _nose(q: PartPoints) -> Tensor:
    x, y, z = q.x, q.y, q.z
    d = torch.minimum(sdf.capsule(x, y, z, q["bridge"], q["tip"], q["bridge_r"]),
                      sdf.sphere(x, y, z, q["tip"], q["tip_r"]))
    return torch.minimum(d, sdf.ellipsoid(q.ax, y, z, q["wing_c"], q["wing_r"]))


def _ears(q):
    return sdf.ellipsoid(q.ax, q.y, q.z, q["ear_c"], q["ear_r"])


def _neck(q):
    return sdf.capsule(q.x, q.y, q.z, q["neck_a"], q["neck_b"], q["neck_r"])


def _skin_albedo(q: PartPoints) -> Tensor:
    """Skin tone, blush (women) and age wrinkles: forehead lines, folds, eye bags."""
    x, y, z, ax = q.x, q.y, q.z, q.ax
    colour = q.rgb("skin")
    front = (z > 0.08).float()
    blush = q["blush"] * _gauss(torch.sqrt((ax - 0.078) ** 2 + (y + 0.035) ** 2), 0.03)
    colour = colour * (1.0 - blush.unsqueeze(-1) * torch.tensor([0.0, 0.3, 0.22]))
    level = q["wrinkles"]
    if isinstance(level, float):
        level = torch.full_like(x, level)
    # Middle-aged: two forehead lines 0.02 apart, folds and eye bags; old: four lines 0.013 apart,
    # crow's feet and mouth corners too. Lines are about a pixel wide at 64x64 (narrower vanish).
    old = (level > 1.5).float()
    spacing = 0.02 - 0.007 * old
    u = (y - 0.125 + 0.007 * old) / spacing
    k = u.round().clamp(0.0, 3.0)
    forehead = _gauss((u - k) * spacing, 0.0045) * (k < 2.0 + 2.0 * old).float() * (ax < 0.075).float() * front
    fold = _gauss(_segment_distance_2d(ax, y, (0.036, -0.052), (0.06, -0.128)), 0.005) * front
    bags = _gauss(_segment_distance_2d(ax, y, (0.035, 0.0), (0.08, 0.003)), 0.004) * front
    feet = _gauss(_segment_distance_2d(ax, y, (0.098, 0.04), (0.112, 0.022)), 0.003)
    corners = _gauss(_segment_distance_2d(ax, y, (0.052, -0.13), (0.056, -0.168)), 0.003) * front
    extra = torch.maximum(corners, feet)
    lines = torch.maximum(torch.maximum(torch.maximum(forehead, fold), bags), old * extra)
    strength = (level > 0.5).float() * torch.where(level > 1.5, 0.75, 0.55)
    return colour * (1.0 - (strength * lines).unsqueeze(-1))


SKIN_PART = Part("skin", (
    ("cranium_c", 3), ("cranium_r", 3), ("jaw_c", 3), ("jaw_r", 3), ("angle_c", 3), ("angle_r", 3),
    ("chin_c", 3), ("chin_r", 3), ("cheek_c", 3), ("cheek_r", 3), ("bridge", 3), ("tip", 3),
    ("bridge_r", 1), ("tip_r", 1), ("wing_c", 3), ("wing_r", 3), ("ear_c", 3), ("ear_r", 3),
    ("neck_a", 3), ("neck_b", 3), ("neck_r", 1), ("skin", 3), ("blush", 1), ("wrinkles", 1),
), (
    Shape(_skull, ((-0.18, -0.21, -0.21), (0.18, 0.26, 0.18))),
    Shape(_jaw_angles, ((0.0, -0.22, -0.11), (0.2, 0.005, 0.15)), mirror=True, blend=0.04),
    Shape(_chin, ((-0.11, -0.25, 0.0), (0.11, -0.065, 0.18)), blend=0.03),
    Shape(_cheeks, ((0.0, -0.13, -0.02), (0.19, 0.07, 0.19)), mirror=True, blend=0.03),
    Shape(_nose, ((-0.095, -0.13, 0.11), (0.095, 0.08, 0.315)), blend=0.018),
    Shape(_ears, ((0.085, -0.075, -0.06), (0.21, 0.075, 0.05)), mirror=True, blend=0.012),
    Shape(_neck, ((-0.15, -0.53, -0.19), (0.15, 0.05, 0.13)), blend=0.05),
), _skin_albedo)


# ----------------------------------------------------------------------------- eyes, brows
def _eyes(q: PartPoints) -> Tensor:
    return sdf.ellipsoid(q.ax, q.y, q.z, q["eye_c"], q["eye_r"])


def _eye_albedo(q: PartPoints) -> Tensor:
    """Sclera, iris and pupil by distance from the eye axis; a dark upper lid line."""
    c, r = q["eye_c"], q["eye_r"]
    u, v = (q.ax - c[0]) / r[0], (q.y - c[1]) / r[1]
    rho = torch.sqrt(u * u + (v * r[1] / r[0]) ** 2)
    colour = torch.full((q.x.shape[0], 3), 0.96)
    colour = torch.where((rho < 0.62).unsqueeze(-1), q.rgb("iris"), colour)
    colour = torch.where((rho < 0.26).unsqueeze(-1), torch.tensor([0.02, 0.02, 0.02]), colour)
    return torch.where((v > q["lid"]).unsqueeze(-1), torch.tensor([0.05, 0.03, 0.03]), colour)


EYES_PART = Part("eyes", (("eye_c", 3), ("eye_r", 3), ("iris", 3), ("lid", 1)),
                 (Shape(_eyes, ((0.005, 0.0, 0.12), (0.11, 0.064, 0.18)), mirror=True),), _eye_albedo)


def _brows(q: PartPoints) -> Tensor:
    return sdf.polyline(q.ax, q.y, q.z, (q["brow_in"], q["brow_mid"], q["brow_out"]), q["brow_r"])


BROWS_PART = Part("eyebrows", (("brow_in", 3), ("brow_mid", 3), ("brow_out", 3), ("brow_r", 1),
                               ("brow_rgb", 3)),
                  (Shape(_brows, ((0.005, 0.04, 0.11), (0.12, 0.135, 0.185)), mirror=True),),
                  _parameter("brow_rgb"))


# ----------------------------------------------------------------------------- mouth
def _lips(q: PartPoints) -> Tensor:
    ax, y, z = q.ax, q.y, q.z
    upper = sdf.capsule(ax, y, z, q["upper_mid"], q["corner"], q["upper_r"])
    return torch.minimum(upper, sdf.capsule(ax, y, z, q["lower_mid"], q["corner"], q["lower_r"]))


LIPS_PART = Part("lips", (("upper_mid", 3), ("lower_mid", 3), ("corner", 3), ("upper_r", 1),
                          ("lower_r", 1), ("lip_rgb", 3)),
                 (Shape(_lips, ((-0.065, -0.16, 0.12), (0.065, -0.075, 0.19))),), _parameter("lip_rgb"))


def _mouth(q: PartPoints) -> Tensor:
    return sdf.ellipsoid(q.x, q.y, q.z, q["inside_c"], q["inside_r"])


MOUTH_PART = Part("mouth", (("inside_c", 3), ("inside_r", 3), ("inside_rgb", 3), ("has_mouth", 1)),
                  (Shape(_mouth, ((-0.045, -0.15, 0.12), (0.045, -0.085, 0.18))),),
                  _parameter("inside_rgb"), flag="has_mouth")


# ----------------------------------------------------------------------------- hair
def _hair_albedo(q: PartPoints) -> Tensor:
    """Hair colour with fine strands (straight styles) or curl highlights (curly)."""
    strands = torch.sin(260.0 * q.x + 30.0 * torch.sin(21.0 * q.y + 9.0 * q.z))
    curls = torch.sin(48.0 * q.x) * torch.sin(48.0 * q.y) * torch.sin(48.0 * q.z)
    shade = torch.where(torch.as_tensor(q["curl_amp"]) > 0, 0.78 + 0.22 * curls, 0.9 + 0.1 * strands)
    return q.rgb("hair_rgb") * shade.unsqueeze(-1)


def _cap(q: PartPoints) -> Tensor:
    """Hair hugging the skull above the hairline y = min(top, h0 + slope * z): level at ``top``
    across the forehead, falling along a tilted plane over the temples and the back."""
    shell = sdf.ellipsoid(q.x, q.y, q.z, q["cap_c"], q["cap_r"])
    h0, slope, top = q["hairline"]
    below = torch.minimum(top - q.y, (h0 + slope * q.z - q.y) / (1.0 + slope * slope) ** 0.5)
    return torch.maximum(shell, below)


def _hanging(q: PartPoints) -> Tensor:
    """Hair hanging beside and behind the face down to ``drop_y``, behind z = ``drop_front``."""
    body = sdf.ellipsoid(q.x, q.y, q.z, q["drop_c"], q["drop_r"])
    return torch.maximum(torch.maximum(body, q["drop_y"] - q.y), q.z - q["drop_front"])


def _curly_cap(q: PartPoints) -> Tensor:
    bumps = q["curl_amp"] * torch.sin(48.0 * q.x) * torch.sin(48.0 * q.y) * torch.sin(48.0 * q.z)
    # The bumps raise the gradient norm to about 1.8: scale so that sphere tracing stays safe.
    return (_cap(q) - bumps) / 1.8


HAIR_LAYOUT = (("cap_c", 3), ("cap_r", 3), ("hairline", 3), ("drop_c", 3), ("drop_r", 3),
               ("drop_y", 1), ("drop_front", 1), ("curl_amp", 1), ("hair_rgb", 3))
_CAP = Shape(_cap, ((-0.215, -0.18, -0.25), (0.215, 0.3, 0.235)))
HAIR_SHAPES = {
    "short": (_CAP,),
    "long": (_CAP, Shape(_hanging, ((-0.215, -0.34, -0.225), (0.215, 0.3, 0.02)))),
    "bangs": (_CAP, Shape(_hanging, ((-0.215, -0.15, -0.21), (0.215, 0.21, 0.02)))),
    "curly": (Shape(_curly_cap, ((-0.245, -0.2, -0.28), (0.245, 0.33, 0.24))),),
}
HAIR_PARTS = tuple(Part(f"hair_{style}", HAIR_LAYOUT + ((f"is_{style}", 1),), shapes, _hair_albedo,
                        flag=f"is_{style}") for style, shapes in HAIR_SHAPES.items())


# ----------------------------------------------------------------------------- beard
def _mustache(q: PartPoints) -> Tensor:
    return sdf.polyline(q.ax, q.y, q.z, (q["must_mid"], q["must_side"], q["must_end"]), q["must_r"])


def _beard(q: PartPoints) -> Tensor:
    x, y, z = q.x, q.y, q.z
    shell = sdf.ellipsoid(x, y, z, q["beard_c"], q["beard_r"])
    h0, slope = q["beard_top"]
    shell = torch.maximum(shell, (y - h0 - slope * q.ax) / (1.0 + slope * slope) ** 0.5)
    shell = torch.maximum(shell, q["beard_back"] - z)
    return torch.maximum(shell, -sdf.ellipsoid(x, y, z, q["mouth_c"], q["mouth_r"]))


def _beard_albedo(q: PartPoints) -> Tensor:
    grain = torch.sin(300.0 * q.x) * torch.sin(230.0 * q.y + 40.0 * q.z)
    return q.rgb("beard_rgb") * (0.85 + 0.15 * grain).unsqueeze(-1)


MUSTACHE_PART = Part("mustache", (("must_mid", 3), ("must_side", 3), ("must_end", 3), ("must_r", 1),
                                  ("beard_rgb", 3), ("has_mustache", 1)),
                     (Shape(_mustache, ((-0.07, -0.135, 0.12), (0.07, -0.06, 0.2))),),
                     _beard_albedo, flag="has_mustache")
BEARD_PART = Part("beard", (("beard_c", 3), ("beard_r", 3), ("beard_top", 2), ("beard_back", 1),
                            ("mouth_c", 3), ("mouth_r", 3), ("beard_rgb", 3), ("has_beard", 1)),
                  (Shape(_beard, ((-0.17, -0.24, -0.04), (0.17, 0.04, 0.2))),),
                  _beard_albedo, flag="has_beard")


# ----------------------------------------------------------------------------- accessories
def _rims(q: PartPoints) -> Tensor:
    ax, y, z = q.ax, q.y, q.z
    c, size = q["rim_c"], q["rim_size"]
    ring = sdf.round_rect_2d(ax - c[0], y - c[1], size[0], size[1], size[2]).abs()
    rims = torch.sqrt(ring * ring + (z - c[2]) ** 2) - q["rim_r"]
    return torch.minimum(rims, sdf.capsule(ax, y, z, q["bridge_a"], q["bridge_b"], q["rim_r"]))


def _arms(q: PartPoints) -> Tensor:
    return sdf.capsule(q.ax, q.y, q.z, q["arm_a"], q["arm_b"], q["rim_r"])


def _lenses(q: PartPoints) -> Tensor:
    c, size = q["rim_c"], q["rim_size"]
    flat = sdf.round_rect_2d(q.ax - c[0], q.y - c[1], size[0], size[1], size[2])
    return torch.maximum(flat, (q.z - c[2]).abs() - 0.003)


FRAME_LAYOUT = (("rim_c", 3), ("rim_size", 3), ("rim_r", 1), ("bridge_a", 3), ("bridge_b", 3),
                ("arm_a", 3), ("arm_b", 3))
GLASSES_PART = Part("glasses", FRAME_LAYOUT + (("has_frame", 1),), (
    Shape(_rims, ((0.0, -0.01, 0.18), (0.12, 0.075, 0.215)), mirror=True),
    Shape(_arms, ((0.07, 0.02, -0.015), (0.185, 0.065, 0.205)), mirror=True),
), _constant(FRAME), flag="has_frame")
LENS_PART = Part("lenses", FRAME_LAYOUT + (("has_lens", 1),),
                 (Shape(_lenses, ((0.0, -0.005, 0.185), (0.115, 0.07, 0.21)), mirror=True),),
                 _constant(LENS), flag="has_lens")


def _earrings(q: PartPoints) -> Tensor:
    ax, y, z = q.ax, q.y, q.z
    stud = sdf.sphere(ax, y, z, q["stud"], 0.008)
    link = sdf.capsule(ax, y, z, q["stud"], q["ball"], 0.004)
    return torch.minimum(torch.minimum(stud, link), sdf.sphere(ax, y, z, q["ball"], q["ball_r"]))


EARRINGS_PART = Part("earrings", (("stud", 3), ("ball", 3), ("ball_r", 1), ("has_earrings", 1)),
                     (Shape(_earrings, ((0.11, -0.112, 0.012), (0.2, -0.03, 0.065)), mirror=True),),
                     _constant(GOLD), flag="has_earrings")


def _chest(q):
    return sdf.ellipsoid(q.x, q.y, q.z, q["chest_c"], q["chest_r"])


def _shoulders(q):
    return sdf.capsule(q.ax, q.y, q.z, q["shoulder_a"], q["shoulder_b"], q["shoulder_r"])


def _torso_albedo(q: PartPoints) -> Tensor:
    """Clothing; women's tops have a scoop neckline showing skin, men's a high round collar."""
    w, h, cy = q["neckline"]
    skin = ((q.ax / w) ** 2 + ((q.y - cy) / h) ** 2 < 1.0) & (q.z > -0.02)
    return torch.where(skin.unsqueeze(-1), q.rgb("torso_skin"), q.rgb("cloth_rgb"))


TORSO_PART = Part("clothing", (("chest_c", 3), ("chest_r", 3), ("shoulder_a", 3), ("shoulder_b", 3),
                               ("shoulder_r", 1), ("neckline", 3), ("cloth_rgb", 3), ("torso_skin", 3)), (
    Shape(_chest, ((-0.27, -0.62, -0.2), (0.27, -0.24, 0.13))),
    Shape(_shoulders, ((0.0, -0.48, -0.21), (0.41, -0.14, 0.11)), mirror=True, blend=0.06),
), _torso_albedo)

PARTS: tuple[Part, ...] = ((SKIN_PART, EYES_PART, BROWS_PART, LIPS_PART, MOUTH_PART) + HAIR_PARTS
                           + (MUSTACHE_PART, BEARD_PART, GLASSES_PART, LENS_PART, EARRINGS_PART,
                              TORSO_PART))
