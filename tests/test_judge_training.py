"""Training and evaluating the judge (world/judge_training.py) on a tiny rendered data set (CPU, seconds)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreamportrait.synthetic.attributes import ATTRIBUTES
from dreamportrait.synthetic.dataset_writer import write_dataset
from dreamportrait.synthetic.judge import AttributeClassifier, JudgeConfig
from world import judge_training as jt
from world.data import WorldData
from world.judge_training import train_step

REPO = Path(__file__).resolve().parents[1]
TINY_JUDGE = dict(resolution=32, channels=(8, 16), feature_dim=32)
# 16 identities: 15 train, 1 validation; 240 steps of 4 images.
RUN = dict(kimg=0.96, batch=4, lr=3e-3, seed=1, warmup_kimg=0.1, val_every_kimg=0.4, log_every_kimg=0.1,
           judge=TINY_JUDGE)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("world") / "tiny-32", num=16, resolution=32, seed=5,
                         progress=False)


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory) -> Path:
    """An uninterrupted run (checkpointed only at its end), exported with its log."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    jt.train_judge(str(data), run_dir, progress=False, checkpoint_seconds=math.inf,
                   export=str(run_dir.parent / "export" / "judge.safetensors"), **RUN)
    return run_dir


def test_training_step_lowers_the_loss_on_a_fixed_batch_of_renders(data):
    world = WorldData.load(data)
    torch.manual_seed(0)
    judge = AttributeClassifier(JudgeConfig(**TINY_JUDGE))
    images, targets = world.float_images(slice(0, 8)), judge.encode_targets(world.attributes[:8])
    opt = torch.optim.AdamW(judge.parameters(), lr=3e-3)
    losses = [train_step(judge, opt, images, targets) for _ in range(25)]
    assert losses[-1] < 0.3 * losses[0], losses


def test_batches_visit_every_training_image_once_per_epoch():
    seen = np.concatenate([jt.batch_indices(10, 4, seed=0, step=s) for s in range(5)])  # two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])


def test_validation_holds_out_the_last_identities():
    seeds = np.array([7, 7, 3, 3, 9, 9, 4, 4])  # four identities of two views each
    train, val = jt.split_identities(seeds, 0.25)
    assert val.tolist() == [6, 7] and train.tolist() == [0, 1, 2, 3, 4, 5]


def test_random_shift_translates_without_changing_content():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    gen = torch.Generator().manual_seed(0)
    shifted = jt.random_shift(images, 2, gen)
    offsets = torch.randint(0, 5, (2, 2), generator=torch.Generator().manual_seed(0)).tolist()
    for img, out, (dy, dx) in zip(images, shifted, offsets):
        dy, dx = dy - 2, dx - 2  # shift of the content: the crop starts dy rows further down
        inner = out[:, 2:6, 2:6]
        assert torch.equal(inner, img[:, 2 + dy:6 + dy, 2 + dx:6 + dx])
    assert torch.equal(jt.random_shift(images, 0, gen), images)


