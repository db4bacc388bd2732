"""The app's handlers as plain Python: input checks, per-session state, images and files for display.

``app.py`` only lays out the page and wires events to :class:`AppBackend` methods, so tests and
scripts call the same handlers directly, without a browser. Every method takes plain values
(strings, numbers) and returns numpy images, file paths and Markdown captions. Bad input raises
:class:`InputError` whose message names the problem and the fix; soft problems (a prompt cut to
the context length) go to the ``warn`` callback. Per-session state (the current portrait's cached
tri-planes and style codes, and the session's files) lives in a bounded :class:`SessionStore`:
the least recently used session is evicted when it is full, and ``close_session`` frees one when
its page closes.
"""
from __future__ import annotations

import atexit
import contextlib
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .checkpoints import GENERATOR_FILE
from .grid import make_grid, to_uint8
from .mesh import DEFAULT_THRESHOLD, extract_mesh
from .pipeline import MAX_SEED, DreamPortraitPipeline, Portrait, check_seed
from .video import orbit_video, write_video

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS_DIR = REPO_ROOT / "checkpoints"
DEFAULT_MODEL_NAME = "default"  # checkpoints/default/generator.safetensors wins over other folders
EXAMPLE_PROMPTS_FILE = REPO_ROOT / "assets" / "example_prompts.txt"

YAW_LIMIT, PITCH_LIMIT = 60.0, 30.0      # degrees either side of the frontal view
PSI_RANGE = (0.0, 1.0)
MAX_PROMPT_CHARS = 1000                  # far beyond the 75 tokens CLIP reads; guards the tokenizer
MAX_MIX_PROMPTS = 8
STRIP_STEPS = (2, 10)
VIDEO_FRAMES = (2, 240)
VIDEO_FPS = 30
MESH_MIN_RESOLUTION = 16
DISPLAY_MIN_SIZE = 512                   # small renders are enlarged (nearest neighbour) to at least this
VIDEO_MIN_SIZE = 256

Warn = Callable[[str], None]
Progress = Callable[[float, str], None]

TRAIN_HINT = ("train one with `python -m train --preset synthetic-tiny --stage prior`, then `--stage stage1` "
              "(each stage writes runs/synthetic-tiny/STAGE/generator.safetensors), copy that folder to "
              f"checkpoints/{DEFAULT_MODEL_NAME}/, or point --checkpoint at a generator.safetensors file or "
              "its folder")


class InputError(ValueError):
    """Bad input from a user; the message names the problem and the fix."""


class StartupError(RuntimeError):
    """The app cannot start (e.g. no usable model); the message is one paragraph for the console."""


# Loading -------------------------------------------------------------------------------------

def find_default_checkpoint(root: Path = CHECKPOINTS_DIR) -> Path:
    """The model the app runs without --checkpoint: ``root/default/``, else ``root/generator.safetensors``,
    else the first folder under ``root`` (by name) holding a generator.safetensors."""
    for candidate in (root / DEFAULT_MODEL_NAME / GENERATOR_FILE, root / GENERATOR_FILE):
        if candidate.is_file():
            return candidate.parent
    folders = sorted(p.parent for p in root.glob(f"*/{GENERATOR_FILE}")) if root.is_dir() else []
    if not folders:
        raise StartupError(f"DreamPortrait found no model in {root} (it looks for {root}/*/{GENERATOR_FILE}). "
                           f"To fix this, {TRAIN_HINT}.")
    return folders[0]


