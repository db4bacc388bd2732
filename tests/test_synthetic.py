"""The synthetic portrait world: determinism, cameras, captions, held-out pairs, visibility."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from dreamportrait.cameras import (FFHQ_DATASET_FOCAL, FFHQ_PIVOT, FFHQ_RADIUS, camera_label, camera_rays,
                                   label_to_yaw_pitch)
from dreamportrait.synthetic import heads
from dreamportrait.synthetic.attributes import (ATTRIBUTES, HELDOUT_COMBINATIONS, LATENT_DIMS, Identity,
                                                attributes_from_latent, heldout_pairs,
                                                sample_identities)
from dreamportrait.synthetic.cameras import sample_labels
from dreamportrait.synthetic.captions import (HELDOUT_WORDS, complete_caption, make_caption, make_captions, mentionable,
                                              parse_caption)
from dreamportrait.synthetic.dataset_writer import write_dataset
from dreamportrait.synthetic.proportions import head_parameters, on_surface
from dreamportrait.synthetic.render import HeadBatch, render


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A tiny training set (3 identities x 2 views at 32x32), written once."""
    out = tmp_path_factory.mktemp("synthetic") / "ds"
    write_dataset(out, num=3, resolution=32, seed=7, views=2, progress=False)
    return out


def _load(path, name):
    return json.loads((path / name).read_text())


# ----------------------------------------------------------------------------- determinism
def test_same_seed_writes_identical_bytes_and_another_seed_differs(written, tmp_path):
    again = write_dataset(tmp_path / "again", num=3, resolution=32, seed=7, views=2, progress=False)
    files = sorted(p.relative_to(written) for p in written.rglob("*") if p.is_file())
    assert len(files) == 6 + 4  # 6 images + dataset, captions, attributes, synthetic json
    for rel in files:
        assert (written / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = write_dataset(tmp_path / "other", num=1, resolution=32, seed=8, views=1, progress=False)
    assert (other / "00000/img00000000.png").read_bytes() != (written / "00000/img00000000.png").read_bytes()
    assert _load(other, "captions.json")["00000/img00000000.png"] != _load(written, "captions.json")["00000/img00000000.png"]


def test_zip_output_is_deterministic_and_holds_the_same_content(written, tmp_path):
    import io
    import zipfile

    from PIL import Image
    a = write_dataset(tmp_path / "a", num=1, resolution=32, seed=7, views=2, zip_output=True, progress=False)
    b = write_dataset(tmp_path / "b.zip", num=1, resolution=32, seed=7, views=2, progress=False)
    folder = write_dataset(tmp_path / "c", num=1, resolution=32, seed=7, views=2, progress=False)
    assert a.name == "a.zip" and a.read_bytes() == b.read_bytes()
    with zipfile.ZipFile(a) as z:
        assert json.loads(z.read("dataset.json")) == _load(folder, "dataset.json")
        assert json.loads(z.read("captions.json")) == _load(folder, "captions.json")
        for name in ("00000/img00000000.png", "00000/img00000001.png"):
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(z.read(name)))),
                                  np.asarray(Image.open(folder / name)))
    # The same identity in a batch with others renders the same up to rounding.
    first = np.asarray(Image.open(folder / "00000/img00000000.png")).astype(int)
    assert np.abs(first - np.asarray(Image.open(written / "00000/img00000000.png")).astype(int)).max() <= 2


def test_killed_render_resumes_to_the_bytes_of_an_uninterrupted_one(tmp_path, monkeypatch):
    import shutil

    import dreamportrait.synthetic.dataset_writer as writer
    whole = write_dataset(tmp_path / "whole", num=3, resolution=32, seed=7, views=2, batch=2, progress=False)
    # A job killed after its first batch: images 0-1 and synthetic.json written, nothing else.
    part = tmp_path / "part"
    (part / "00000").mkdir(parents=True)
    for name in ("synthetic.json", "00000/img00000000.png", "00000/img00000001.png"):
        shutil.copyfile(whole / name, part / name)
    with pytest.raises(FileExistsError, match="--resume"):
        write_dataset(part, num=3, resolution=32, seed=7, views=2, batch=2, progress=False)
    with pytest.raises(ValueError, match="other settings.*seed"):
        write_dataset(part, num=3, resolution=32, seed=8, views=2, batch=2, progress=False, resume=True)
    rendered = []
    real = writer._render_batch
    monkeypatch.setattr(writer, "_render_batch", lambda ids, labels, res: rendered.append(len(ids)) or real(ids, labels, res))
    write_dataset(part, num=3, resolution=32, seed=7, views=2, batch=2, progress=False, resume=True)
    assert rendered == [2, 2]  # the first batch was not rendered again
    files = sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(part) for p in part.rglob("*") if p.is_file())
    for rel in files:
        assert (whole / rel).read_bytes() == (part / rel).read_bytes(), rel
    with pytest.raises(FileExistsError, match="complete"):
        write_dataset(part, num=3, resolution=32, seed=7, views=2, batch=2, progress=False, resume=True)


