"""Human-like captions of synthetic identities, and a parser that reads attributes back.

Captions follow the style of CelebAText-HQ / FFHQ-Text ("The woman has long blond hair and big
blue eyes. She is wearing earrings."). Each caption mentions a random subset of the
identity's true attributes in random order, through several sentence forms, and names each
value with one of the words people use for it ("elderly", "senior", "aged"; "gray", "grey",
"silver"; "sunglasses", "shades"). Values meaning absence (no beard, no glasses, no earrings,
natural lips) and attributes that cannot be seen (``None``) are never mentioned, so a caption
never states anything false. :func:`parse_caption` recovers every attribute a caption mentions
from its words alone; the tests use it to check captions against the ground truth.

A fixed list of paraphrases, :data:`HELDOUT_WORDS` ("grandmother", "ginger", "sunnies", ...),
never appears in training captions; ``make_caption(..., heldout=True)`` uses them wherever one
exists for a mentioned value, to measure how far a text encoder generalises beyond the
training grammar. The parser reads both.
"""
from __future__ import annotations

import re

import numpy as np

from .attributes import ATTRIBUTES, Identity, attributes_from_latent

CAPTIONS_PER_IDENTITY = 10
MAX_MENTIONS = 6  # a caption names 2 to MAX_MENTIONS attributes besides the person's gender

# Paraphrases that training captions never use; held-out captions (heldout=True) use them.
HELDOUT_WORDS: tuple[str, ...] = (
    "youthful", "grandfather", "grandmother",                                # age (and gender)
    "cropped", "flowing", "frizzy", "hairless",                              # hair style
    "raven", "chestnut", "golden", "ginger", "silvery", "snowy",             # hair colour
    "heavy", "sparse", "curved",                                             # eyebrows
    "emerald", "button", "prominent", "chubby", "slender", "sharp",          # eyes, nose, face, chin
    "pale", "olive",                                                         # skin
    "beaming", "agape", "shut", "scarlet",                                   # mouth, lips
    "specs", "sunnies", "hoops", "violet",                                   # accessories, background
)

# Adjective-like values: attribute -> value -> (training words, held-out words).
_ADJECTIVES: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "age": {"young": (("young",), ("youthful",)), "middle-aged": (("middle-aged",), ()),
            "old": (("old", "elderly", "senior", "aged"), ())},
    "hair_style": {"short": (("short",), ("cropped",)), "long": (("long",), ("flowing",)),
                   "curly": (("curly",), ("frizzy",))},
    "hair_color": {"black": (("black",), ("raven",)), "brown": (("brown",), ("chestnut",)),
                   "blond": (("blond", "blonde"), ("golden",)), "red": (("red",), ("ginger",)),
                   "gray": (("gray", "grey", "silver"), ("silvery",)), "white": (("white",), ("snowy",))},
    "eyebrow_thickness": {"thick": (("thick", "bushy"), ("heavy",)), "thin": (("thin",), ("sparse",))},
    "eyebrow_shape": {"arched": (("arched",), ("curved",)), "straight": (("straight", "flat"), ())},
    "eye_size": {"big": (("big", "large"), ()), "small": (("small",), ())},
    "eye_color": {"blue": (("blue",), ()), "green": (("green",), ("emerald",)), "brown": (("brown",), ())},
    "nose": {"small": (("small", "little"), ("button",)), "big": (("big", "large"), ("prominent",))},
    "face_shape": {"round": (("round",), ("chubby",)), "oval": (("oval",), ()),
                   "narrow": (("narrow", "slim"), ("slender",))},
    "chin": {"broad": (("broad", "wide"), ()), "pointed": (("pointed", "pointy"), ("sharp",))},
    "skin_tone": {"fair": (("fair", "light"), ("pale",)), "medium": (("medium",), ("olive",)),
                  "brown": (("brown",), ()), "dark": (("dark",), ())},
    "clothing": {c: ((c,), ()) for c in ATTRIBUTES["clothing"]},
    "background": {c: ((c,), ("violet",) if c == "purple" else ()) for c in ATTRIBUTES["background"]},
}
# The noun each adjective attribute describes (a regular expression), and whether the parser
# allows one more word in between ("short black hair", "thick arched eyebrows", "big blue eyes").
_NOUNS: dict[str, tuple[str, bool]] = {
    "hair_style": ("hair", True), "hair_color": ("hair", False), "eyebrow_thickness": ("(?:eye)?brows", True),
    "eyebrow_shape": ("(?:eye)?brows", False), "eye_size": ("eyes", True), "eye_color": ("eyes", False),
    "nose": ("nose", False), "face_shape": ("face", False), "chin": ("chin", False), "skin_tone": ("skin", False),
    "clothing": ("(?:shirt|t-shirt|top|sweater)", False), "background": ("(?:background|backdrop)", False)}

