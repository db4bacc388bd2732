"""How much of a caption's attributes the locked text encoder's features carry, beyond the grammar.

The teacher and the generator read captions through all-MiniLM-L6-v2; a caption in held-out
paraphrase words ("raven hair", "sunnies") can only be followed as far as those features place it
near its training-grammar synonyms. This measures that ceiling with the simplest readers: per
attribute, a linear classifier trained on the features of training captions (the attributes each
names, :func:`train.evaluate.mentioned_attributes`), then read on held-out identities' captions and
on the same items' captions in held-out words (:func:`train.evaluate_world.heldout_captions`, the
teacher's and generator's held-out sets). Two readers, one per condition the models get:

- ``pooled``: a linear layer on the global condition (the attention-masked mean of the token
  states, what the generator's semantics mapping reads);
- ``attention``: one learnt query attending over the token states, then a linear layer (the local
  condition, what the teacher's U-Net and the generator's adapters cross-attend to).

Accuracy is :func:`train.evaluate.attribute_accuracy`'s (mean over attributes), so it compares
with the teacher's and the generator's numbers, which also carry their image and judge errors.

    python -m world.text_probe --train data/synthetic-64-12k --heldout data/heldout-ids-64 \
        --out world/text_probe.json
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

import torch
from torch import nn

from dreamportrait.synthetic.attributes import ATTRIBUTES
from dreamportrait.text_encoder import MINILM_NAME, TextEncoder

READERS = ("pooled", "attention")


class Reader(nn.Module):
    """One attribute's classifier over the pooled feature, or over the token states through one
    learnt attention query."""

    def __init__(self, kind: str, width: int, classes: int):
        super().__init__()
        if kind not in READERS:
            raise ValueError(f"reader {kind!r} unknown; choose one of {READERS}")
        self.kind = kind
        self.query = nn.Parameter(torch.randn(width) * width ** -0.5) if kind == "attention" else None
        self.linear = nn.Linear(width, classes)

    def forward(self, pooled: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.query is None:
            return self.linear(pooled)
        tokens = tokens.float()
        weights = (tokens @ self.query).masked_fill(~mask, float("-inf")).softmax(dim=1)
        return self.linear((weights.unsqueeze(-1) * tokens).sum(dim=1))


@torch.no_grad()
def encode(encoder: TextEncoder, captions: Sequence[str], batch: int = 256) -> tuple[torch.Tensor, ...]:
    """(pooled (N, D), token states (N, L, D) in half precision, mask (N, L)), cut to the longest
    caption's length."""
    pooled, tokens, masks = [], [], []
    for start in range(0, len(captions), batch):
        e = encoder(list(captions[start:start + batch]))
        pooled.append(e.eot.float())
        tokens.append(e.tokens.half())
        masks.append(e.mask)
    mask = torch.cat(masks)
    length = int(mask.sum(1).max())
    return torch.cat(pooled), torch.cat(tokens)[:, :length], mask[:, :length]


def fit_readers(features, mentioned: Sequence[dict], kind: str, steps: int = 300, batch: int = 1024,
                lr: float = 1e-2, seed: int = 0) -> dict[str, Reader]:
    """One :class:`Reader` per attribute, trained (Adam, cross-entropy, minibatches) on the
    captions that name it."""
    torch.manual_seed(seed)
    pooled, tokens, mask = features
    readers = {}
    for name in sorted({n for m in mentioned for n in m}):
        values = list(ATTRIBUTES[name])
        rows = torch.tensor([k for k, m in enumerate(mentioned) if name in m])
        labels = torch.tensor([values.index(mentioned[k][name]) for k in rows.tolist()])
        reader = Reader(kind, pooled.shape[1], len(values))
        opt = torch.optim.Adam(reader.parameters(), lr=lr, weight_decay=1e-4)
        for _ in range(steps):
            pick = torch.randint(len(rows), (min(batch, len(rows)),))
            idx = rows[pick]
            loss = nn.functional.cross_entropy(reader(pooled[idx], tokens[idx], mask[idx]), labels[pick])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        readers[name] = reader.eval()
    return readers