def test_identity_rebuilds_from_its_seed(written):
    attrs = _load(written, "attributes.json")
    for entry in attrs.values():
        assert Identity.from_seed(entry["identity_seed"]).attributes == entry["attributes"]


# ----------------------------------------------------------------------------- cameras
def _check_pose(label: torch.Tensor, radius: float, pivot) -> None:
    pose = label[:16].reshape(4, 4).double()
    R, t = pose[:3, :3], pose[:3, 3]
    assert torch.allclose(R.T @ R, torch.eye(3, dtype=torch.float64), atol=1e-5)
    assert torch.linalg.det(R).item() == pytest.approx(1.0, abs=1e-5)
    assert t.norm().item() == pytest.approx(radius, abs=1e-4)
    to_pivot = torch.tensor(pivot, dtype=torch.float64) - t
    assert torch.allclose(R[:, 2], to_pivot / to_pivot.norm(), atol=1e-5)  # camera +z looks at the pivot
    assert R[1, 1].item() < 0  # OpenCV: camera +y (image down) points down in the world
    assert torch.allclose(pose[3], torch.tensor([0, 0, 0, 1.0], dtype=torch.float64))
    K = label[16:].reshape(3, 3)
    assert torch.allclose(K, torch.tensor([[FFHQ_DATASET_FOCAL, 0, 0.5], [0, FFHQ_DATASET_FOCAL, 0.5], [0, 0, 1.0]]))


def test_written_labels_are_valid_ffhq_cameras(written):
    labels = _load(written, "dataset.json")["labels"]
    attrs = _load(written, "attributes.json")
    assert len(labels) == 6
    for name, values in labels:
        label = torch.tensor(values)
        _check_pose(label, FFHQ_RADIUS, FFHQ_PIVOT)
        yaw, pitch = label_to_yaw_pitch(label[None])
        assert yaw.item() == pytest.approx(attrs[name]["yaw"], abs=1e-2)
        assert pitch.item() == pytest.approx(attrs[name]["pitch"], abs=1e-2)


def test_pose_distribution_is_ffhq_like_and_jitter_keeps_poses_valid():
    labels, yaw, pitch = sample_labels(np.random.default_rng(0), 4000)
    assert np.mean(np.abs(yaw) <= 35) > 0.95 and np.abs(yaw).max() <= 50 and np.std(yaw) > 12
    assert np.abs(pitch).max() <= 15 and np.std(pitch) > 3
    jittered, _, _ = sample_labels(np.random.default_rng(1), 50, radius_jitter=0.02, pivot_jitter=0.01)
    radii = jittered[:, [3, 7, 11]].norm(dim=1)
    assert 0.01 < radii.std() / FFHQ_RADIUS < 0.04
    misses = []
    for label, r in zip(jittered, radii):
        pose = label[:16].reshape(4, 4)
        to_pivot = torch.tensor(FFHQ_PIVOT) - pose[:3, 3]
        along = (to_pivot @ pose[:3, 2]).item()
        misses.append((to_pivot - along * pose[:3, 2]).norm().item())  # FFHQ pivot to the optical axis
        _check_pose(label, r.item(), (pose[:3, 3] + along * pose[:3, 2]).tolist())
    assert 0.003 < np.median(misses) < 0.03  # jittered pivots scatter by about 0.01 around FFHQ's


