"""The synthetic world's judge metrics: does the prior draw the world's people, and does the text
model follow unseen words, stay diverse where its caption is silent and consistent across views?

    python -m train.evaluate prior CHECKPOINT --judge FILE [--num 2000] [--split train] [--out prior.json]
    python -m train.evaluate text CHECKPOINT --data DIR --judge FILE [--num 1000] [--out text.json]

Each prints a markdown table and writes it beside its JSON (same name, ``.md``). The judge
(:class:`~dreamportrait.synthetic.judge.AttributeClassifier`) reads every attribute of each
image; what its own reading hides (bald: hair colour; sunglasses: eye size and colour; full
beard: chin, :func:`~dreamportrait.synthetic.attributes.hide_invisible`) counts as unseen, as in
the world's ground truth. Views: yaw -30, 0 and +30 degrees, pitch 0, mapping conditioned on the
frontal camera (as the app renders).

**Prior** (a plain TriPlaneGenerator; a text generator is read with the empty prompt ""): the
samples of seeds 0..N-1 (the pipeline's z; truncation psi 1 by default).

* attribute TV: per attribute, the total variation distance between the distribution of the
  judge's readings (the three views pooled, where seen) and the world's: the exact probabilities
  of the world's sampler for identities of ``--split`` (default 'train', what
  ``python -m dreamportrait.synthetic`` writes and the generator learns from) over the values
  where the attribute is seen, :func:`~dreamportrait.synthetic.attributes.attribute_distribution`
  (no data set, no sampling noise on that side). An attribute the judge never sees scores 1.
  Reported per attribute, with their mean (target <= 0.1) and max.
* cross-view agreement: the fraction of (sample, attribute) readings equal in all three views
  (unseen counts as a reading), in percent; target >= 90 %.
* latent attributes (no target; meaningful for a generator warm-started by ``train/paired.py``,
  near the majority guess for any other): per attribute, how often the frontal reading equals
  the value the sample's z names (:func:`~dreamportrait.synthetic.attributes.attributes_from_latent`),
  where that value is seen, in percent, beside always guessing the world's most likely value.

**Text model**, on the N items of an evaluation data set that ``train.evaluate`` draws (same
captions, same seeds):

* attribute accuracy (as in ``train.evaluate``, but at these views and with unseen readings) on
  the data set's captions and on a second caption per item written with the held-out paraphrase
  words (``make_caption(truth, heldout=True)``; items with no such paraphrase are counted and
  left out), each against the attributes its caption names, in percent;
* the unconditional rate: the same accuracy when each item's image is made, with its own seed,
  from another item's caption (:func:`mismatched_captions`), read against the item's own. For a
  text-blind generator this is exactly what ignoring the text scores (the ablation's baseline:
  stage 1 should stay near it, the full model far above); a generator that follows text scores
  a little lower here, since it draws the other caption's attributes, so its gain over this rate
  slightly overstates its gain over a text-blind generator of the same quality;
* diversity: each of the first C captions with seeds 0..S-1, read from the front. Per attribute
  the caption does not name, the normalised entropy (entropy / log(number of values)) of the
  readings where seen, averaged over (caption, attribute) pairs, beside the world's own: the
  expected normalised entropy of as many draws from the world's exact distribution of that
  attribute given the values the caption names (so the plug-in estimate's small-sample bias is on
  both sides). Score = generated / world; target >= 0.7. Only attributes the world varies under
  the caption (two or more values possible where seen) count, and only with 2 readings where seen;
* multi-view consistency: the cross-view agreement above, on the data set's captions;
* depth relief (no target; a diagnostic of the geometry behind consistency): each data-set
  caption's portrait from the front, at the neural-rendering resolution, against the world's
  render of the item's own person (:func:`depth_relief`: how far the cheeks recede behind the
  centre of the face); score = generated / world median. A generator that paints its heads on a
  flat sheet scores near 0 and reads differently from the side;
* latent agreement (no target; meaningful for a generator trained with
  ``stage2.latent_prompt_mentions``, at chance for any other): on the diversity readings, how
  often an unnamed attribute reads as the value the seed's z stands for given the caption
  (:func:`latent_agreement`), beside the agreement of readings that ignore z.
"""
from __future__ import annotations

import argparse
from collections import Counter
from math import exp, lgamma, log, log1p
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from dreamportrait.checkpoints import atomic_write
from dreamportrait.synthetic.attributes import (ATTRIBUTES, LATENT_DIMS, SPLITS, attribute_distribution,
                                                attributes_from_latent, hide_invisible)