# Values said in a phrase: (attribute, value) -> (training phrases, held-out phrases, words that
# name the value). A phrase is (clause, text): 'has' ("a shaved head"), 'is' ("bald") or
# 'wears' ("shades"); "{his}" becomes the possessive pronoun.
_PHRASES: dict[tuple[str, str], tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...], tuple[str, ...]]] = {
    ("hair_style", "bald"): ((("is", "bald"), ("has", "a shaved head")), (("is", "hairless"),),
                             ("bald", "shaved head", "hairless")),
    ("hair_style", "bangs"): ((("has", "bangs"), ("has", "a fringe")), (), ("bangs", "fringe")),
    ("mouth", "smiling"): ((("is", "smiling"), ("is", "grinning"), ("has", "a smile"), ("has", "a big smile")),
                           (("is", "beaming"),), ("smiling", "smile", "grinning", "beaming")),
    ("mouth", "open"): ((("has", "an open mouth"), ("has", "{his} mouth open")), (("has", "{his} mouth agape"),),
                        ("open mouth", "mouth open", "mouth agape")),
    ("mouth", "closed"): ((("has", "a closed mouth"), ("has", "{his} mouth closed")), (("has", "{his} mouth shut"),),
                          ("closed mouth", "mouth closed", "mouth shut")),
    ("lips", "red lipstick"): ((("wears", "red lipstick"), ("has", "red lips")), (("has", "scarlet lips"),),
                               ("lipstick", "red lips", "scarlet lips")),
    ("beard", "mustache"): ((("has", "a mustache"), ("has", "a thick mustache"), ("has", "a moustache")), (),
                            ("mustache", "moustache")),
    ("beard", "full beard"): ((("has", "a full beard"), ("has", "a beard"), ("is", "bearded")), (),
                              ("full beard", "beard", "bearded")),
    ("glasses", "glasses"): ((("wears", "glasses"), ("wears", "eyeglasses"), ("wears", "spectacles")),
                             (("wears", "specs"),), ("glasses", "eyeglasses", "spectacles", "specs")),
    ("glasses", "sunglasses"): ((("wears", "sunglasses"), ("wears", "shades")), (("wears", "sunnies"),),
                                ("sunglasses", "shades", "sunnies")),
    ("earrings", "earrings"): ((("wears", "earrings"), ("wears", "gold earrings")), (("wears", "hoops"),),
                               ("earrings", "hoops")),
}

# Nouns for a person: gender -> plain nouns; a young woman may be a "girl"; held-out nouns
# name gender and age at once.
_PERSON = {"man": ("man", "gentleman", "guy"), "woman": ("woman", "lady")}
_YOUNG_NOUNS = {"woman": "girl"}
_HELDOUT_NOUNS = {("man", "old"): "grandfather", ("woman", "old"): "grandmother"}
_PRONOUN = {"man": ("he", "his"), "woman": ("she", "her")}
_NEGATIVE = {"beard": "none", "glasses": "none", "earrings": "none", "lips": "natural"}
_MENTIONABLE = ("age", "hair_style", "hair_color", "eyebrow_thickness", "eyebrow_shape", "eye_size",
                "eye_color", "nose", "face_shape", "chin", "skin_tone", "mouth", "lips", "beard",
                "glasses", "earrings", "clothing", "background")


