"""The procedural head: attributes -> per-part SDF parameters and materials.

A head is a fixed list of parts (skin, eyes, eyebrows, lips, mouth, hair styles, beard,
glasses, earrings, clothing). Every part has its own signed-distance function, parameters per
identity and an albedo function evaluated only at hit points; parts an identity lacks are
switched off by a per-identity flag. World frame of EG3D's FFHQ: y up, the face looks toward
+z, eyes near y = 0.03, chin near y = -0.19, shoulders at the bottom edge of the FFHQ frame,
everything inside :data:`SCENE_BOX` (which lies inside the tri-plane box [-0.5, 0.5]^3).

Sizes are chosen so that every attribute is readable at 64x64 (one pixel is about 0.009
world units at the face): thick dark glasses rims, large bright earrings, strong lipstick,
wrinkle lines a pixel wide.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from . import sdf
from .attributes import Identity

Tensor = torch.Tensor

# Axis-aligned bounds of every head (min corner, max corner); geometry outside is not rendered.
SCENE_BOX = ((-0.36, -0.48, -0.34), (0.36, 0.36, 0.34))

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


@dataclass(frozen=True)
class Part:
    """One material region of the head: distance, albedo and the flag that switches it on."""

    name: str
    layout: tuple[tuple[str, int], ...]
    distance: Callable[["PartPoints"], Tensor]
    albedo: Callable[["PartPoints"], Tensor]
    flag: str | None = None  # parameter (0/1) that enables the part; None = always present


class PartPoints:
    """Points (structure of arrays) with their image's parameters of one part gathered."""

    def __init__(self, x: Tensor, y: Tensor, z: Tensor, rows: Tensor, slots: dict[str, slice]):
        self.x, self.y, self.z, self.rows, self.slots = x, y, z, rows, slots

    def __getitem__(self, name: str) -> Tensor:
        """One parameter: a (M,) tensor for scalars, (k, M) for vectors."""
        sl = self.slots[name]
        return self.rows[sl.start] if sl.stop - sl.start == 1 else self.rows[sl]

    def moved(self, dx: float, dy: float, dz: float) -> "PartPoints":
        return PartPoints(self.x + dx, self.y + dy, self.z + dz, self.rows, self.slots)

    @property
    def ax(self) -> Tensor:
        """|x|: left/right symmetric parts are modelled once on the +x side."""
        return self.x.abs()


def _rgb(value: Tensor, m: int) -> Tensor:
    """(3, M) parameter rows -> (M, 3) colours."""
    return value.t().reshape(m, 3)


def _mix(a: Tensor, b: Tensor, w: Tensor) -> Tensor:
    return a + (b - a) * w.unsqueeze(-1)


def _gauss(d: Tensor, width: float) -> Tensor:
    return torch.exp(-(d / width) ** 2)


def _segment_distance_2d(u: Tensor, v: Tensor, a: Sequence[float], b: Sequence[float]) -> Tensor:
    bu, bv = b[0] - a[0], b[1] - a[1]
    pu, pv = u - a[0], v - a[1]
    h = ((pu * bu + pv * bv) / (bu * bu + bv * bv)).clamp(0.0, 1.0)
    return torch.sqrt((pu - bu * h) ** 2 + (pv - bv * h) ** 2)


# ----------------------------------------------------------------------------- skin
def _skin_distance(q: PartPoints) -> Tensor:
    x, y, z, ax = q.x, q.y, q.z, q.ax
    d = sdf.ellipsoid(x, y, z, q["cranium_c"], q["cranium_r"])
    d = sdf.smooth_union(d, sdf.ellipsoid(x, y, z, q["jaw_c"], q["jaw_r"]), 0.05)
    d = sdf.smooth_union(d, sdf.ellipsoid(ax, y, z, q["angle_c"], q["angle_r"]), 0.04)
    d = sdf.smooth_union(d, sdf.ellipsoid(x, y, z, q["chin_c"], q["chin_r"]), 0.03)
    d = sdf.smooth_union(d, sdf.ellipsoid(ax, y, z, q["cheek_c"], q["cheek_r"]), 0.03)
    nose = torch.minimum(sdf.capsule(x, y, z, q["bridge"], q["tip"], q["bridge_r"]),
                         sdf.sphere(x, y, z, q["tip"], q["tip_r"]))
    nose = torch.minimum(nose, sdf.ellipsoid(ax, y, z, q["wing_c"], q["wing_r"]))
    d = sdf.smooth_union(d, nose, 0.018)
    d = sdf.smooth_union(d, sdf.ellipsoid(ax, y, z, q["ear_c"], q["ear_r"]), 0.012)
    return sdf.smooth_union(d, sdf.capsule(x, y, z, q["neck_a"], q["neck_b"], q["neck_r"]), 0.05)


