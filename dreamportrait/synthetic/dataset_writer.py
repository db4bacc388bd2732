"""Write synthetic portraits in EG3D's data set layout, deterministically for a seed.

Layout (a folder, or the same entries in an uncompressed zip like EG3D's dataset_tool):

- ``00000/img00000000.png`` ...: RGB images, ``views`` consecutive images per identity;
- ``dataset.json``: ``{"labels": [[name, [25 floats]], ...]}`` (EG3D camera labels);
- ``captions.json``: ``{name: [10 captions]}`` (all views of an identity share its captions);
- ``attributes.json``: ``{name: {"identity", "identity_seed", "view", "yaw", "pitch",
  "attributes"}}`` (ground truth; ``Identity.from_seed(identity_seed)`` rebuilds the head);
- ``synthetic.json``: the generation settings and the held-out attribute combinations (written
  first, so an unfinished folder says what it was becoming).

``split='train'`` keeps only identities without a held-out combination, ``'heldout'`` only
identities with one, ``'all'`` everything; train and held-out sets of one seed never share an
identity. Use another seed for held-out identities of the training distribution.

A folder output is complete once ``dataset.json`` exists (it is written last). An unfinished one
(a killed job) continues with ``resume=True`` (``--resume``): the same settings are required, the
batches whose images are all there are not rendered again, and since every file is written
atomically and deterministically the result is byte for byte that of an uninterrupted run.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import zipfile
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..checkpoints import atomic_file, atomic_write
from ..grid import to_uint8
from .attributes import HELDOUT_COMBINATIONS, Identity, sample_identities
from .cameras import sample_labels
from .captions import make_captions
from .render import HeadBatch, render

FORMAT_VERSION = 1
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed entry time: identical bytes for identical content


def image_name(index: int) -> str:
    """EG3D dataset_tool's naming: 1000 images per folder."""
    return f"{index // 1000:05d}/img{index:08d}.png"


