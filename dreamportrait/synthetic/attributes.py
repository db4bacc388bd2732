"""Attribute vocabulary of the synthetic portrait world, identity sampling and held-out pairs.

An identity is a seed plus a dict of discrete attributes. Every value is drawn from that seed
alone, so any identity can be rebuilt (and re-rendered from any camera) from its seed. An
attribute that cannot be seen is ``None``: hair colour when bald, eye size and colour behind
sunglasses, the chin under a full beard. Values such as ``"none"`` (no beard, no glasses) are true attributes that captions
never mention.
"""
from __future__ import annotations

import bisect
import functools
import math
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
_EYEBROW_THICKNESS = {"man": (0.6, 0.4), "woman": (0.4, 0.6)}
_BEARD = {"man": (0.45, 0.25, 0.3), "woman": (1.0, 0.0, 0.0)}
_LIPS = {"man": (1.0, 0.0), "woman": (0.55, 0.45)}
_EARRINGS = {"man": (0.8, 0.2), "woman": (0.45, 0.55)}
_AGE = (0.4, 0.33, 0.27)
_GLASSES = (0.45, 0.3, 0.25)

# How each attribute is drawn, in draw order: (name, the attribute it depends on, probabilities:
# None = uniform, a tuple, or {value of that attribute: tuple}).
_DRAWS = (("gender", None, None), ("age", None, _AGE), ("face_shape", None, None), ("chin", None, None),
          ("skin_tone", None, None), ("hair_style", "gender", _HAIR_STYLE), ("hair_color", "age", _HAIR_COLOR),
          ("eyebrow_thickness", "gender", _EYEBROW_THICKNESS), ("eyebrow_shape", None, None),
          ("eye_size", None, None), ("eye_color", None, None), ("nose", None, None), ("mouth", None, None),
          ("lips", "gender", _LIPS), ("beard", "gender", _BEARD), ("glasses", None, _GLASSES),
          ("earrings", "gender", _EARRINGS), ("clothing", None, None), ("background", None, None))

# What hides what: these attributes cannot be seen (are None) while another has this value.
HIDDEN_BY: dict[tuple[str, str], tuple[str, ...]] = {
    ("hair_style", "bald"): ("hair_color",), ("glasses", "sunglasses"): ("eye_size", "eye_color"),
    ("beard", "full beard"): ("chin",)}


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
    a: dict = {}
    for name, parent, probs in _DRAWS:
        a[name] = _choice(rng, name, probs[a[parent]] if parent else probs)
    return hide_invisible(a)


LATENT_DIMS = len(_DRAWS)  # components of a latent that attributes_from_latent reads
# name -> the value of the attribute it depends on (None: independent) -> cumulative probabilities.
_CUMULATIVE = {name: {key: np.cumsum(np.full(len(ATTRIBUTES[name]), 1 / len(ATTRIBUTES[name])) if p is None
                                     else p).tolist()
                      for key, p in (probs.items() if parent else [(None, probs)])}
               for name, parent, probs in _DRAWS}


def attributes_from_latent(z, given: dict | None = None) -> dict:
    """The attributes a Gaussian latent stands for: its first :data:`LATENT_DIMS` components pick,
    in draw order, each attribute's value at the normal quantile of that component, with the
    world's (conditional) probabilities. So the attributes of z ~ N(0, I) follow
    :func:`sample_attributes` exactly (split 'all'), and they are a deterministic, piecewise
    constant function of z: the paired warm start of the prior (train/paired.py) trains G(z) to
    draw head(z). Further components are not read.

    ``given`` ({name: value}, e.g. what a caption names) fixes those attributes; the others are
    drawn from z as above among the values that fit them: none that would hide a given attribute
    (no sunglasses for given blue eyes), make a given value impossible (no woman for a given
    beard) or form a held-out pair (:data:`HELDOUT_COMBINATIONS`) with a value already set."""
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    if z.size < LATENT_DIMS:
        raise ValueError(f"a latent needs at least {LATENT_DIMS} components (one per attribute), got {z.size}")
    given = dict(given or {})
    for name, value in given.items():
        if value not in ATTRIBUTES.get(name, ()):
            raise ValueError(f"given {name}={value!r} is not a value of the world's attributes "
                             f"({ATTRIBUTES.get(name, sorted(ATTRIBUTES))})")
    a: dict = {}
    for k, (name, parent, _) in enumerate(_DRAWS):
        if name in given:
            a[name] = given[name]
            continue
        cumulative = _CUMULATIVE[name][a[parent] if parent else None]
        allowed = [v for v in ATTRIBUTES[name] if _fits(name, v, a, given)]
        if given and 0 < len(allowed) < len(ATTRIBUTES[name]):  # renormalise over the values that fit
            mass = np.diff(cumulative, prepend=0.0) * [v in allowed for v in ATTRIBUTES[name]]
            cumulative = (np.cumsum(mass) / mass.sum()).tolist()
        u = 0.5 * (1.0 + math.erf(float(z[k]) / math.sqrt(2.0)))
        a[name] = ATTRIBUTES[name][min(bisect.bisect_right(cumulative, u), len(cumulative) - 1)]
    return hide_invisible(a)


