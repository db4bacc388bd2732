"""The one engine behind the app, the CLI and the benchmarks.

``DreamPortraitPipeline`` composes a generator and its frozen text encoder and caches every
stage separately: prompt -> text encoding, (seed, psi) -> ws, (ws, prompt) -> tri-planes,
planes + camera -> view. A camera change re-renders cached planes (no mapping or synthesis);
prompt mixing reuses z; style interpolation reuses the text encoding. Rendering for display
uses deterministic depth sampling, so the same prompt, seed and camera give identical pixels.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cameras import camera_label
from .checkpoints import GENERATOR_FILE, CheckpointError, read_model_metadata
from .generator import TriPlaneGenerator
from .text_conditioning import interpolate_encodings
from .text_encoder import TextEncoder, TextEncoding, truncation_messages
from .text_generator import DreamPortraitGenerator

MAX_SEED = 2 ** 31 - 1


class LRU(OrderedDict):
    """A small thread-safe least-recently-used cache."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self._lock = threading.Lock()

    def get_or(self, key, make):
        with self._lock:
            if key in self:
                self.move_to_end(key)
                return self[key]
            value = make()
            self[key] = value
            if len(self) > self.capacity:
                self.popitem(last=False)
            return value


@dataclass
class Portrait:
    """A generated portrait: everything needed to re-render it from any camera."""
    prompt: str
    seed: int
    truncation_psi: float
    ws: torch.Tensor
    planes: torch.Tensor
    text: TextEncoding | None = None
    warnings: list = field(default_factory=list)


