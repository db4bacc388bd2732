"""The training data set reader (train/data.py) on the synthetic world's output and on broken data."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dreamportrait.synthetic.dataset_writer import write_dataset
from train.data import DatasetError, PortraitDataset


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 identities x 2 views at 32x32."""
    out = tmp_path_factory.mktemp("reader") / "ds"
    return write_dataset(out, num=3, resolution=32, seed=3, views=2, progress=False)


@pytest.fixture(scope="module")
def zipped(folder, tmp_path_factory):
    """The same data set as a zip (EG3D's dataset_tool layout), packed from the folder."""
    base = tmp_path_factory.mktemp("reader_zip") / "ds"
    return shutil.make_archive(str(base), "zip", folder)


def _copy(folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def test_items_hold_image_label_and_caption(folder, zipped):
    labels = dict((n, l) for n, l in json.loads((folder / "dataset.json").read_text())["labels"])
    captions = json.loads((folder / "captions.json").read_text())
    for path in (folder, zipped):
        ds = PortraitDataset(path)
        assert len(ds) == 6 and ds.resolution == 32 and ds.attributes is not None
        for i in range(len(ds)):
            item = ds[i]
            name = ds.names[i]
            assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
            pixels = np.asarray(Image.open(folder / name).convert("RGB")).astype(np.float32)
            assert torch.equal(item["image"], torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1))
            assert torch.equal(item["label"], torch.tensor(labels[name], dtype=torch.float32))
            assert item["caption"] in captions[name] and item["index"] == i
            assert ds.attributes[name]["view"] in (0, 1)


def test_training_captions_are_seeded_random_and_evaluation_captions_fixed(folder):
    train = PortraitDataset(folder, seed=5)
    draws = [[train.caption(i) for i in range(len(train))]]
    assert draws[0] == [PortraitDataset(folder, seed=5).caption(i) for i in range(len(train))]
    for epoch in range(1, 6):
        train.set_epoch(epoch)
        draws.append([train.caption(i) for i in range(len(train))])
    assert len({tuple(d) for d in draws}) > 1  # captions change across epochs
    assert len({c for d in draws for c in d}) > len(train)  # more than one caption per image is used
    evaluation = PortraitDataset(folder, train=False)
    evaluation.set_epoch(3)
    assert [evaluation[i]["caption"] for i in range(6)] == [evaluation.captions[i][0] for i in range(6)]


def test_dataloader_batches_in_worker_processes(zipped):
    ds = PortraitDataset(zipped, seed=1)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].shape == (4, 25)
    assert batch["caption"] == [ds.caption(i) for i in range(4)]
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1


def test_rank_shards_partition_the_data_set(folder):
    full = PortraitDataset(folder).names
    shards = [PortraitDataset(folder, rank=r, world_size=4).names for r in range(4)]
    assert sorted(n for s in shards for n in s) == sorted(full)
    assert [len(s) for s in shards] == [2, 2, 1, 1]
    with pytest.raises(ValueError, match="rank"):
        PortraitDataset(folder, rank=2, world_size=2)


def test_plain_eg3d_folder_with_captions_and_no_attributes(tmp_path):
    """Real EG3D-format data (e.g. FFHQ-Text after EG3D's crops): images, dataset.json, captions."""
    (tmp_path / "sub").mkdir()
    labels = []
    for k in range(2):
        Image.fromarray(np.full((16, 16, 3), 40 * k, np.uint8)).save(tmp_path / "sub" / f"{k}.png")
        labels.append([f"sub\\{k}.png", list(range(25))])  # EG3D tolerates Windows separators
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
    (tmp_path / "captions.json").write_text(json.dumps({"sub/0.png": ["a face"], "sub/1.png": ["b", "c"]}))
    ds = PortraitDataset(tmp_path, train=False)
    assert ds.attributes is None and ds.names == ["sub/0.png", "sub/1.png"]
    assert ds[1]["caption"] == "b" and ds[1]["image"].shape == (3, 16, 16)
    assert ds[1]["image"][0, 0, 0].item() == pytest.approx(40 / 127.5 - 1)


def _rewrite(path, name, change):
    data = json.loads((path / name).read_text())
    change(data)
    (path / name).write_text(json.dumps(data))


@pytest.mark.parametrize("breakage, message", [
    (lambda p: (p / "dataset.json").unlink(), "no dataset.json"),
    (lambda p: (p / "00000/img00000003.png").unlink(), "missing"),
    (lambda p: _rewrite(p, "dataset.json", lambda d: d["labels"][2][1].pop()), "entry 2 .*25 numbers"),
    (lambda p: _rewrite(p, "dataset.json", lambda d: d.pop("labels")), "expected"),
    (lambda p: _rewrite(p, "captions.json", lambda d: d.pop("00000/img00000001.png")), "no captions"),
    (lambda p: _rewrite(p, "captions.json", lambda d: d.update({"00000/img00000000.png": []})), "no captions"),
    (lambda p: (p / "captions.json").unlink(), "no captions.json"),
    (lambda p: (p / "dataset.json").write_text("{oops"), "not valid JSON"),
    (lambda p: _rewrite(p, "attributes.json", lambda d: d.pop("00000/img00000005.png")), "attributes.json"),
    (lambda p: Image.new("RGB", (32, 16)).save(p / "00000/img00000000.png"), "square"),
    (lambda p: Image.new("RGB", (16, 16)).save(p / "00000/img00000000.png"), "first image|16x16"),
])
def test_malformed_data_sets_fail_with_a_clear_message(folder, tmp_path, breakage, message):
    path = _copy(folder, tmp_path)
    breakage(path)
    with pytest.raises(DatasetError, match=message):
        ds = PortraitDataset(path)
        for i in range(len(ds)):
            ds[i]


def test_missing_path_and_non_zip_file(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        PortraitDataset(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a zip"):
        PortraitDataset(tmp_path / "file.txt")
