"""DreamPortrait model files: one ``.safetensors`` file per model, architecture config in its metadata.

Loading goes through safetensors only, so opening a model file never unpickles or executes
anything. Metadata keys: ``format`` ("dreamportrait"), ``format_version``, ``kind`` (what the
file holds, e.g. "generator"), ``config`` (JSON) and any ``extra`` entries (each JSON-encoded).
JSON turns tuples into lists, so configs come back with lists where tuples went in.
"""
from __future__ import annotations

import dataclasses
import hashlib

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "dreamportrait"
FORMAT_VERSION = "1"
RESERVED_KEYS = ("format", "format_version", "kind", "config")
CONVERT_HINT = "convert an EG3D .pkl with `python -m dreamportrait.eg3d.convert`"
# File names of the models in a model folder (a training stage's run folder, a converted EG3D pickle).
GENERATOR_FILE = "generator.safetensors"
DISCRIMINATOR_FILE = "discriminator.safetensors"


class CheckpointError(ValueError):
    """A model file is missing, unreadable or not what the caller asked for."""


@dataclass
class ModelMetadata:
    """What a model file says about itself, read without touching the tensors."""

    kind: str
    config: dict
    extra: dict = field(default_factory=dict)


@dataclass
class ModelFile(ModelMetadata):
    """A loaded model file: its metadata plus the tensors by name."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no two sharing storage (safetensors refuses shared memory)."""
    out, seen = {}, set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        tensor = tensor.detach().contiguous()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        if storage[1] != 0 and storage in seen:
            tensor = tensor.clone()
        seen.add(storage)
        out[name] = tensor
    return out


def _metadata(config: dict, kind: str, extra: dict | None) -> dict[str, str]:
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string, got {kind!r}")
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind}
    for key, value in (("config", config), *(extra or {}).items()):
        if key in metadata:
            raise ValueError(f"extra key {key!r} is reserved; use another name (reserved: {RESERVED_KEYS})")
        try:
            metadata[key] = json.dumps(value)
        except TypeError as exc:
            raise ValueError(f"metadata entry {key!r} is not JSON-serialisable: {exc}") from exc
    return metadata


def config_from_dict(cls, d: dict, what: str):
    """A config dataclass from its ``to_dict()``; unknown keys are an error naming ``what`` and the known keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {what} config keys {sorted(unknown)}; known keys: {sorted(names)}")
    return cls(**d)


def save_model_file(path, tensors: dict[str, torch.Tensor], config: dict, kind: str,
                    extra: dict | None = None) -> None:
    """Write ``tensors`` and their config to ``path`` atomically and durably (:func:`atomic_file`)."""
    metadata = _metadata(config, kind, extra)
    tensors = _storable(tensors)
    with atomic_file(path, fsync=True) as tmp:
        save_file(tensors, tmp, metadata=metadata)


@contextmanager
def atomic_file(path, fsync: bool = False) -> Iterator[Path]:
    """Write a file atomically: yields a temporary path beside ``path`` with the same suffix (for
    writers that pick the format from it); when the block ends it is renamed over ``path`` (after
    flushing it to disk when ``fsync``), and on an error it is removed, so readers only ever see
    the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp{path.suffix}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path) -> str:
    """Hex SHA-256 of a file, read in chunks (weight files are up to gigabytes)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write(path, data: bytes | str) -> Path:
    """Write bytes (or text, as UTF-8) to ``path`` atomically (see :func:`atomic_file`); returns the path."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


@contextmanager
def atomic_folder(folder, replace: bool = True) -> Iterator[Path]:
    """Write a folder atomically: yields an empty staging folder beside ``folder``; when the block
    ends it is renamed into place (over an old ``folder`` when ``replace``), and on an error it is
    removed, so readers only ever see the old folder or the complete new one."""
    folder = Path(folder)
    if folder.exists() and not replace:
        raise FileExistsError(f"{folder} already exists; remove it or choose another folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield staging
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's private 0700, made what mkdir would have given
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}-old.", dir=folder.parent))
            os.replace(folder, old / folder.name)
            os.replace(staging, folder)
            shutil.rmtree(old)
        else:
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _open_error(path: Path, exc: Exception) -> CheckpointError:
    if not path.exists():
        return CheckpointError(
            f"model file {path} does not exist; download the DreamPortrait weights into checkpoints/, "
            f"train a model, or {CONVERT_HINT}")
    if path.is_file() and _looks_like_pickle(path):
        return CheckpointError(
            f"{path} is a Python pickle, not a DreamPortrait model file; {CONVERT_HINT}")
    return CheckpointError(
        f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}; "
        "re-download or re-convert it")


def _parse_metadata(path: Path, raw: dict[str, str] | None, expected_kind: str | None) -> ModelMetadata:
    raw = dict(raw or {})
    if raw.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not a DreamPortrait model file (no format=dreamportrait "
            f"metadata); {CONVERT_HINT}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {raw.get('format_version')!r}; this DreamPortrait reads "
            f"{FORMAT_VERSION!r}; update DreamPortrait or re-convert the model")
    try:
        kind = raw["kind"]
        config = json.loads(raw["config"])
        extra = {key: json.loads(value) for key, value in raw.items() if key not in RESERVED_KEYS}
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has corrupt metadata ({exc!r}); re-download or re-convert it") from exc
    if expected_kind is not None and kind != expected_kind:
        raise CheckpointError(f"{path} holds a {kind!r} model, expected a {expected_kind!r} model")
    return ModelMetadata(kind=kind, config=config, extra=extra)


def read_model_metadata(path, expected_kind: str | None = None) -> ModelMetadata:
    """Kind, config and extra entries of a model file, without loading its tensors."""
    path = Path(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            raw = f.metadata()
    except (SafetensorError, OSError) as exc:
        raise _open_error(path, exc) from exc
    return _parse_metadata(path, raw, expected_kind)


def load_model_file(path, expected_kind: str | None = None, device="cpu") -> ModelFile:
    """Load a model file written by :func:`save_model_file` (safetensors only, no code runs)."""
    path = Path(path)
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            meta = _parse_metadata(path, f.metadata(), expected_kind)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise _open_error(path, exc) from exc
    return ModelFile(kind=meta.kind, config=meta.config, extra=meta.extra, tensors=tensors)
