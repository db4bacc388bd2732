"""Human-like captions of synthetic identities, and a parser that reads attributes back.

Captions follow the style of CelebAText-HQ / FFHQ-Text ("The woman has long blond hair and big
blue eyes. She is wearing earrings."). Each caption mentions a random subset of the
identity's true attributes in random order, through several sentence forms and phrasings.
Values meaning absence (no beard, no glasses, no earrings, natural lips) and attributes that
cannot be seen (``None``) are never mentioned, so a caption never states anything false.
:func:`parse_caption` recovers every attribute a caption mentions from its words alone; the
tests use it to check captions against the ground truth.
"""
from __future__ import annotations

import re

import numpy as np

from .attributes import Identity

CAPTIONS_PER_IDENTITY = 10

_NOUN = {"man": {None: ("man", "gentleman", "guy"), "young": ("young man", "young guy"),
                 "middle-aged": ("middle-aged man", "middle-aged gentleman"),
                 "old": ("old man", "elderly man", "elderly gentleman")},
         "woman": {None: ("woman", "lady"), "young": ("young woman", "young lady"),
                   "middle-aged": ("middle-aged woman", "middle-aged lady"),
                   "old": ("old woman", "elderly woman", "elderly lady")}}
_PRONOUN = {"man": "he", "woman": "she"}
_NEGATIVE = {"beard": "none", "glasses": "none", "earrings": "none", "lips": "natural"}
_MENTIONABLE = ("age", "hair_style", "hair_color", "eyebrow_thickness", "eyebrow_shape", "eye_size",
                "eye_color", "nose", "face_shape", "chin", "skin_tone", "mouth", "lips", "beard",
                "glasses", "earrings", "clothing", "background")


def mentionable(attributes: dict) -> list[str]:
    """The attributes a caption of this identity may mention."""
    return [name for name in _MENTIONABLE
            if attributes.get(name) is not None and attributes[name] != _NEGATIVE.get(name)]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrases(a: dict, chosen: list[str], rng: np.random.Generator) -> tuple[list, list, list, str | None]:
    """Noun phrases for 'has', states for 'is', items for 'wearing', and the background."""
    has, state, wear, background = [], [], [], None
    done: set[str] = set()
    for name in chosen:
        if name in done:
            continue
        if name in ("hair_style", "hair_color"):
            done.update(("hair_style", "hair_color"))
            style = a["hair_style"] if "hair_style" in chosen else None
            colour = a["hair_color"] if "hair_color" in chosen else None
            if style == "bald":
                state.append("bald")
            elif style == "bangs":
                has.append(f"{colour} hair with bangs" if colour else "bangs")
            else:
                has.append(" ".join(w for w in (style, colour) if w) + " hair")
        elif name in ("eyebrow_thickness", "eyebrow_shape"):
            done.update(("eyebrow_thickness", "eyebrow_shape"))
            words = [a[n] for n in ("eyebrow_thickness", "eyebrow_shape") if n in chosen]
            has.append(" ".join(words) + " eyebrows")
        elif name in ("eye_size", "eye_color"):
            done.update(("eye_size", "eye_color"))
            has.append(" ".join(a[n] for n in ("eye_size", "eye_color") if n in chosen) + " eyes")
        elif name in ("nose", "face_shape", "chin"):
            noun = {"nose": "nose", "face_shape": "face", "chin": "chin"}[name]
            has.append(f"{_article(a[name])} {a[name]} {noun}")
        elif name == "skin_tone":
            has.append(f"{a[name]} skin")
        elif name == "mouth":
            if a[name] == "smiling":
                state.append("smiling")
            else:
                possessive = "his" if a["gender"] == "man" else "her"
                has.append(str(rng.choice([f"{_article(a[name])} {a[name]} mouth", f"{possessive} mouth {a[name]}"])))
        elif name == "beard":
            has.append(str(rng.choice(["a mustache", "a thick mustache"])) if a[name] == "mustache"
                       else "a full beard")
        elif name == "lips":
            wear.append("red lipstick")
        elif name == "glasses":
            wear.append("sunglasses" if a[name] == "sunglasses" else str(rng.choice(["glasses", "eyeglasses"])))
        elif name == "earrings":
            wear.append(str(rng.choice(["earrings", "gold earrings"])))
        elif name == "clothing":
            wear.append(f"a {a[name]} {rng.choice(['shirt', 'top'])}")
        elif name == "background":
            background = a[name]
        done.add(name)
    return has, state, wear, background