def test_camera_rays_follow_eg3d_ray_sampler():
    """Pixel centres (i + 0.5) / R, row-major, OpenCV camera: rays project back to their pixel."""
    label = camera_label([20.0], [-10.0])
    label[0, 17] = 0.01  # a skew, to exercise the full intrinsics formula
    res = 8
    origins, dirs = camera_rays(label, res)
    pose, K = label[0, :16].reshape(4, 4), label[0, 16:].reshape(3, 3)
    assert torch.allclose(origins[0], pose[:3, 3])
    cam = dirs[0] @ pose[:3, :3]  # world -> camera directions
    pix = cam @ K.T
    uv = pix[:, :2] / pix[:, 2:]
    rows, cols = torch.meshgrid(torch.arange(res), torch.arange(res), indexing="ij")
    expect = torch.stack(((cols.reshape(-1) + 0.5) / res, (rows.reshape(-1) + 0.5) / res), dim=1)
    assert torch.allclose(uv, expect, atol=1e-5)
    assert torch.allclose(dirs[0].norm(dim=1), torch.ones(res * res), atol=1e-6)
    # Frontal camera: the top-left pixel looks up and to the left (world +y up, +x right).
    _, d = camera_rays(camera_label([0.0], [0.0]), res)
    assert d[0, 0, 0] < 0 and d[0, 0, 1] > 0 and d[0, res - 1, 0] > 0 and d[0, -1, 1] < 0


# ----------------------------------------------------------------------------- captions
def test_every_caption_states_only_true_attributes(written):
    caps, attrs = _load(written, "captions.json"), _load(written, "attributes.json")
    pairs = [(c, attrs[name]["attributes"]) for name, cs in caps.items() for c in cs]
    for ident in sample_identities(3, 300, "all"):
        pairs += [(c, ident.attributes) for c in make_captions(ident)]
    assert len(pairs) == 6 * 10 + 3000
    seen = set()
    for caption, truth in pairs:
        found = parse_caption(caption)
        assert len(set(found) - {"gender"}) >= 1, caption
        for name, values in found.items():
            assert values == {truth[name]}, (caption, name, values, truth[name])
            seen.add(name)
    assert seen == set(ATTRIBUTES)  # every attribute is mentioned by some caption


def test_captions_per_identity_are_ten_distinct_subsets_in_random_order():
    ident = sample_identities(5, 1, "all")[0]
    caps = make_captions(ident)
    assert len(caps) == 10 and len(set(caps)) == 10
    assert caps == make_captions(Identity.from_seed(ident.seed))
    mentioned = [set(parse_caption(c)) - {"gender"} for c in caps]
    assert len({frozenset(m) for m in mentioned}) > 5
    assert set().union(*mentioned) <= set(mentionable(ident.attributes))


def test_parser_reads_attribute_words_and_catches_false_ones():
    found = parse_caption("The young woman has short red hair, big blue eyes and a small nose. "
                          "She is wearing sunglasses and a blue shirt against a pink background.")
    assert found == {"gender": {"woman"}, "age": {"young"}, "hair_style": {"short"}, "hair_color": {"red"},
                     "eye_size": {"big"}, "eye_color": {"blue"}, "nose": {"small"}, "glasses": {"sunglasses"},
                     "clothing": {"blue"}, "background": {"pink"}}
    assert parse_caption("An elderly man wears eyeglasses.")["glasses"] == {"glasses"}
    assert parse_caption("He has a mustache and is bald.") == {"gender": {"man"}, "beard": {"mustache"},
                                                               "hair_style": {"bald"}}
    blond_man = dict(sample_identities(0, 1, "all")[0].attributes, hair_color="blond", gender="man")
    assert parse_caption("The woman has black hair.") != {k: {blond_man[k]} for k in ("gender", "hair_color")}


def test_captions_never_mention_absent_or_invisible_attributes():
    for ident in sample_identities(11, 300, "all"):
        a = ident.attributes
        for caption in make_captions(ident):
            found = parse_caption(caption)
            if a["glasses"] == "sunglasses":
                assert "eye_color" not in found and "eye_size" not in found
            if a["hair_style"] == "bald":
                assert "hair_color" not in found
            assert found.get("beard", {"x"}) != {"none"} and "no " not in caption.lower()


def _words(caption):
    return set(re.findall(r"[a-z]+(?:-[a-z]+)*", caption.lower()))


