"""Dual-discriminator model files: one ``.safetensors`` file, kind ``dual-discriminator``.

The file's config holds either ``eg3d_init_kwargs`` (EG3D's constructor kwargs, written by
``python -m dreamportrait.convert_eg3d``) or ``discriminator`` (a :class:`DiscriminatorConfig`
dict, written by :func:`save_discriminator` for discriminators our trainer produced).
"""
from __future__ import annotations

from pathlib import Path

from dreamportrait.checkpoints import CheckpointError, load_model_file, save_model_file
from dreamportrait.convert_eg3d import DISCRIMINATOR_KIND
from train.discriminator import DiscriminatorConfig, DualDiscriminator

CONFIG_KEYS = ("eg3d_init_kwargs", "discriminator")


def discriminator_config(config: dict, path) -> DiscriminatorConfig:
    """The DiscriminatorConfig a model file's config describes (exactly one of CONFIG_KEYS)."""
    present = [key for key in CONFIG_KEYS if key in config]
    if len(present) != 1:
        raise CheckpointError(
            f"{path} config must hold exactly one of {list(CONFIG_KEYS)}, found keys {sorted(config)}; "
            "write it with train.discriminator_io.save_discriminator or dreamportrait.convert_eg3d")
    try:
        if present[0] == "eg3d_init_kwargs":
            return DiscriminatorConfig.from_eg3d_kwargs(config["eg3d_init_kwargs"])
        return DiscriminatorConfig.from_dict(config["discriminator"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has an invalid discriminator config ({exc!r}); "
                              "re-convert or re-save it") from exc


def save_discriminator(D: DualDiscriminator, path, extra: dict | None = None) -> None:
    """Write ``D`` with its DiscriminatorConfig in the metadata (atomic, see save_model_file)."""
    save_model_file(path, D.state_dict(), {"discriminator": D.config.to_dict()}, DISCRIMINATOR_KIND, extra)


def load_discriminator(path, device="cpu") -> DualDiscriminator:
    """A DualDiscriminator loaded strictly from a 'dual-discriminator' model file, in eval mode."""
    path = Path(path)
    f = load_model_file(path, expected_kind=DISCRIMINATOR_KIND, device=device)
    D = DualDiscriminator(discriminator_config(f.config, path))
    try:
        D.load_state_dict(f.tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the discriminator its config describes: {exc}") from exc
    return D.to(device).eval()
