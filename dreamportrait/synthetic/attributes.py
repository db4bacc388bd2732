"""Attribute vocabulary of the synthetic portrait world, identity sampling and held-out pairs.

An identity is a seed plus a dict of discrete attributes. Every value is drawn from that seed
alone, so any identity can be rebuilt (and re-rendered from any camera) from its seed. An
attribute that cannot be seen is ``None``: hair colour when bald, eye size and colour behind
sunglasses, the chin under a full beard. Values such as ``"none"`` (no beard, no glasses) are true attributes that captions
never mention.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "gender": ("man", "woman"),
    "age": ("young", "middle-aged", "old"),
    "face_shape": ("round", "oval", "narrow"),
    "chin": ("broad", "pointed"),
    "skin_tone": ("fair", "medium", "brown", "dark"),
    "hair_style": ("bald", "short", "long", "bangs", "curly"),
    "hair_color": ("black", "brown", "blond", "red", "gray", "white"),
    "eyebrow_thickness": ("thick", "thin"),
    "eyebrow_shape": ("arched", "straight"),
    "eye_size": ("big", "small"),
    "eye_color": ("blue", "green", "brown"),
    "nose": ("small", "big"),
    "mouth": ("closed", "smiling", "open"),
    "lips": ("natural", "red lipstick"),
    "beard": ("none", "mustache", "full beard"),
    "glasses": ("none", "glasses", "sunglasses"),
    "earrings": ("none", "earrings"),
    "clothing": ("red", "blue", "green", "yellow", "black", "white"),
    "background": ("blue", "green", "pink", "purple", "teal"),
}

# Pairs of attribute values that never occur together in training output.
HELDOUT_COMBINATIONS: tuple[tuple[tuple[str, str], tuple[str, str]], ...] = (
    (("hair_color", "red"), ("glasses", "sunglasses")),
    (("hair_color", "white"), ("age", "young")),
    (("hair_style", "bald"), ("earrings", "earrings")),
    (("beard", "full beard"), ("hair_color", "blond")),
    (("lips", "red lipstick"), ("hair_style", "curly")),
)

SPLITS = ("train", "heldout", "all")

# Conditional probabilities (the order follows ATTRIBUTES).
_HAIR_STYLE = {"man": (0.17, 0.45, 0.1, 0.1, 0.18), "woman": (0.06, 0.2, 0.32, 0.22, 0.2)}
_HAIR_COLOR = {"young": (0.24, 0.24, 0.19, 0.15, 0.08, 0.1),
               "middle-aged": (0.2, 0.2, 0.15, 0.12, 0.18, 0.15),
               "old": (0.08, 0.08, 0.06, 0.06, 0.36, 0.36)}
_BEARD = {"man": (0.45, 0.25, 0.3), "woman": (1.0, 0.0, 0.0)}
_LIPS = {"man": (1.0, 0.0), "woman": (0.55, 0.45)}
_EARRINGS = {"man": (0.8, 0.2), "woman": (0.45, 0.55)}
_AGE = (0.4, 0.33, 0.27)
_GLASSES = (0.45, 0.3, 0.25)


@dataclass(frozen=True)
class Identity:
    """One synthetic person: the seed everything is drawn from, and its attributes."""

    seed: int
    attributes: dict = field(compare=False)

    @classmethod
    def from_seed(cls, seed: int) -> "Identity":
        return cls(int(seed), sample_attributes(np.random.default_rng([int(seed), 0])))


def _choice(rng: np.random.Generator, name: str, probs=None) -> str:
    values = ATTRIBUTES[name]
    return values[int(rng.choice(len(values), p=probs))]


def sample_attributes(rng: np.random.Generator) -> dict:
    """Draw one identity's attributes (realistic dependencies: beards on men, greying with age)."""
    a = {"gender": _choice(rng, "gender")}
    g = a["gender"]
    a["age"] = _choice(rng, "age", _AGE)
    a["face_shape"] = _choice(rng, "face_shape")
    a["chin"] = _choice(rng, "chin")
    a["skin_tone"] = _choice(rng, "skin_tone")
    a["hair_style"] = _choice(rng, "hair_style", _HAIR_STYLE[g])
    a["hair_color"] = _choice(rng, "hair_color", _HAIR_COLOR[a["age"]])
    a["eyebrow_thickness"] = _choice(rng, "eyebrow_thickness", (0.6, 0.4) if g == "man" else (0.4, 0.6))
    a["eyebrow_shape"] = _choice(rng, "eyebrow_shape")
    a["eye_size"] = _choice(rng, "eye_size")
    a["eye_color"] = _choice(rng, "eye_color")
    a["nose"] = _choice(rng, "nose")
    a["mouth"] = _choice(rng, "mouth")
    a["lips"] = _choice(rng, "lips", _LIPS[g])
    a["beard"] = _choice(rng, "beard", _BEARD[g])
    a["glasses"] = _choice(rng, "glasses", _GLASSES)
    a["earrings"] = _choice(rng, "earrings", _EARRINGS[g])
    a["clothing"] = _choice(rng, "clothing")
    a["background"] = _choice(rng, "background")
    if a["hair_style"] == "bald":
        a["hair_color"] = None
    if a["glasses"] == "sunglasses":
        a["eye_size"] = a["eye_color"] = None
    if a["beard"] == "full beard":
        a["chin"] = None
    return a


def heldout_pairs(attributes: dict) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """The held-out combinations this attribute dict contains."""
    return [pair for pair in HELDOUT_COMBINATIONS
            if all(attributes.get(name) == value for name, value in pair)]


def in_split(attributes: dict, split: str) -> bool:
    """'train': no held-out combination; 'heldout': at least one; 'all': everything."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if split == "all":
        return True
    return bool(heldout_pairs(attributes)) == (split == "heldout")


def identity_seed(seed: int, index: int) -> int:
    """The seed of candidate ``index`` in the identity stream of data set seed ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def sample_identities(seed: int, num: int, split: str = "train") -> list[Identity]:
    """The first ``num`` identities of the stream of ``seed`` that belong to ``split``.

    The 'train' and 'heldout' splits of one seed come from the same candidate stream, so they
    never share an identity.
    """
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    out: list[Identity] = []
    index = 0
    while len(out) < num:
        ident = Identity.from_seed(identity_seed(seed, index))
        if in_split(ident.attributes, split):
            out.append(ident)
        index += 1
    return out