@torch.no_grad()
def read(readers: dict[str, Reader], features) -> list[dict[str, str]]:
    """Every attribute's reading of each caption."""
    pooled, tokens, mask = features
    out = [{} for _ in range(len(pooled))]
    for name, reader in readers.items():
        values = list(ATTRIBUTES[name])
        for row, k in zip(out, reader(pooled, tokens, mask).argmax(1).tolist()):
            row[name] = values[k]
    return out


def training_captions(path: str, identities: int) -> tuple[list[str], list[dict]]:
    """Every caption of the data set's first ``identities`` identities and the attributes each
    names (captions and attributes only: no image is decoded)."""
    from train.data import PortraitDataset
    from train.evaluate import mentioned_attributes
    ds = PortraitDataset(path, train=False)
    if ds.attributes is None:
        raise ValueError(f"{path} has no attributes.json; the probe needs a synthetic-world data set "
                         "(python -m dreamportrait.synthetic)")
    captions, mentioned = [], []
    for name, texts in list(zip(ds.names, ds.captions))[:identities]:
        truth = ds.attributes[name]["attributes"]
        captions += texts
        mentioned += [mentioned_attributes(c, truth) for c in texts]
    return captions, mentioned


def probe(encoder: TextEncoder, train_path: str, heldout_path: str, identities: int = 1500, num: int = 200,
          steps: int = 300, seed: int = 0) -> dict:
    """Both readers' accuracy on the held-out items' captions and on their held-out-word captions."""
    from train.evaluate import attribute_accuracy, load_items
    from train.evaluate_world import heldout_captions
    captions, mentioned = training_captions(train_path, identities)
    train_features = encode(encoder, captions)
    items = load_items(heldout_path, num, seed)
    paraphrased = heldout_captions(items, seed)
    sets = {"heldout_captions": (list(items.captions), list(items.mentioned)),
            "heldout_words": ([c for _, c, _ in paraphrased], [m for _, _, m in paraphrased])}
    features = {key: encode(encoder, texts) for key, (texts, _) in sets.items()}
    results = {"encoder": encoder.describe().get("name", "?"), "train_captions": len(captions), "num": num,
               "steps": steps, "readers": {}}
    for kind in READERS:
        readers = fit_readers(train_features, mentioned, kind, steps=steps, seed=seed)
        results["readers"][kind] = {key: attribute_accuracy(read(readers, features[key]), want)
                                    for key, (_, want) in sets.items()}
    return results


def format_table(results: dict) -> str:
    rows = ["| reader | held-out captions | held-out paraphrase words |", "|---|---:|---:|"]
    for kind, entry in results["readers"].items():
        rows.append(f"| {kind} | {100 * entry['heldout_captions']['mean']:.1f} % | "
                    f"{100 * entry['heldout_words']['mean']:.1f} % |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m world.text_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True, help="synthetic-world training data set (its captions)")
    ap.add_argument("--heldout", required=True, help="held-out synthetic-world data set")
    ap.add_argument("--text", default=MINILM_NAME, help="the locked text encoder: all-MiniLM-L6-v2's name or folder")
    ap.add_argument("--identities", type=int, default=1500, help="training identities whose captions train the readers")
    ap.add_argument("--num", type=int, default=200, help="held-out items (as the teacher's evaluation)")
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps per attribute reader")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="JSON file for the results")
    args = ap.parse_args(argv)
    for path in (args.train, args.heldout):
        if not os.path.exists(path):
            ap.error(f"data set {path} not found; write it with `python -m dreamportrait.synthetic --out {path} ...`")
    results = probe(TextEncoder.from_minilm(args.text), args.train, args.heldout, args.identities, args.num,
                    args.steps, args.seed)
    print(format_table(results))
    if args.out:
        from dreamportrait.checkpoints import atomic_write
        atomic_write(args.out, json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