@pytest.mark.parametrize("heldout", [False, True])
def test_captions_of_both_modes_parse_back_to_the_true_attributes(heldout):
    for ident in sample_identities(21, 300, "all"):
        a = ident.attributes
        full = make_caption(a, np.random.default_rng([ident.seed, 1]), mentions=99, heldout=heldout)
        assert {name: {a[name]} for name in mentionable(a)}.items() <= parse_caption(full).items(), full
        for caption in make_captions(ident, heldout=heldout) + [full]:
            for name, values in parse_caption(caption).items():
                assert values == {a[name]}, (caption, name, values, a[name])


def test_training_captions_never_use_a_heldout_word_and_heldout_captions_always_do():
    heldout_words, used = set(HELDOUT_WORDS), set()
    for ident in sample_identities(22, 300, "all"):
        full = make_caption(ident.attributes, np.random.default_rng(ident.seed), mentions=99)
        for caption in make_captions(ident) + [full]:
            assert not _words(caption) & heldout_words, caption
        for caption in make_captions(ident, heldout=True) + [
                make_caption(ident.attributes, np.random.default_rng(ident.seed), mentions=1, heldout=True)]:
            assert _words(caption) & heldout_words, caption
            used |= _words(caption) & heldout_words
    assert used == heldout_words  # every held-out paraphrase is really produced by the held-out mode
    assert make_captions(sample_identities(22, 1, "all")[0]) != make_captions(sample_identities(22, 1, "all")[0],
                                                                            heldout=True)


def test_a_caption_completed_from_a_latent_keeps_what_it_names_and_adds_what_the_latent_stands_for():
    """complete_caption: every value the caption names is still named; the added ones are the
    latent's (given the named ones) and true of the completed person, except those whose absence
    captions never state; at most `mentions` attributes besides gender; training words only; two
    latents differ where the caption is silent."""
    heldout_words = set(HELDOUT_WORDS)
    rng = np.random.default_rng(5)
    completions = []
    for ident in sample_identities(23, 60, "train"):
        caption = make_captions(ident)[0]
        named = {n: next(iter(v)) for n, v in parse_caption(caption).items()}
        for _ in range(3):
            z = rng.standard_normal(LATENT_DIMS)
            done = complete_caption(caption, z, np.random.default_rng(0), mentions=6)
            said = {n: next(iter(v)) for n, v in parse_caption(done).items()}
            truth = attributes_from_latent(z, named)
            assert named.items() <= said.items(), (caption, done)
            assert all(truth[n] == v for n, v in said.items()), (done, truth)
            addable = [n for n in mentionable(truth) if n in named or n not in ("beard", "glasses", "earrings", "lips")]
            assert len(set(said) - {"gender"}) == min(6, len(addable)) or len(named) > 6, done
            assert not {"beard", "glasses", "earrings", "lips"} & (set(said) - set(named)), done  # presence only: not added
            assert not _words(done) & heldout_words, done
            if len(set(said) - set(named)) >= 2:  # where two or more are added, the latent shows
                completions.append(done)
        assert complete_caption(caption, z, np.random.default_rng(0)) == done  # a function of (caption, z, rng)
    assert len(set(completions)) > 0.9 * len(completions)


def test_parser_reads_synonyms_and_heldout_paraphrases():
    assert parse_caption("A senior lady with silver hair, wearing shades and spectacles.") == {
        "gender": {"woman"}, "age": {"old"}, "hair_color": {"gray"}, "glasses": {"sunglasses", "glasses"}}
    assert parse_caption("The bearded guy is grinning. He has grey brows.") == {
        "gender": {"man"}, "beard": {"full beard"}, "mouth": {"smiling"}}
    assert parse_caption("A girl with a fringe and an aged gentleman.")["age"] == {"young", "old"}
    assert parse_caption("This middle-aged woman has bushy eyebrows.") == {
        "gender": {"woman"}, "age": {"middle-aged"}, "eyebrow_thickness": {"thick"}}  # 'aged' not read in it
    assert parse_caption("The grandmother has frizzy ginger hair, a button nose and her mouth agape. "
                         "She wears sunnies and hoops against a violet backdrop.") == {
        "gender": {"woman"}, "age": {"old"}, "hair_style": {"curly"}, "hair_color": {"red"}, "nose": {"small"},
        "mouth": {"open"}, "glasses": {"sunglasses"}, "earrings": {"earrings"}, "background": {"purple"}}
    assert parse_caption("A youthful person with scarlet lips, pale skin and a sharp chin is beaming.") == {
        "age": {"young"}, "lips": {"red lipstick"}, "skin_tone": {"fair"}, "chin": {"pointed"},
        "mouth": {"smiling"}}


