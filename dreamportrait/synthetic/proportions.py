"""Attributes -> numbers: the per-part parameters of one identity's head.

Discrete attributes set the shapes and colours; a per-identity style generator (seeded by the
identity seed) adds small continuous variation (proportions, hair volume, colour jitter) so
that two identities with the same attributes still differ.
"""
from __future__ import annotations

import numpy as np

from . import heads
from .attributes import Identity

# face shape -> (face width, face height, cheek size) factors
FACE_SHAPE = {"round": (1.12, 0.94, 1.3), "oval": (1.0, 1.0, 1.0), "narrow": (0.87, 1.06, 0.8)}


def _jitter(rng: np.random.Generator, colour, amount: float = 0.04) -> np.ndarray:
    return np.clip(np.asarray(colour) * (1.0 + rng.uniform(-amount, amount, 3)), 0.0, 1.0)


def _brow_colour(a: dict, rng: np.random.Generator) -> np.ndarray:
    """Eyebrows: a darker shade of the hair; grey with old age; a dark shade when bald."""
    hair = a["hair_color"] or ("black", "brown", "blond")[rng.integers(3)]
    colour = np.asarray(heads.HAIR[hair]) * (0.55 if hair in ("blond", "red", "brown") else 0.75)
    if hair == "white":
        colour = np.asarray(heads.HAIR["gray"]) * 1.2
    if a["age"] == "old" and hair not in ("gray", "white"):
        colour = 0.4 * colour + 0.6 * np.asarray((0.62, 0.62, 0.62))
    return np.clip(colour, 0.0, 1.0)


def on_surface(c, r, x: float, y: float, lift: float) -> tuple[float, float, float]:
    """The point of the front of ellipsoid (c, r) at (x, y), moved ``lift`` toward +z."""
    inside = 1.0 - ((x - c[0]) / r[0]) ** 2 - ((y - c[1]) / r[1]) ** 2
    return (x, y, c[2] + r[2] * max(inside, 0.0) ** 0.5 + lift)


