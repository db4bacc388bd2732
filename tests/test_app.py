"""The app's handlers (dreamportrait.app_logic.AppBackend) called directly, without a browser.

Protects: determinism (same prompt + seed + camera => identical pixels), camera re-renders from
cached planes (no mapping/synthesis, equal to a fresh generation at that camera), every bad input
named in the issue with a message naming the problem, per-session state with a bounded store,
prompt mixing / blending / style interpolation / videos / meshes, and start-up errors.

The tiny checkpoint is built here (never checkpoints/); its text gates and fusion layer are set
away from their identity initialisation so that prompts change the picture.
"""
import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from dreamportrait.app_logic import (
    MAX_MIX_PROMPTS, AppBackend, InputError, SessionStore, StartupError, depth_image, describe_model, display_scale,
    enlarge, find_default_checkpoint, load_pipeline, read_example_prompts,
)
from dreamportrait.grid import to_uint8
from dreamportrait.mesh import density_grid, load_mesh
from dreamportrait.pipeline import MAX_SEED, DreamPortraitPipeline
from dreamportrait.text_encoder import TextEncoder
from dreamportrait.text_generator import DreamPortraitGenerator, TextConditionConfig
from dreamportrait.generator import preset

ENCODER_CONFIG = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)
PROMPT = "A young woman with long blond hair and blue eyes."
OTHER = "An old man with a full gray beard and glasses."
SCALE = 8  # the tiny model's 64 px output is enlarged x8 to 512 px for display


@functools.lru_cache(maxsize=None)
def tiny_checkpoint(**overrides) -> Path:
    """A tiny text-conditioned generator folder (``preset("tiny", **overrides)``), built once per test
    process and removed at exit."""
    root = Path(tempfile.mkdtemp(prefix="dreamportrait-tiny-"))
    atexit.register(shutil.rmtree, root, True)
    encoder = TextEncoder.from_config(ENCODER_CONFIG, seed=0)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        G = DreamPortraitGenerator(preset("tiny", **overrides),
                                   TextConditionConfig(text_dim=encoder.width, adapter_count=2))
        for name, param in G.named_parameters():
            if name.endswith(".gamma"):
                param.fill_(1.0)  # open the cross-attention gates
        fusion = G.semantics.fusion
        fusion.weight.normal_(0.0, 0.5 / (fusion.weight_gain * fusion.weight.shape[1] ** 0.5))
    folder = root / "tiny-test"
    G.save_pretrained(folder / "generator.safetensors",
                      extra={"text_encoder": encoder.describe(), "kimg": 0.0, "stage": "test"})
    return folder


@pytest.fixture(scope="module")
def pipeline():
    return DreamPortraitPipeline.from_pretrained(tiny_checkpoint())


@pytest.fixture()
def warned():
    return []


@pytest.fixture()
def backend(pipeline, warned, tmp_path):
    return AppBackend(pipeline, warn=warned.append, max_sessions=3, max_mesh_resolution=48, work_dir=tmp_path)


def shown(pipeline, prompt, seed, yaw=0.0, pitch=0.0, psi=0.7):
    """What the page should show: the pipeline's render, enlarged with nearest neighbour."""
    _, views = pipeline.generate(prompt, seed, psi, yaw, pitch)
    return enlarge(to_uint8(views["image"][0]), SCALE)


def mesh_threshold(pipeline, prompt, seed) -> float:
    """A density level inside this random model's range (its density never reaches EG3D's 10)."""
    return float(np.median(density_grid(pipeline.G, pipeline.portrait(prompt, seed).planes, 16)))


def frame_count(path) -> int:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    count = sum(1 for _ in reader)
    assert meta["size"][0] > 0
    return count


# Generate and camera ---------------------------------------------------------------------------

def test_generate_is_deterministic_sharp_and_states_true_resolution(backend, pipeline):
    image, depth, raw, caption = backend.generate("s", PROMPT, "5", 0.7, 10, -5)
    again = backend.generate("s2", PROMPT, 5, 0.7, 10, -5)[0]
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(image, shown(pipeline, PROMPT, 5, 10, -5))
    assert image.shape == (64 * SCALE, 64 * SCALE, 3)
    blocks = image.reshape(64, SCALE, 64, SCALE, 3)
    assert (blocks == blocks[:, :1, :, :1]).all(), "enlargement must be nearest-neighbour (sharp blocks)"
    assert "64×64" in caption and "×8" in caption and "32×32" in caption and "generated (mapping" in caption
    assert raw.shape == (32 * 16, 32 * 16, 3) and depth.shape == raw.shape
    assert depth.std() > 0 and not np.array_equal(image, backend.generate("s", PROMPT, 6, 0.7, 10, -5)[0])