def _skin_albedo(q: PartPoints) -> Tensor:
    x, y, z, ax = q.x, q.y, q.z, q.ax
    m = x.shape[0]
    colour = _rgb(q["skin"], m)
    front = (z > 0.08).float()
    # Blush on the cheeks (women) and a darker nostril shadow.
    blush = q["blush"] * _gauss(torch.sqrt((ax - 0.075) ** 2 + (y + 0.035) ** 2), 0.03)
    colour = colour * (1.0 - blush.unsqueeze(-1) * torch.tensor([0.0, 0.35, 0.28]))
    # Wrinkles: forehead lines, nasolabial folds, eye bags and mouth-corner lines.
    level = q["wrinkles"]
    u = (y - 0.132) / 0.019
    k = u.round().clamp(0.0, 3.0)
    count = torch.where(level > 1.5, 4.0, 2.0)
    forehead = _gauss((u - k) * 0.019, 0.0032) * (k < count).float() * (ax < 0.075).float()
    forehead = forehead * front * (u > -0.5).float()
    fold = _gauss(_segment_distance_2d(ax, y, (0.034, -0.052), (0.058, -0.128)), 0.0035) * front
    bags = _gauss(_segment_distance_2d(ax, y, (0.03, 0.0), (0.075, 0.0)), 0.003) * front
    corners = _gauss(_segment_distance_2d(ax, y, (0.05, -0.13), (0.055, -0.168)), 0.003) * front
    old = (level > 1.5).float()
    lines = torch.maximum(torch.maximum(forehead, fold), old * torch.maximum(bags, corners))
    strength = (level > 0.5).float() * torch.where(level > 1.5, 0.6, 0.45)
    return colour * (1.0 - (strength * lines).unsqueeze(-1))


SKIN_PART = Part("skin", (
    ("cranium_c", 3), ("cranium_r", 3), ("jaw_c", 3), ("jaw_r", 3), ("angle_c", 3), ("angle_r", 3),
    ("chin_c", 3), ("chin_r", 3), ("cheek_c", 3), ("cheek_r", 3), ("bridge", 3), ("tip", 3),
    ("bridge_r", 1), ("tip_r", 1), ("wing_c", 3), ("wing_r", 3), ("ear_c", 3), ("ear_r", 3),
    ("neck_a", 3), ("neck_b", 3), ("neck_r", 1), ("skin", 3), ("blush", 1), ("wrinkles", 1),
), _skin_distance, _skin_albedo)


# ----------------------------------------------------------------------------- eyes, brows
def _eye_distance(q: PartPoints) -> Tensor:
    return sdf.ellipsoid(q.ax, q.y, q.z, q["eye_c"], q["eye_r"])


def _eye_albedo(q: PartPoints) -> Tensor:
    c, r = q["eye_c"], q["eye_r"]
    u, v = (q.ax - c[0]) / r[0], (q.y - c[1]) / r[1]
    rho = torch.sqrt(u * u + (v * r[1] / r[0]) ** 2)
    m = u.shape[0]
    colour = torch.full((m, 3), 0.96)
    colour = torch.where((rho < 0.62).unsqueeze(-1), _rgb(q["iris"], m), colour)
    colour = torch.where((rho < 0.26).unsqueeze(-1), torch.tensor([0.02, 0.02, 0.02]), colour)
    lid = (v > q["lid"]).unsqueeze(-1)
    return torch.where(lid, torch.tensor([0.05, 0.03, 0.03]), colour)


EYES_PART = Part("eyes", (("eye_c", 3), ("eye_r", 3), ("iris", 3), ("lid", 1)),
                 _eye_distance, _eye_albedo)


def _brow_distance(q: PartPoints) -> Tensor:
    return sdf.polyline(q.ax, q.y, q.z, (q["brow_in"], q["brow_mid"], q["brow_out"]), q["brow_r"])


def _flat_albedo(name: str) -> Callable[[PartPoints], Tensor]:
    return lambda q: _rgb(q[name], q.x.shape[0])


BROWS_PART = Part("eyebrows", (("brow_in", 3), ("brow_mid", 3), ("brow_out", 3), ("brow_r", 1),
                               ("brow_rgb", 3)), _brow_distance, _flat_albedo("brow_rgb"))


# ----------------------------------------------------------------------------- mouth
def _lips_distance(q: PartPoints) -> Tensor:
    ax, y, z = q.ax, q.y, q.z
    upper = sdf.capsule(ax, y, z, q["upper_mid"], q["corner"], q["upper_r"])
    lower = sdf.capsule(ax, y, z, q["lower_mid"], q["corner"], q["lower_r"])
    return torch.minimum(upper, lower)