# ----------------------------------------------------------------------------- held-out pairs
def test_heldout_combinations_never_appear_in_training_output(written):
    train = sample_identities(0, 1500, "train")
    held = sample_identities(0, 200, "heldout")
    every = sample_identities(0, 1500, "all")
    assert all(not heldout_pairs(i.attributes) for i in train)
    assert all(heldout_pairs(i.attributes) for i in held)
    assert not {i.seed for i in train} & {i.seed for i in held}
    rate = np.mean([bool(heldout_pairs(i.attributes)) for i in every])
    assert 0.05 < rate < 0.3  # the exclusion is real: such identities do occur before filtering
    counts = {pair: sum(1 for i in held if pair in heldout_pairs(i.attributes)) for pair in HELDOUT_COMBINATIONS}
    assert min(counts.values()) > 10
    attrs = _load(written, "attributes.json")
    caps = _load(written, "captions.json")
    for name, entry in attrs.items():
        assert not heldout_pairs(entry["attributes"])
        for caption in caps[name]:
            found = parse_caption(caption)
            for (a1, v1), (a2, v2) in HELDOUT_COMBINATIONS:
                assert not (found.get(a1) == {v1} and found.get(a2) == {v2}), caption


# ----------------------------------------------------------------------------- geometry and renders
def test_shape_boxes_contain_their_shapes():
    """The tracer skips a shape for rays missing its box: every surface must lie inside it."""
    idents = sample_identities(2, 40, "all")
    batch = HeadBatch(idents)
    gen = torch.Generator().manual_seed(0)
    n = 40000
    lo = torch.tensor([-0.4, -0.6, -0.4])
    hi = torch.tensor([0.4, 0.45, 0.4])
    p = lo + (hi - lo) * torch.rand(n, 3, generator=gen)
    b = torch.randint(len(idents), (n,), generator=gen)
    for i, part in enumerate(heads.PARTS):
        q = batch.points(i, p[:, 0], p[:, 1], p[:, 2], b)
        for shape in part.shapes:
            near = shape.distance(q) < 1.25 * shape.blend + 0.003
            (x0, y0, z0), (x1, y1, z1) = shape.box
            x = p[:, 0].abs() if shape.mirror else p[:, 0]
            inside = (x >= x0) & (x <= x1) & (p[:, 1] >= y0) & (p[:, 1] <= y1) & (p[:, 2] >= z0) & (p[:, 2] <= z1)
            assert near.any(), (part.name, shape.distance.__name__)
            assert bool(inside[near].all()), (part.name, shape.distance.__name__)


def test_scene_lies_inside_the_triplane_box():
    lo, hi = heads.SCENE_BOX
    assert all(-0.5 <= v <= 0.5 for v in lo + hi)


def _project(label: torch.Tensor, model_point) -> tuple[float, float]:
    """(column, row) in pixels of a model-frame point, for a 64x64 image."""
    world = torch.tensor(heads.HEAD_POSITION) + heads.HEAD_SCALE * (torch.tensor(model_point) -
                                                                    torch.tensor(heads.HEAD_ANCHOR))
    pose, K = label[:16].reshape(4, 4), label[16:].reshape(3, 3)
    cam = pose[:3, :3].T @ (world - pose[:3, 3])
    u, v = (K @ (cam / cam[2]))[:2]
    return u.item() * 64 - 0.5, v.item() * 64 - 0.5


BASE = {"gender": "man", "age": "young", "face_shape": "oval", "chin": "broad", "skin_tone": "medium",
        "hair_style": "short", "hair_color": "brown", "eyebrow_thickness": "thick", "eyebrow_shape": "straight",
        "eye_size": "big", "eye_color": "brown", "nose": "small", "mouth": "closed", "lips": "natural",
        "beard": "none", "glasses": "none", "earrings": "none", "clothing": "blue", "background": "green"}