def test_render_reuses_cached_planes_and_equals_fresh_generation(backend, pipeline, monkeypatch):
    front = backend.generate("a", PROMPT, 3, 0.7, 0, 0)
    calls = []
    for name in ("mapping", "synthesize_planes"):
        original = getattr(pipeline.G, name)
        monkeypatch.setattr(pipeline.G, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    turned = backend.render("a", 30, -10)
    assert calls == [], "a camera change must not run mapping or synthesis"
    assert "re-rendered from cached tri-planes in" in turned[3]
    monkeypatch.undo()
    fresh = backend.generate("b", PROMPT, 3, 0.7, 30, -10)
    for got, want in zip(turned[:3], fresh[:3]):
        np.testing.assert_array_equal(got, want)
    assert np.abs(turned[0].astype(int) - front[0]).mean() > 1, "the view must change with the camera"


def test_sessions_keep_their_own_portraits(backend, pipeline):
    backend.generate("one", PROMPT, 1, 0.7)
    backend.generate("two", OTHER, 2, 0.7)
    np.testing.assert_array_equal(backend.render("one", 20, 0)[0], shown(pipeline, PROMPT, 1, 20, 0))
    np.testing.assert_array_equal(backend.render("two", 20, 0)[0], shown(pipeline, OTHER, 2, 20, 0))


def test_session_store_evicts_least_recent_and_frees_on_close(backend):
    for sid in ("s1", "s2", "s3"):
        backend.generate(sid, PROMPT, 0, 0.7)
    folder = backend.sessions.get("s1").folder  # touching s1 makes s2 the least recent
    backend.generate("s4", PROMPT, 0, 0.7)
    assert len(backend.sessions) == 3 and "s2" not in backend.sessions and folder.is_dir()
    with pytest.raises(InputError, match="dropped to make room.*keeps 3 sessions.*Generate again"):
        backend.render("s2", 0, 0)
    assert len(backend.sessions) == 3 and "s3" in backend.sessions, "a failed request must not evict anyone"
    s3 = backend.sessions.get("s3")
    backend.orbit_video("s3", 2)
    assert any(s3.folder.iterdir())
    backend.close_session("s3")
    assert "s3" not in backend.sessions and not s3.folder.exists() and s3.portrait is None
    with pytest.raises(InputError, match="Nothing to re-render yet"):
        backend.render("s3", 0, 0)
    with pytest.raises(ValueError, match="at least 1"):
        SessionStore(0, backend.work_dir)


def test_session_store_stays_bounded_under_concurrent_visitors(tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    store = SessionStore(4, tmp_path)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: store.get(f"visitor-{i % 50}"), range(2000)))
    assert len(store) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(store.get(f"visitor-{i}").folder.name
                                                                 for i in range(50) if f"visitor-{i}" in store)


@pytest.mark.parametrize("size, scale", [(64, 8), (100, 6), (128, 4), (512, 1), (1024, 1)])
def test_display_enlargement_reaches_512_pixels_with_whole_factors(size, scale):
    assert display_scale(size) == scale
    image = np.arange(size * size * 3, dtype=np.uint8).reshape(size, size, 3)
    big = enlarge(image, scale)
    assert big.shape == (size * scale, size * scale, 3) and np.array_equal(big[::scale, ::scale], image)


def test_depth_view_shows_near_bright_and_far_dark():
    view = depth_image(torch.tensor([2.5, 2.7, 3.3]).reshape(1, 1, 1, 3))
    torch.testing.assert_close(view.flatten(), torch.tensor([1.0, 0.5, -1.0]))


# Bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["", "   \n "])
def test_empty_prompt_is_refused(backend, prompt):
    with pytest.raises(InputError, match="prompt is empty: describe the portrait"):
        backend.generate("s", prompt, 0, 0.7)


def test_overlong_prompt_warns_with_token_counts(backend, warned, pipeline):
    long_prompt = "A young woman with " + " and ".join(["long blond hair"] * 30) + "."
    image = backend.generate("s", long_prompt, 0, 0.7)[0]
    assert len(warned) == 1
    text, _ = pipeline.encode(long_prompt)
    assert f"has {int(text.prompt_tokens[0])} tokens" in warned[0]
    assert "only the first 75" in warned[0] and "rest was cut" in warned[0]
    assert image.shape == (512, 512, 3)
    with pytest.raises(InputError, match="characters long; the limit is 1000.*shorten it"):
        backend.generate("s", "a" * 1001, 0, 0.7)