def mentionable(attributes: dict) -> list[str]:
    """The attributes a caption of this identity may mention."""
    return [name for name in _MENTIONABLE
            if attributes.get(name) is not None and attributes[name] != _NEGATIVE.get(name)]


def has_heldout_phrasing(attributes: dict, name: str) -> bool:
    """Whether a held-out caption can name this attribute's value with a held-out word."""
    value = attributes[name]
    if name == "age" and (attributes["gender"], value) in _HELDOUT_NOUNS:
        return True
    if (name, value) in _PHRASES:
        return bool(_PHRASES[name, value][1])
    return bool(_ADJECTIVES.get(name, {}).get(value, ((), ()))[1])


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _word(name: str, value: str, rng: np.random.Generator, heldout: bool) -> str:
    train, held = _ADJECTIVES[name][value]
    return _pick(rng, held if heldout and held else train)


def _phrase(name: str, a: dict, rng: np.random.Generator, heldout: bool) -> tuple[str, str]:
    train, held, _ = _PHRASES[name, a[name]]
    clause, text = _pick(rng, held if heldout and held else train)
    return clause, text.format(his=_PRONOUN[a["gender"]][1])


def _phrases(a: dict, chosen: list[str], rng: np.random.Generator,
             heldout: bool) -> tuple[list, list, list, str | None]:
    """Noun phrases for 'has', states for 'is', items for 'wearing', and the background colour."""
    out = {"has": [], "is": [], "wears": []}
    background = None
    done: set[str] = set()
    for name in chosen:
        if name in done:
            continue
        if name in ("hair_style", "hair_color"):
            done.update(("hair_style", "hair_color"))
            style = a["hair_style"] if "hair_style" in chosen else None
            colour = _word("hair_color", a["hair_color"], rng, heldout) if "hair_color" in chosen else None
            if style == "bald":
                clause, text = _phrase("hair_style", a, rng, heldout)
                out[clause].append(text)
            elif style == "bangs":
                fringe = _phrase("hair_style", a, rng, heldout)[1]
                out["has"].append(f"{colour} hair with {fringe}" if colour else fringe)
            else:
                style = style and _word("hair_style", style, rng, heldout)
                out["has"].append(" ".join(w for w in (style, colour) if w) + " hair")
        elif name in ("eyebrow_thickness", "eyebrow_shape", "eye_size", "eye_color"):
            pair = ("eyebrow_thickness", "eyebrow_shape") if name.startswith("eyebrow") else ("eye_size", "eye_color")
            done.update(pair)
            noun = _pick(rng, ("eyebrows", "brows")) if name.startswith("eyebrow") else "eyes"
            out["has"].append(" ".join([_word(n, a[n], rng, heldout) for n in pair if n in chosen] + [noun]))
        elif name in ("nose", "face_shape", "chin"):
            word = _word(name, a[name], rng, heldout)
            out["has"].append(f"{_article(word)} {word} {_NOUNS[name][0]}")
        elif name == "skin_tone":
            out["has"].append(f"{_word(name, a[name], rng, heldout)} skin")
        elif (name, a[name]) in _PHRASES:
            clause, text = _phrase(name, a, rng, heldout)
            out[clause].append(text)
        elif name == "clothing":
            word = _word(name, a[name], rng, heldout)
            out["wears"].append(f"{_article(word)} {word} {_pick(rng, ('shirt', 't-shirt', 'top', 'sweater'))}")
        elif name == "background":
            background = _word(name, a[name], rng, heldout)
        done.add(name)
    return out["has"], out["is"], out["wears"], background


