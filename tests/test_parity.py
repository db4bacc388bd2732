"""Parity with NVIDIA's reference EG3D on the shared fixtures (relative L2 error <= 1e-4)."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreamportrait.eg3d.parity import TOLERANCE
from fixtures_path import FIXTURE_NAMES, REPO, fixture_prefix


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_parity_cli_passes_on_shared_fixture(name):
    prefix = fixture_prefix(name)
    proc = subprocess.run([sys.executable, "-m", "dreamportrait.eg3d.parity", str(prefix)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("out.")]
    # Every output the fixture lists is compared, each within tolerance.
    expected = sorted(k for k in load_file(str(prefix.with_suffix(".safetensors"))) if k.startswith("out."))
    assert sorted(r[0] for r in rows) == expected
    assert all(float(r[1]) <= TOLERANCE and r[2] == "ok" for r in rows)


def test_parity_cli_fails_when_a_weight_is_off(tmp_path):
    prefix = fixture_prefix("eg3d_parity_128")
    tensors = load_file(str(prefix.with_suffix(".safetensors")))
    tensors["G.decoder.net.2.bias"] = tensors["G.decoder.net.2.bias"] + 0.05
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    (tmp_path / "bad.json").write_text(prefix.with_suffix(".json").read_text())
    proc = subprocess.run([sys.executable, "-m", "dreamportrait.eg3d.parity", str(tmp_path / "bad")], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    failed = {line.split()[0] for line in proc.stdout.splitlines() if line.endswith("FAIL")}
    # The decoder feeds points, raw image, image and D; mapping and planes are untouched.
    assert {"out.points_rgb", "out.image_raw", "out.image"} <= failed
    assert "out.ws" not in failed and "out.planes_stride8" not in failed


def test_fixture_camera_labels_match_eg3d_lookat_sampler():
    from dreamportrait import cameras as C
    t = load_file(str(fixture_prefix("eg3d_parity_128").with_suffix(".safetensors")))
    label = C.make_label(C.lookat_pose(t["in.yaw"], t["in.pitch"]), C.intrinsics(C.fov_to_focal(18.837), 2))
    torch.testing.assert_close(label, t["in.c"], atol=1e-6, rtol=0)