from train.evaluate import (accuracy_metric, chunks, item_seeds, load_items, mentioned_attributes, render_views,
                            seed_latent, write_json)

WORLD_VIEWS = {"yaw-30": -30.0, "frontal": 0.0, "yaw+30": 30.0}
TARGETS = {"attribute_tv": 0.1, "view_agreement": 90.0, "diversity": 0.7}  # the targets


# ---- metric math -------------------------------------------------------------------------------

def total_variation(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """0.5 * sum over values of |p(v) - q(v)| (a value one side lacks has probability 0 there):
    0 for equal distributions, 1 for disjoint ones."""
    for which, d in (("first", p), ("second", q)):
        if not d or min(d.values()) < 0 or abs(sum(d.values()) - 1) > 1e-6:
            raise ValueError(f"the {which} argument {dict(d)} is not a probability distribution "
                             "(non-negative, summing to 1)")
    return 0.5 * sum(abs(p.get(v, 0.0) - q.get(v, 0.0)) for v in set(p) | set(q))


def frequencies(readings: Iterable[str | None]) -> dict[str, float]:
    """The distribution of the seen readings (None, unseen, is left out); {} when none is seen."""
    counts = Counter(r for r in readings if r is not None)
    total = sum(counts.values())
    return {v: c / total for v, c in sorted(counts.items())}


def normalised_entropy(readings: Iterable[str | None], num_values: int) -> float:
    """Plug-in entropy of the seen readings over log(num_values): 1 for readings spread evenly over
    every value, 0 for a constant reading."""
    if num_values < 2:
        raise ValueError(f"normalised entropy needs at least 2 possible values, got {num_values}")
    p = frequencies(readings).values()
    if not p:
        raise ValueError("no seen reading: the entropy of nothing is undefined")
    return -sum(q * log(q) for q in p) / log(num_values)


def expected_normalised_entropy(probs: Iterable[float], draws: int, num_values: int) -> float:
    """The mean of :func:`normalised_entropy` over ``draws`` independent readings from ``probs``,
    exactly: by linearity, sum over values of E[-(n/draws) log(n/draws)], n ~ Binomial(draws, p)."""
    if draws < 1 or num_values < 2:
        raise ValueError(f"need draws >= 1 and num_values >= 2, got {draws} and {num_values}")
    total = 0.0
    for p in probs:
        if 0 < p < 1:  # p = 1 draws only that value (its term is 0), p = 0 never
            for n in range(1, draws + 1):
                pmf = exp(lgamma(draws + 1) - lgamma(n + 1) - lgamma(draws - n + 1) + n * log(p)
                          + (draws - n) * log1p(-p))
                total -= pmf * (n / draws) * log(n / draws)
    return total / log(num_values)


def view_agreement(readings: Mapping[str, Sequence[Mapping[str, str | None]]]) -> dict:
    """Fraction of (sample, attribute) readings equal in every view, per attribute and over all:
    ``readings[view][i]`` is the reading of sample i from that view (None, unseen, is a reading)."""
    views = list(readings.values())
    if len(views) < 2 or not views[0] or len({len(v) for v in views}) != 1:
        raise ValueError(f"need readings of the same samples (at least one) from at least 2 views, got "
                         f"{ {k: len(v) for k, v in readings.items()} }")
    n = len(views[0])
    per = {name: sum(len({v[i][name] for v in views}) == 1 for i in range(n)) / n for name in views[0][0]}
    return {"value": sum(per.values()) / len(per), "per_attribute": per}


# ---- generation and reading --------------------------------------------------------------------

def load_models(checkpoint: str, judge: str, device):
    from dreamportrait.pipeline import DreamPortraitPipeline
    from dreamportrait.synthetic.judge import AttributeClassifier
    return (DreamPortraitPipeline.from_pretrained(checkpoint, device=device),
            AttributeClassifier.from_pretrained(judge, device=device))


@torch.no_grad()
def judge_readings(pipe, judge, jobs: Sequence[tuple[str, int]], psi: float, views: Mapping[str, float],
                   text=None, batch: int = 16, progress: bool = True, desc: str = "reading") -> dict[str, list]:
    """view -> the judge's reading (unseen attributes None) of each (prompt, seed) portrait of
    ``jobs`` from that view. ``text``: one encoding for every job instead of its prompt's."""
    from tqdm.auto import tqdm
    out: dict[str, list] = {v: [] for v in views}
    for chunk in tqdm(list(chunks(len(jobs), batch)), desc=desc, unit="batch", disable=not progress):
        images: dict[str, list] = {v: [] for v in views}
        for i in chunk:
            portrait = pipe.portrait(jobs[i][0], jobs[i][1], psi, text=text)
            for v, image in render_views(pipe, portrait, views).items():
                images[v].append(image)
        for v in views:
            out[v] += [hide_invisible(r) for r in judge.read(torch.cat(images[v]))]
    return out


def depth_relief(depth: torch.Tensor) -> torch.Tensor:
    """Frontal depth maps (n, 1, R, R) -> each one's relief: over the middle tenth of the rows, the
    mean depth a quarter of the width either side of the centre column, minus the centre's. A head
    seen from the front recedes towards its cheeks (the world's by 0.1-0.2); a sheet does not."""
    size = depth.shape[-1]
    centre, offset = size // 2, size // 4
    band = depth[:, 0, int(0.45 * size):int(0.55 * size) + 1]
    return ((band[..., centre - offset] + band[..., centre + offset]) / 2 - band[..., centre]).mean(1)


@torch.no_grad()
def relief_metric(pipe, items, seeds: Sequence[int], psi: float) -> dict:
    """:func:`depth_relief` of each item's portrait (its caption, its seed) beside the world's
    render of the item's own person from the same frontal camera; medians over the items."""
    from dreamportrait.cameras import camera_label
    from dreamportrait.synthetic.attributes import Identity
    from dreamportrait.synthetic.render import render
    records = [items.dataset.attributes[items.dataset.names[i]] for i in items.indices]
    if any("identity_seed" not in r for r in records):
        return {"skipped": "the data set's attributes.json has no identity_seed to rebuild each person from"}
    generated = torch.cat([pipe.render(pipe.portrait(caption, seed, psi))["image_depth"].float().cpu()
                           for caption, seed in zip(items.captions, seeds)])
    camera = camera_label(0.0, 0.0, pivot=pipe.G.config.avg_camera_pivot, radius=pipe.G.config.avg_camera_radius)
    world = render([Identity.from_seed(r["identity_seed"]) for r in records],
                   camera.reshape(1, 25).repeat(len(records), 1), generated.shape[-1], supersample=2)["depth"]
    g, w = float(depth_relief(generated).median()), float(depth_relief(world).median())
    return {"value": g / w, "generated": g, "world": w, "items": len(records)}


# ---- the prior ---------------------------------------------------------------------------------

def latent_attribute_accuracy(readings: Sequence[Mapping[str, str | None]], named: Sequence[Mapping[str, str | None]],
                              split: str = "train") -> dict:
    """Percent of readings equal to the values their latents name (where named values are seen),
    per attribute and mean, with the accuracy of always guessing the world's most likely value."""
    world = attribute_distribution(split)
    per, guess = {}, {}
    for name in ATTRIBUTES:
        pairs = [(r[name], t[name]) for r, t in zip(readings, named) if t[name] is not None]
        likely = max(world[name], key=world[name].get)
        per[name] = 100 * sum(a == b for a, b in pairs) / len(pairs) if pairs else float("nan")
        guess[name] = 100 * sum(b == likely for _, b in pairs) / len(pairs) if pairs else float("nan")
    mean = lambda d: float(np.nanmean(list(d.values())))
    return {"value": mean(per), "unit": "percent", "per_attribute": per, "majority_guess": mean(guess),
            "majority_guess_per_attribute": guess}


def evaluate_prior(checkpoint: str, judge: str, num: int = 2000, split: str = "train", psi: float = 1.0,
                   device="cpu", batch: int = 16, progress: bool = True) -> dict:
    """Attribute TV against the world and cross-view agreement of samples 0..num-1 (module doc)."""
    if num < 1:
        raise ValueError(f"--num {num}: evaluate at least one sample")
    world = attribute_distribution(split)
    pipe, judge_model = load_models(checkpoint, judge, device)
    text = pipe.text_encoder([""]) if pipe.text_conditioned else None
    readings = judge_readings(pipe, judge_model, [("", s) for s in range(num)], psi, WORLD_VIEWS, text, batch,
                              progress, "prior")
    pooled = [r for v in WORLD_VIEWS for r in readings[v]]
    tv, distributions = {}, {}
    for name in ATTRIBUTES:
        judged = frequencies(r[name] for r in pooled)
        tv[name] = total_variation(judged, world[name]) if judged else 1.0
        distributions[name] = {"judge": judged, "world": world[name],
                               "readings_seen": sum(r[name] is not None for r in pooled)}
    agree = view_agreement(readings)
    z_dim = pipe.G.config.z_dim
    latent = ({"skipped": f"z has {z_dim} components; attributes_from_latent reads {LATENT_DIMS}"}
              if z_dim < LATENT_DIMS else latent_attribute_accuracy(
                  readings["frontal"], [attributes_from_latent(seed_latent(s, z_dim, "cpu")[0].numpy())
                                        for s in range(num)], split))
    mean_tv = sum(tv.values()) / len(tv)
    metrics = {
        "attribute_tv": {"value": mean_tv, "max": max(tv.values()), "per_attribute": tv,
                         "target": TARGETS["attribute_tv"], "met": mean_tv <= TARGETS["attribute_tv"],
                         "above_target": [k for k, v in tv.items() if v > TARGETS["attribute_tv"]]},
        "view_agreement": {"value": 100 * agree["value"], "unit": "percent",
                           "per_attribute": {k: 100 * v for k, v in agree["per_attribute"].items()},
                           "target": TARGETS["view_agreement"],
                           "met": 100 * agree["value"] >= TARGETS["view_agreement"]},
        "latent_attributes": latent}
    return {"kind": "prior", "checkpoint": str(checkpoint), "judge": str(judge),
            "prompt": "" if text is not None else None, "num": num, "seeds": f"0..{num - 1}",
            "truncation_psi": psi, "views": WORLD_VIEWS, "split": split,
            "reference": f"attribute_distribution({split!r}): the world's exact distribution, where seen",
            "device": str(device), "metrics": metrics, "distributions": distributions}


# ---- the text model ----------------------------------------------------------------------------

def heldout_captions(items, seed: int) -> list[tuple[int, str, dict]]:
    """(item position, caption in held-out words of its ground truth, the attributes it names) for
    every item that has a value with a held-out paraphrase."""
    from dreamportrait.synthetic.captions import has_heldout_phrasing, make_caption, mentionable
    out = []
    for k, truth in enumerate(items.truths):
        if any(has_heldout_phrasing(truth, name) for name in mentionable(truth)):
            caption = make_caption(truth, np.random.default_rng([seed, 3, items.indices[k]]), heldout=True)
            out.append((k, caption, mentioned_attributes(caption, truth)))
    return out


def mismatched_captions(captions: Sequence[str], seed: int) -> list[str]:
    """Each item's caption replaced by another item's (a random derangement fixed by ``seed``).
    Images made from them and read against each item's own caption give the unconditional rate of
    the ablation table: exactly a text-blind generator's score, and a little lower for one that
    follows text (it draws the other caption's attributes)."""
    if len(captions) < 2:
        raise ValueError("the unconditional rate needs at least 2 items (--num 2)")
    order = np.random.default_rng([seed, 4]).permutation(len(captions))
    out = list(captions)
    for i, k in enumerate(order):  # each item in the cycle takes the next one's caption
        out[k] = captions[order[(i + 1) % len(order)]]
    return out


def diversity(frontal: Sequence[Mapping[str, str | None]], mentioned: Sequence[Mapping[str, str]],
              seeds: int, split: str) -> dict:
    """Diversity score from the frontal readings of captions x seeds (caption-major) and the
    attributes each caption names (module doc)."""
    pairs, without_reference = [], 0
    for k, given in enumerate(mentioned):
        world = attribute_distribution(split, given)
        if not any(world.values()):
            without_reference += 1  # no identity of the split has what the caption names
            continue
        for name, values in ATTRIBUTES.items():
            seen = [r[name] for r in frontal[k * seeds:(k + 1) * seeds] if r[name] is not None]
            if name in given or sum(p > 0 for p in world[name].values()) < 2 or len(seen) < 2:
                continue
            pairs.append((name, normalised_entropy(seen, len(values)),
                          expected_normalised_entropy(world[name].values(), len(seen), len(values))))
    common = {"captions": len(mentioned), "seeds": seeds, "split": split, "pairs": len(pairs),
              "captions_without_reference": without_reference, "target": TARGETS["diversity"]}
    generated = sum(p[1] for p in pairs) / len(pairs) if pairs else 0.0
    world_mean = sum(p[2] for p in pairs) / len(pairs) if pairs else 0.0
    if world_mean == 0:
        return {"skipped": "no (caption, unnamed attribute) pair where the world varies and the judge saw "
                           "2 readings; use more --diversity-captions or --diversity-seeds", **common}
    per = {}
    for name in ATTRIBUTES:
        mine = [p for p in pairs if p[0] == name]
        if mine:
            per[name] = {"generated": sum(p[1] for p in mine) / len(mine),
                         "world": sum(p[2] for p in mine) / len(mine), "pairs": len(mine)}
    score = generated / world_mean
    return {"value": score, "generated": generated, "world": world_mean, "met": score >= TARGETS["diversity"],
            "per_attribute": per, **common}


def latent_agreement(frontal: Sequence[Mapping[str, str | None]], mentioned: Sequence[Mapping[str, str]],
                     seeds: int, z_dim: int) -> dict:
    """How far the diversity readings (caption-major, seeds 0..S-1) follow the latent: per
    attribute a caption does not name, how often the reading equals the value the seed's z stands
    for given what the caption names (:func:`attributes_from_latent`, as ``stage2.latent_prompt_mentions``
    trains it), where both are seen, in percent, beside chance: the agreement of readings that
    ignore z, from the two marginals of the same pairs (sum over values of P(reading) P(latent))."""
    if z_dim < LATENT_DIMS:
        return {"skipped": f"z has {z_dim} components; attributes_from_latent reads {LATENT_DIMS}"}
    latents = [seed_latent(s, z_dim, "cpu")[0].numpy() for s in range(seeds)]
    pairs: dict[str, list[tuple[str, str]]] = {}
    for k, given in enumerate(mentioned):
        for s, z in enumerate(latents):
            stands_for, read = attributes_from_latent(z, given), frontal[k * seeds + s]
            for name in ATTRIBUTES:
                if name not in given and read[name] is not None and stands_for[name] is not None:
                    pairs.setdefault(name, []).append((read[name], stands_for[name]))
    per, chance = {}, {}
    for name, got in pairs.items():
        read, latent = Counter(r for r, _ in got), Counter(l for _, l in got)
        per[name] = 100 * sum(r == l for r, l in got) / len(got)
        chance[name] = 100 * sum(read[v] * latent[v] for v in read) / len(got) ** 2
    mean = lambda d: float(np.mean(list(d.values()))) if d else float("nan")
    return {"value": mean(per), "unit": "percent", "chance": mean(chance), "per_attribute": per,
            "chance_per_attribute": chance, "pairs": sum(len(g) for g in pairs.values())}


def evaluate_text(checkpoint: str, data: str, judge: str, num: int = 1000, seed: int = 0, psi: float = 1.0,
                  split: str = "train", diversity_captions: int = 50, diversity_seeds: int = 16, device="cpu",
                  batch: int = 16, progress: bool = True) -> dict:
    """Accuracy on the data set's and on held-out-word captions, diversity and multi-view
    consistency of a text-conditioned generator (module doc)."""
    if diversity_captions < 1 or diversity_seeds < 2:
        raise ValueError(f"diversity needs --diversity-captions >= 1 and --diversity-seeds >= 2, got "
                         f"{diversity_captions} and {diversity_seeds}")
    items = load_items(data, num, seed)
    if items.truths is None:
        raise ValueError(f"{data} has no attributes.json: the text metrics need the synthetic world's ground "
                         "truth (a data set written by python -m dreamportrait.synthetic)")
    pipe, judge_model = load_models(checkpoint, judge, device)
    if not pipe.text_conditioned:
        raise ValueError(f"{checkpoint} is not text-conditioned; evaluate a prior with python -m train.evaluate prior")
    seeds = item_seeds(seed, num)
    own = judge_readings(pipe, judge_model, list(zip(items.captions, seeds)), psi, WORLD_VIEWS, None, batch,
                         progress, "data set captions")
    held = heldout_captions(items, seed)
    metrics = {"attribute_accuracy": accuracy_metric(own, items.mentioned)}
    other = judge_readings(pipe, judge_model, list(zip(mismatched_captions(items.captions, seed), seeds)), psi,
                           WORLD_VIEWS, None, batch, progress, "another item's caption")
    metrics["unconditional_accuracy"] = accuracy_metric(other, items.mentioned)
    if held:
        held_read = judge_readings(pipe, judge_model, [(c, seeds[k]) for k, c, _ in held], psi, WORLD_VIEWS,
                                   None, batch, progress, "held-out captions")
        metrics["heldout_attribute_accuracy"] = dict(accuracy_metric(held_read, [m for _, _, m in held]),
                                                     items=len(held), items_without_heldout_word=num - len(held))
    else:
        metrics["heldout_attribute_accuracy"] = {"skipped": "no item has a value with a held-out paraphrase"}
    count = min(diversity_captions, num)
    jobs = [(items.captions[k], s) for k in range(count) for s in range(diversity_seeds)]
    frontal = judge_readings(pipe, judge_model, jobs, psi, {"frontal": 0.0}, None, batch, progress,
                             "diversity")["frontal"]
    metrics["diversity"] = diversity(frontal, items.mentioned[:count], diversity_seeds, split)
    metrics["latent_agreement"] = latent_agreement(frontal, items.mentioned[:count], diversity_seeds,
                                                   pipe.G.config.z_dim)
    metrics["depth_relief"] = relief_metric(pipe, items, seeds, psi)
    agree = view_agreement(own)
    metrics["view_consistency"] = {"value": 100 * agree["value"], "unit": "percent",
                                   "per_attribute": {k: 100 * v for k, v in agree["per_attribute"].items()}}
    return {"kind": "text", "checkpoint": str(checkpoint), "data": str(data), "judge": str(judge), "num": num,
            "seed": seed, "truncation_psi": psi, "views": WORLD_VIEWS, "device": str(device), "metrics": metrics}


# ---- output ------------------------------------------------------------------------------------

def _markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(row) + " |" for row in rows]