def head_parameters(identity: Identity) -> dict[str, dict[str, np.ndarray]]:
    """part name -> parameter name -> values, for every part in :data:`heads.PARTS`."""
    a = identity.attributes
    rng = np.random.default_rng([identity.seed, 1])
    man = a["gender"] == "man"
    fw, fh, cheek = FACE_SHAPE[a["face_shape"]]
    fw *= rng.uniform(0.97, 1.03)
    broad = a["chin"] != "pointed"
    skin = _jitter(rng, heads.SKIN[a["skin_tone"]])
    hair_key = a["hair_color"]
    hair = _jitter(rng, heads.HAIR[hair_key]) if hair_key else np.asarray(heads.HAIR["black"])
    brow = _brow_colour(a, rng)
    eye_x = 0.06 * fw + rng.uniform(-0.002, 0.002)
    eye_y = 0.032
    tip_y = -0.04
    big_nose = a["nose"] == "big"
    p: dict[str, dict] = {}

    cranium_c, cranium_r = (0, 0.06, -0.015), (0.148 * fw, 0.19, 0.185)
    jaw_c, jaw_r = (0, -0.05, 0.015), (0.122 * fw, 0.135 * fh, 0.15)
    p["skin"] = dict(
        cranium_c=cranium_c, cranium_r=cranium_r, jaw_c=jaw_c, jaw_r=jaw_r,
        angle_c=((0.092 if man else 0.078) * fw, -0.105 * fh, 0.02),
        angle_r=(0.04 if man else 0.032, 0.05, 0.07),
        chin_c=(0, -0.162 * fh, 0.088), chin_r=((0.062 if broad else 0.03) * fw, 0.036, 0.045),
        cheek_c=(0.068 * fw, -0.03, 0.085), cheek_r=(0.055 * cheek, 0.045 * cheek, 0.06),
        bridge=(0, 0.03, 0.158), tip=(0, tip_y - (0.012 if big_nose else 0.0), 0.245 if big_nose else 0.203),
        bridge_r=0.027 if big_nose else 0.014, tip_r=0.038 if big_nose else 0.019,
        wing_c=(0.038 if big_nose else 0.019, -0.056 if big_nose else -0.05, 0.178),
        wing_r=(0.024, 0.018, 0.019) if big_nose else (0.012, 0.01, 0.012),
        ear_c=(0.148 * fw, 0.0, -0.005), ear_r=(0.022, 0.05, 0.032),
        neck_a=(0, -0.1, -0.02), neck_b=(0, -0.38, -0.04), neck_r=0.078 if man else 0.062,
        skin=skin, blush=0.0 if man else 1.0, wrinkles=heads.WRINKLE[a["age"]])

    big_eye = a["eye_size"] != "small"
    er = 0.032 if big_eye else 0.022
    p["eyes"] = dict(eye_c=on_surface(cranium_c, cranium_r, eye_x, eye_y, -0.004), eye_r=(er, 0.75 * er, 0.022),
                     iris=_jitter(rng, heads.IRIS[a["eye_color"] or "brown"]),
                     lid=0.45 if not man else 0.7)

    # Arched: a raised middle and a dropping outer end; straight: one level line.
    arched = a["eyebrow_shape"] == "arched"
    brow_x = eye_x - 0.054
    p["eyebrows"] = dict(brow_in=on_surface(cranium_c, cranium_r, brow_x + 0.028, 0.078, 0.004),
                         brow_mid=on_surface(cranium_c, cranium_r, brow_x + 0.061, 0.108 if arched else 0.08, 0.004),
                         brow_out=on_surface(cranium_c, cranium_r, brow_x + 0.094, 0.062 if arched else 0.08, 0.004),
                         brow_r=0.013 if a["eyebrow_thickness"] == "thick" else 0.0045, brow_rgb=brow)

    mouth = a["mouth"]
    lift = 0.014 if mouth == "smiling" else 0.0
    gap = 0.022 if mouth == "open" else (0.008 if mouth == "smiling" else 0.0)
    lips = heads.LIPSTICK if a["lips"] == "red lipstick" else skin * np.array((0.86, 0.6, 0.6))
    full = 0.0 if man else 0.002
    upper = on_surface(jaw_c, jaw_r, 0.0, -0.098, 0.008)
    p["lips"] = dict(upper_mid=upper, lower_mid=on_surface(jaw_c, jaw_r, 0.0, -0.117 - gap, 0.008),
                     corner=on_surface(jaw_c, jaw_r, 0.046 if mouth == "smiling" else 0.038, -0.107 + lift, 0.0),
                     upper_r=0.009 + full, lower_r=0.011 + full, lip_rgb=lips)
    p["mouth"] = dict(inside_c=(0, -0.109 - gap / 2, upper[2] - 0.008),
                      inside_r=(0.034, 0.01 + gap * 0.5, 0.016) if mouth != "closed" else (0.02, 0.01, 0.01),
                      inside_rgb=heads.TEETH if mouth == "smiling" else heads.MOUTH_INSIDE,
                      has_mouth=float(mouth != "closed"))

    style = a["hair_style"]
    volume = rng.uniform(0.018, 0.03)
    cr = np.array((0.148 * fw, 0.19, 0.185))
    # Every hairline stays above the eyebrows (top <= 0.121) and the forehead lines (y 0.118-0.157,
    # |x| < 0.075), so both are visible under every style: bangs are a level fringe standing out
    # just above them, curls a level edge a little higher.
    cap = dict(cap_c=(0, 0.06, -0.015), cap_r=cr + volume, hairline=(0.085, 1.0, 0.2),
               drop_c=(0, -0.05, -0.05), drop_r=(0.185 * fw, 0.33, 0.17), drop_y=-0.33, drop_front=0.012,
               curl_amp=0.0, hair_rgb=hair)
    hair_styles = {
        "short": dict(cap),
        "long": dict(cap, cap_r=cr + volume + 0.008),
        "bangs": dict(cap, cap_c=(0, 0.06, -0.004), cap_r=cr + volume + (0.006, 0.006, 0.011),
                      hairline=(0.085, 1.0, 0.17), drop_c=(0, -0.0, -0.03), drop_r=(0.178 * fw, 0.2, 0.17), drop_y=-0.145),
        "curly": dict(cap, cap_c=(0, 0.07, -0.02), cap_r=cr + (0.055, 0.045, 0.05),
                      hairline=(0.085, 1.0, 0.19), curl_amp=0.011),
    }
    for name, values in hair_styles.items():
        p[f"hair_{name}"] = dict(values, **{f"is_{name}": float(style == name)})

    beard = a["beard"]
    facial_hair = np.clip(hair * 0.8 if hair_key else brow, 0.0, 1.0)
    p["mustache"] = dict(must_mid=on_surface(jaw_c, jaw_r, 0.0, -0.081, 0.012),
                         must_side=on_surface(jaw_c, jaw_r, 0.035, -0.087, 0.01),
                         must_end=on_surface(jaw_c, jaw_r, 0.052, -0.113, 0.006), must_r=0.011, beard_rgb=facial_hair,
                         has_mustache=float(beard != "none"))
    p["beard"] = dict(beard_c=(0, -0.062, 0.02), beard_r=(0.122 * fw + 0.02, 0.135 * fh + 0.022, 0.17),
                      beard_top=(-0.075, 0.6), beard_back=-0.03,
                      mouth_c=(0, -0.108, 0.175), mouth_r=(0.048, 0.024, 0.05),
                      beard_rgb=facial_hair, has_beard=float(beard == "full beard"))

    frame = dict(rim_c=(eye_x, eye_y, 0.197), rim_size=(0.037, 0.026, 0.012), rim_r=0.0065,
                 bridge_a=(0.0, eye_y + 0.006, 0.198), bridge_b=(eye_x - 0.04, eye_y + 0.006, 0.198),
                 arm_a=(eye_x + 0.038, eye_y + 0.006, 0.19), arm_b=(0.152 * fw, eye_y + 0.015, 0.0))
    p["glasses"] = dict(frame, has_frame=float(a["glasses"] != "none"))
    p["lenses"] = dict(frame, has_lens=float(a["glasses"] == "sunglasses"))

    p["earrings"] = dict(stud=(0.152 * fw, -0.045, 0.03), ball=(0.157 * fw, -0.085, 0.038), ball_r=0.017,
                         has_earrings=float(a["earrings"] == "earrings"))

    p["clothing"] = dict(chest_c=(0, -0.43, -0.04), chest_r=(0.25, 0.17, 0.15),
                         shoulder_a=(0.06, -0.3, -0.05), shoulder_b=(0.25, -0.32, -0.05),
                         shoulder_r=0.075 if man else 0.065,
                         neckline=(0.1, 0.07, -0.26) if not man else (0.055, 0.03, -0.25),
                         cloth_rgb=_jitter(rng, heads.CLOTHING[a["clothing"]], 0.03), torso_skin=skin)
    return p


def background_colour(identity: Identity) -> np.ndarray:
    return np.asarray(heads.BACKGROUND[identity.attributes["background"]])
