"""The files of one training run of the synthetic world's models (judge, CLIP, teacher).

A run folder holds ``config.json``, ``state.pt`` (everything needed to continue: weights,
optimiser, RNG, images seen), ``log.jsonl`` (one line per logged step), tensorboard scalars and
images, and ``samples/`` (PNG grids). ``state.pt`` is replaced atomically, so a run killed at any
moment resumes from its last checkpoint with ``resume=True``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from train.loop import rng_state, save_state_atomic, set_rng_state

STATE_FILE = "state.pt"


class RunFiles:
    """Create or resume a run folder; log, save and restore. ``total`` is the images to train on."""

    def __init__(self, run_dir: str | Path, config: dict, total: int, resume: bool = False,
                 progress: bool = True, desc: str = "train"):
        self.dir = Path(run_dir)
        self.state_path = self.dir / STATE_FILE
        self.state = None
        if self.state_path.exists() and not resume:
            raise FileExistsError(f"{self.dir} already holds a run ({STATE_FILE}); pass --resume to continue it "
                                  "or choose a new --run-dir")
        if resume:
            if not self.state_path.exists():
                raise FileNotFoundError(f"--resume: no {STATE_FILE} in {self.dir}; start without --resume")
            saved = json.loads((self.dir / "config.json").read_text())
            if saved != json.loads(json.dumps(config)):
                changed = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
                raise ValueError(f"--resume: the settings differ from the run in {self.dir} ({changed}); "
                                 "resume with the same settings or start a new --run-dir")
            self.state = torch.load(self.state_path, map_location="cpu", weights_only=False)
            set_rng_state(self.state["rng"])
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.json").write_text(json.dumps(config, indent=1))
        self.nimg = self.state["nimg"] if self.state else 0
        self.total = total
        self.log_file = open(self.dir / "log.jsonl", "a")
        self.t0, self.n0 = time.time(), self.nimg
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.dir / "tensorboard"))
        except ImportError:
            self.tb = None
        self.bar = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=self.nimg, unit="img", unit_scale=True, desc=desc)

    @property
    def done(self) -> bool:
        return self.nimg >= self.total

    def images_per_second(self) -> float:
        return (self.nimg - self.n0) / max(time.time() - self.t0, 1e-9)

    def step(self, batch: int, stats: dict, log: bool = True) -> None:
        """Count ``batch`` images seen; log ``stats`` (floats) against images seen."""
        self.nimg += batch
        if self.bar is not None:
            self.bar.update(batch)
            self.bar.set_postfix_str(" ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in stats.items()))
        if not log:
            return
        rec = {"nimg": self.nimg, "sec": round(time.time() - self.t0, 2),
               "img_per_s": round(self.images_per_second(), 2), **stats}
        self.log_file.write(json.dumps(rec) + "\n")
        self.log_file.flush()
        if self.tb is not None:
            for k, v in stats.items():
                self.tb.add_scalar(k, v, self.nimg)

    def image_grid(self, name: str, images: torch.Tensor, nrow: int) -> Path:
        """Save images in [-1, 1] (B, 3, H, W) as ``samples/{name}-{nimg}.png`` and to tensorboard."""
        from torchvision.utils import make_grid
        from PIL import Image
        grid = make_grid(((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu(),
                         nrow=nrow, padding=1)
        path = self.dir / "samples" / f"{name}-{self.nimg:09d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
        if self.tb is not None:
            self.tb.add_image(name, grid, self.nimg)
        return path

    def save(self, state: dict) -> None:
        """Atomically write ``state`` plus images seen and RNG state as the run's checkpoint."""
        save_state_atomic(self.state_path, {**state, "nimg": self.nimg, "rng": rng_state()})

    def close(self) -> None:
        self.log_file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
