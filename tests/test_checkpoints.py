"""DreamPortrait model files: bit-exact round trip, atomic writes and clear errors on bad files."""
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from dreamportrait.checkpoints import (
    CheckpointError,
    load_model_file,
    read_model_metadata,
    save_model_file,
)

CONFIG = {"preset": "tiny", "z_dim": 16, "rendering_kwargs": {"box_warp": 1.0, "ray_start": 2.25}}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, so NaN payloads and -0.0 compare exactly."""
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    return tensor.view(ints[tensor.dtype]) if tensor.dtype in ints else tensor


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 65504.0])
    base = torch.randn(6, 5, generator=g)
    return {
        "f32": torch.randn(3, 4, 5, generator=g),
        "f32_special": special,
        "f16": torch.cat([torch.randn(7, generator=g), special]).half(),
        "bf16": torch.cat([torch.randn(7, generator=g), special]).bfloat16(),
        "i64": torch.randint(-2**62, 2**62, (9,), generator=g, dtype=torch.int64),
        "transposed": torch.randn(4, 3, generator=g).t(),  # non-contiguous
        "base": base,
        "row_view": base[2],  # shares storage with "base", non-zero offset
        "col_view": base[:, 1],  # shares storage, non-contiguous
        "scalar": torch.tensor(3.5),
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
    }


def test_save_load_round_trip_is_bit_exact(tmp_path):
    tensors = _tensors()
    originals = {name: t.detach().clone() for name, t in tensors.items()}
    path = tmp_path / "model.safetensors"
    save_model_file(path, tensors, CONFIG, kind="generator", extra={"source": "unit-test", "step": 7})

    loaded = load_model_file(path, expected_kind="generator")
    assert loaded.kind == "generator"
    assert loaded.config == CONFIG
    assert loaded.extra == {"source": "unit-test", "step": 7}
    assert set(loaded.tensors) == set(tensors)
    for name, original in originals.items():
        got = loaded.tensors[name]
        assert got.dtype == original.dtype and got.shape == original.shape, name
        assert torch.equal(_bits(got), _bits(original.contiguous())), name
    # Saving must not have modified the caller's tensors.
    for name, original in originals.items():
        assert torch.equal(_bits(tensors[name].detach()), _bits(original)), name


def test_read_model_metadata_matches_saved_config(tmp_path):
    path = tmp_path / "sub" / "dir" / "model.safetensors"  # parent folders are created
    save_model_file(path, {"w": torch.ones(2)}, {"pivot": (0.0, 0.0, 0.2)}, kind="discriminator",
                    extra={"eg3d_class": "DualDiscriminator"})
    meta = read_model_metadata(path)
    assert meta.kind == "discriminator"
    assert meta.config == {"pivot": [0.0, 0.0, 0.2]}  # JSON turns tuples into lists
    assert meta.extra == {"eg3d_class": "DualDiscriminator"}
    with pytest.raises(CheckpointError, match="holds a 'discriminator' model, expected a 'generator'"):
        read_model_metadata(path, expected_kind="generator")


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_model_file(path, {"w": torch.full((3,), 1.0)}, CONFIG, kind="generator")

    import dreamportrait.checkpoints as checkpoints

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_model_file(path, {"w": torch.full((3,), 2.0)}, CONFIG, kind="generator")
    monkeypatch.undo()

    assert os.listdir(tmp_path) == ["model.safetensors"]  # temp file removed
    assert torch.equal(load_model_file(path).tensors["w"], torch.full((3,), 1.0))  # old file intact


def test_missing_file_error_names_path_and_remedy(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError) as info:
        load_model_file(path)
    assert str(path) in str(info.value) and "does not exist" in str(info.value)
    assert "python -m dreamportrait.eg3d.convert" in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_file_error_suggests_redownload(tmp_path, damage):
    good = tmp_path / "good.safetensors"
    save_model_file(good, {"w": torch.arange(100.0)}, CONFIG, kind="generator")
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes({"truncated": data[:-16], "garbage": b"not a model at all" * 4, "empty": b""}[damage])
    for reader in (load_model_file, read_model_metadata):
        with pytest.raises(CheckpointError, match="re-download or re-convert") as info:
            reader(bad)
        assert str(bad) in str(info.value)


def test_plain_safetensors_and_pickles_point_to_the_converter(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a DreamPortrait model file.*eg3d.convert"):
        load_model_file(plain)

    pkl = tmp_path / "ffhq512-128.pkl"
    pkl.write_bytes(pickle.dumps({"G_ema": None}, protocol=4))
    with pytest.raises(CheckpointError, match="is a Python pickle.*eg3d.convert"):
        load_model_file(pkl)


def test_wrong_kind_and_bad_metadata_are_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_model_file(path, {"w": torch.zeros(2)}, CONFIG, kind="generator")
    with pytest.raises(CheckpointError, match="holds a 'generator' model, expected a 'discriminator'"):
        load_model_file(path, expected_kind="discriminator")

    newer = tmp_path / "newer.safetensors"
    save_file({"w": torch.zeros(2)}, newer, metadata={
        "format": "dreamportrait", "format_version": "99", "kind": "generator", "config": "{}"})
    with pytest.raises(CheckpointError, match="format_version '99'"):
        load_model_file(newer)

    broken = tmp_path / "broken.safetensors"
    save_file({"w": torch.zeros(2)}, broken, metadata={
        "format": "dreamportrait", "format_version": "1", "kind": "generator", "config": "{oops"})
    with pytest.raises(CheckpointError, match="corrupt metadata"):
        load_model_file(broken)


def test_save_rejects_bad_metadata(tmp_path):
    path = tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match="reserved"):
        save_model_file(path, {"w": torch.zeros(1)}, CONFIG, kind="generator", extra={"config": 1})
    with pytest.raises(ValueError, match="'config' is not JSON-serialisable"):
        save_model_file(path, {"w": torch.zeros(1)}, {"bad": object()}, kind="generator")
    with pytest.raises(ValueError, match="kind must be a non-empty string"):
        save_model_file(path, {"w": torch.zeros(1)}, CONFIG, kind="")
    assert not path.exists()


def test_atomic_folder_has_the_permissions_of_a_plain_folder(tmp_path):
    from dreamportrait.checkpoints import atomic_folder
    with atomic_folder(tmp_path / "model") as staging:
        (staging / "a.txt").write_text("1")
    (tmp_path / "plain").mkdir()
    assert (tmp_path / "model").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_atomic_folder_replaces_whole_or_leaves_the_old_folder(tmp_path):
    from dreamportrait.checkpoints import atomic_folder
    target = tmp_path / "model"
    with atomic_folder(target) as staging:
        (staging / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_folder(target) as staging:
            (staging / "a.txt").write_text("2")
            raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_folder(target) as staging:
        (staging / "b.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_folder(target, replace=False):
            pass


def test_atomic_file_keeps_the_suffix_and_leaves_the_old_file_on_error(tmp_path):
    from dreamportrait.checkpoints import atomic_file, atomic_write
    target = tmp_path / "sub" / "video.mp4"
    assert atomic_write(target, b"old") == target  # creates the parent folder
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_file(target) as tmp:
            assert tmp.parent == target.parent and tmp.suffix == ".mp4" and tmp != target
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and os.listdir(target.parent) == ["video.mp4"]
    atomic_write(target, "new text, stored as UTF-8: é")
    assert target.read_text(encoding="utf-8") == "new text, stored as UTF-8: é"
    assert os.listdir(target.parent) == ["video.mp4"]