LIPS_PART = Part("lips", (("upper_mid", 3), ("lower_mid", 3), ("corner", 3), ("upper_r", 1),
                          ("lower_r", 1), ("lip_rgb", 3)), _lips_distance, _flat_albedo("lip_rgb"))


def _mouth_distance(q: PartPoints) -> Tensor:
    return sdf.ellipsoid(q.x, q.y, q.z, q["inside_c"], q["inside_r"])


MOUTH_PART = Part("mouth", (("inside_c", 3), ("inside_r", 3), ("inside_rgb", 3), ("has_mouth", 1)),
                  _mouth_distance, _flat_albedo("inside_rgb"), flag="has_mouth")


# ----------------------------------------------------------------------------- hair
def _hair_albedo(q: PartPoints) -> Tensor:
    """Hair colour with fine strands (straight styles) or curl highlights (curly)."""
    base = _rgb(q["hair_rgb"], q.x.shape[0])
    strands = torch.sin(260.0 * q.x + 30.0 * torch.sin(21.0 * q.y + 9.0 * q.z))
    curls = torch.sin(48.0 * q.x) * torch.sin(48.0 * q.y) * torch.sin(48.0 * q.z)
    t = torch.where(q["curl_amp"] > 0, 0.78 + 0.22 * curls, 0.9 + 0.1 * strands)
    return base * t.unsqueeze(-1)


def _cap(q: PartPoints) -> Tensor:
    """Hair hugging the skull above a tilted hairline plane y = h0 + slope * z."""
    shell = sdf.ellipsoid(q.x, q.y, q.z, q["cap_c"], q["cap_r"])
    hairline = (q["hairline"][0] + q["hairline"][1] * q.z - q.y) / torch.sqrt(1 + q["hairline"][1] ** 2)
    return torch.maximum(shell, hairline)


def _hanging(q: PartPoints) -> Tensor:
    """Hair hanging beside and behind the face, down to ``drop_y``, behind the plane z = front."""
    body = sdf.ellipsoid(q.x, q.y, q.z, q["drop_c"], q["drop_r"])
    return torch.maximum(torch.maximum(body, q["drop_y"] - q.y), q.z - q["drop_front"])


HAIR_LAYOUT = (("cap_c", 3), ("cap_r", 3), ("hairline", 2), ("drop_c", 3), ("drop_r", 3),
               ("drop_y", 1), ("drop_front", 1), ("curl_amp", 1), ("hair_rgb", 3))


def _short_hair(q):
    return _cap(q)


def _hanging_hair(q):
    return torch.minimum(_cap(q), _hanging(q))


def _curly_hair(q):
    bumps = q["curl_amp"] * torch.sin(48.0 * q.x) * torch.sin(48.0 * q.y) * torch.sin(48.0 * q.z)
    # The bumps raise the gradient norm to about 1.8: scale so sphere tracing stays safe.
    return (_cap(q) - bumps) / 1.8


HAIR_PARTS = tuple(Part(f"hair_{style}", HAIR_LAYOUT + ((f"is_{style}", 1),), fn, _hair_albedo,
                        flag=f"is_{style}")
                   for style, fn in (("short", _short_hair), ("long", _hanging_hair),
                                     ("bangs", _hanging_hair), ("curly", _curly_hair)))


# ----------------------------------------------------------------------------- beard
def _mustache_distance(q: PartPoints) -> Tensor:
    return sdf.polyline(q.ax, q.y, q.z, (q["must_mid"], q["must_side"], q["must_end"]), q["must_r"])


def _beard_distance(q: PartPoints) -> Tensor:
    x, y, z = q.x, q.y, q.z
    shell = sdf.ellipsoid(x, y, z, q["beard_c"], q["beard_r"])
    top = (y - q["beard_top"][0] - q["beard_top"][1] * q.ax) / torch.sqrt(1 + q["beard_top"][1] ** 2)
    shell = torch.maximum(torch.maximum(shell, top), q["beard_back"] - z)
    hole = sdf.ellipsoid(x, y, z, q["mouth_c"], q["mouth_r"])
    return torch.maximum(shell, -hole)


def _beard_albedo(q: PartPoints) -> Tensor:
    base = _rgb(q["beard_rgb"], q.x.shape[0])
    grain = torch.sin(300.0 * q.x) * torch.sin(230.0 * q.y + 40.0 * q.z)
    return base * (0.85 + 0.15 * grain).unsqueeze(-1)