def _fits(name: str, value: str, drawn: dict, given: dict) -> bool:
    """Whether ``name=value`` may join the attributes ``drawn`` so far and those ``given``."""
    if any(n in given for n in HIDDEN_BY.get((name, value), ())):
        return False
    for child, parent, probs in _DRAWS:
        if parent == name and child in given and probs[value][ATTRIBUTES[child].index(given[child])] == 0:
            return False
    known = {**drawn, **given}
    return not any((name, value) in pair and all(known.get(n, value if n == name else None) == v for n, v in pair)
                   for pair in HELDOUT_COMBINATIONS)


def hide_invisible(attributes: dict) -> dict:
    """Set what the other attributes hide (:data:`HIDDEN_BY`) to None, in place; returns the dict."""
    for (name, value), hidden in HIDDEN_BY.items():
        if attributes.get(name) == value:
            attributes.update(dict.fromkeys(hidden))
    return attributes


@functools.lru_cache(maxsize=None)
def _coupled_joint(split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Exact joint of the attributes that depend on others, hide others or form held-out pairs:
    (their names, every combination of value indices (rows, names) with -1 where hidden, the
    probability of each row for an identity of ``split``). The other attributes are independent."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    linked = {p for _, p, _ in _DRAWS if p} | {n for pair in HELDOUT_COMBINATIONS for n, _ in pair}
    linked |= {n for (hider, _), hidden in HIDDEN_BY.items() for n in (hider, *hidden)}
    names = [n for n, parent, _ in _DRAWS if parent or n in linked]
    col = {n: i for i, n in enumerate(names)}
    grid = np.stack(np.meshgrid(*[np.arange(len(ATTRIBUTES[n])) for n in names], indexing="ij"), -1)
    grid = grid.reshape(-1, len(names)).astype(np.int8)
    prob = np.ones(len(grid))
    for name, parent, probs in _DRAWS:
        if name in col:
            size = len(ATTRIBUTES[name])
            table = (np.array([probs[v] for v in ATTRIBUTES[parent]]) if parent else
                     np.array([probs if probs is not None else np.full(size, 1 / size)]))
            prob *= table[grid[:, col[parent]] if parent else 0, grid[:, col[name]]]
    shown = grid.copy()
    for (hider, value), hidden in HIDDEN_BY.items():
        shown[np.ix_(grid[:, col[hider]] == ATTRIBUTES[hider].index(value), [col[n] for n in hidden])] = -1
    if split != "all":
        held = np.zeros(len(grid), dtype=bool)
        for pair in HELDOUT_COMBINATIONS:
            held |= np.logical_and.reduce([shown[:, col[n]] == ATTRIBUTES[n].index(v) for n, v in pair])
        prob = np.where(held == (split == "heldout"), prob, 0.0)
    return names, shown, prob / prob.sum()


def attribute_distribution(split: str = "train", given: dict | None = None) -> dict[str, dict[str, float]]:
    """Exact probability of each attribute's values for an identity of ``split`` (as
    :func:`sample_identities` draws them), among the identities where the attribute can be seen and
    that have the values ``given`` ({name: value}); {} for an attribute never seen there (for every
    attribute when no identity of ``split`` has ``given``)."""
    names, shown, prob = _coupled_joint(split)
    col = {n: i for i, n in enumerate(names)}
    given = dict(given or {})
    for name, value in given.items():
        if value not in ATTRIBUTES.get(name, ()):
            raise ValueError(f"given {name}={value!r} is not a value of the world's attributes "
                             f"({ATTRIBUTES.get(name, sorted(ATTRIBUTES))})")
        if name in col:
            prob = prob * (shown[:, col[name]] == ATTRIBUTES[name].index(value))
    if prob.sum() == 0:
        return {name: {} for name in ATTRIBUTES}
    out = {}
    for name, _, probs in _DRAWS:
        size = len(ATTRIBUTES[name])
        if name in col:
            c = shown[:, col[name]]
            mass = np.bincount(c[c >= 0], weights=prob[c >= 0], minlength=size)
        elif name in given:
            mass = np.eye(size)[ATTRIBUTES[name].index(given[name])]
        else:
            mass = np.asarray(probs if probs is not None else np.ones(size), dtype=np.float64)
        total = mass.sum()
        out[name] = {} if total == 0 else {v: float(m / total) for v, m in zip(ATTRIBUTES[name], mass)}
    return out


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