def _target(m: dict, relation: str) -> str:
    return f"{relation} {m['target']:g} ({'met' if m['met'] else 'not met'})"


def _cell(metric: dict, name: str) -> str:
    value = metric.get("per_attribute", {}).get(name)
    return "—" if value is None else f"{value:.1f}"


def format_markdown(results: dict) -> str:
    """Markdown tables of a prior or text evaluation: the metrics, then per attribute."""
    m = results["metrics"]
    if results["kind"] == "prior":
        tv, agree = m["attribute_tv"], m["view_agreement"]
        worst = max(tv["per_attribute"], key=tv["per_attribute"].get)
        rows = [("attribute TV (mean)", f"{tv['value']:.3f}", _target(tv, "≤"),
                 f"max {tv['max']:.3f} ({worst}); {results['num']} samples x 3 views vs the world "
                 f"('{results['split']}' split)"),
                ("cross-view agreement (%)", f"{agree['value']:.1f}", _target(agree, "≥"),
                 "yaw " + ", ".join(f"{y:+g}" if y else "0" for y in results["views"].values()))]
        latent = m["latent_attributes"]
        rows.append(("frontal reading = attribute z names (%)", "skipped", "", latent["skipped"]) if "skipped" in latent
                    else ("frontal reading = attribute z names (%)", f"{latent['value']:.1f}", "",
                          f"a paired warm start's measure; always guessing the likeliest value: "
                          f"{latent['majority_guess']:.1f}"))
        named = lambda n: ("—" if "skipped" in latent else
                           f"{latent['per_attribute'][n]:.1f} / {latent['majority_guess_per_attribute'][n]:.1f}")
        per = [(name, f"{tv['per_attribute'][name]:.3f}", f"{agree['per_attribute'][name]:.1f}", named(name),
                str(results["distributions"][name]["readings_seen"])) for name in ATTRIBUTES]
        return "\n".join(_markdown(("metric", "value", "target", "details"), rows) + [""] +
                         _markdown(("attribute", "TV", "agreement (%)", "= z's value / guess (%)", "readings seen"),
                                   per))
    rows = []
    for key, title in (("attribute_accuracy", "attribute accuracy, data set captions (%)"),
                       ("unconditional_accuracy", "the same, images made from another item's caption (%)"),
                       ("heldout_attribute_accuracy", "attribute accuracy, held-out words (%)"),
                       ("diversity", "diversity (generated / world entropy)"),
                       ("view_consistency", "multi-view consistency (%)")):
        d = m[key]
        if "skipped" in d:
            rows.append((title, "skipped", "", d["skipped"]))
        elif key == "diversity":
            rows.append((title, f"{d['value']:.3f}", _target(d, "≥"),
                         f"generated {d['generated']:.3f}, world {d['world']:.3f} over {d['pairs']} pairs; "
                         f"{d['captions']} captions x {d['seeds']} seeds"))
        else:
            detail = (f"{d['items']} items ({d['items_without_heldout_word']} without a held-out word)"
                      if key == "heldout_attribute_accuracy" else
                      f"{results['num']} items; the unconditional rate (a text-blind generator's score)"
                      if key == "unconditional_accuracy" else f"{results['num']} items")
            rows.append((title, f"{d['value']:.1f}", "", detail))
    latent = m.get("latent_agreement")  # evaluations written before session 15 have none
    if latent is not None:
        rows.append(("unnamed attribute = what the seed's z stands for (%)", "skipped", "", latent["skipped"])
                    if "skipped" in latent else
                    ("unnamed attribute = what the seed's z stands for (%)", f"{latent['value']:.1f}", "",
                     f"chance {latent['chance']:.1f}; the diversity readings, {latent['pairs']} pairs"))
    relief = m.get("depth_relief")  # evaluations written before session 17 have none
    if relief is not None:
        rows.append(("depth relief (generated / world)", "skipped", "", relief["skipped"]) if "skipped" in relief
                    else ("depth relief (generated / world)", f"{relief['value']:.2f}", "",
                          f"generated {relief['generated']:.3f}, world {relief['world']:.3f} (median over "
                          f"{relief['items']} items, frontal)"))
    acc, uncond, held, div, cons = (m[k] for k in ("attribute_accuracy", "unconditional_accuracy",
                                                   "heldout_attribute_accuracy", "diversity", "view_consistency"))
    per = []
    for name in ATTRIBUTES:
        d = div.get("per_attribute", {}).get(name)
        per.append((name, _cell(acc, name), _cell(uncond, name), _cell(held, name),
                    f"{d['generated']:.2f} / {d['world']:.2f}" if d else "—", _cell(cons, name)))
    return "\n".join(_markdown(("metric", "value", "target", "details"), rows) + [""] +
                     _markdown(("attribute", "accuracy (%)", "another's caption (%)", "held-out words (%)",
                                "diversity gen / world", "consistency (%)"), per))