MUSTACHE_PART = Part("mustache", (("must_mid", 3), ("must_side", 3), ("must_end", 3), ("must_r", 1),
                                  ("beard_rgb", 3), ("has_mustache", 1)),
                     _mustache_distance, _beard_albedo, flag="has_mustache")
BEARD_PART = Part("beard", (("beard_c", 3), ("beard_r", 3), ("beard_top", 2), ("beard_back", 1),
                            ("mouth_c", 3), ("mouth_r", 3), ("beard_rgb", 3), ("has_beard", 1)),
                  _beard_distance, _beard_albedo, flag="has_beard")


# ----------------------------------------------------------------------------- accessories
def _frame_distance(q: PartPoints) -> Tensor:
    ax, y, z = q.ax, q.y, q.z
    c, size = q["rim_c"], q["rim_size"]
    ring = sdf.round_rect_2d(ax - c[0], y - c[1], size[0], size[1], size[2]).abs()
    rims = torch.sqrt(ring * ring + (z - c[2]) ** 2) - q["rim_r"]
    bridge = sdf.capsule(ax, y, z, q["bridge_a"], q["bridge_b"], q["rim_r"])
    arm = sdf.capsule(ax, y, z, q["arm_a"], q["arm_b"], q["rim_r"])
    return torch.minimum(torch.minimum(rims, bridge), arm)


FRAME_LAYOUT = (("rim_c", 3), ("rim_size", 3), ("rim_r", 1), ("bridge_a", 3), ("bridge_b", 3),
                ("arm_a", 3), ("arm_b", 3))
GLASSES_PART = Part("glasses", FRAME_LAYOUT + (("has_frame", 1),), _frame_distance,
                    lambda q: torch.tensor(FRAME).expand(q.x.shape[0], 3), flag="has_frame")


def _lens_distance(q: PartPoints) -> Tensor:
    c, size = q["rim_c"], q["rim_size"]
    flat = sdf.round_rect_2d(q.ax - c[0], q.y - c[1], size[0], size[1], size[2])
    return torch.maximum(flat, (q.z - c[2]).abs() - 0.003)


LENS_PART = Part("lenses", FRAME_LAYOUT + (("has_lens", 1),), _lens_distance,
                 lambda q: torch.tensor(LENS).expand(q.x.shape[0], 3), flag="has_lens")


def _earring_distance(q: PartPoints) -> Tensor:
    ax, y, z = q.ax, q.y, q.z
    stud = sdf.sphere(ax, y, z, q["stud"], 0.008)
    link = sdf.capsule(ax, y, z, q["stud"], q["ball"], 0.004)
    return torch.minimum(torch.minimum(stud, link), sdf.sphere(ax, y, z, q["ball"], q["ball_r"]))


EARRINGS_PART = Part("earrings", (("stud", 3), ("ball", 3), ("ball_r", 1), ("has_earrings", 1)),
                     _earring_distance, lambda q: torch.tensor(GOLD).expand(q.x.shape[0], 3),
                     flag="has_earrings")


def _torso_distance(q: PartPoints) -> Tensor:
    x, y, z = q.x, q.y, q.z
    chest = sdf.ellipsoid(x, y, z, q["chest_c"], q["chest_r"])
    shoulders = sdf.capsule(q.ax, y, z, q["shoulder_a"], q["shoulder_b"], q["shoulder_r"])
    return sdf.smooth_union(chest, shoulders, 0.06)


def _torso_albedo(q: PartPoints) -> Tensor:
    """Clothing; women's tops have a scoop neckline showing skin, men's a high round collar."""
    m = q.x.shape[0]
    neckline = (q.ax / q["neckline"][0]) ** 2 + ((q.y - q["neckline"][2]) / q["neckline"][1]) ** 2
    skin = (neckline < 1.0) & (q.z > -0.02)
    return torch.where(skin.unsqueeze(-1), _rgb(q["torso_skin"], m), _rgb(q["cloth_rgb"], m))


TORSO_PART = Part("clothing", (("chest_c", 3), ("chest_r", 3), ("shoulder_a", 3), ("shoulder_b", 3),
                               ("shoulder_r", 1), ("neckline", 3), ("cloth_rgb", 3), ("torso_skin", 3)),
                  _torso_distance, _torso_albedo)

PARTS: tuple[Part, ...] = ((SKIN_PART, EYES_PART, BROWS_PART, LIPS_PART, MOUTH_PART) + HAIR_PARTS
                           + (MUSTACHE_PART, BEARD_PART, GLASSES_PART, LENS_PART, EARRINGS_PART,
                              TORSO_PART))
