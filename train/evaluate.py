"""Metrics for a generator checkpoint: FID, CLIP R-Precision, MSC and attribute accuracy.

``python -m train.evaluate CHECKPOINT --data DIR [--judge FILE] [--clip SPEC] [--num N] [--out FILE]``

N items are drawn from the EG3D-format data set; each gives a real image, a fixed evaluation
caption, a camera label and a random seed. From them:

* **FID** (Heusel et al.): Fréchet distance between Gaussian fits of features of the N real
  images and of N generated images. Each generated image follows EG3D's metric protocol: the
  mapping is conditioned on the item's camera and the portrait is rendered from it. Features:
  torchvision's ImageNet Inception-v3 pool features (2048-d) when its weights are already in the
  local torch hub cache (nothing is downloaded), else the judge's penultimate features. The
  output names the extractor; numbers from different extractors (or from the TF-Inception of
  the reference FID code) are not comparable.
* **CLIP R-Precision** (Park et al. 2021, as in the paper): for each portrait's frontal view,
  its caption is ranked by CLIP similarity among K distractor captions drawn from the data set's
  other evaluation captions; the score is the top-1 rate (ties shared), in percent.
* **MSC** (the paper's multi-view semantic consistency): the CLIP score 100 * cos(image, text)
  averaged over the frontal, -15° and +15° yaw views, then over portraits. Like the app, these
  views condition the mapping on the frontal camera. Unlike torchmetrics' CLIPScore, negative
  cosines are not clipped to 0.
* **Attribute accuracy** (synthetic world): the judge's reading of the same three views against
  the attributes each caption mentions (unmentioned attributes do not count); per attribute and
  their mean, in percent.

The synthetic world's prior metrics (attribute distribution, cross-view agreement) and text-model
metrics (held-out-word accuracy, diversity, multi-view consistency) are subcommands,
``python -m train.evaluate prior|text ...``: see :mod:`train.evaluate_world`.

``python -m train.evaluate discriminator RUN_DIR --data DIR`` asks whether a text-reading
discriminator (the ``STAGE.text_discriminator`` extension) reads the text: on real images, how
much higher its logit is with the image's own caption than with another image's.

A metric whose component is missing (no judge, no CLIP, no Inception weights, a generator
without text) is reported as skipped with the reason.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dreamportrait.checkpoints import atomic_write
from dreamportrait.grid import to_uint8
from dreamportrait.ops import resize

VIEWS = {"frontal": 0.0, "yaw-15": -15.0, "yaw+15": 15.0}  # MSC and attribute-accuracy views (degrees)
DEFAULT_DISTRACTORS = 99  # Park et al.'s R-Precision: the true caption among 100
FEATURE_CHOICES = ("auto", "inception", "judge")


# ---- metric math -------------------------------------------------------------------------------

def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and unbiased covariance (F, F) of features (N, F), in float64."""
    x = np.asarray(features.detach().cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"feature statistics need at least 2 feature vectors (N, F), got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues -> 0)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2): the inner matrix is symmetric PSD, so an
    eigen-decomposition gives it exactly, with no complex round-off (unlike a general sqrtm).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    root1 = _psd_sqrt(s1)
    inner = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def clip_score(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """100 * cosine similarity of each image with its text: (N, D), (N, D) -> (N,)."""
    if image_embeddings.shape != text_embeddings.shape or image_embeddings.ndim != 2:
        raise ValueError(f"need paired (N, D) embeddings, got {tuple(image_embeddings.shape)} and "
                         f"{tuple(text_embeddings.shape)}")
    return 100 * F.cosine_similarity(image_embeddings.float(), text_embeddings.float(), dim=1)


def r_precision(similarity: torch.Tensor, target: torch.Tensor | None = None) -> float:
    """Top-1 rate of the true candidate per row of a (N, C) similarity matrix.

    ``target`` (N,) gives the true column of each row (default: the diagonal). A tie at the top
    counts as 1 / (number tied), the expected top-1 rate under random tie-breaking.
    """
    sim = torch.as_tensor(similarity, dtype=torch.float64)
    if sim.ndim != 2 or sim.shape[0] == 0:
        raise ValueError(f"similarity must be a non-empty (N, C) matrix, got shape {tuple(sim.shape)}")
    rows = torch.arange(sim.shape[0])
    target = rows if target is None else torch.as_tensor(target, dtype=torch.long)
    true = sim[rows, target][:, None]
    above = (sim > true).sum(dim=1)
    tied = (sim == true).sum(dim=1)
    return float(torch.where(above == 0, 1.0 / tied, 0.0).mean())


def distractor_sets(captions: Sequence[str], pool: Sequence[str], k: int,
                    rng: np.random.Generator) -> list[list[str]]:
    """Per caption: [the caption, k distinct other captions drawn from ``pool``] (k capped by the pool)."""
    unique = sorted(set(pool))
    sets = []
    for caption in captions:
        others = [p for p in unique if p != caption]
        pick = rng.choice(len(others), size=min(k, len(others)), replace=False)
        sets.append([caption] + [others[i] for i in pick])
    return sets


def attribute_accuracy(predicted: Sequence[Mapping[str, str]],
                       mentioned: Sequence[Mapping[str, str]]) -> dict:
    """Fraction of mentioned attribute values that were predicted, per attribute and their mean.

    ``predicted[i]`` holds the judge's reading of image i; ``mentioned[i]`` only the attributes
    its caption states. The mean is over attributes (each attribute weighs the same).
    """
    if len(predicted) != len(mentioned):
        raise ValueError(f"{len(predicted)} predictions but {len(mentioned)} captions")
    hits: dict[str, int] = {}
    counts: dict[str, int] = {}
    for pred, want in zip(predicted, mentioned):
        for name, value in want.items():
            counts[name] = counts.get(name, 0) + 1
            hits[name] = hits.get(name, 0) + int(pred[name] == value)
    per = {name: hits[name] / counts[name] for name in sorted(counts)}
    return {"per_attribute": per, "counts": dict(sorted(counts.items())),
            "mean": sum(per.values()) / len(per) if per else math.nan}


def accuracy_metric(readings: Mapping[str, Sequence[Mapping[str, str]]],
                    mentioned: Sequence[Mapping[str, str]]) -> dict:
    """Attribute accuracy in percent of the judge's readings (view -> one reading per item), views
    pooled, against what each item's caption mentions."""
    acc = attribute_accuracy([r for view in readings.values() for r in view], list(mentioned) * len(readings))
    return {"value": 100 * acc["mean"], "unit": "percent", "views": list(readings),
            "per_attribute": {k: 100 * v for k, v in acc["per_attribute"].items()}, "counts": acc["counts"]}


# ---- feature extractors for FID ------------------------------------------------------------------

Extractor = Callable[[torch.Tensor], torch.Tensor]


def inception_weights_file() -> Path:
    """Where torchvision keeps Inception-v3's ImageNet weights in the local torch hub cache."""
    from torchvision.models import Inception_V3_Weights
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(Inception_V3_Weights.IMAGENET1K_V1.url).name


def inception_extractor(device) -> Extractor:
    """torchvision Inception-v3 (ImageNet weights from the hub cache) -> 2048-d pool features."""
    from torchvision.models.inception import Inception3
    file = inception_weights_file()
    if not file.is_file():
        raise FileNotFoundError(f"Inception-v3 weights not found at {file}; nothing is downloaded here: copy "
                                "the torchvision file there, or use --fid-features judge")
    with torch.device("meta"):  # no random initialisation: every tensor comes from the file
        net = Inception3(num_classes=1000, aux_logits=True, transform_input=False, init_weights=False)
    net.load_state_dict(torch.load(file, map_location="cpu", weights_only=True), assign=True)
    net.fc, net.AuxLogits, net.aux_logits = torch.nn.Identity(), None, False
    net = net.to(device).eval()

    @torch.no_grad()
    def extract(images: torch.Tensor) -> torch.Tensor:
        # The Google weights expect inputs in [-1, 1] (what transform_input makes of normalised ones).
        return net(resize(images.to(device, torch.float32).clamp(-1, 1), 299))
    return extract


def fid_extractor(choice: str, judge, device) -> tuple[Extractor, str]:
    """The FID feature extractor and its description; raises LookupError when none is available."""
    if choice not in FEATURE_CHOICES:
        raise ValueError(f"unknown FID feature extractor {choice!r}; choose one of {FEATURE_CHOICES}")
    if choice == "inception" or (choice == "auto" and inception_weights_file().is_file()):
        return inception_extractor(device), f"inception-v3 (torchvision ImageNet weights, {inception_weights_file()})"
    if judge is None:
        raise LookupError("--fid-features judge needs a --judge" if choice == "judge" else
                          f"no feature extractor: Inception-v3 weights are not at {inception_weights_file()} "
                          "and no --judge was given")
    return torch.no_grad()(judge.features), f"judge features ({judge.config.feature_dim}-d)"


# ---- CLIP -----------------------------------------------------------------------------------------

class Clip:
    """An open_clip model with its tokenizer: unit-length image and text embeddings."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, name: str = "open_clip model"):
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        from open_clip.model import get_model_preprocess_cfg
        from open_clip.tokenizer import SimpleTokenizer
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer or SimpleTokenizer(context_length=model.context_length)
        self.name = name
        cfg = get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = torch.tensor(cfg.get("mean") or OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std") or OPENAI_DATASET_STD).view(1, 3, 1, 1)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> (B, D), resized with antialiased bicubic as open_clip does."""
        x = (images.to(self.device, torch.float32) + 1) / 2
        x = resize(x, self.size, mode="bicubic").clamp(0, 1)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(ids).float(), dim=-1)


def load_clip(spec: str, device="cpu") -> "Clip | LitClip":
    """A CLIP with unit ``images``/``texts`` embeddings from ``spec``: the synthetic world's CLIP (a
    folder holding ``lit_clip.safetensors``, or that file: :class:`~dreamportrait.synthetic.lit_clip.LitClip`,
    whose locked text tower is rebuilt from its recorded identity and hash-checked), or an open_clip
    model: a local folder (open_clip_config.json with ``model_cfg`` plus weights, e.g. the earlier
    small CLIP), ``NAME:TAG`` (open_clip cache), ``NAME:/weights/file``, or an open_clip
    ``local-dir:`` / ``hf-hub:`` name."""
    from dreamportrait.synthetic.lit_clip import LIT_CLIP_FILE, LitClip
    if (Path(spec) / LIT_CLIP_FILE).is_file() or (spec.endswith(".safetensors") and os.path.isfile(spec)):
        return LitClip.from_pretrained(spec, device)
    import open_clip
    if os.path.isdir(spec):
        if not (Path(spec) / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{spec} has neither {LIT_CLIP_FILE} (the world's CLIP) nor "
                                    "open_clip_config.json (an open_clip folder, with a 'model_cfg' entry, "
                                    "and its weights)")
        name, pretrained = f"local-dir:{spec}", None
    elif spec.startswith(("local-dir:", "hf-hub:")):
        name, pretrained = spec, None
    elif ":" in spec:
        name, pretrained = spec.split(":", 1)
    else:
        raise ValueError(f"--clip {spec!r} names no weights; use NAME:TAG (e.g. ViT-H-14:laion2b_s32b_b79k), "
                         "NAME:/path/to/weights (the open_clip model name, then a weights file) or a local "
                         "CLIP folder")
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as err:  # open_clip raises several types for missing configs or weights
        raise RuntimeError(f"could not load CLIP {spec!r}: {err}") from err
    return Clip(model, tokenizer, spec)


# ---- data set ------------------------------------------------------------------------------------

@dataclass
class EvalItems:
    """The N evaluated items of a data set: indices, cameras, fixed captions, mentioned attributes."""
    dataset: object                 # train.data.PortraitDataset in evaluation mode
    indices: list[int]
    labels: torch.Tensor            # (N, 25) camera labels
    captions: list[str]             # each item's fixed evaluation caption
    mentioned: list[dict] | None    # ground truth of the attributes each caption states (None: unknown)
    caption_pool: list[str]         # every evaluation caption of the data set (R-Precision distractors)
    truths: list[dict] | None       # each item's ground-truth attributes (None: unknown)


def mentioned_attributes(caption: str, truth: Mapping[str, str | None]) -> dict[str, str]:
    """Ground-truth values of the attributes ``caption`` mentions (found by the world's caption parser)."""
    from dreamportrait.synthetic.captions import parse_caption
    return {name: truth[name] for name in parse_caption(caption) if truth.get(name) is not None}


def load_items(data: str, num: int, seed: int) -> EvalItems:
    """N items drawn without replacement (seeded) from an EG3D-layout data set with captions."""
    from train.data import PortraitDataset
    ds = PortraitDataset(data, train=False)
    if not 2 <= num <= len(ds):
        raise ValueError(f"--num {num}: the data set {data} has {len(ds)} images; use 2 <= --num <= {len(ds)}")
    indices = [int(i) for i in np.random.default_rng([seed, 0]).choice(len(ds), size=num, replace=False)]
    captions = [ds.caption(i) for i in indices]
    mentioned = truths = None
    if ds.attributes is not None:
        truths = [ds.attributes[ds.names[i]].get("attributes") for i in indices]
        for truth, i in zip(truths, indices):
            if not isinstance(truth, dict):
                raise ValueError(f"{data}: the attributes entry of {ds.names[i]} has no 'attributes' dict "
                                 "(the synthetic world's layout: python -m dreamportrait.synthetic)")
        mentioned = [mentioned_attributes(c, truth) for c, truth in zip(captions, truths)]
    return EvalItems(ds, indices, ds.labels[indices], captions, mentioned,
                     [ds.caption(i) for i in range(len(ds))], truths)


def item_seeds(seed: int, num: int) -> list[int]:
    """The generator seed of each of the ``num`` items drawn with ``seed``."""
    return [int(s) for s in np.random.default_rng([seed, 1]).integers(0, 2 ** 31 - 1, size=num)]


# ---- generation ----------------------------------------------------------------------------------

def seed_latent(seed: int, z_dim: int, device) -> torch.Tensor:
    """The pipeline's z for a seed (same generator and draw as DreamPortraitPipeline.latent)."""
    return torch.randn(1, z_dim, generator=torch.Generator().manual_seed(seed)).to(device)


def _quantise(images: torch.Tensor) -> torch.Tensor:
    """Round generator output to the uint8 grid, back in [-1, 1]: EG3D's metric protocol scores the
    images as it saves them, ``(x * 127.5 + 128).clamp(0, 255)`` truncated to uint8, which is
    :func:`~dreamportrait.grid.to_uint8`'s rounding (nearest level, halves up, clamped)."""
    levels = torch.from_numpy(to_uint8(images)).movedim(-1, -3).to(images.device)
    return levels.float() / 127.5 - 1


@torch.no_grad()
def generate_item(pipe, prompt: str, seed: int, label: torch.Tensor, psi: float, fid: bool,
                  views: bool) -> dict[str, torch.Tensor]:
    """One item's images (1, 3, R, R): 'fid' (mapping conditioned on and rendered from ``label``,
    EG3D's metric protocol) and, with ``views``, each view of VIEWS of the app's frontal-conditioned
    portrait."""
    G, out = pipe.G, {}
    if fid:
        c = label.reshape(1, -1).to(pipe.device)
        ws = G.mapping(seed_latent(seed, G.config.z_dim, pipe.device), c, truncation_psi=psi)
        portrait = pipe.portrait(prompt, seed, psi, ws=ws)
        out["fid"] = _quantise(G.render(portrait.planes, portrait.ws, c, deterministic=True)["image"])
    if views:
        out.update(render_views(pipe, pipe.portrait(prompt, seed, psi), VIEWS))
    return out


@torch.no_grad()
def render_views(pipe, portrait, views: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """The portrait from each yaw of ``views`` (name -> degrees; pitch 0), on the uint8 grid."""
    return {name: _quantise(pipe.render(portrait, yaw, 0.0)["image"]) for name, yaw in views.items()}


def chunks(n: int, size: int):
    return (range(i, min(i + size, n)) for i in range(0, n, size))


# ---- the evaluation --------------------------------------------------------------------------------

def evaluate(checkpoint: str, data: str, judge: str | None = None,
             clip: str | Clip | torch.nn.Module | None = None, num: int = 1000, seed: int = 0,
             psi: float = 1.0, distractors: int = DEFAULT_DISTRACTORS, fid_features: str = "auto",
             device="cpu", batch: int = 16, progress: bool = True) -> dict:
    """Every metric for one checkpoint (skipped ones with their reason) as a JSON-ready dict.

    ``clip`` is a :func:`load_clip` spec, a :class:`Clip` or an open_clip model object.

    Images are consumed batch by batch (features, embeddings, judge readings), so memory does not
    grow with ``num``.
    """
    from tqdm.auto import tqdm

    from dreamportrait.pipeline import DreamPortraitPipeline
    from dreamportrait.synthetic.judge import AttributeClassifier

    items = load_items(data, num, seed)
    pipe = DreamPortraitPipeline.from_pretrained(checkpoint, device=device)
    judge_model = AttributeClassifier.from_pretrained(judge, device=device) if judge else None
    if isinstance(clip, torch.nn.Module):
        clip = Clip(clip)
    clip_model = clip if isinstance(clip, Clip) or clip is None else load_clip(clip, device)
    seeds = item_seeds(seed, num)
    metrics: dict[str, dict] = {}

    extractor = None
    if items.dataset.resolution != pipe.G.config.img_resolution:
        res, gres = items.dataset.resolution, pipe.G.config.img_resolution
        metrics["fid"] = {"skipped": f"the data set's images are {res}x{res} but the generator's are {gres}x{gres}"}
    else:
        try:
            extractor, extractor_name = fid_extractor(fid_features, judge_model, device)
        except LookupError as why:
            metrics["fid"] = {"skipped": str(why)}
    reasons = {}
    if not pipe.text_conditioned:
        reasons["clip"] = reasons["judge"] = "the generator is not text-conditioned"
    if clip_model is None:
        reasons.setdefault("clip", "no --clip given")
    if judge_model is None:
        reasons.setdefault("judge", "no --judge given")
    elif items.mentioned is None:
        reasons["judge"] = "the data set has no attributes file (not from the synthetic world)"
    use_clip, use_judge = "clip" not in reasons, "judge" not in reasons

    real_features, fake_features = [], []
    embeddings = {v: [] for v in VIEWS}
    readings = {v: [] for v in VIEWS}
    for chunk in tqdm(list(chunks(num, batch)), desc="evaluating", unit="batch", disable=not progress):
        outs = [generate_item(pipe, items.captions[i], seeds[i], items.labels[i], psi,
                              fid=extractor is not None, views=use_clip or use_judge) for i in chunk]
        images = {name: torch.cat([o[name] for o in outs]) for name in outs[0]}
        if extractor is not None:
            reals = torch.stack([items.dataset[items.indices[i]]["image"] for i in chunk])
            real_features.append(extractor(reals).float().cpu())
            fake_features.append(extractor(images["fid"]).float().cpu())
        for v in VIEWS:
            if use_clip:
                embeddings[v].append(clip_model.images(images[v]).cpu())
            if use_judge:
                readings[v] += judge_model.read(images[v])

    if extractor is not None:
        real, fake = torch.cat(real_features), torch.cat(fake_features)
        metrics["fid"] = {"value": frechet_distance(*feature_statistics(real), *feature_statistics(fake)),
                          "feature_extractor": extractor_name, "num_real": len(real), "num_generated": len(fake)}
    if use_clip:
        metrics.update(_clip_metrics(clip_model, items, {v: torch.cat(e) for v, e in embeddings.items()},
                                     distractors, seed))
    else:
        metrics["clip_r_precision"] = metrics["msc"] = {"skipped": reasons["clip"]}
    if use_judge:
        metrics["attribute_accuracy"] = accuracy_metric(readings, items.mentioned)
    else:
        metrics["attribute_accuracy"] = {"skipped": reasons["judge"]}

    return {"checkpoint": str(checkpoint), "data": str(data), "judge": judge,
            "clip": None if clip_model is None else clip_model.name, "num": num, "seed": seed,
            "truncation_psi": psi, "device": str(device), "metrics": metrics}


def _clip_metrics(clip: Clip, items: EvalItems, image_embeddings: dict[str, torch.Tensor], distractors: int,
                  seed: int) -> dict:
    """CLIP R-Precision on the frontal views and MSC over all views, from unit image embeddings."""
    sets = distractor_sets(items.captions, items.caption_pool, distractors, np.random.default_rng([seed, 2]))
    texts = sorted({t for s in sets for t in s})
    index = {t: i for i, t in enumerate(texts)}
    text_emb = torch.cat([clip.texts(texts[i:i + 256]).cpu() for i in range(0, len(texts), 256)])
    k = min(len(s) for s in sets)
    if k < 2:
        rp = {"skipped": "the data set has no other evaluation caption to serve as a distractor"}
    else:
        candidates = torch.tensor([[index[t] for t in s[:k]] for s in sets])
        sim = torch.einsum("nd,nkd->nk", image_embeddings["frontal"], text_emb[candidates])
        rp = {"value": 100 * r_precision(sim, torch.zeros(len(sets), dtype=torch.long)), "unit": "percent",
              "distractors": k - 1, "view": "frontal", "clip": clip.name}
    own = text_emb[[index[c] for c in items.captions]]
    per_view = {v: float(clip_score(e, own).mean()) for v, e in image_embeddings.items()}
    msc = {"value": sum(per_view.values()) / len(per_view), "per_view": per_view, "clip": clip.name}
    return {"clip_r_precision": rp, "msc": msc}


# ---- output ---------------------------------------------------------------------------------------

_TITLES = {"fid": "FID", "clip_r_precision": "CLIP R-Precision (%)", "msc": "MSC",
           "attribute_accuracy": "attribute accuracy (%)"}


def format_table(results: dict) -> str:
    """A plain-text table of the metrics, one line per metric (skipped ones with the reason)."""
    lines = [f"{'metric':<24}{'value':>10}  details", "-" * 72]
    for key, title in _TITLES.items():
        m = results["metrics"][key]
        if "skipped" in m:
            lines.append(f"{title:<24}{'skipped':>10}  {m['skipped']}")
            continue
        if key == "fid":
            detail = f"{m['num_real']} real / {m['num_generated']} generated; {m['feature_extractor']}"
        elif key == "clip_r_precision":
            detail = f"top-1 among 1 + {m['distractors']} captions, {m['view']} view; CLIP {m['clip']}"
        elif key == "msc":
            detail = ", ".join(f"{v} {s:.2f}" for v, s in m["per_view"].items()) + f"; CLIP {m['clip']}"
        else:
            detail = f"mean over {len(m['per_attribute'])} mentioned attributes, views {', '.join(m['views'])}"
        lines.append(f"{title:<24}{m['value']:>10.2f}  {detail}")
    if "attribute_accuracy" in results["metrics"] and "per_attribute" in results["metrics"]["attribute_accuracy"]:
        m = results["metrics"]["attribute_accuracy"]
        lines += ["", f"{'attribute':<24}{'accuracy':>10}  mentions"]
        lines += [f"{k:<24}{v:>10.1f}  {m['counts'][k]}" for k, v in m["per_attribute"].items()]
    return "\n".join(lines)


@torch.no_grad()
def discriminator_text_margin(D, text_encoder, data: str, num: int, raw_resolution: int, seed: int = 0,
                              batch: int = 16) -> dict:
    """D(real, own caption) - D(real, another real's caption) over ``num`` real images (batches of
    ``batch``, each image paired with its neighbour's caption; the raw image is the real resized to
    ``raw_resolution``, as training shows reals): the mean margin and the fraction of images whose
    own caption scores higher. A D that ignores the text has margin 0 and fraction ~0.5."""
    from train.sampling import BatchSampler, open_data
    if D.config.text_dim == 0:
        raise ValueError("this discriminator does not read text (text_dim 0): nothing to measure")
    device = next(D.parameters()).device
    sampler = BatchSampler(open_data(data), 1, seed)
    margins = []
    for part in chunks(num, batch):
        reals = sampler.next_reals(len(part), device)
        img = {"image": reals.img, "image_raw": resize(reals.img, raw_resolution)}
        eot = text_encoder(reals.captions).eot.to(device)
        margins.append((D(img, reals.c, eot) - D(img, reals.c, eot.roll(1, 0))).squeeze(1))
    margins = torch.cat(margins)
    return {"images": len(margins), "margin_mean": float(margins.mean()),
            "own_caption_higher": float((margins > 0).float().mean())}


def write_json(results: dict, path) -> None:
    """Write the results atomically."""
    atomic_write(path, json.dumps(results, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["prior"], ["text"]):
        from train.evaluate_world import main as world_main
        return world_main(argv)
    if argv[:1] == ["discriminator"]:
        return _discriminator_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0],
                                epilog="The synthetic world's prior and text-model metrics: "
                                       "`python -m train.evaluate prior --help`, `... text --help`.")
    p.add_argument("checkpoint", help="generator.safetensors (or its folder)")
    p.add_argument("--data", required=True, help="EG3D-layout data set (folder or .zip) with captions.json")
    p.add_argument("--judge", help="attribute classifier .safetensors (attribute accuracy; FID features "
                                   "when Inception weights are absent)")
    p.add_argument("--clip", help="CLIP for R-Precision and MSC: the world's CLIP folder (lit_clip.safetensors), "
                                  "a local open_clip folder, NAME:TAG or NAME:FILE")
    p.add_argument("--num", type=int, default=1000, help="number of real and of generated images (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the item draw, generator seeds and distractors")
    p.add_argument("--psi", type=float, default=1.0, help="truncation psi (default 1: no truncation)")
    p.add_argument("--distractors", type=int, default=DEFAULT_DISTRACTORS,
                   help=f"R-Precision distractor captions per image (default {DEFAULT_DISTRACTORS})")
    p.add_argument("--fid-features", choices=FEATURE_CHOICES, default="auto",
                   help="auto: Inception-v3 if its weights are cached, else the judge")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=16, help="items generated and scored together (default 16)")
    p.add_argument("--out", default="results.json", help="JSON output (default results.json)")
    args = p.parse_args(argv)
    if args.num < 2:
        p.error("--num must be at least 2 (FID needs a covariance)")
    results = evaluate(args.checkpoint, args.data, args.judge, args.clip, args.num, args.seed, args.psi,
                       args.distractors, args.fid_features, args.device, args.batch)
    print(format_table(results))
    write_json(results, args.out)
    print(f"\nwrote {args.out}")
    return results


def _discriminator_main(argv: Sequence[str]) -> dict:
    from dreamportrait.checkpoints import DISCRIMINATOR_FILE
    from dreamportrait.discriminator import DualDiscriminator
    from dreamportrait.pipeline import DreamPortraitPipeline
    p = argparse.ArgumentParser(prog="python -m train.evaluate discriminator",
                                description="Does a text-reading discriminator read the text? Its logit on real "
                                            "images with their own caption minus with another image's.")
    p.add_argument("run", help="run folder of a stage with STAGE.text_discriminator=true (its discriminator, and "
                               "its generator for the text encoder and neural rendering resolution it trained with)")
    p.add_argument("--data", required=True, help="EG3D-layout data set with captions.json (held-out images)")
    p.add_argument("--num", type=int, default=128, help="real images (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON output")
    args = p.parse_args(argv)
    pipe = DreamPortraitPipeline.from_pretrained(args.run)
    if pipe.text_encoder is None:
        raise ValueError(f"{args.run} holds a text-blind generator (a prior run): its discriminator reads no text")
    result = discriminator_text_margin(DualDiscriminator.from_pretrained(Path(args.run) / DISCRIMINATOR_FILE),
                                       pipe.text_encoder, args.data, args.num, pipe.info["neural_resolution"],
                                       args.seed)
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(result, args.out)
    return result


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        sys.exit(f"error: {err}")
