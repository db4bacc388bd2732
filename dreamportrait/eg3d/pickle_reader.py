"""Read NVIDIA EG3D network pickles (e.g. ffhq512-128.pkl) without executing any code from them.

An EG3D ``.pkl`` is a pickled dict ``{training_set_kwargs, G, D, G_ema, augment_pipe}``. Its
``@persistent_class`` modules pickle as ``_reconstruct_persistent_obj(meta)`` with the full source
of their defining module in ``meta['module_src']`` (EG3D's own loader executes it); the decoder,
renderer, ray sampler and ray marcher, and torch's Sequential/Softplus, pickle by reference to
``training.*`` / ``torch.nn.modules.*``. :class:`RestrictedUnpickler` resolves only an allow-list
of globals (spec §8.3/8.4): persistent objects and by-reference modules become inert holders of
their pickled state, storages are read with ``torch.load(weights_only=True)``, and anything else
is refused. The state dicts are then rebuilt from ``_parameters``/``_buffers``/``_modules`` under
the names ``nn.Module.state_dict()`` would give.
"""
from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy._core.multiarray import scalar as _numpy_scalar

from ..checkpoints import CheckpointError

STUB_MODULE_PREFIXES = ("training.", "torch.nn.modules.")


class EG3DPickleError(CheckpointError):
    """An EG3D pickle is missing, unreadable, or references something it should not."""


@dataclass
class PersistentObject:
    """Inert stand-in for an EG3D ``@persistent_class`` object: its ``meta`` dict, never executed."""

    meta: dict


class InertObject:
    """Base of the stand-ins for by-reference classes: stores the pickled state, runs nothing."""

    pickled_module = ""
    pickled_name = ""
    state = None

    def __new__(cls, *args, **kwargs):  # accepts (and ignores) NEWOBJ/REDUCE arguments
        return super().__new__(cls)

    def __setstate__(self, state):
        self.state = state


class EasyDictData(dict):
    """Stand-in for ``dnnlib.util.EasyDict``: a plain dict subclass."""


def _reconstruct_persistent_obj(meta):
    return PersistentObject(meta)


def _load_storage_bytes(data: bytes):
    """Stand-in for ``torch.storage._load_from_bytes``: the blob is read in weights-only mode."""
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): EasyDictData,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals an EG3D checkpoint needs, to inert stand-ins."""

    def __init__(self, file, source: str = "<pickle>"):
        super().__init__(file)
        self.source = source
        self._stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[(module, name)]
        if module == "training" or module.startswith(STUB_MODULE_PREFIXES):
            key = (module, name)
            if key not in self._stubs:
                self._stubs[key] = type(name, (InertObject,), {"pickled_module": module, "pickled_name": name})
            return self._stubs[key]
        raise EG3DPickleError(
            f"refusing to load global {module}.{name} from {self.source}: not part of an EG3D "
            "checkpoint (loading it could run arbitrary code); use an unmodified EG3D .pkl")


@dataclass
class EG3DNetwork:
    """One network (G, G_ema, D, ...) of an EG3D pickle, as plain data.

    ``module_name`` is set for by-reference classes; persistent classes carry ``module_src``
    (the source text of their module, never executed) instead.
    """

    class_name: str
    module_name: str | None
    state_dict: OrderedDict[str, torch.Tensor]
    init_kwargs: dict
    init_args: tuple
    attributes: dict
    module_src: str | None


@dataclass
class EG3DCheckpoint:
    """Everything read from an EG3D pickle: its networks by name and ``training_set_kwargs``."""

    path: Path
    networks: dict[str, EG3DNetwork]
    training_set_kwargs: dict | None

    def network(self, name: str = "G_ema") -> EG3DNetwork:
        """The named network, or a clear error listing the ones the pickle has."""
        if name not in self.networks:
            raise EG3DPickleError(f"{self.path} has no network {name!r}; it has {sorted(self.networks)}")
        return self.networks[name]


def _plain(value):
    """Pickled configuration as plain Python: dict subclasses -> dict, numpy scalars -> numbers."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _module_state(obj, where: str) -> dict:
    """The nn.Module ``__dict__`` pickled for a persistent or by-reference module."""
    if isinstance(obj, PersistentObject):
        meta = obj.meta
        if not isinstance(meta, dict) or meta.get("type") != "class" or "state" not in meta:
            raise EG3DPickleError(f"{where}: persistent object is not an EG3D persistent class (meta={meta!r:.200})")
        state = meta["state"]
    elif isinstance(obj, InertObject):
        state = obj.state
    else:
        raise EG3DPickleError(f"{where}: expected a module, found {type(obj).__name__}")
    if not isinstance(state, dict):
        raise EG3DPickleError(f"{where}: module state is {type(state).__name__}, expected a dict")
    return state


def _collect_tensors(state: dict, prefix: str, out: OrderedDict, where: str) -> None:
    """Add a module's tensors to ``out`` in ``nn.Module.state_dict()`` order and naming."""
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    entries = [*(state.get("_parameters") or {}).items(),
               *((name, buf) for name, buf in (state.get("_buffers") or {}).items() if name not in non_persistent)]
    for name, tensor in entries:
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise EG3DPickleError(f"{where}{prefix}{name} is a {type(tensor).__name__}, expected a tensor")
        out[prefix + name] = tensor.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            child_where = f"{where}{prefix}{name}"
            _collect_tensors(_module_state(child, child_where), f"{prefix}{name}.", out, where)


def _network(name: str, obj) -> EG3DNetwork:
    state = _module_state(obj, name)
    state_dict = OrderedDict()
    _collect_tensors(state, "", state_dict, f"{name}.")
    persistent = isinstance(obj, PersistentObject)
    return EG3DNetwork(
        class_name=obj.meta.get("class_name") if persistent else obj.pickled_name,
        module_name=None if persistent else obj.pickled_module,
        state_dict=state_dict,
        init_kwargs=_plain(state.get("_init_kwargs") or {}),
        init_args=tuple(_plain(state.get("_init_args") or ())),
        attributes={key: _plain(value) for key, value in state.items()
                    if not key.startswith("_") and key != "training"},
        module_src=obj.meta.get("module_src") if persistent else None,
    )


def read_eg3d_pickle(path) -> EG3DCheckpoint:
    """Read an EG3D network pickle's tensors and configuration without executing its code."""
    path = Path(path)
    if not path.is_file():
        raise EG3DPickleError(
            f"EG3D pickle {path} does not exist; download NVIDIA's released EG3D models "
            "(e.g. ffhq512-128.pkl, linked from the EG3D README) and pass its path")
    with open(path, "rb") as f:
        try:
            data = RestrictedUnpickler(f, source=str(path)).load()
        except EG3DPickleError:
            raise
        except Exception as exc:  # any failure of the pickle stream itself
            raise EG3DPickleError(
                f"{path} is not a readable EG3D pickle ({type(exc).__name__}: {exc}); "
                "it may be truncated or corrupt: re-download it") from exc
    if not isinstance(data, dict):
        raise EG3DPickleError(f"{path} holds a {type(data).__name__}, not an EG3D snapshot dict (G, D, G_ema)")
    networks = {key: _network(key, value) for key, value in data.items()
                if isinstance(value, (PersistentObject, InertObject))}
    if not networks:
        raise EG3DPickleError(f"{path} contains no networks (keys: {list(data)}); expected G, D and G_ema")
    kwargs = data.get("training_set_kwargs")
    return EG3DCheckpoint(path=path, networks=networks,
                          training_set_kwargs=None if kwargs is None else _plain(kwargs))
