"""train.prepare: images + caption files + camera json -> a data set the reader accepts; clear errors."""
import json

import numpy as np
import pytest
from PIL import Image

from dreamportrait.cameras import camera_label
from train.data import PortraitDataset
from train.prepare import PrepareError, main, prepare


def make_inputs(root, n=3, size=32):
    (root / "img").mkdir()
    (root / "txt").mkdir()
    labels = []
    for i in range(n):
        Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(root / "img" / f"{i:05d}.jpg")
        (root / "txt" / f"{i:05d}.txt").write_text(f"The woman has long hair {i}.\n\nShe is smiling.\n")
        labels.append([f"{i:05d}.png", camera_label(float(i), 0.0)[0].tolist()])
    (root / "cams.json").write_text(json.dumps({"labels": labels}))


def test_prepared_data_set_reads_back(tmp_path):
    make_inputs(tmp_path)
    counts = prepare(tmp_path / "img", tmp_path / "txt", tmp_path / "cams.json", tmp_path / "out", resolution=16)
    assert counts == {"written": 3, "skipped": 0, "resolution": 16}
    ds = PortraitDataset(tmp_path / "out", train=False)
    item = ds[2]
    assert item["image"].shape == (3, 16, 16)
    assert item["caption"] == "The woman has long hair 2."
    assert ds.captions[2] == ["The woman has long hair 2.", "She is smiling."]
    np.testing.assert_allclose(item["label"].numpy(), camera_label(2.0, 0.0)[0].numpy(), atol=1e-6)


def test_every_missing_or_malformed_piece_is_named(tmp_path):
    make_inputs(tmp_path)
    (tmp_path / "txt" / "00001.txt").unlink()
    with pytest.raises(PrepareError, match="00001.jpg: no caption file"):
        prepare(tmp_path / "img", tmp_path / "txt", tmp_path / "cams.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    counts = prepare(tmp_path / "img", tmp_path / "txt", tmp_path / "cams.json", tmp_path / "out", skip_incomplete=True)
    assert counts["written"] == 2 and counts["skipped"] == 1
    (tmp_path / "txt" / "00002.txt").write_text("\n \n")
    with pytest.raises(PrepareError, match="00002.txt is empty"):
        prepare(tmp_path / "img", tmp_path / "txt", tmp_path / "cams.json", tmp_path / "o2", skip_incomplete=True)
    (tmp_path / "cams.json").write_text(json.dumps({"labels": [["00000.png", [1.0] * 24]]}))
    with pytest.raises(PrepareError, match=r"malformed label entry"):
        prepare(tmp_path / "img", tmp_path / "txt", tmp_path / "cams.json", tmp_path / "o3")
    assert main(["--images", str(tmp_path / "nope"), "--captions", str(tmp_path / "txt"), "--cameras",
                 str(tmp_path / "cams.json"), "--out", str(tmp_path / "o4")]) == 2