def identity_views(identity: Identity, views: int, radius_jitter: float = 0.0,
                   pivot_jitter: float = 0.0) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The ``views`` camera labels of an identity (drawn from its seed), with yaw and pitch."""
    return sample_labels(np.random.default_rng([identity.seed, 3]), views, radius_jitter, pivot_jitter)


def _png(image: np.ndarray, compress_level: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def _check_resumable(path: Path, settings: dict) -> None:
    """An unfinished folder of the same settings, or a clear error."""
    if not path.is_dir():
        raise FileNotFoundError(f"--resume: {path} is not a folder; resume continues an unfinished folder output")
    if (path / "dataset.json").exists():
        raise FileExistsError(f"--resume: {path} is a complete data set already (it has dataset.json)")
    if not (path / "synthetic.json").exists():
        raise FileExistsError(f"--resume: {path} has no synthetic.json, so its settings are unknown (written by "
                              "an older version, or not a data set): render into a new --out")
    found = json.loads((path / "synthetic.json").read_text())
    if found != settings:
        diff = {k: (found.get(k), settings.get(k)) for k in set(found) | set(settings) if found.get(k) != settings.get(k)}
        raise ValueError(f"--resume: {path} was started with other settings (found, asked): {diff}; "
                         "give the same options, or render into a new --out")


@contextmanager
def _folder_sink(path: Path, settings: dict, resume: bool):
    """``add(name, data)`` into a folder, each file atomically; the caller writes dataset.json last,
    so a folder without dataset.json is an unfinished data set."""
    if resume:
        _check_resumable(path, settings)
    elif path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"output {path} exists and is not an empty folder; choose a new --out, or pass "
                              "--resume to continue an unfinished one")
    path.mkdir(parents=True, exist_ok=True)
    yield lambda name, data: atomic_write(path / name, data)


@contextmanager
def _zip_sink(path: Path, settings: dict, resume: bool):
    """``add(name, data)`` into an uncompressed zip, written to a temporary file and renamed into
    place when complete (removed on an error)."""
    if resume:
        raise ValueError("--resume continues folder outputs only; a zip is written whole (render it again)")
    if path.exists():
        raise FileExistsError(f"output {path} exists; choose a new --out")
    with atomic_file(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        yield lambda name, data: archive.writestr(zipfile.ZipInfo(name, date_time=_ZIP_TIME), data)


def _render_batch(identities: list[Identity], labels: torch.Tensor, resolution: int) -> np.ndarray:
    return to_uint8(render(HeadBatch(identities), labels, resolution)["rgb"], value_range=(0, 1))


def single_thread_worker(*_worker_id) -> None:
    """Initialiser of a rendering worker process (a Pool's, or a DataLoader's with its worker id):
    one thread each, so that several workers do not oversubscribe the cores."""
    torch.set_num_threads(1)


def _json(obj) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=False).encode()


def write_dataset(out: str | Path, num: int, resolution: int = 64, seed: int = 0, views: int = 1,
                  split: str = "train", zip_output: bool = False, batch: int = 64,
                  radius_jitter: float = 0.0, pivot_jitter: float = 0.0, progress: bool = True,
                  workers: int = 0, resume: bool = False) -> Path:
    """Render ``num`` identities x ``views`` images at ``resolution`` into ``out``; returns the path.

    With ``zip_output`` (or an ``out`` ending in .zip) the data set is one uncompressed zip.
    ``workers`` > 0 renders batches in that many single-threaded processes (robust on a busy
    machine, where multi-threaded torch slows down badly); 0 renders here with torch's
    threads. Batches are the same either way, so the bytes written are too. ``resume`` continues
    an unfinished folder written with the same settings (see the module's documentation).
    """
    if num < 1 or views < 1 or resolution < 1 or batch < 1 or workers < 0:
        raise ValueError(f"num, views, resolution and batch must be >= 1 and workers >= 0 (got {num}, "
                         f"{views}, {resolution}, {batch}, {workers})")
    out = Path(out)
    if zip_output and out.suffix != ".zip":
        out = out.with_name(out.name + ".zip")
    zipped = out.suffix == ".zip"
    settings = {"format_version": FORMAT_VERSION, "generator": "dreamportrait.synthetic",
                "num_identities": num, "views": views, "resolution": resolution, "seed": seed,
                "split": split, "radius_jitter": radius_jitter, "pivot_jitter": pivot_jitter, "batch": batch,
                "heldout_combinations": [[list(p) for p in pair] for pair in HELDOUT_COMBINATIONS]}
    with (_zip_sink if zipped else _folder_sink)(out, settings, resume) as add:
        if not resume:
            add("synthetic.json", _json(settings))
        identities = sample_identities(seed, num, split)
        jobs = []  # (image index, identity index, view, label, yaw, pitch)
        for j, ident in enumerate(identities):
            labels, yaw, pitch = identity_views(ident, views, radius_jitter, pivot_jitter)
            for v in range(views):
                jobs.append((j * views + v, j, v, labels[v], float(yaw[v]), float(pitch[v])))
        dataset, captions, attributes = [], {}, {}
        chunks = [jobs[start:start + batch] for start in range(0, len(jobs), batch)]
        done = [resume and all((out / image_name(job[0])).is_file() for job in chunk) for chunk in chunks]
        tasks = [([identities[job[1]] for job in chunk], torch.stack([job[3] for job in chunk]), resolution)
                 for chunk, skip in zip(chunks, done) if not skip]
        pool = None
        if workers:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=single_thread_worker)
        try:
            rendered = iter(pool.map(_render_batch, *zip(*tasks)) if pool and tasks else
                            (_render_batch(*t) for t in tasks))
            with tqdm(total=len(jobs), unit="img", desc=f"rendering {out.name}", disable=not progress) as bar:
                for chunk, skip in zip(chunks, done):
                    images = [None] * len(chunk) if skip else next(rendered)
                    for (index, j, v, label, yaw, pitch), image in zip(chunk, images):
                        name = image_name(index)
                        if image is not None:
                            add(name, _png(image, 0 if zipped else 6))
                        dataset.append([name, [float(x) for x in label]])
                        ident = identities[j]
                        captions[name] = make_captions(ident)
                        attributes[name] = {"identity": j, "identity_seed": ident.seed, "view": v,
                                            "yaw": yaw, "pitch": pitch, "attributes": ident.attributes}
                    bar.update(len(chunk))
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)
        add("captions.json", _json(captions))
        add("attributes.json", _json(attributes))
        add("dataset.json", _json({"labels": dataset}))
    return out
