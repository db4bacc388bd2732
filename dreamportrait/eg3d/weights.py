"""Mapping EG3D's constructor kwargs and state dicts onto this project's modules.

EG3D's state dicts carry a few tensors our modules do not keep: constant ``resample_filter``
buffers of modules that never filter (the 2X super-resolution's top-level filter, the
discriminator blocks' filters in the ResNet architecture) and the training loop's
``dataset_label_std``. They are checked (filters must be the standard [1, 3, 3, 1] filter) and
dropped; every other tensor must match by name and shape.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from ..generator import GeneratorConfig
from ..ops import setup_filter
from ..superresolution import EG3D_SR_MODULES

_UNUSED_FILTERS = re.compile(r"^(superresolution\.resample_filter|resample_filter|b\d+\.resample_filter)$")
_UNUSED_OTHER = {"dataset_label_std"}


def generator_config_from_eg3d(g_kwargs: dict, neural_rendering_resolution: int | None = None) -> GeneratorConfig:
    """GeneratorConfig from EG3D ``TriPlaneGenerator`` kwargs (init_kwargs of a pickle or a fixture)."""
    rk = g_kwargs.get("rendering_kwargs", {})
    sr_name = rk.get("superresolution_module")
    if sr_name not in EG3D_SR_MODULES:
        raise ValueError(f"unsupported EG3D super-resolution module {sr_name!r}; supported: {sorted(EG3D_SR_MODULES)}")
    if rk.get("clamp_mode", "softplus") != "softplus":
        raise ValueError("only EG3D's clamp_mode='softplus' is supported")
    if rk.get("ray_start") == "auto" or rk.get("ray_end") == "auto":
        raise ValueError("ray_start/ray_end 'auto' (ShapeNet) is not supported; give numeric bounds")
    if rk.get("disparity_space_sampling", False):
        raise ValueError("disparity_space_sampling is not supported (no EG3D config uses it)")
    sr = EG3D_SR_MODULES[sr_name]
    cfg = GeneratorConfig(
        z_dim=g_kwargs["z_dim"], c_dim=g_kwargs["c_dim"], w_dim=g_kwargs["w_dim"],
        mapping_layers=g_kwargs.get("mapping_kwargs", {}).get("num_layers", 2),
        channel_base=g_kwargs.get("channel_base", 32768), channel_max=g_kwargs.get("channel_max", 512),
        decoder_lr_mul=rk.get("decoder_lr_mul", 1.0), sr_antialias=rk.get("sr_antialias", True),
        neural_rendering_resolution=neural_rendering_resolution or 64,
        depth_resolution=rk["depth_resolution"], depth_resolution_importance=rk["depth_resolution_importance"],
        ray_start=rk["ray_start"], ray_end=rk["ray_end"], box_warp=rk["box_warp"],
        white_back=rk.get("white_back", False), avg_camera_radius=rk.get("avg_camera_radius", 2.7),
        avg_camera_pivot=tuple(rk.get("avg_camera_pivot", (0, 0, 0.2))),
        c_gen_conditioning_zero=rk.get("c_gen_conditioning_zero", False), c_scale=rk.get("c_scale", 1.0),
        **sr)
    if cfg.img_resolution != g_kwargs["img_resolution"]:
        raise ValueError(f"{sr_name} outputs {cfg.img_resolution}, but img_resolution is {g_kwargs['img_resolution']}")
    return cfg


def filter_eg3d_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop EG3D tensors our modules do not keep, after checking that nothing meaningful is lost."""
    kept = {}
    std_filter = setup_filter()
    for name, t in state.items():
        if _UNUSED_FILTERS.match(name):
            if t.shape != std_filter.shape or not torch.allclose(t.float(), std_filter):
                raise ValueError(f"{name} is not the standard [1,3,3,1] filter; this checkpoint is not EG3D's")
            continue
        if name in _UNUSED_OTHER:
            continue
        kept[name] = t
    return kept


def load_eg3d_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strictly load an EG3D-named state dict (after :func:`filter_eg3d_state_dict`) into ``module``."""
    state = filter_eg3d_state_dict(state)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        raise ValueError("EG3D weights do not fit this architecture: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
                         f"shape mismatch {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in bad_shape[:5]]}")
    module.load_state_dict(state, strict=True)
