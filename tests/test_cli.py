"""`python -m dreamportrait generate`: seeds, cameras, file names, outputs equal to the pipeline, errors, --help.

Protects: seed ranges/lists, that each PNG holds exactly the pipeline's render for its prompt/seed/
camera at the true resolution, that --video and --mesh write decodable files, that bad flags exit
with a message naming the problem, and that --help documents every flag.
"""
import runpy
import sys

import numpy as np
import pytest
from PIL import Image

from test_app import PROMPT, frame_count, mesh_threshold, tiny_checkpoint
from dreamportrait.app_logic import InputError
from dreamportrait.cli import build_parser, main, parse_seeds, slug
from dreamportrait.grid import to_uint8
from dreamportrait.mesh import load_mesh
from dreamportrait.pipeline import DreamPortraitPipeline

SLUG = "a-young-woman-with-long-blond-hair-and-blue-eyes"


@pytest.fixture(scope="module")
def pipeline():
    return DreamPortraitPipeline.from_pretrained(tiny_checkpoint())


def run(*flags, out):
    return main(["generate", "--checkpoint", str(tiny_checkpoint()), "--out", str(out), *flags])


@pytest.mark.parametrize("text, seeds", [("0-3", [0, 1, 2, 3]), ("1,5,9", [1, 5, 9]), ("0-2, 7", [0, 1, 2, 7]),
                                         ("4,4,2-4", [4, 2, 3]), (" 12 ", [12])])
def test_seed_ranges_and_lists(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text, problem", [("5-2", "runs backwards"), ("a", "whole number"),
                                           ("-1", "out of range"), ("0-20000", "at most 10000")])
def test_bad_seed_lists_are_refused(text, problem):
    with pytest.raises(InputError, match=problem):
        parse_seeds(text)


def test_slug_is_file_name_safe_and_bounded():
    assert slug(PROMPT) == SLUG
    assert slug("Ünïcode?!/..") == "n-code"
    assert slug("!!!") == "portrait"
    assert len(slug("word " * 40)) <= 48


def test_views_video_and_mesh_files(tmp_path, pipeline, capsys):
    threshold = mesh_threshold(pipeline, PROMPT, 1)
    rc = run("--prompt", PROMPT, "--seeds", "0-1", "--views", "3", "--max-yaw", "30", "--video", "--frames", "4",
             "--mesh", "--mesh-resolution", "24", "--mesh-threshold", str(threshold), "--no-progress", out=tmp_path)
    assert rc == 0
    expected = {f"{SLUG}_seed{s}_{v}" for s in (0, 1)
                for v in ("yaw-30_pitch+0.png", "yaw+0_pitch+0.png", "yaw+30_pitch+0.png", "orbit.mp4", "mesh24.glb")}
    assert {p.name for p in tmp_path.iterdir()} == expected
    assert set(capsys.readouterr().out.split()) == {str(tmp_path / name) for name in expected}
    png = np.asarray(Image.open(tmp_path / f"{SLUG}_seed1_yaw+30_pitch+0.png"))
    np.testing.assert_array_equal(png, to_uint8(pipeline.generate(PROMPT, 1, 0.7, 30, 0)[1]["image"][0]))
    assert frame_count(tmp_path / f"{SLUG}_seed0_orbit.mp4") == 4
    mesh = load_mesh(tmp_path / f"{SLUG}_seed1_mesh24.glb")
    assert len(mesh.faces) > 50 and len(np.unique(mesh.colors, axis=0)) > 5


def test_one_camera_for_a_seed_list_with_progress_bar(tmp_path, pipeline, capsys):
    assert run("--prompt", "x", "--seeds", "3,1", "--yaw", "-20", "--pitch", "10", "--psi", "0.5", out=tmp_path) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_seed1_yaw-20_pitch+10.png", "x_seed3_yaw-20_pitch+10.png"]
    png = np.asarray(Image.open(tmp_path / "x_seed3_yaw-20_pitch+10.png"))
    np.testing.assert_array_equal(png, to_uint8(pipeline.generate("x", 3, 0.5, -20, 10)[1]["image"][0]))
    assert "2/2" in capsys.readouterr().err


def test_grid_figure_holds_every_still_in_prompt_seed_rows_and_view_columns(tmp_path):
    figure = tmp_path / "figure.png"
    assert run("--prompt", "x", "--prompt", "y", "--seeds", "0-1", "--views", "2", "--grid", str(figure),
               "--no-progress", out=tmp_path / "stills") == 0
    grid = np.asarray(Image.open(figure))
    tile = 2 * 64 + 2  # stills upscaled twice, 2 px apart, after a 260 px label column
    assert grid.shape == (4 * tile, 260 + 2 * tile, 3)
    for row, (prompt, seed) in enumerate([("x", 0), ("x", 1), ("y", 0), ("y", 1)]):
        for col, yaw in enumerate(("-30", "+30")):
            still = np.asarray(Image.open(tmp_path / "stills" / f"{prompt}_seed{seed}_yaw{yaw}_pitch+0.png"))
            y, x = row * tile, 260 + col * tile
            np.testing.assert_array_equal(grid[y:y + 128:2, x:x + 128:2], still)
    assert (grid[:, :260] < 128).any()  # the labels are written


@pytest.mark.parametrize("flags, code, message", [
    (["--prompt", "x", "--yaw", "10", "--views", "3"], 2, "--yaw and --views exclude each other"),
    (["--prompt", "x", "--yaw", "90"], 2, "--yaw is 90, outside the allowed range"),
    (["--prompt", " "], 2, "prompt is empty"),
    (["--prompt", "x", "--seeds", "9-1"], 2, "runs backwards"),
    (["--prompt", "x", "--psi", "3"], 2, "--psi is 3"),
])
def test_bad_flags_exit_with_a_message(tmp_path, capsys, flags, code, message):
    assert run(*flags, out=tmp_path) == code
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_missing_checkpoint_exits_with_one_paragraph(tmp_path, capsys):
    assert main(["generate", "--prompt", "x", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "none/generator.safetensors does not exist" in err and "python -m train" in err and "\n" == err[-1]


def test_help_documents_every_flag(capsys, monkeypatch):
    generate = next(a for a in build_parser()._actions if a.dest == "command").choices["generate"]
    for action in generate._actions:
        assert action.help and len(action.help) > 10, f"{action.option_strings} has no help"
    monkeypatch.setattr(sys, "argv", ["python -m dreamportrait", "generate", "--help"])
    with pytest.raises(SystemExit) as done:  # through dreamportrait/__main__.py, as `python -m dreamportrait`
        runpy.run_module("dreamportrait", run_name="__main__")
    assert done.value.code == 0
    text = capsys.readouterr().out
    for action in generate._actions:
        assert all(opt in text for opt in action.option_strings)