class DreamPortraitPipeline:
    """Text (+ seed, camera) -> 3D-aware portrait, with cached stages."""

    def __init__(self, generator: TriPlaneGenerator, text_encoder: TextEncoder | None, device="cpu",
                 info: dict | None = None):
        self.device = torch.device(device)
        self.G = generator.to(self.device).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(self.device) if text_encoder is not None else None
        if isinstance(generator, DreamPortraitGenerator) and text_encoder is None:
            raise ValueError("a text-conditioned generator needs its text encoder")
        self.info = info or {}
        self._text_cache = LRU(64)
        self._lock = threading.Lock()

    # Loading -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu") -> "DreamPortraitPipeline":
        """Load ``generator.safetensors`` (a file or its folder) and the text encoder it names."""
        path = Path(path)
        file = path / GENERATOR_FILE if path.is_dir() else path
        meta = read_model_metadata(file)
        if meta.kind == DreamPortraitGenerator.KIND:
            G = DreamPortraitGenerator.from_pretrained(file, device=device)
            identity = meta.extra.get("text_encoder")
            if identity is None:
                raise CheckpointError(f"{file} has no text_encoder entry in its metadata; it cannot be used "
                                      "without knowing which text encoder it was trained with")
            encoder = TextEncoder.from_identity(identity)
        elif meta.kind == TriPlaneGenerator.KIND:
            G, encoder = TriPlaneGenerator.from_pretrained(file, device=device), None
        else:
            raise CheckpointError(f"{file} holds a {meta.kind!r} model, not a generator")
        info = {"file": str(file), "kind": meta.kind, "resolution": G.config.img_resolution,
                "neural_resolution": G.config.neural_rendering_resolution, **meta.extra}
        return cls(G, encoder, device, info)

    @property
    def text_conditioned(self) -> bool:
        return isinstance(self.G, DreamPortraitGenerator)

    # Stages ------------------------------------------------------------------------------
    def encode(self, prompt: str) -> tuple[TextEncoding | None, list[str]]:
        """Cached text encoding of one prompt, and warnings (e.g. truncation) for the caller."""
        if not self.text_conditioned:
            return None, []
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty: describe the portrait, e.g. 'A young woman with long red hair.'")
        prompt = prompt.strip()

        def make():
            enc = self.text_encoder([prompt])
            return enc, truncation_messages([prompt], enc)
        return self._text_cache.get_or(prompt, make)

    def latent(self, seed: int, truncation_psi: float = 0.7) -> torch.Tensor:
        """Style codes ws (1, num_ws, w_dim) of ``seed``, conditioned on the frontal camera."""
        seed = check_seed(seed)
        z = torch.randn(1, self.G.config.z_dim, generator=torch.Generator().manual_seed(seed)).to(self.device)
        return self.G.mapping(z, self.G.conditioning_label(1, self.device), truncation_psi=truncation_psi)

    @torch.no_grad()
    def portrait(self, prompt: str, seed: int, truncation_psi: float = 0.7,
                 text: TextEncoding | None = None, ws: torch.Tensor | None = None) -> Portrait:
        """Mapping + tri-plane synthesis (the expensive, camera-independent part)."""
        warnings = []
        if text is None:
            text, warnings = self.encode(prompt)
        with self._lock:
            ws = self.latent(seed, truncation_psi) if ws is None else ws
            cond = {}
            if text is not None:
                ws = self.G.fuse_text(ws, text)
                cond["text"] = text
            planes = self.G.synthesize_planes(ws, noise_mode="const", **cond)
        return Portrait(prompt, seed, truncation_psi, ws, planes, text, warnings)

    @torch.no_grad()
    def render(self, portrait: Portrait, yaw: float = 0.0, pitch: float = 0.0,
               depth_multiplier: int = 1) -> dict[str, torch.Tensor]:
        """Re-render cached planes from a new camera (deterministic depth sampling)."""
        c = camera_label(yaw, pitch, pivot=self.G.config.avg_camera_pivot,
                         radius=self.G.config.avg_camera_radius).to(self.device)
        with self._lock:
            return self.G.render(portrait.planes, portrait.ws, c, deterministic=True,
                                 depth_multiplier=depth_multiplier)

    def generate(self, prompt: str, seed: int, truncation_psi: float = 0.7, yaw: float = 0.0,
                 pitch: float = 0.0) -> tuple[Portrait, dict[str, torch.Tensor]]:
        p = self.portrait(prompt, seed, truncation_psi)
        return p, self.render(p, yaw, pitch)

    # Prompt and style operations ---------------------------------------------------------
    def mix(self, prompts: list[str], seed: int, truncation_psi: float = 0.7, yaw: float = 0.0,
            pitch: float = 0.0) -> list[torch.Tensor]:
        """Incremental prompt editing: each prompt rendered with the same z and camera."""
        prompts = [p for p in (p.strip() for p in prompts) if p]
        if not prompts:
            raise ValueError("no prompts given: write one prompt per line")
        ws = self.latent(seed, truncation_psi)
        return [self.render(self.portrait(p, seed, truncation_psi, ws=ws), yaw, pitch)["image"] for p in prompts]

    def blend(self, prompt_a: str, prompt_b: str, t: float, seed: int, truncation_psi: float = 0.7) -> Portrait:
        """A portrait from the interpolated encodings (global and local) of two prompts."""
        a, wa = self.encode(prompt_a)
        b, wb = self.encode(prompt_b)
        text = interpolate_encodings(a, b, t) if a is not None else None
        p = self.portrait(f"{prompt_a} ⟷ {prompt_b} ({t:.2f})", seed, truncation_psi, text=text)
        p.warnings = wa + wb
        return p

    def interpolate_styles(self, prompt: str, seed_a: int, seed_b: int, t: float,
                           truncation_psi: float = 0.7) -> Portrait:
        """Style-latent interpolation with the prompt fixed: lerp(w_a, w_b, t), then the text fusion."""
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"interpolation weight must lie in [0, 1], got {t}")
        ws = torch.lerp(self.latent(seed_a, truncation_psi), self.latent(seed_b, truncation_psi), t)
        return self.portrait(prompt, seed_a, truncation_psi, ws=ws)


def check_seed(seed) -> int:
    """A seed as an int in [0, 2^31 - 1], or a clear error."""
    try:
        value = int(seed)
    except (TypeError, ValueError):
        raise ValueError(f"seed must be a whole number between 0 and {MAX_SEED}, got {seed!r}") from None
    if value != seed and not isinstance(seed, str):
        raise ValueError(f"seed must be a whole number between 0 and {MAX_SEED}, got {seed!r}")
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"seed {value} is out of range: use a whole number between 0 and {MAX_SEED}")
    return value