def _person(a: dict, age_mentioned: bool, rng: np.random.Generator, heldout: bool) -> str:
    """The noun for the person, carrying the age when it is mentioned ("elderly lady", "girl")."""
    gender = a["gender"]
    if not age_mentioned:
        return _pick(rng, _PERSON[gender])
    if heldout and (gender, a["age"]) in _HELDOUT_NOUNS:
        return _HELDOUT_NOUNS[gender, a["age"]]
    if not heldout and a["age"] == "young" and gender in _YOUNG_NOUNS and rng.random() < 0.3:
        return _YOUNG_NOUNS[gender]
    return f"{_word('age', a['age'], rng, heldout)} {_pick(rng, _PERSON[gender])}"


def make_caption(attributes: dict, rng: np.random.Generator, mentions: int | None = None,
                 heldout: bool = False, chosen: list[str] | None = None) -> str:
    """One caption mentioning a random subset of ``attributes``: ``mentions`` of them (all when
    larger than the mentionable ones), or 2 to 6 drawn at random when ``mentions`` is None;
    ``chosen``: exactly these attributes (each must be mentionable) instead.

    ``heldout=True`` names every value that has a held-out paraphrase (:data:`HELDOUT_WORDS`)
    with one, and makes sure at least one such value is mentioned (swapping one in if needed).
    """
    names = mentionable(attributes)
    if chosen is not None:
        if set(chosen) - set(names):
            raise ValueError(f"cannot mention {sorted(set(chosen) - set(names))}: a caption mentions only "
                             f"seen values that are not absences ({names})")
        chosen = list(chosen)
    else:
        if mentions is not None:
            k = min(int(mentions), len(names))
        else:
            k = int(rng.integers(2, min(MAX_MENTIONS, len(names)) + 1)) if len(names) >= 2 else len(names)
        chosen = [names[i] for i in rng.permutation(len(names))[:k]]
    if heldout:
        usable = [n for n in names if has_heldout_phrasing(attributes, n)]
        if not usable:
            raise ValueError("this identity has no attribute with a held-out paraphrase; "
                             "use heldout=False for it")
        if not set(chosen) & set(usable):
            chosen[-1:] = [_pick(rng, usable)]
    has, state, wear, background = _phrases(attributes, chosen, rng, heldout)
    noun = _person(attributes, "age" in chosen, rng, heldout)
    pronoun = _PRONOUN[attributes["gender"]][0]
    clauses = []
    if has:
        clauses.append("has " + _join(has))
    if state:
        clauses.append("is " + _join(state))
    if wear:
        clauses.append(_pick(rng, ("is wearing ", "wears ")) + _join(wear))
    clauses = [clauses[i] for i in rng.permutation(len(clauses))]
    scene = background and (f" {_pick(rng, ('against', 'in front of'))} {_article(background)} {background} "
                            f"{_pick(rng, ('background', 'backdrop'))}")
    if has and rng.random() < 0.35:
        # "A young man with short black hair and a mustache, wearing glasses."
        lead = _pick(rng, ("", "", "a photo of ", "a portrait of "))
        text = f"{lead}{_article(noun)} {noun} with {_join(has)}"
        text = text[0].upper() + text[1:]
        rest = [c for c in clauses if not c.startswith("has ")]
        if rest and rest[0].startswith(("is wearing", "wears")):
            clause = rest.pop(0)
            text += ", wearing " + clause.split(" ", 2 if clause.startswith("is ") else 1)[-1]
        text += (scene or "") + "."
        text += "".join(f" {pronoun.capitalize()} {c}." for c in rest)
        return text
    first = _pick(rng, ("The", "This")) + f" {noun}"
    if not clauses:
        return f"{_article(noun).capitalize()} {noun}{scene or ''}."
    take = 2 if len(clauses) > 1 and rng.random() < 0.5 else 1
    text = f"{first} {' and '.join(clauses[:take])}{scene or ''}."
    text += "".join(f" {pronoun.capitalize()} {c}." for c in clauses[take:])
    return text