@pytest.mark.parametrize("seed, problem", [("abc", "whole number between 0 and"), ("1.5", "whole number"),
                                           (-1, "out of range"), (MAX_SEED + 1, "out of range"),
                                           ("", "whole number"), (None, "whole number")])
def test_bad_seed_is_refused_with_the_valid_range(backend, seed, problem):
    with pytest.raises(InputError, match=f"seed.*{problem}.*{MAX_SEED}"):
        backend.generate("s", PROMPT, seed, 0.7)


@pytest.mark.parametrize("args, message", [
    ((PROMPT, 0, 1.5), r"truncation ψ is 1.5, outside the allowed range: use a value between 0 and 1"),
    ((PROMPT, 0, "x"), r"truncation ψ must be a number"),
    ((PROMPT, 0, 0.7, 61, 0), r"yaw is 61.*between -60 and 60"),
    ((PROMPT, 0, 0.7, 0, float("nan")), r"pitch is nan.*between -30 and 30"),
])
def test_out_of_range_numbers_are_refused(backend, args, message):
    with pytest.raises(InputError, match=message):
        backend.generate("s", *args)


@pytest.mark.parametrize("call", [
    lambda b: b.render("new", 0, 0),
    lambda b: b.orbit_video("new", 2),
    lambda b: b.interpolate("new", 0, 1, 0.5),
    lambda b: b.interpolation_strip("new", 0, 1, 3),
    lambda b: b.interpolation_video("new", 0, 1, 2),
    lambda b: b.mesh("new", 32, 1.0),
])
def test_work_on_the_current_portrait_needs_one_first(backend, call):
    with pytest.raises(InputError, match="yet: generate a portrait first"):
        call(backend)


def test_mesh_resolution_above_cap_and_threshold_without_surface(backend):
    backend.generate("s", PROMPT, 0, 0.7)
    with pytest.raises(InputError, match="mesh resolution 64 is outside.*between 16 and 48.*caps the grid at 48"):
        backend.mesh("s", 64, 1.0)
    with pytest.raises(InputError, match="mesh resolution must be a whole number"):
        backend.mesh("s", 32.5, 1.0)
    with pytest.raises(InputError, match="no surface at threshold 1000.*lower"):
        backend.mesh("s", 16, 1000.0)


def test_mixing_input_is_checked(backend):
    with pytest.raises(InputError, match="No prompts to mix: write one prompt per line"):
        backend.mix("\n  \n", 0, 0.7)
    with pytest.raises(InputError, match=f"at most {MAX_MIX_PROMPTS}"):
        backend.mix("\n".join(["A man."] * (MAX_MIX_PROMPTS + 1)), 0, 0.7)
    with pytest.raises(InputError, match="seed: seed must be a whole number"):
        backend.mix("A man.", "x", 0.7)


# Mixing, blending, interpolation -----------------------------------------------------------------

def test_mix_renders_each_prompt_with_the_same_seed_and_camera(backend, pipeline):
    prompts = ["This is a woman.", "This is a middle-aged woman.", "This is a middle-aged woman with red hair."]
    strip, caption = backend.mix("\n".join(prompts) + "\n", 4, 0.7, -20, 5)
    assert strip.shape == (512, 3 * 512, 3)
    for i, prompt in enumerate(prompts):
        np.testing.assert_array_equal(strip[:, i * 512:(i + 1) * 512], shown(pipeline, prompt, 4, -20, 5))
    assert not np.array_equal(strip[:, :512], strip[:, 512:1024])
    assert "(3) This is a middle-aged woman with red hair." in caption


def test_blend_ends_are_the_two_prompts(backend, pipeline):
    a = backend.blend(PROMPT, OTHER, 0.0, 2, 0.7)[0]
    b = backend.blend(PROMPT, OTHER, 1.0, 2, 0.7)[0]
    mid = backend.blend(PROMPT, OTHER, 0.5, 2, 0.7)[0]
    np.testing.assert_array_equal(a, shown(pipeline, PROMPT, 2))
    np.testing.assert_array_equal(b, shown(pipeline, OTHER, 2))
    assert not np.array_equal(mid, a) and not np.array_equal(mid, b)
    with pytest.raises(InputError, match="blend weight is 2"):
        backend.blend(PROMPT, OTHER, 2, 2, 0.7)