def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_run(data, reference_run, tmp_path):
    run_dir = tmp_path / "killed"
    code = ("import torch; torch.set_num_threads(1); from world.judge_training import train_judge; "
            f"train_judge({str(data)!r}, {str(run_dir)!r}, progress=False, checkpoint_seconds=0, **{RUN!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while not (run_dir / "state.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = torch.load(run_dir / "state.pt", weights_only=False)["nimg"]
    assert 0 < killed_at < RUN["kimg"] * 1000, f"the run was not stopped midway ({killed_at} images)"

    with pytest.raises(FileExistsError, match="--resume"):
        jt.train_judge(str(data), run_dir, progress=False, **RUN)
    with pytest.raises(ValueError, match="settings differ"):
        jt.train_judge(str(data), run_dir, resume=True, progress=False, **{**RUN, "lr": 1e-2})
    jt.train_judge(str(data), run_dir, resume=True, progress=False, checkpoint_seconds=math.inf, **RUN)

    ref = torch.load(reference_run / "state.pt", weights_only=False)
    got = torch.load(run_dir / "state.pt", weights_only=False)
    assert got["nimg"] == ref["nimg"] == 960
    assert ref["model"].keys() == got["model"].keys()
    for name, tensor in ref["model"].items():
        assert torch.equal(tensor, got["model"][name]), name
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert records[-1]["nimg"] == 960 and "val/mean_accuracy" in records[-1]


def test_exported_judge_loads_and_carries_its_log(reference_run):
    export = reference_run.parent / "export"
    judge = AttributeClassifier.from_pretrained(export / "judge.safetensors")
    assert judge.config.resolution == 32
    assert (export / "logs" / "judge-log.jsonl").read_text() == (reference_run / "log.jsonl").read_text()
    losses = [json.loads(line)["train/loss"] for line in (reference_run / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.7 * losses[0], losses  # it learned something, not just ran


def test_command_line_errors_name_the_problem(data, reference_run, tmp_path, capsys):
    missing = tmp_path / "no-such-set"
    assert jt.main(["--data", str(missing), "--run-dir", str(tmp_path / "a"), "--kimg", "1"]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert jt.main(["--data", str(data), "--run-dir", str(tmp_path / "b"), "--kimg", "1", "--resume"]) == 2
    assert "no state.pt" in capsys.readouterr().err
    assert jt.main(["--data", str(data), "--run-dir", str(reference_run), "--kimg", "1"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert jt.main(["evaluate", "--judge", str(tmp_path / "none.safetensors"), "--num", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_evaluation_reports_every_attribute_at_every_view(reference_run, tmp_path, capsys, monkeypatch):
    out, sheet = tmp_path / "eval.json", tmp_path / "misses.png"
    judge = reference_run.parent / "export" / "judge.safetensors"
    sheet.write_bytes(b"an earlier judge's sheet")
    assert jt.main(["evaluate", "--judge", str(judge), "--num", "5", "--seed", "3", "--out", str(out),
                    "--misses", str(sheet), "--no-progress"]) == 0
    results = json.loads(out.read_text())
    assert list(results["per_view"]) == ["frontal", "yaw -30", "yaw +30"]
    for view in results["per_view"].values():
        assert set(view["per_attribute"]) == set(ATTRIBUTES)
        assert all(0.0 <= acc <= 1.0 for acc in view["per_attribute"].values())
        assert view["counts"]["gender"] == 5
    table = capsys.readouterr().out
    assert table.startswith("| attribute | frontal | yaw -30 | yaw +30 |")
    assert all(f"| {name} |" in table for name in ATTRIBUTES)
    # one row per view and attribute with a miss (a judge trained this briefly misses many)
    rows = sum(sum(1 for a in ATTRIBUTES if acc["per_attribute"][a] < 1.0)
               for acc in json.loads(out.read_text())["per_view"].values())
    assert rows > 0 and Image.open(sheet).size[1] == rows * (64 + 22)
    # a judge without misses writes no sheet and leaves no earlier one standing
    monkeypatch.setattr(jt, "misses_sheet", lambda *a, **k: None)
    assert jt.main(["evaluate", "--judge", str(judge), "--num", "1", "--misses", str(sheet), "--no-progress"]) == 0
    assert not sheet.exists()


def test_misses_sheet_shows_one_row_per_missed_attribute_and_nothing_when_all_are_right():
    images = torch.linspace(-1, 1, 3 * 3 * 16 * 16).reshape(3, 3, 16, 16)
    truth = [{"gender": "man", "age": "young", "hair_color": None},
             {"gender": "woman", "age": "old", "hair_color": "red"},
             {"gender": "man", "age": "old", "hair_color": "black"}]
    assert jt.misses_sheet(images, truth, [dict(t, hair_color=t["hair_color"] or "red") for t in truth]) is None
    readings = [dict(t) for t in truth]
    readings[0].update(gender="woman", hair_color="red")  # hair colour unseen there: not a miss
    readings[1].update(gender="man")
    readings[2].update(age="young")
    sheet = jt.misses_sheet(images, truth, readings, per_row=4)
    assert sheet.shape == (2 * (16 + 22), 110 + 4 * 16, 3)  # rows: age, gender
    gender_row = sheet[16 + 22:2 * 16 + 22, 110:110 + 2 * 16]
    assert np.array_equal(gender_row[:, :16], jt.to_uint8(images[:1])[0])
    assert np.array_equal(gender_row[:, 16:], jt.to_uint8(images[1:2])[0])
    assert (sheet[16 + 22:2 * 16 + 22, 110 + 2 * 16:] == 255).all()  # only two gender misses