def test_frontal_framing_matches_an_aligned_ffhq_crop():
    ident = Identity(4242, dict(BASE))
    label = camera_label([0.0], [0.0])
    out = render([ident], label, 64)
    eye_col, eye_row = _project(label[0], head_parameters(ident)["eyes"]["eye_c"])
    _, mouth_row = _project(label[0], head_parameters(ident)["lips"]["upper_mid"])
    assert 0.42 < eye_row / 64 < 0.52 and 0.66 < mouth_row / 64 < 0.8
    assert 0.18 < 2 * (eye_col - 31.5) / 64 < 0.28  # eyes about a quarter of the frame apart (FFHQ)
    mask = out["mask"][0, 0]
    assert mask[-1].mean() > 0.6  # shoulders at the bottom edge
    assert mask[int(eye_row)].mean() > 0.5 and mask[int(eye_row), :3].max() == 0  # head fills, with margins
    depth = out["depth"][0, 0]
    assert 2.3 < depth[int(eye_row), 32].item() < 2.7 and depth[mask == 0].abs().max() == 0
    assert out["rgb"].shape == (1, 3, 64, 64) and 0 <= out["rgb"].min() and out["rgb"].max() <= 1


# (attribute, new value, which pixels may change, minimum number of changed pixels)
SWAPS = [
    ("hair_color", "blond", "above_eyes", 60),
    ("glasses", "glasses", "eye_band", 40),
    ("glasses", "sunglasses", "eye_band", 60),
    ("eye_color", "blue", "eye_band", 6),
    ("eyebrow_thickness", "thin", "brow_band", 8),
    ("beard", "full beard", "below_eyes", 150),
    ("beard", "mustache", "mouth_band", 12),
    ("lips", "red lipstick", "mouth_band", 10),
    ("mouth", "smiling", "mouth_band", 8),
    ("earrings", "earrings", "earring_sides", 10),
    ("age", "old", "face", 15),
    ("clothing", "red", "below_chin", 40),
    ("background", "pink", "background", 300),
]


def test_one_attribute_swap_changes_the_expected_region():
    """At 64x64, frontal and at 30 degrees yaw, each swap changes enough pixels, nearly all of
    them where the attribute lives (hair above the eyes, glasses at eye height, ...)."""
    variants = [Identity(4242, dict(BASE))] + [Identity(4242, dict(BASE, **{a: v})) for a, v, _, _ in SWAPS]
    yaws = (0.0, 30.0)
    labels = camera_label([y for y in yaws for _ in variants], [0.0] * (len(yaws) * len(variants)))
    out = render(variants * len(yaws), labels, 64)
    params = head_parameters(variants[0])
    rows = torch.arange(64).view(-1, 1).expand(64, 64).float()
    cols = torch.arange(64).view(1, -1).expand(64, 64).float()
    for k, yaw in enumerate(yaws):
        label = labels[k * len(variants)]
        rgb, mask = out["rgb"][k * len(variants):(k + 1) * len(variants)], out["mask"][k * len(variants), 0]
        eye_row = _project(label, params["eyes"]["eye_c"])[1]
        brow_row = _project(label, params["eyebrows"]["brow_mid"])[1]
        mouth_row = _project(label, params["lips"]["upper_mid"])[1]
        chin_row = _project(label, params["skin"]["chin_c"])[1]
        centre = _project(label, (0.0, 0.0, 0.15))[0]
        regions = {
            "above_eyes": rows < eye_row,
            "eye_band": (rows - eye_row).abs() <= 5,
            "brow_band": (rows - brow_row).abs() <= 4,
            "below_eyes": rows > eye_row,
            "mouth_band": (rows - mouth_row).abs() <= 5,
            "earring_sides": (rows > eye_row) & (rows < chin_row + 4) & ((cols - centre).abs() > 5),
            "face": (rows > eye_row - 14) & (rows < chin_row + 3),
            "below_chin": rows > chin_row,
            "background": mask < 1,
        }
        for (attr, value, region, minimum), image in zip(SWAPS, rgb[1:]):
            changed = (image - rgb[0]).abs().amax(dim=0) > 0.08
            count = int(changed.sum())
            inside = int((changed & regions[region]).sum())
            assert count >= minimum, (attr, value, yaw, count)
            assert inside >= 0.9 * count, (attr, value, yaw, inside, count)


