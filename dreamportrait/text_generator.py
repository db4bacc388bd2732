"""DreamPortrait's text-conditioned generator: EG3D's generator plus the hierarchical latent condition.

Global condition: the prompt's EOT feature is fused with the style code by the semantics
mapping network (w -> w_t), after EG3D's own (untouched) z -> w mapping and truncation.
Local condition: word tokens enter through 3D-aware gated cross-attention adapters after
selected synthesis blocks. Both start as the identity, so a fresh DreamPortraitGenerator on
EG3D weights is EG3D. The frozen text encoder is not part of this module; its identity is
stored in the checkpoint metadata and :mod:`dreamportrait.pipeline` loads it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .generator import GeneratorConfig, TriPlaneGenerator
from .text_conditioning import AdapterStack, SemanticsMapping, adapter_resolutions
from .text_encoder import TextEncoding


@dataclass
class TextConditionConfig:
    """Where and how text enters the generator."""
    text_dim: int = 1024                        # width of the text encoder's token features
    adapter_resolutions: tuple | None = None    # None: ``adapter_count`` blocks spread from 4^2 to the top
    adapter_count: int = 6
    adapter_head_dim: int = 64
    semantics_lr_multiplier: float = 0.01

    def __post_init__(self):
        if self.adapter_resolutions is not None:
            self.adapter_resolutions = tuple(int(r) for r in self.adapter_resolutions)

    def resolutions(self, block_resolutions) -> list[int]:
        if self.adapter_resolutions is not None:
            bad = sorted(set(self.adapter_resolutions) - set(block_resolutions))
            if bad:
                raise ValueError(f"adapter resolutions {bad} are not synthesis blocks {sorted(block_resolutions)}")
            return list(self.adapter_resolutions)
        return adapter_resolutions(block_resolutions, self.adapter_count)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adapter_resolutions"] = None if self.adapter_resolutions is None else list(self.adapter_resolutions)
        return d


class DreamPortraitGenerator(TriPlaneGenerator):
    """(z, camera, text) -> 3D-aware portrait; text parts named ``semantics.*`` and ``adapters.*``."""

    KIND = "dreamportrait-generator"

    def __init__(self, config: GeneratorConfig | str, text: TextConditionConfig):
        super().__init__(config)
        self.text_config = text
        channels = self.config.block_channels()
        placements = {r: channels[r] for r in text.resolutions(channels)}
        self.semantics = SemanticsMapping(text.text_dim, self.config.w_dim, text.semantics_lr_multiplier)
        self.adapters = AdapterStack(placements, text.text_dim, head_dim=text.adapter_head_dim)

    @classmethod
    def from_eg3d(cls, core: TriPlaneGenerator, text: TextConditionConfig) -> "DreamPortraitGenerator":
        """Start from a trained (EG3D or prior) generator; text parts freshly initialised."""
        model = cls(core.config, text)
        missing, unexpected = model.load_state_dict(core.state_dict(), strict=False)
        if unexpected or any(not (k.startswith("semantics.") or k.startswith("adapters.")) for k in missing):
            raise ValueError(f"generator weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model

    def mapping(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, update_emas: bool = False,
                text: TextEncoding | None = None) -> torch.Tensor:
        """EG3D's mapping (with truncation of the style code), then the semantics mapping: w_t."""
        ws = super().mapping(z, c, truncation_psi, truncation_cutoff, update_emas)
        return ws if text is None else self.fuse_text(ws, text)

    def fuse_text(self, ws: torch.Tensor, text: TextEncoding) -> torch.Tensor:
        """w -> w_t with the prompt's EOT feature (reuse cached ws for a new prompt)."""
        return self.semantics(ws, text.eot.to(ws.device))

    def synthesize_planes(self, ws: torch.Tensor, noise_mode: str = "random", text: TextEncoding | None = None,
                          block_hook=None) -> torch.Tensor:
        if text is not None:
            if block_hook is not None:
                raise ValueError("pass either text or block_hook, not both")
            text = text.to(ws.device)
            block_hook = self.adapters.block_hook(text.tokens, text.attention_mask())
        return super().synthesize_planes(ws, noise_mode=noise_mode, block_hook=block_hook)

    def forward(self, z: torch.Tensor, c: torch.Tensor, text: TextEncoding | None = None,
                truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
                c_render: torch.Tensor | None = None, **synthesis_kwargs) -> dict[str, torch.Tensor]:
        ws = self.mapping(z, c, truncation_psi, truncation_cutoff, text=text)
        return self.synthesis(ws, c if c_render is None else c_render, text=text, **synthesis_kwargs)

    def checkpoint_config(self) -> dict:
        return {"generator": self.config.to_dict(), "text": self.text_config.to_dict()}

    @classmethod
    def from_checkpoint_config(cls, config: dict) -> "DreamPortraitGenerator":
        return cls(GeneratorConfig.from_dict(config["generator"]), TextConditionConfig(**config["text"]))
