"""Guidance: what a frozen prior says about rendered images, as a loss (threestudio's guidance modules).

A guidance takes the prompts and the rendered images (B, 3, H, W) in [-1, 1] and returns a
scalar loss whose gradient with respect to the images is the guidance, plus detached statistics
to log. It owns whatever it needs to read the prompts (its own text encoder and embedding
cache), so the training loop hands it strings. Stage 2's generator objective is
``gan_weight * GAN + guidance``; distribution SDS (:mod:`train.distribution_sds`) is the
paper's, variational score distillation (:mod:`train.variational_sds`) and classifier score
distillation (:mod:`train.classifier_score`) are extensions; another prior is another subclass.
A guidance that learns as it goes keeps its state in :meth:`Guidance.state_dict`, which the run
saves and a resumed run loads.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass
class GuidanceOutput:
    loss: torch.Tensor                                            # scalar; d loss / d images is the guidance
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for logging


class Guidance(ABC):
    """The interface of a guidance; ``name`` prefixes its entries in the training log."""

    name: str

    @abstractmethod
    def __call__(self, prompts: list[str], images: torch.Tensor) -> GuidanceOutput:
        """The loss for ``images`` (B, 3, H, W) in [-1, 1] rendered for ``prompts`` (B strings)."""

    def state_dict(self) -> dict:
        """What a resumed run needs back (tensors, numbers, strings, lists and dicts); none by default."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"the {self.name} guidance keeps no state, but the run holds some for it "
                             f"({sorted(state)}); resume with the guidance the run was started with")