def load_pipeline(checkpoint: str | Path | None, device: str | None = None) -> DreamPortraitPipeline:
    """The pipeline for ``checkpoint`` (None: :func:`find_default_checkpoint`) on ``device`` (None: CUDA if
    present, else CPU); any failure becomes one :class:`StartupError` paragraph naming the file."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = Path(checkpoint) if checkpoint is not None else find_default_checkpoint()
    file = path / GENERATOR_FILE if path.is_dir() or path.suffix != ".safetensors" else path
    if not file.is_file():
        raise StartupError(f"DreamPortrait could not load its model: {file} does not exist. To fix this, {TRAIN_HINT}.")
    try:
        return DreamPortraitPipeline.from_pretrained(file, device=device)
    except Exception as exc:  # any failure to build the model: report it in one paragraph, not a traceback
        reason = str(exc).rstrip(".")
        raise StartupError(f"DreamPortrait could not load its model from {file} on device {device!r}: {reason}. "
                           f"To fix this, check the file and the --device flag, or {TRAIN_HINT}.") from exc


def model_name(info: dict) -> str:
    """A model's display name: its ``name`` metadata, else its folder (for generator.safetensors) or file stem."""
    if info.get("name"):
        return str(info["name"])
    file = Path(info.get("file", "model"))
    return file.parent.name if file.name == GENERATOR_FILE and file.parent.name else file.stem


def describe_model(pipeline: DreamPortraitPipeline) -> str:
    """One Markdown line saying which model runs: name, training images seen, resolution, device."""
    info = pipeline.info
    kimg = info.get("kimg_total", info.get("kimg"))  # all training stages; older files carry only kimg
    seen = f"{float(kimg):g} kimg ({float(kimg) * 1000:,.0f} training images seen)" if kimg is not None \
        else "training images seen: unknown"
    res, nr = info.get("resolution"), info.get("neural_resolution")
    extra = " · ".join(f"{k} `{info[k]}`" for k in ("stage", "train_preset") if info.get(k))
    text = "" if pipeline.text_conditioned else " · **not text-conditioned: prompts are ignored**"
    return (f"**Model** `{model_name(info)}` · {seen} · output **{res}×{res}** px (neural render {nr}×{nr})"
            f"{' · ' + extra if extra else ''} · device `{pipeline.device}`{text}")


def read_example_prompts(path: Path = EXAMPLE_PROMPTS_FILE) -> list[str]:
    """Example prompts, one per line (blank lines skipped); none if the file is absent."""
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# Input checks ----------------------------------------------------------------------------------

def parse_seed(value, name: str = "seed") -> int:
    """A seed from a number or text, or an :class:`InputError` naming the field and the valid range."""
    if isinstance(value, str):
        value = value.strip()
    try:
        return check_seed(value)
    except ValueError as exc:
        raise InputError(f"{name}: {exc}") from None


def parse_number(value, name: str, low: float, high: float) -> float:
    """A float within [low, high], or an :class:`InputError` saying the allowed range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number between {low:g} and {high:g}, got {value!r}") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise InputError(f"{name} is {number:g}, outside the allowed range: use a value between {low:g} and {high:g}")
    return number


def parse_int(value, name: str, low: int, high: int, hint: str = "") -> int:
    """A whole number within [low, high] (``hint`` explains the bound), or an :class:`InputError`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not number.is_integer():
        raise InputError(f"{name} must be a whole number between {low} and {high}, got {value!r}")
    if not low <= number <= high:
        raise InputError(f"{name} {int(number)} is outside the allowed range: choose between {low} and {high}{hint}")
    return int(number)


def check_prompt(prompt) -> str:
    """A non-empty prompt of bounded length, stripped."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("The prompt is empty: describe the portrait, e.g. 'A young woman with long blond hair.'")
    prompt = prompt.strip()
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"The prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS} and the "
                         "model reads only its first 75 tokens (a few hundred characters): shorten it")
    return prompt


def check_camera(yaw, pitch) -> tuple[float, float]:
    return (parse_number(yaw, "yaw", -YAW_LIMIT, YAW_LIMIT), parse_number(pitch, "pitch", -PITCH_LIMIT, PITCH_LIMIT))


# Images ---------------------------------------------------------------------------------------

def display_scale(size: int, min_size: int = DISPLAY_MIN_SIZE) -> int:
    """The integer enlargement that brings ``size`` pixels to at least ``min_size`` (1 for large images)."""
    return max(1, -(-min_size // size))


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer factor: every pixel becomes a sharp scale x scale block."""
    return image if scale == 1 else image.repeat(scale, axis=0).repeat(scale, axis=1)