def make_caption(attributes: dict, rng: np.random.Generator, mentions: int | None = None) -> str:
    """One caption mentioning a random subset of ``attributes``: ``mentions`` of them (all when
    larger than the mentionable ones), or 2 to 6 drawn at random when ``mentions`` is None."""
    names = mentionable(attributes)
    if mentions is not None:
        k = min(int(mentions), len(names))
    else:
        k = int(rng.integers(2, min(6, len(names)) + 1)) if len(names) >= 2 else len(names)
    chosen = [names[i] for i in rng.permutation(len(names))[:k]]
    has, state, wear, background = _phrases(attributes, chosen, rng)
    gender = attributes["gender"]
    noun = str(rng.choice(_NOUN[gender]["age" in chosen and attributes["age"] or None]))
    pronoun = _PRONOUN[gender]
    clauses = []
    if has:
        clauses.append("has " + _join(has))
    if state:
        clauses.append("is " + _join(state))
    if wear:
        clauses.append(str(rng.choice(["is wearing ", "wears "])) + _join(wear))
    clauses = [clauses[i] for i in rng.permutation(len(clauses))]
    scene = background and str(rng.choice([f" against {_article(background)} {background} background",
                                            f" in front of {_article(background)} {background} background"]))
    if has and rng.random() < 0.35:
        # "A young man with short black hair and a mustache, wearing glasses."
        text = f"{_article(noun).capitalize()} {noun} with {_join(has)}"
        rest = [c for c in clauses if not c.startswith("has ")]
        if rest and rest[0].startswith(("is wearing", "wears")):
            clause = rest.pop(0)
            text += ", wearing " + clause.split(" ", 2 if clause.startswith("is ") else 1)[-1]
        text += (scene or "") + "."
        text += "".join(f" {pronoun.capitalize()} {c}." for c in rest)
        return text
    first = str(rng.choice(["The", "This"])) + f" {noun}"
    if not clauses:
        return f"{_article(noun).capitalize()} {noun}{scene or ''}."
    take = 2 if len(clauses) > 1 and rng.random() < 0.5 else 1
    text = f"{first} {' and '.join(clauses[:take])}{scene or ''}."
    text += "".join(f" {pronoun.capitalize()} {c}." for c in clauses[take:])
    return text


def make_captions(identity: Identity, num: int = CAPTIONS_PER_IDENTITY) -> list[str]:
    """``num`` captions of one identity, distinct where possible, from its seed alone."""
    rng = np.random.default_rng([identity.seed, 2])
    out: list[str] = []
    for _ in range(num * 20):
        caption = make_caption(identity.attributes, rng)
        if caption not in out:
            out.append(caption)
        if len(out) == num:
            return out
    while len(out) < num:  # too few attributes for num distinct captions: repeat
        out.append(out[len(out) % max(1, len(out))])
    return out


_PATTERNS: tuple[tuple[str, str, str | None], ...] = (
    # (attribute, regular expression, fixed value or None for the first group)
    ("gender", r"\b(?:man|gentleman|guy|he|his)\b", "man"),
    ("gender", r"\b(?:woman|lady|she|her)\b", "woman"),
    ("age", r"\b(young|middle-aged)\b", None),
    ("age", r"\b(?:old|elderly)\b", "old"),
    ("hair_style", r"\b(short|long|curly)\b(?: \w+)? hair\b", None),
    ("hair_style", r"\bbangs\b", "bangs"),
    ("hair_style", r"\bbald\b", "bald"),
    ("hair_color", r"\b(black|brown|blond|red|gray|white) hair\b", None),
    ("eyebrow_thickness", r"\b(thick|thin)\b(?: \w+)? eyebrows\b", None),
    ("eyebrow_shape", r"\b(arched|straight) eyebrows\b", None),
    ("eye_size", r"\b(big|small)\b(?: \w+)? eyes\b", None),
    ("eye_color", r"\b(blue|green|brown) eyes\b", None),
    ("nose", r"\b(big|small) nose\b", None),
    ("face_shape", r"\b(round|oval|narrow) face\b", None),
    ("chin", r"\b(broad|pointed) chin\b", None),
    ("skin_tone", r"\b(fair|medium|brown|dark) skin\b", None),
    ("mouth", r"\bsmil(?:ing|e)\b", "smiling"),
    ("mouth", r"\b(open|closed) mouth\b|\bmouth (open|closed)\b", None),
    ("lips", r"\blipstick\b", "red lipstick"),
    ("beard", r"\bmustache\b", "mustache"),
    ("beard", r"\bfull beard\b", "full beard"),
    ("glasses", r"\bsunglasses\b", "sunglasses"),
    ("glasses", r"\b(?:eye)?glasses\b", "glasses"),
    ("earrings", r"\bearrings\b", "earrings"),
    ("clothing", r"\b(red|blue|green|yellow|black|white) (?:shirt|top)\b", None),
    ("background", r"\b(\w+) background\b", None),
)


def parse_caption(text: str) -> dict[str, set[str]]:
    """Every attribute value a caption mentions: attribute -> set of values (one if consistent).

    The mustache of a full beard is part of it: 'full beard' wins over 'mustache' only when
    both appear, which no caption of this module produces.
    """
    found: dict[str, set[str]] = {}
    lower = text.lower()
    for name, pattern, value in _PATTERNS:
        for match in re.finditer(pattern, lower):
            found.setdefault(name, set()).add(value or next(g for g in match.groups() if g))
    return found