def test_a_render_pooled_to_a_coarser_resolution_is_that_resolution_rendered_with_more_subsamples():
    """coarser(): one 32^2 render (2x supersampled) pooled to 16^2 is the 16^2 render with 4x4
    subsamples (the same rays): depth the mean over hits, 0 where a block has none; a resolution
    that does not divide is refused."""
    from dreamportrait.synthetic.render import coarser
    people = [Identity(4242, dict(BASE)), Identity(7, dict(BASE, hair_style="long"))]
    labels = camera_label([0.0, 35.0], [0.0, 5.0])
    pooled = coarser(render(people, labels, 32, supersample=2), 16)
    direct = render(people, labels, 16, supersample=4)
    assert 0.05 < float((pooled["mask"] % 1).gt(0).float().mean()) < 0.5  # edges: partly hit blocks
    for key in ("rgb", "depth", "mask"):
        assert pooled[key].shape == direct[key].shape
        torch.testing.assert_close(pooled[key], direct[key], atol=1e-5, rtol=0)
    assert torch.equal(pooled["depth"][pooled["mask"] == 0], torch.zeros(int((pooled["mask"] == 0).sum())))
    with pytest.raises(ValueError, match="divides 32, got 12"):
        coarser(render(people, labels, 32), 12)


def test_cli_writes_a_data_set_and_refuses_to_overwrite(tmp_path, capsys):
    from dreamportrait.synthetic.__main__ import main
    main(["--out", str(tmp_path / "cli"), "--num", "2", "--res", "16", "--seed", "1", "--views", "2"])
    labels = _load(tmp_path / "cli", "dataset.json")["labels"]
    assert [name for name, _ in labels] == [f"00000/img0000000{k}.png" for k in range(4)]
    assert "wrote 4 images of 2 identities" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "cli"), "--num", "2"])
    assert "not an empty folder" in capsys.readouterr().err


def _pixels(label: torch.Tensor, points) -> torch.Tensor:
    """(row, column) of the 64x64 pixels holding model-frame points (N, 3)."""
    uv = torch.tensor([_project(label, [float(c) for c in p]) for p in points]).round().long().clamp(0, 63)
    return uv.flip(1)


def test_curly_hair_and_bangs_leave_eyebrows_and_forehead_lines_uncovered():
    """The judge's labels call eyebrow shape and age visible under every hair style, so no hair
    may cover the eyebrows or the forehead lines that carry age (frontal and 30 degrees yaw)."""
    hair_parts = [i for i, part in enumerate(heads.PARTS) if part.name.startswith("hair_")]
    idents = [Identity(i.seed, dict(i.attributes, hair_style=style, hair_color=i.attributes["hair_color"] or "black"))
              for style in ("curly", "bangs") for i in sample_identities(9, 12, "all")]
    yaws = (-30.0, 0.0, 30.0)
    labels = camera_label([y for y in yaws for _ in idents], [0.0] * (len(yaws) * len(idents)))
    hair = render(idents * len(yaws), labels, 64, parts=True)["parts"][:, hair_parts].sum(dim=1)
    brows, forehead = [], []
    for v, (label, ident) in enumerate(zip(labels, idents * len(yaws))):
        p = head_parameters(ident)
        brow, skull = p["eyebrows"], p["skin"]
        chain = [np.asarray(brow[k]) for k in ("brow_in", "brow_mid", "brow_out")]
        points = [a + t * (b - a) for a, b in zip(chain, chain[1:]) for t in np.linspace(0, 1, 5)]
        points += [q * (-1, 1, 1) for q in points]
        lines = [on_surface(skull["cranium_c"], skull["cranium_r"], x, y, 0.0)  # every line of middle and old age
                 for y in (0.118, 0.125, 0.131, 0.144, 0.145, 0.157) for x in np.linspace(-0.07, 0.07, 8)]
        brows.append(hair[v][tuple(_pixels(label, points).t())])
        forehead.append(hair[v][tuple(_pixels(label, lines).t())])
    brows, forehead = torch.stack(brows), torch.stack(forehead)
    # At most one of a pixel's four subsamples on the eyebrows and two on the forehead lines'
    # outer ends (the hairline's edge), and hardly any hair on the forehead lines as a whole.
    assert brows.max() <= 0.25 and forehead.max() <= 0.5, (brows.max(), forehead.max())
    assert forehead.mean() < 0.02, forehead.mean()
