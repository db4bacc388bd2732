"""The files of one training run: DreamPortrait's stages and the synthetic world's models alike.

A run folder holds ``config.json``, ``state.pt`` (everything needed to continue: weights,
optimisers, images seen, steps and every process's RNG state), ``log.jsonl`` (one line per
logged step), tensorboard scalars and images, and ``samples/`` (PNG grids). ``state.pt`` is
replaced atomically, so a run killed at any moment continues from its last checkpoint with
``resume=True`` as if it had never stopped. It holds only tensors, numbers, strings, lists, tuples
and dicts, and is loaded with ``weights_only=True``: opening it never unpickles other objects
(which could run code), and :meth:`RunFiles.save` refuses anything else.

Under ``torchrun`` every rank opens the run: rank 0 writes the files, :meth:`RunFiles.save` is
collective (each rank's RNG state and ``rank_state`` are gathered into the one file) and a
resumed rank gets its own back.
"""
from __future__ import annotations

import json
import pickle
import random
import re
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dreamportrait.checkpoints import atomic_file, atomic_write
from dreamportrait.grid import make_grid, save_png

STATE_FILE = "state.pt"
PLAIN_VALUES = (str, int, float, bool, type(None))  # with tensors, lists, tuples and dicts: what state.pt holds


def rng_state() -> dict:
    """This process's global RNG states: torch (and CUDA), numpy (its key as a tensor), Python."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_plain(value, where: str = "state") -> None:
    """Raise TypeError unless ``value`` is made of tensors, numbers, strings, None, lists, tuples and
    dicts only: what ``torch.load(..., weights_only=True)`` reads back."""
    if isinstance(value, torch.Tensor) or type(value) in PLAIN_VALUES:
        return
    if type(value) in (dict, OrderedDict):
        for k, v in value.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where} has a key {k!r} of type {type(k).__name__}; use str or int keys")
            check_plain(v, f"{where}[{k!r}]")
    elif type(value) in (list, tuple):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
    else:
        raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__name__}; {STATE_FILE} holds only "
                        "tensors, numbers, strings, lists, tuples and dicts (it is loaded without unpickling "
                        "other objects): convert it, e.g. an array with torch.from_numpy, a config with json.dumps")


def changed_settings(saved: dict, config: dict, defaults: dict, prefix: str = "") -> list[str]:
    """Dotted names of the settings in which ``config`` differs from ``saved``; a setting missing
    from ``saved`` whose value in ``config`` equals its entry in ``defaults`` is unchanged."""
    changed = []
    for key in sorted(set(saved) | set(config)):
        name = f"{prefix}{key}"
        old, new, default = saved.get(key), config.get(key), defaults.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += changed_settings(old, new, default if isinstance(default, dict) else {}, f"{name}.")
        elif key not in saved and key in defaults and new == default:
            continue
        elif old != new or (key in saved) != (key in config):
            changed.append(name)
    return changed


class RunFiles:
    """Create or resume a run folder; count, log, save and restore. ``total`` is the images to train on.

    On resume, ``state`` is what was passed to :meth:`save` on rank 0, ``rank_state`` this rank's
    ``rank_state``, and the global RNGs are restored.

    A resumed run must have the saved settings, with one allowance: ``defaults`` (the settings'
    defaults, same layout) lets a setting that the saved run predates count as unchanged while it
    is at its default (a new option's default is the behaviour the code had before it)."""

    def __init__(self, run_dir: str | Path, config: dict, total: int, resume: bool = False,
                 progress: bool = True, desc: str = "train", defaults: dict | None = None):
        self.dir = Path(run_dir)
        self.state_path = self.dir / STATE_FILE
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.is_main = self.rank == 0
        self.state, self.rank_state = None, {}
        if self.state_path.exists() and not resume:
            raise FileExistsError(f"{self.dir} already holds a run ({STATE_FILE}); pass --resume to continue it "
                                  "or choose a new --run-dir")
        if resume:
            self._resume(config, defaults or {})
        self.nimg = self.state["nimg"] if self.state else 0
        self.steps = self.state["steps"] if self.state else 0
        self.total = total
        self.t0, self.n0 = time.time(), self.nimg
        self.log_file = self.tb = self.bar = None
        if not self.is_main:
            return
        atomic_write(self.dir / "config.json", json.dumps(config, indent=1))
        self.log_file = open(self.dir / "log.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.dir / "tensorboard"))
        except ImportError:
            self.tb = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=self.nimg, unit="img", unit_scale=True, desc=desc)

    def _resume(self, config: dict, defaults: dict) -> None:
        if not self.state_path.exists():
            raise FileNotFoundError(f"--resume: no {STATE_FILE} in {self.dir}; start without --resume")
        saved = json.loads((self.dir / "config.json").read_text())
        changed = changed_settings(saved, json.loads(json.dumps(config)), json.loads(json.dumps(defaults)))
        if changed:
            raise ValueError(f"--resume: the settings differ from the run in {self.dir} ({changed}); "
                             "resume with the same settings or start a new --run-dir")
        try:
            self.state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            raise ValueError(f"--resume: {self.state_path} holds objects other than tensors, numbers, strings, "
                             f"lists and dicts ({found[1] if found else err}); they are not loaded, as unpickling "
                             "them could run code. It was not written by RunFiles.save: start a new --run-dir") from None
        ranks = self.state.pop("ranks")
        if len(ranks) != self.world_size:
            raise ValueError(f"--resume: {self.dir} was saved by {len(ranks)} process(es), this run has "
                             f"{self.world_size}; resume with the same number of processes")
        self.rank_state = ranks[self.rank]
        set_rng_state(self.rank_state.pop("rng"))

    @property
    def done(self) -> bool:
        return self.nimg >= self.total

    def images_per_second(self) -> float:
        return (self.nimg - self.n0) / max(time.time() - self.t0, 1e-9)

    def crossed(self, every_kimg: float, before: int) -> bool:
        """Whether the last step crossed a multiple of ``every_kimg`` thousand images (counting from
        ``before``, the images seen before it), or ended the run: when to snapshot or draw samples."""
        every = max(int(every_kimg * 1000), 1)
        return self.nimg // every > before // every or self.done

    def step(self, batch: int, stats: dict, log: bool = True) -> None:
        """Count one step of ``batch`` images; log ``stats`` (floats) against images seen."""
        self.nimg += batch
        self.steps += 1
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.update(batch)
            self.bar.set_postfix_str(" ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in stats.items()))
        if not log:
            return
        rec = {"step": self.steps, "nimg": self.nimg, "sec": round(time.time() - self.t0, 2),
               "img_per_s": round(self.images_per_second(), 2), **stats}
        self.log_file.write(json.dumps(rec) + "\n")
        self.log_file.flush()
        if self.tb is not None:
            for k, v in stats.items():
                self.tb.add_scalar(k, v, self.nimg)

    def image_grid(self, name: str, images: torch.Tensor, nrow: int) -> Path | None:
        """Save images in [-1, 1] (B, 3, H, W), ``nrow`` to a row, as ``samples/{name}-{nimg}.png`` and to
        tensorboard (rank 0)."""
        if not self.is_main:
            return None
        grid = make_grid(images, nrow)
        path = save_png(grid, self.dir / "samples" / f"{name}-{self.nimg:09d}.png")
        if self.tb is not None:
            self.tb.add_image(name, grid, self.nimg, dataformats="HWC")
        return path

    def save(self, state: dict, rank_state: dict | None = None) -> None:
        """Atomically write ``state`` (rank 0's) plus images seen, steps and every rank's RNG state and
        ``rank_state`` as the run's checkpoint. Collective under torchrun: every rank calls it.
        Both may hold tensors, numbers, strings, lists, tuples and dicts only (TypeError otherwise)."""
        own = {"rng": rng_state(), **(rank_state or {})}
        check_plain(state)
        check_plain(own, "rank_state")
        ranks = [own]
        if self.world_size > 1:
            ranks = [None] * self.world_size
            dist.all_gather_object(ranks, own)
        if self.is_main:
            with atomic_file(self.state_path) as tmp:
                torch.save({**state, "nimg": self.nimg, "steps": self.steps, "ranks": ranks}, tmp)

    def close(self) -> None:
        for f in (self.log_file, self.tb, self.bar):
            if f is not None:
                f.close()