def named_values(caption: str) -> dict[str, str]:
    """The attribute values ``caption`` names (:func:`parse_caption`), without those it leaves open
    (a word naming two values counts as neither)."""
    return {name: next(iter(values)) for name, values in parse_caption(caption).items() if len(values) == 1}


def complete_caption(caption: str, z, rng: np.random.Generator, mentions: int = MAX_MENTIONS) -> str:
    """A training-grammar caption of the person ``caption`` describes, naming up to ``mentions``
    attributes in all: every value the caption names (:func:`parse_caption`; a word naming two
    values counts as neither), and then unnamed attributes, picked at random, with the values the
    latent ``z`` stands for given the named ones (:func:`attributes_from_latent`). So two latents
    with the same caption get captions that agree where it speaks and differ where z does.

    Attributes whose absence captions never state (beard, glasses, earrings, lipstick) are not
    added: z could only ever ask for their presence, which would push every latent towards it."""
    given = named_values(caption)
    attributes = attributes_from_latent(z, given)
    names = mentionable(attributes)
    named = [n for n in names if n in given]
    free = [n for n in names if n not in given and n not in _NEGATIVE]
    extra = [free[i] for i in rng.permutation(len(free))[:max(0, mentions - len(named))]]
    return make_caption(attributes, rng, chosen=[*named, *extra])


def make_captions(identity: Identity, num: int = CAPTIONS_PER_IDENTITY, heldout: bool = False) -> list[str]:
    """``num`` captions of one identity, distinct where possible, from its seed alone
    (``heldout=True``: held-out-paraphrase captions, from a separate random stream)."""
    rng = np.random.default_rng([identity.seed, 3 if heldout else 2])
    out: list[str] = []
    for _ in range(num * 20):
        caption = make_caption(identity.attributes, rng, heldout=heldout)
        if caption not in out:
            out.append(caption)
        if len(out) == num:
            return out
    while len(out) < num:  # too few attributes for num distinct captions: repeat
        out.append(out[len(out) % max(1, len(out))])
    return out


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


# A word boundary that keeps hyphenated words whole ("aged" is not found in "middle-aged").
_START, _END = r"(?<![\w-])", r"(?![\w-])"


def _parser_patterns() -> list[tuple[str, re.Pattern, dict[str, str]]]:
    """(attribute, pattern with one group, matched words -> value) for every way a value is named."""
    def word_map(name):
        return {w: value for value, (train, held) in _ADJECTIVES[name].items() for w in train + held}
    gender = {w: g for g, nouns in _PERSON.items() for w in nouns + _PRONOUN[g]}
    gender.update({n: g for (g, _), n in _HELDOUT_NOUNS.items()}, him="man", girl="woman")
    age = dict(word_map("age"), girl="young", **{n: age for (_, age), n in _HELDOUT_NOUNS.items()})
    patterns = [("gender", gender, ""), ("age", age, "")]
    for name, (noun, gap) in _NOUNS.items():
        patterns.append((name, word_map(name), ("(?: [\\w-]+)?" if gap else "") + f" {noun}" + _END))
    for (name, value), (_, _, words) in _PHRASES.items():
        patterns.append((name, {w: value for w in words}, ""))
    return [(name, re.compile(f"{_START}({_alternatives(words)}){_END}{noun}"), words)
            for name, words, noun in patterns]


_PATTERNS = _parser_patterns()


def parse_caption(text: str) -> dict[str, set[str]]:
    """Every attribute value a caption mentions: attribute -> set of values (one if consistent).

    Reads training and held-out phrasings alike. The mustache of a full beard is part of it:
    'full beard' and 'mustache' both appear in the result only when both are written, which no
    caption of this module does.
    """
    found: dict[str, set[str]] = {}
    lower = text.lower()
    for name, pattern, words in _PATTERNS:
        for match in pattern.finditer(lower):
            found.setdefault(name, set()).add(words[match.group(1)])
    return found