def depth_image(depth: torch.Tensor) -> torch.Tensor:
    """(1, 1, H, W) ray depth -> (1, 1, H, W) in [-1, 1] for display, near bright and far dark."""
    lo, hi = depth.amin(), depth.amax()
    return 1 - 2 * (depth - lo) / (hi - lo).clamp_min(1e-8)


# Sessions -------------------------------------------------------------------------------------

@dataclass
class Session:
    """One visitor's state: the current portrait (cached planes and ws) and a folder for its files."""
    folder: Path
    portrait: Portrait | None = None


class SessionStore:
    """At most ``capacity`` sessions, least recently used evicted first; evicted and closed sessions
    lose their portrait and files. Thread-safe."""

    def __init__(self, capacity: int, root: Path):
        if capacity < 1:
            raise ValueError(f"session capacity must be at least 1, got {capacity}")
        self.capacity, self.root = capacity, Path(root)
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._evicted: OrderedDict[str, None] = OrderedDict()  # recently evicted ids, for a clearer message
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def get(self, session_id: str) -> Session:
        """The session (created if new), marked as most recently used."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                session = Session(Path(tempfile.mkdtemp(prefix="session-", dir=self.root)))
                self._sessions[session_id] = session
            self._sessions.move_to_end(session_id)
            while len(self._sessions) > self.capacity:
                old_id, old = self._sessions.popitem(last=False)
                self._evicted[old_id] = None
                if len(self._evicted) > 16 * self.capacity:
                    self._evicted.popitem(last=False)
                _free(old)
            return session

    def find(self, session_id: str) -> Session | None:
        """The session if it is stored (marked as most recently used), else None; never creates one."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                self._sessions.move_to_end(session_id)
            return session

    def was_evicted(self, session_id: str) -> bool:
        return session_id in self._evicted

    def close(self, session_id: str) -> None:
        """Free a session (its page closed)."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
            self._evicted.pop(session_id, None)
        if session is not None:
            _free(session)


def _free(session: Session) -> None:
    session.portrait = None
    shutil.rmtree(session.folder, ignore_errors=True)


# Handlers ------------------------------------------------------------------------------------

class AppBackend:
    """Every handler of the app over one shared :class:`DreamPortraitPipeline`.

    warn: called with a message for soft problems (the app passes ``gr.Warning``).
    max_sessions: sessions kept in memory (each holds one portrait's tri-planes).
    max_mesh_resolution: cap on the marching-cubes grid (points per side).
    work_dir: where session folders (videos, meshes) go; default a temporary folder removed at exit.
    """

    def __init__(self, pipeline: DreamPortraitPipeline, warn: Warn | None = None, max_sessions: int = 32,
                 max_mesh_resolution: int = 256, work_dir: str | Path | None = None):
        self.pipeline = pipeline
        self.warn = warn or (lambda message: None)
        self.max_mesh_resolution = int(max_mesh_resolution)
        if self.max_mesh_resolution < MESH_MIN_RESOLUTION:
            raise ValueError(f"max_mesh_resolution must be at least {MESH_MIN_RESOLUTION}")
        if work_dir is None:
            work_dir = tempfile.mkdtemp(prefix="dreamportrait-app-")
            atexit.register(shutil.rmtree, work_dir, True)
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.sessions = SessionStore(max_sessions, self.work_dir)
        self.resolution = int(pipeline.info.get("resolution") or pipeline.G.config.img_resolution)

    # Helpers --------------------------------------------------------------------------------
    def _encode_checked(self, prompt) -> str:
        """Check a prompt and warn (with token counts) when the text encoder had to cut it."""
        prompt = check_prompt(prompt)
        try:
            text, _ = self.pipeline.encode(prompt)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if text is not None and bool(text.truncated[0]):
            keep = text.tokens.shape[1] - 2
            short = prompt if len(prompt) <= 50 else prompt[:47] + "..."
            self.warn(f"Prompt too long: {short!r} has {int(text.prompt_tokens[0])} tokens but the model reads "
                      f"only the first {keep}; the rest was cut. Shorten the prompt to keep every detail.")
        return prompt

    def _current(self, session_id: str, action: str) -> Session:
        """The session holding a portrait, or an error saying to generate one first (no session is created,
        so requests that fail never evict anyone)."""
        session = self.sessions.find(session_id)
        if session is None or session.portrait is None:
            if self.sessions.was_evicted(session_id):
                raise InputError(f"Cannot {action}: your portrait was dropped to make room for other visitors "
                                 f"(the server keeps {self.sessions.capacity} sessions). Press Generate again.")
            raise InputError(f"Nothing to {action} yet: generate a portrait first (Portrait tab), then try again.")
        return session

    def _show(self, images: torch.Tensor) -> np.ndarray:
        """(1, 3, H, W) in [-1, 1] -> enlarged uint8 image for display."""
        image = to_uint8(images[0])
        return enlarge(image, display_scale(image.shape[0]))

    def _caption(self, views: dict[str, torch.Tensor], what: str) -> str:
        h = views["image"].shape[-1]
        nr = views["image_raw"].shape[-1]
        scale = display_scale(h)
        shown = f"shown ×{scale} with nearest-neighbour enlargement" if scale > 1 else "shown at true size"
        return f"{what} · true resolution **{h}×{h}** px, {shown} · raw neural render {nr}×{nr}"

    def _views(self, portrait: Portrait, yaw: float, pitch: float, started: float, work: str):
        """(image, depth, raw, caption) of ``portrait`` at the camera; the caption says how long ``work`` took."""
        views = self.pipeline.render(portrait, yaw, pitch)
        took = (time.perf_counter() - started) * 1000
        what = (f"seed {portrait.seed} · ψ {portrait.truncation_psi:g} · yaw {yaw:+g}° · pitch {pitch:+g}° · "
                f"{work} in {took:.0f} ms")
        return (self._show(views["image"]), self._show(depth_image(views["image_depth"])),
                self._show(views["image_raw"]), self._caption(views, what))

    def _strip(self, images: list[torch.Tensor]) -> np.ndarray:
        strip = make_grid(torch.cat(images), ncol=len(images))
        return enlarge(strip, display_scale(images[0].shape[-1]))

    def _psi(self, psi) -> float:
        return parse_number(psi, "truncation ψ", *PSI_RANGE)

    def _frames(self, value) -> int:
        return parse_int(value, "number of video frames", *VIDEO_FRAMES)

    # Generate and camera ----------------------------------------------------------------------
    def random_seed(self) -> str:
        return str(random.randint(0, MAX_SEED))

    def generate(self, session_id: str, prompt, seed, psi, yaw=0.0, pitch=0.0):
        """New portrait (mapping + synthesis), kept for the session and rendered at the camera.

        Returns (image, depth, raw, caption)."""
        started = time.perf_counter()
        prompt, seed, psi = self._encode_checked(prompt), parse_seed(seed), self._psi(psi)
        yaw, pitch = check_camera(yaw, pitch)
        session = self.sessions.get(session_id)
        session.portrait = self.pipeline.portrait(prompt, seed, psi)
        return self._views(session.portrait, yaw, pitch, started, "generated (mapping, synthesis, render)")

    def render(self, session_id: str, yaw, pitch):
        """Re-render the session's cached tri-planes from a new camera (no mapping, no synthesis)."""
        started = time.perf_counter()
        yaw, pitch = check_camera(yaw, pitch)
        return self._views(self._current(session_id, "re-render").portrait, yaw, pitch, started,
                           "re-rendered from cached tri-planes")

    def orbit_video(self, session_id: str, num_frames=60, progress: Progress | None = None) -> str:
        """An mp4 of the current portrait along EG3D's orbit ellipse; returns its path."""
        num_frames = self._frames(num_frames)
        session = self._current(session_id, "make an orbit video")
        portrait = session.portrait
        path = session.folder / f"orbit-seed{portrait.seed}-{num_frames}f.mp4"
        report = None if progress is None else (lambda done, total: progress(done / total, "rendering frames"))
        orbit_video(self.pipeline.G, portrait.planes, portrait.ws, path, num_frames, VIDEO_FPS, progress=report,
                    upscale=display_scale(self.resolution, VIDEO_MIN_SIZE))
        return str(path)

    # Prompt mixing ---------------------------------------------------------------------------
    def mix(self, prompts, seed, psi, yaw=0.0, pitch=0.0):
        """One prompt per line, each rendered with the same seed and camera: (strip, caption)."""
        lines = [line for line in (prompts or "").splitlines() if line.strip()]
        if not lines:
            raise InputError("No prompts to mix: write one prompt per line, e.g. 'This is a woman.' then "
                             "'This is a middle-aged woman.'")
        if len(lines) > MAX_MIX_PROMPTS:
            raise InputError(f"{len(lines)} prompts given; the strip shows at most {MAX_MIX_PROMPTS}: remove some lines")
        lines = [self._encode_checked(line) for line in lines]
        seed, psi = parse_seed(seed), self._psi(psi)
        yaw, pitch = check_camera(yaw, pitch)
        images = self.pipeline.mix(lines, seed, psi, yaw, pitch)
        caption = " → ".join(f"({i + 1}) {p}" for i, p in enumerate(lines))
        return self._strip(images), f"seed {seed} · yaw {yaw:+g}° · pitch {pitch:+g}° · {caption}"

    def blend(self, prompt_a, prompt_b, t, seed, psi, yaw=0.0, pitch=0.0):
        """A portrait from the interpolated text encodings of two prompts: (image, caption)."""
        prompt_a, prompt_b = self._encode_checked(prompt_a), self._encode_checked(prompt_b)
        t = parse_number(t, "blend weight", 0.0, 1.0)
        seed, psi = parse_seed(seed), self._psi(psi)
        yaw, pitch = check_camera(yaw, pitch)
        views = self.pipeline.render(self.pipeline.blend(prompt_a, prompt_b, t, seed, psi), yaw, pitch)
        return self._show(views["image"]), self._caption(views, f"{1 - t:.2f} × A + {t:.2f} × B · seed {seed}")

    # Style interpolation ---------------------------------------------------------------------
    def _interpolated(self, session_id: str, seed_a, seed_b, action: str):
        """(session, t -> portrait with the style lerp(w_A, w_B, t) and the current prompt, seed A, seed B)."""
        session = self._current(session_id, action)
        prompt, psi = session.portrait.prompt, session.portrait.truncation_psi
        seed_a, seed_b = parse_seed(seed_a, "seed A"), parse_seed(seed_b, "seed B")
        return session, (lambda t: self.pipeline.interpolate_styles(prompt, seed_a, seed_b, t, psi)), seed_a, seed_b

    def interpolate(self, session_id: str, seed_a, seed_b, t, yaw=0.0, pitch=0.0):
        """The current prompt with the style latent lerp(w_A, w_B, t): (image, caption)."""
        session, make, seed_a, seed_b = self._interpolated(session_id, seed_a, seed_b, "interpolate styles")
        t = parse_number(t, "interpolation weight", 0.0, 1.0)
        yaw, pitch = check_camera(yaw, pitch)
        views = self.pipeline.render(make(t), yaw, pitch)
        return self._show(views["image"]), self._caption(views, f"seeds {seed_a} → {seed_b} at t = {t:.2f} · "
                                                                f"prompt {session.portrait.prompt!r}")

    def interpolation_strip(self, session_id: str, seed_a, seed_b, steps=5, yaw=0.0, pitch=0.0) -> np.ndarray:
        """``steps`` evenly spaced interpolation weights from seed A to seed B side by side."""
        _, make, _, _ = self._interpolated(session_id, seed_a, seed_b, "interpolate styles")
        steps = parse_int(steps, "number of steps", *STRIP_STEPS)
        yaw, pitch = check_camera(yaw, pitch)
        return self._strip([self.pipeline.render(make(float(t)), yaw, pitch)["image"]
                            for t in np.linspace(0.0, 1.0, steps)])

    def interpolation_video(self, session_id: str, seed_a, seed_b, num_frames=48, yaw=0.0, pitch=0.0,
                            progress: Progress | None = None) -> str:
        """An mp4 going from seed A's style to seed B's at a fixed camera; returns its path."""
        session, make, seed_a, seed_b = self._interpolated(session_id, seed_a, seed_b, "make an interpolation video")
        num_frames = self._frames(num_frames)
        yaw, pitch = check_camera(yaw, pitch)
        scale = display_scale(self.resolution, VIDEO_MIN_SIZE)

        def frames():
            for i, t in enumerate(np.linspace(0.0, 1.0, num_frames)):
                yield enlarge(to_uint8(self.pipeline.render(make(float(t)), yaw, pitch)["image"][0]), scale)
                if progress is not None:
                    progress((i + 1) / num_frames, "rendering frames")
        path = session.folder / f"styles-{seed_a}-{seed_b}-{num_frames}f.mp4"
        return str(write_video(frames(), path, VIDEO_FPS))

    # Mesh ------------------------------------------------------------------------------------
    def mesh(self, session_id: str, resolution=128, threshold=DEFAULT_THRESHOLD, progress: Progress | None = None):
        """Marching-cubes mesh of the current portrait with vertex colours.

        Returns (glb path for the 3D view, [obj, ply, glb] paths for download, caption)."""
        cap = self.max_mesh_resolution
        resolution = parse_int(resolution, "mesh resolution", MESH_MIN_RESOLUTION, cap,
                               f" (the server caps the grid at {cap} points per side to bound time and memory)")
        threshold = parse_number(threshold, "density threshold", -1e6, 1e6)
        session = self._current(session_id, "extract a mesh")
        portrait = session.portrait
        report = None if progress is None else (lambda done, total: progress(done / total, "evaluating density"))
        try:
            mesh = extract_mesh(self.pipeline.G, portrait.planes, resolution, threshold, progress=report)
        except ValueError as exc:  # e.g. no surface at this threshold; the message gives the density range
            raise InputError(str(exc)) from None
        stem = session.folder / f"mesh-seed{portrait.seed}-{resolution}"
        paths = [str(mesh.save(stem.with_suffix(suffix))) for suffix in (".obj", ".ply", ".glb")]
        caption = (f"{len(mesh.vertices):,} vertices · {len(mesh.faces):,} faces · grid {resolution}³ · "
                   f"threshold {threshold:g}")
        return paths[2], paths, caption

    # Sessions --------------------------------------------------------------------------------
    def close_session(self, session_id: str) -> None:
        """Free a session's portrait and files (the page was closed)."""
        self.sessions.close(session_id)


# Running the app as a separate process (end-to-end tests, benchmarks) ---------------------------

def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def offline_env() -> dict:
    """This process's environment with Gradio analytics off and no proxy for loopback."""
    loopback = "127.0.0.1,localhost"
    return dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", no_proxy=loopback, NO_PROXY=loopback,
                PYTHONUNBUFFERED="1")


@contextlib.contextmanager
def app_process(checkpoint: str | Path, log: str | Path, *flags: str, timeout: float = 240.0):
    """Run ``python app.py --checkpoint CHECKPOINT --host 127.0.0.1 --port FREE FLAGS`` (output to ``log``),
    yield ``(url, process)`` once the page answers, and terminate it afterwards.

    Raises RuntimeError (with the log) if the app exits, TimeoutError if it does not answer in ``timeout`` s.
    """
    url = f"http://127.0.0.1:{free_port()}/"
    log = Path(log)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "app.py"), "--checkpoint", str(checkpoint),
                                 "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1].strip("/"), *flags],
                                cwd=REPO_ROOT, env=offline_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not _answers(url):
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with code {proc.returncode}:\n{log.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"app.py did not answer on {url} within {timeout:g} s:\n"
                                   f"{log.read_text(errors='replace')}")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "config", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