def test_style_interpolation_keeps_the_prompt_and_runs_between_seeds(backend, pipeline):
    backend.generate("s", OTHER, 9, 0.7)
    start = backend.interpolate("s", 3, 8, 0.0, 15, 0)[0]
    end = backend.interpolate("s", 3, 8, 1.0, 15, 0)[0]
    np.testing.assert_array_equal(start, shown(pipeline, OTHER, 3, 15, 0))
    np.testing.assert_array_equal(end, shown(pipeline, OTHER, 8, 15, 0))
    strip = backend.interpolation_strip("s", 3, 8, 3, 15, 0)
    assert strip.shape == (512, 3 * 512, 3)
    np.testing.assert_array_equal(strip[:, :512], start)
    np.testing.assert_array_equal(strip[:, -512:], end)
    middle = backend.interpolate("s", 3, 8, 0.5, 15, 0)[0]
    np.testing.assert_array_equal(strip[:, 512:1024], middle)
    with pytest.raises(InputError, match="seed B: seed 4294967296 is out of range"):
        backend.interpolate("s", 3, 2 ** 32, 0.5)
    with pytest.raises(InputError, match="number of steps 11 is outside.*between 2 and 10"):
        backend.interpolation_strip("s", 3, 8, 11)


def test_videos_decode_with_the_requested_frame_count(backend):
    backend.generate("s", PROMPT, 0, 0.7)
    progress = []
    orbit = backend.orbit_video("s", 5, lambda fraction, text: progress.append(fraction))
    assert frame_count(orbit) == 5 and progress[-1] == 1.0
    styles = backend.interpolation_video("s", 0, 1, 3, 0, 0)
    assert frame_count(styles) == 3
    with pytest.raises(InputError, match="number of video frames 241 is outside.*between 2 and 240"):
        backend.orbit_video("s", 241)


def test_mesh_files_load_back_with_vertex_colours(backend, pipeline):
    backend.generate("s", PROMPT, 0, 0.7)
    progress = []
    glb, files, caption = backend.mesh("s", 32, mesh_threshold(pipeline, PROMPT, 0),
                                       lambda fraction, text: progress.append(fraction))
    assert glb == files[2] and [Path(f).suffix for f in files] == [".obj", ".ply", ".glb"]
    meshes = [load_mesh(f) for f in files]
    for mesh in meshes:
        assert len(mesh.vertices) > 100 and len(mesh.faces) > 100
        assert len(np.unique(mesh.colors, axis=0)) > 10, "vertex colours must vary over the surface"
        np.testing.assert_allclose(mesh.vertices, meshes[0].vertices, atol=1e-5)
    assert f"{len(meshes[0].vertices):,} vertices" in caption and progress[-1] == 1.0


# Start-up -------------------------------------------------------------------------------------------

def test_model_description_names_model_kimg_and_resolution(pipeline):
    text = describe_model(pipeline)
    assert "`tiny-test`" in text and "0 kimg" in text and "64×64" in text and "32×32" in text
    assert "stage `test`" in text


def test_missing_or_corrupt_checkpoint_gives_one_paragraph(tmp_path):
    with pytest.raises(StartupError, match=r"nowhere/generator.safetensors does not exist.*python -m train"):
        load_pipeline(tmp_path / "nowhere")
    corrupt = tmp_path / "broken" / "generator.safetensors"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"not a model" * 10)
    with pytest.raises(StartupError, match=r"broken/generator.safetensors.*--checkpoint") as info:
        load_pipeline(corrupt.parent, "cpu")
    assert "\n" not in str(info.value)
    with pytest.raises(StartupError, match="found no model in"):
        find_default_checkpoint(tmp_path / "empty")


def test_default_checkpoint_prefers_default_then_first_folder(tmp_path):
    for name in ("b-model", "a-model", "default"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "generator.safetensors").write_bytes(b"x")
    assert find_default_checkpoint(tmp_path) == tmp_path / "default"
    shutil.rmtree(tmp_path / "default")
    assert find_default_checkpoint(tmp_path) == tmp_path / "a-model"


def test_example_prompts_fit_the_text_encoder(pipeline):
    prompts = read_example_prompts()
    assert len(prompts) >= 8
    for prompt in prompts:
        text, messages = pipeline.encode(prompt)
        assert messages == [] and int(text.prompt_tokens[0]) <= 75


def test_random_seed_is_a_valid_seed(backend):
    seeds = {int(backend.random_seed()) for _ in range(20)}
    assert len(seeds) > 1 and all(0 <= s <= MAX_SEED for s in seeds)