def main(argv: Sequence[str]) -> dict:
    """``prior ...`` or ``text ...`` (called by ``python -m train.evaluate``)."""
    kind = argv[0]
    p = argparse.ArgumentParser(prog=f"python -m train.evaluate {kind}",
                                description=("prior: attribute TV against the world and cross-view agreement"
                                             if kind == "prior" else "text: accuracy on held-out words, "
                                             "diversity and multi-view consistency") + " (train/evaluate_world.py)")
    p.add_argument("checkpoint", help="generator.safetensors (or its folder)")
    p.add_argument("--judge", required=True, help="the world's attribute classifier (.safetensors)")
    if kind == "text":
        p.add_argument("--data", required=True, help="the synthetic world's data set (with attributes.json)")
    p.add_argument("--num", type=int, default=2000 if kind == "prior" else 1000,
                   help="samples (seeds 0..N-1)" if kind == "prior" else "evaluated items of the data set")
    if kind == "text":
        p.add_argument("--seed", type=int, default=0, help="seed of the item draw and generator seeds")
        p.add_argument("--diversity-captions", type=int, default=50, help="captions read for diversity")
        p.add_argument("--diversity-seeds", type=int, default=16, help="seeds per caption for diversity")
    p.add_argument("--split", choices=SPLITS, default="train", help="the world's identities to compare with")
    p.add_argument("--psi", type=float, default=1.0, help="truncation psi (default 1: no truncation)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=16, help="portraits read by the judge together (default 16)")
    p.add_argument("--out", default=f"{kind}.json", help=f"JSON output (default {kind}.json; the table: .md)")
    args = p.parse_args(argv[1:])
    if kind == "prior":
        results = evaluate_prior(args.checkpoint, args.judge, args.num, args.split, args.psi, args.device,
                                 args.batch)
    else:
        results = evaluate_text(args.checkpoint, args.data, args.judge, args.num, args.seed, args.psi, args.split,
                                args.diversity_captions, args.diversity_seeds, args.device, args.batch)
    table = format_markdown(results)
    print(table)
    write_json(results, args.out)
    atomic_write(Path(args.out).with_suffix(".md"), table + "\n")
    print(f"\nwrote {args.out} and {Path(args.out).with_suffix('.md')}")
    return results
