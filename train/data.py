"""The training data set: EG3D-layout images with camera labels and captions.

Reads a folder or an (uncompressed or deflated) zip holding

- images (any PIL-readable RGB, square, all of one size) at the paths ``dataset.json`` names;
- ``dataset.json``: ``{"labels": [[relative/path.png, [25 floats]], ...]}``: EG3D's layout, as
  written by EG3D's dataset_tool.py or ``python -m dreamportrait.synthetic``;
- a captions file (default ``captions.json``): ``{relative/path.png: [caption, ...]}``, as the
  synthetic world writes it or as prepared for CelebAText-HQ / FFHQ-Text after EG3D's cropping;
- optionally an attributes file (default ``attributes.json``, used when present).

Each item is ``{"image": (3, R, R) float32 in [-1, 1], "label": (25,) float32, "caption": str,
"index": int}``. In training mode the caption is drawn at random from the image's captions by a
generator seeded with (seed, epoch, index), so it is reproducible and identical in every
DataLoader worker; call :meth:`PortraitDataset.set_epoch` each epoch. In evaluation mode it is
always the first caption (the paper samples a caption in training and fixes one for evaluation).

Multi-process training: either give each rank its own strided shard with ``rank`` and
``world_size`` (items ``rank, rank + world_size, ...``), or keep the defaults and let a
``torch.utils.data.DistributedSampler`` shard the indices; do not combine the two.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

LABEL_DIM = 25


class DatasetError(ValueError):
    """A data set on disk is missing something or is malformed."""


class _Source:
    """Files of a data set folder or zip (the zip is reopened in each worker process)."""

    def __init__(self, path: Path):
        self.path = path
        self.is_zip = path.is_file()
        if self.is_zip and not zipfile.is_zipfile(path):
            raise DatasetError(f"{path} is a file but not a zip archive; pass a data set folder or .zip")
        if not path.exists():
            raise DatasetError(f"data set {path} does not exist; write one with "
                               "`python -m dreamportrait.synthetic --out DIR --num N`")
        self._zip, self._pid = None, None
        self.names = set(self._archive().namelist()) if self.is_zip else None

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            self._zip, self._pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def exists(self, name: str) -> bool:
        return name in self.names if self.is_zip else (self.path / name).is_file()

    def read(self, name: str) -> bytes:
        return self._archive().read(name) if self.is_zip else (self.path / name).read_bytes()

    def json(self, name: str, what: str):
        if not self.exists(name):
            raise DatasetError(f"{self.path} has no {name} ({what})")
        try:
            return json.loads(self.read(name))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{self.path}/{name} is not valid JSON: {e}") from e

    def __getstate__(self):
        return {**self.__dict__, "_zip": None, "_pid": None}


def _parse_labels(raw, where: str) -> list[tuple[str, list[float]]]:
    if not isinstance(raw, dict) or not isinstance(raw.get("labels"), list):
        raise DatasetError(f"{where}: expected {{\"labels\": [[name, [25 floats]], ...]}}")
    out = []
    for k, entry in enumerate(raw["labels"]):
        ok = (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)
              and isinstance(entry[1], (list, tuple)) and len(entry[1]) == LABEL_DIM
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in entry[1]))
        if not ok:
            raise DatasetError(f"{where}: entry {k} ({str(entry)[:80]}) is not [name, [25 numbers]]; "
                               "camera labels are EG3D's 16 cam2world + 9 intrinsics values")
        out.append((entry[0].replace("\\", "/"), [float(v) for v in entry[1]]))
    if not out:
        raise DatasetError(f"{where}: no labelled images")
    return out


class PortraitDataset(torch.utils.data.Dataset):
    """Images, 25-d EG3D camera labels and captions of an EG3D-layout data set (see module doc)."""

    def __init__(self, path: str | os.PathLike, captions: str = "captions.json",
                 attributes: str | None = "attributes.json", train: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.source = _Source(Path(path))
        entries = _parse_labels(self.source.json("dataset.json", "EG3D camera labels"),
                                f"{path}/dataset.json")
        missing = [name for name, _ in entries if not self.source.exists(name)]
        if missing:
            raise DatasetError(f"{len(missing)} image(s) listed in {path}/dataset.json are missing, "
                               f"e.g. {missing[:3]}")
        caps = self.source.json(captions, "captions: {image: [caption, ...]}")
        if not isinstance(caps, dict):
            raise DatasetError(f"{path}/{captions} must map image names to lists of captions")
        bad = [name for name, _ in entries
               if not (isinstance(caps.get(name), list) and caps[name] and all(isinstance(c, str) and c for c in caps[name]))]
        if bad:
            raise DatasetError(f"{len(bad)} image(s) have no captions (a non-empty list of strings) in "
                               f"{path}/{captions}, e.g. {bad[:3]}")
        self.attributes = None
        if attributes is not None and (self.source.exists(attributes) or attributes != "attributes.json"):
            attrs = self.source.json(attributes, "ground-truth attributes")
            lacking = [name for name, _ in entries if name not in attrs]
            if lacking:
                raise DatasetError(f"{len(lacking)} image(s) have no entry in {path}/{attributes}, e.g. {lacking[:3]}")
            self.attributes = {name: attrs[name] for name, _ in entries}
        entries = entries[rank::world_size]
        self.names = [name for name, _ in entries]
        self.labels = torch.tensor([label for _, label in entries], dtype=torch.float32)
        self.captions = [list(caps[name]) for name in self.names]
        self.train, self.seed, self.epoch = train, seed, 0
        self.resolution = self._decode(0).shape[-1]

    def __len__(self) -> int:
        return len(self.names)

    def set_epoch(self, epoch: int) -> None:
        """Training mode draws a fresh caption per image each epoch."""
        self.epoch = int(epoch)

    def caption(self, i: int) -> str:
        """The caption of item i: the first one in evaluation mode, a seeded draw in training."""
        caps = self.captions[i]
        if not self.train:
            return caps[0]
        return caps[int(np.random.default_rng([self.seed, self.epoch, i]).integers(len(caps)))]

    def _decode(self, i: int) -> torch.Tensor:
        name = self.names[i]
        try:
            with Image.open(io.BytesIO(self.source.read(name))) as im:
                array = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise DatasetError(f"cannot read image {name} of {self.source.path}: {e}") from e
        if array.shape[0] != array.shape[1]:
            raise DatasetError(f"image {name} is {array.shape[1]}x{array.shape[0]}; EG3D data sets are square")
        if hasattr(self, "resolution") and array.shape[0] != self.resolution:
            raise DatasetError(f"image {name} is {array.shape[0]}x{array.shape[0]} but the data set's first "
                               f"image is {self.resolution}x{self.resolution}")
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def uint8_images(self) -> torch.Tensor:
        """Every image, decoded once: (N, 3, R, R) uint8 (small data sets held in memory)."""
        return torch.stack([self._decode(i) for i in range(len(self))])

    def __getitem__(self, i: int) -> dict:
        image = self._decode(i).to(torch.float32) / 127.5 - 1.0
        return {"image": image, "label": self.labels[i].clone(), "caption": self.caption(i), "index": i}
