"""Evaluation metrics, the judge (attribute classifier) and the ``train.evaluate`` CLI (CPU, seconds)."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from dreamportrait.checkpoints import CheckpointError
from dreamportrait.synthetic.attributes import ATTRIBUTES, sample_identities
from dreamportrait.synthetic.judge import IGNORE, AttributeClassifier, JudgeConfig
from train import evaluate as ev
from train import evaluate_world as ew
from world.judge_training import train_step

TINY_JUDGE = dict(resolution=32, channels=(8, 8, 8), feature_dim=32)


def random_spd(dim: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(dim, dim))
    return a @ a.T + 0.1 * np.eye(dim)


# ---- metric math on hand-computed numbers -------------------------------------------------------

def test_frechet_distance_of_identical_gaussians_is_zero():
    mu, sigma = np.arange(5.0), random_spd(5, 0)
    assert abs(ev.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_frechet_distance_of_shifted_means_is_squared_shift():
    sigma = random_spd(4, 1)
    mu = np.array([1.0, -2.0, 0.5, 3.0])
    shift = np.array([3.0, 4.0, 0.0, 0.0])
    assert ev.frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(25.0, rel=1e-9)


def test_frechet_distance_of_diagonal_covariances_by_hand():
    # tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt a - sqrt b)^2 = (2-1)^2 + (3-1)^2 = 5; plus |(3,4)|^2 = 25.
    fid = ev.frechet_distance([0.0, 0.0], np.diag([4.0, 9.0]), [3.0, 4.0], np.diag([1.0, 1.0]))
    assert fid == pytest.approx(30.0, rel=1e-12)


def test_frechet_distance_matches_the_sqrtm_formula_for_non_commuting_covariances():
    s1, s2 = random_spd(6, 2), random_spd(6, 3)
    mu1, mu2 = np.zeros(6), np.full(6, 0.3)
    reference = 6 * 0.09 + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes do not match"):
        ev.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_feature_statistics_by_hand():
    mu, sigma = ev.feature_statistics(torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]]))
    np.testing.assert_allclose(mu, [1.0, 1.0])
    np.testing.assert_allclose(sigma, [[4 / 3, 0.0], [0.0, 4 / 3]])  # unbiased: sum of squares 4 over N-1 = 3
    with pytest.raises(ValueError, match="at least 2"):
        ev.feature_statistics(np.zeros((1, 3)))


def test_clip_score_is_100_times_cosine():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    txt = torch.tensor([[5.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [4.0, 3.0]])
    torch.testing.assert_close(ev.clip_score(img, txt), torch.tensor([100.0, 0.0, -100.0, 96.0]))


def test_r_precision_counts_top1_hits_and_shares_ties():
    assert ev.r_precision(torch.eye(5)) == 1.0
    sim = torch.tensor([[0.9, 0.1, 0.0],    # true (col 0) is top: hit
                        [0.2, 0.3, 0.5],    # true (col 1) is beaten by col 2
                        [0.1, 0.8, 0.1]])   # true (col 2) is beaten by col 1
    assert ev.r_precision(sim) == pytest.approx(1 / 3)
    assert ev.r_precision(torch.tensor([[0.5, 0.5, 0.1]]), torch.tensor([1])) == pytest.approx(0.5)
    assert ev.r_precision(torch.tensor([[0.2, 0.7], [0.9, 0.4]]), torch.tensor([1, 0])) == 1.0


def test_distractor_sets_put_the_caption_first_among_distinct_others():
    pool = ["a", "b", "c", "d", "a", "b"]
    sets = ev.distractor_sets(["a", "c"], pool, 2, np.random.default_rng(0))
    for caption, s in zip(["a", "c"], sets):
        assert s[0] == caption and len(s) == 3 and len(set(s)) == 3
    capped = ev.distractor_sets(["a"], pool, 10, np.random.default_rng(0))[0]
    assert sorted(capped[1:]) == ["b", "c", "d"]


def test_attribute_accuracy_counts_only_mentioned_attributes():
    predicted = [{"gender": "man", "age": "old", "glasses": "none"},
                 {"gender": "woman", "age": "young", "glasses": "glasses"},
                 {"gender": "man", "age": "young", "glasses": "none"}]
    mentioned = [{"gender": "man", "age": "young"}, {"gender": "woman"}, {"gender": "woman", "glasses": "none"}]
    acc = ev.attribute_accuracy(predicted, mentioned)
    assert acc["per_attribute"] == {"age": 0.0, "gender": 2 / 3, "glasses": 1.0}
    assert acc["counts"] == {"age": 1, "gender": 3, "glasses": 1}
    assert acc["mean"] == pytest.approx((0 + 2 / 3 + 1) / 3)


def test_mentioned_attributes_are_the_ground_truth_of_what_the_caption_names():
    truth = dict(sample_identities(0, 1)[0].attributes, gender="woman", eyebrow_thickness="thin",
                 skin_tone="dark", hair_style="bald", hair_color=None)
    got = ev.mentioned_attributes("The woman has thin eyebrows and dark skin. She is bald.", truth)
    assert got == {"gender": "woman", "eyebrow_thickness": "thin", "skin_tone": "dark", "hair_style": "bald"}


# ---- the judge -----------------------------------------------------------------------------------

def judge_batch(n: int = 6):
    attrs = [ident.attributes for ident in sample_identities(0, n)]
    images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return images, attrs


def test_judge_train_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    judge = AttributeClassifier(JudgeConfig(**TINY_JUDGE))
    images, attrs = judge_batch()
    targets = judge.encode_targets(attrs)
    opt = torch.optim.Adam(judge.parameters(), lr=1e-2)
    losses = [train_step(judge, opt, images, targets) for _ in range(10)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_judge_ignores_invisible_attributes():
    torch.manual_seed(0)
    judge = AttributeClassifier(JudgeConfig(**TINY_JUDGE))
    images, attrs = judge_batch(3)
    for a in attrs:
        a["hair_color"] = None
    targets = judge.encode_targets(attrs)
    assert targets["hair_color"].tolist() == [IGNORE] * 3
    loss = judge.loss(images, targets)
    per_attribute = [F.cross_entropy(logits, targets[name]) for name, logits in judge(images).items()
                     if name != "hair_color"]
    torch.testing.assert_close(loss, sum(per_attribute))  # the sum of per-attribute CEs, hair colour left out
    loss.backward()
    rows = judge.heads.weight.grad.split(judge.sizes)
    names = list(ATTRIBUTES)
    assert rows[names.index("hair_color")].abs().max() == 0
    assert rows[names.index("gender")].abs().max() > 0
    with pytest.raises(ValueError, match="not in the judge's vocabulary"):
        judge.encode_targets([dict(attrs[0], gender="robot")])


def test_judge_resizes_other_resolutions_with_antialiased_bilinear():
    torch.manual_seed(0)
    judge = AttributeClassifier(JudgeConfig(**TINY_JUDGE))
    big = torch.rand(2, 3, 128, 128) * 2 - 1
    small = F.interpolate(big, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(judge.features(big), judge.features(small))
    assert judge.features(small).shape == (2, 32)
    predicted = judge.predict(small)
    assert set(predicted) == set(ATTRIBUTES) and all(p.shape == (2,) for p in predicted.values())


def test_judge_save_load_round_trip_and_vocabulary_check(tmp_path):
    torch.manual_seed(0)
    judge = AttributeClassifier(JudgeConfig(**TINY_JUDGE)).eval()
    path = tmp_path / "judge.safetensors"
    judge.save_pretrained(path)
    loaded = AttributeClassifier.from_pretrained(path)
    images, _ = judge_batch(2)
    torch.testing.assert_close(loaded.grid_logits(images), judge.grid_logits(images), rtol=0, atol=0)
    assert loaded.config == judge.config
    changed = dict(ATTRIBUTES, glasses=("none", "glasses", "sunglasses", "monocle"))
    with pytest.raises(CheckpointError, match=r"glasses: .*monocle"):
        AttributeClassifier.from_pretrained(path, vocabulary=changed)


# ---- FID feature extractors ----------------------------------------------------------------------

def test_fid_features_fall_back_to_the_judge_without_inception_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache
    judge = AttributeClassifier(JudgeConfig(**TINY_JUDGE))
    extract, name = ev.fid_extractor("auto", judge, "cpu")
    assert name.startswith("judge") and extract(torch.zeros(2, 3, 64, 64)).shape == (2, 32)
    with pytest.raises(LookupError, match="no --judge"):
        ev.fid_extractor("auto", None, "cpu")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        ev.fid_extractor("inception", judge, "cpu")


def test_inception_features_come_from_the_hub_cache_with_torchvision_preprocessing(tmp_path, monkeypatch):
    """Random weights stand in for the ImageNet file; the extractor must equal torchvision's own
    Inception-v3 (transform_input=True on ImageNet-normalised input) with the fc layer removed."""
    from torchvision.models.inception import Inception3
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    reference = Inception3(num_classes=1000, aux_logits=True, transform_input=True, init_weights=False)
    ev.inception_weights_file().parent.mkdir(parents=True)
    torch.save(reference.state_dict(), ev.inception_weights_file())
    extract, name = ev.fid_extractor("auto", None, "cpu")
    assert name.startswith("inception-v3")
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    reference.fc = torch.nn.Identity()
    x = F.interpolate((images + 1) / 2, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = reference.eval()((x - mean) / std)
    torch.testing.assert_close(extract(images), want, rtol=1e-4, atol=1e-4)
    assert want.shape == (1, 2048)


# ---- the command line on tiny random models ------------------------------------------------------

TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def write_clip_folder(folder, seed: int = 0):
    """A random open_clip CLIP in open_clip's local-folder layout (config + safetensors weights)."""
    import json

    import open_clip
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP)
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return model


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A 32x32 tiny random generator, a data set from the real synthetic writer, a judge and a CLIP."""
    from dreamportrait.generator import preset
    from dreamportrait.synthetic.__main__ import main as write_synthetic
    from dreamportrait.text_encoder import TextEncoder
    from dreamportrait.text_generator import DreamPortraitGenerator, TextConditionConfig
    root = tmp_path_factory.mktemp("evaluate")
    enc = TextEncoder.from_config(dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2), seed=0)
    torch.manual_seed(0)
    # The tiny preset without its 2x super-resolution: 32x32 output, so the data set renders fast.
    G = DreamPortraitGenerator(preset("tiny", sr_upsample=(False, False)),
                               TextConditionConfig(text_dim=64, adapter_count=2))
    G.save_pretrained(root / "generator.safetensors", extra={"text_encoder": enc.describe()})
    write_synthetic(["--out", str(root / "data"), "--num", "6", "--res", "32", "--seed", "0"])
    AttributeClassifier(JudgeConfig(**TINY_JUDGE)).save_pretrained(root / "judge.safetensors")
    write_clip_folder(root / "clip")
    return root


def test_evaluate_cli_reports_every_metric(tiny_world, tmp_path, monkeypatch, capsys):
    import json
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no Inception weights: FID uses the judge
    out = tmp_path / "results.json"
    root = tiny_world
    ev.main([str(root / "generator.safetensors"), "--data", str(root / "data"), "--judge",
             str(root / "judge.safetensors"), "--clip", str(root / "clip"), "--num", "3", "--distractors", "3",
             "--batch", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    m = results["metrics"]
    assert set(m) == {"fid", "clip_r_precision", "msc", "attribute_accuracy"}
    assert all(math.isfinite(v["value"]) for v in m.values()), m
    assert m["fid"]["feature_extractor"].startswith("judge") and m["fid"]["num_generated"] == 3
    assert m["fid"]["value"] > 0
    assert m["clip_r_precision"]["distractors"] == 3 and 0 <= m["clip_r_precision"]["value"] <= 100
    assert set(m["msc"]["per_view"]) == set(ev.VIEWS)
    assert m["msc"]["value"] == pytest.approx(sum(m["msc"]["per_view"].values()) / 3)
    acc = m["attribute_accuracy"]
    assert "gender" in acc["per_attribute"] and acc["counts"]["gender"] == 3 * 3  # every caption names it
    assert 0 <= acc["value"] <= 100
    for title in ("FID", "CLIP R-Precision (%)", "MSC", "attribute accuracy (%)"):
        assert title in printed
    assert f"{m['fid']['value']:.2f}" in printed


def test_evaluate_reports_missing_components_as_skipped(tiny_world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    results = ev.evaluate(str(tiny_world / "generator.safetensors"), str(tiny_world / "data"), num=2,
                          progress=False)
    m = results["metrics"]
    assert m["attribute_accuracy"] == {"skipped": "no --judge given"}
    assert m["msc"] == m["clip_r_precision"] == {"skipped": "no --clip given"}
    assert "no --judge was given" in m["fid"]["skipped"]
    table = ev.format_table(results)
    assert "attribute accuracy (%)     skipped  no --judge given" in table
    with pytest.raises(ValueError, match="has 6 images"):
        ev.evaluate(str(tiny_world / "generator.safetensors"), str(tiny_world / "data"), num=7, progress=False)


# ---- the synthetic world's prior and text-model metrics (train/evaluate_world.py) -----------------

def test_total_variation_is_zero_for_identical_and_one_for_disjoint_distributions():
    p = {"man": 0.3, "woman": 0.7}
    assert ew.total_variation(p, dict(p)) == 0.0
    assert ew.total_variation({"a": 0.5, "b": 0.5}, {"c": 1.0}) == 1.0
    assert ew.total_variation({"a": 0.5, "b": 0.5}, {"a": 1.0}) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="not a probability distribution"):
        ew.total_variation({"a": 0.5}, {"a": 1.0})


def test_normalised_entropy_is_one_for_uniform_and_zero_for_constant_readings():
    assert ew.normalised_entropy(["red", "blue", "green", None] * 3, 3) == pytest.approx(1.0)  # None: unseen
    assert ew.normalised_entropy(["red"] * 5, 6) == 0.0
    assert ew.normalised_entropy(["a", "b"], 4) == pytest.approx(0.5)  # log 2 / log 4
    with pytest.raises(ValueError, match="no seen reading"):
        ew.normalised_entropy([None, None], 2)


def test_expected_normalised_entropy_of_few_draws_by_hand():
    # Two draws of a fair coin: equal (prob 1/2) -> 0, different (prob 1/2) -> 1.
    assert ew.expected_normalised_entropy([0.5, 0.5], 2, 2) == pytest.approx(0.5)
    assert ew.expected_normalised_entropy([1.0, 0.0, 0.0], 7, 3) == 0.0
    many = ew.expected_normalised_entropy([0.25] * 4, 4000, 4)
    assert 0.999 < many < 1.0  # the plug-in entropy's bias vanishes with many draws


def test_view_agreement_of_identical_readings_is_one_and_counts_each_attribute():
    a = [{"gender": "man", "hair_color": None}, {"gender": "woman", "hair_color": "red"}]
    assert ew.view_agreement({"left": a, "front": [dict(r) for r in a], "right": a})["value"] == 1.0
    b = [{"gender": "man", "hair_color": "black"}, {"gender": "woman", "hair_color": "red"}]
    got = ew.view_agreement({"left": a, "front": a, "right": b})
    assert got["per_attribute"] == {"gender": 1.0, "hair_color": 0.5} and got["value"] == 0.75
    with pytest.raises(ValueError, match="at least 2 views"):
        ew.view_agreement({"front": a})


def test_world_distribution_is_the_samplers_exact_distribution_where_seen():
    from dreamportrait.synthetic.attributes import attribute_distribution
    world = attribute_distribution("train")
    identities = [ident.attributes for ident in sample_identities(1, 1500, "train")]
    for name in ATTRIBUTES:
        assert sum(world[name].values()) == pytest.approx(1.0)
        empirical = ew.frequencies(a[name] for a in identities)
        assert ew.total_variation(world[name], empirical) < 0.06, name
    woman = attribute_distribution("train", {"gender": "woman"})
    assert woman["beard"]["none"] == 1.0 and woman["lips"]["red lipstick"] > 0.3
    assert attribute_distribution("train", {"age": "young"})["hair_color"]["white"] == 0.0  # a held-out pair
    assert attribute_distribution("all", {"age": "young"})["hair_color"]["white"] > 0.0
    assert attribute_distribution("all", {"glasses": "sunglasses"})["eye_color"] == {}  # never seen
    assert attribute_distribution("all", {"eye_color": "blue"})["glasses"]["sunglasses"] == 0.0
    assert not any(attribute_distribution("train", {"age": "young", "hair_color": "white"}).values())


def test_diversity_score_is_the_generated_over_the_worlds_entropy():
    names = list(ATTRIBUTES)
    mentioned = [{"gender": "man", "age": "old"}]
    constant = [dict.fromkeys(names, None) | {"gender": "man", "age": "old", "glasses": "none"}] * 4
    d = ew.diversity(constant, mentioned, 4, "train")
    assert d["pairs"] == 1 and d["value"] == 0.0 and d["world"] > 0 and not d["met"]  # glasses only
    varied = [dict(r, glasses=g) for r, g in zip(constant, ["none", "glasses", "sunglasses", "none"])]
    d = ew.diversity(varied, mentioned, 4, "train")
    assert d["generated"] == pytest.approx(ew.normalised_entropy(["none", "glasses", "sunglasses", "none"], 3))
    assert d["value"] == pytest.approx(d["generated"] / d["world"])
    bearded = [dict.fromkeys(names, None) | {"gender": "woman", "beard": b} for b in ("none", "full beard")]
    assert "skipped" in ew.diversity(bearded, [{"gender": "woman"}], 2, "train")  # the world fixes a woman's beard
    held = ew.diversity(varied, [{"gender": "man", "age": "young", "hair_color": "white"}], 4, "train")
    assert held["captions_without_reference"] == 1 and "skipped" in held


def test_latent_agreement_compares_unnamed_readings_with_what_each_seeds_z_stands_for():
    from dreamportrait.synthetic.attributes import attributes_from_latent
    from train.evaluate import seed_latent
    mentioned, seeds = [{"gender": "man", "age": "old"}, {"gender": "woman", "hair_color": "red"}], 8
    follows = [attributes_from_latent(seed_latent(s, 64, "cpu")[0].numpy(), given)
               for given in mentioned for s in range(seeds)]
    exact = ew.latent_agreement(follows, mentioned, seeds, 64)
    assert exact["value"] == pytest.approx(100.0) and exact["chance"] < 80
    assert "gender" not in exact["per_attribute"]  # named by both captions: never counted
    one = [dict(follows[0], **{n: follows[0][n] for n in ATTRIBUTES})] * len(follows)  # one head for every seed
    ignores = ew.latent_agreement(one, mentioned, seeds, 64)
    assert ignores["value"] == pytest.approx(ignores["chance"])  # a z-blind generator scores chance
    assert "skipped" in ew.latent_agreement(follows, mentioned, seeds, 8)


def test_latent_attribute_accuracy_counts_readings_equal_to_the_named_values():
    import numpy as np
    from dreamportrait.synthetic.attributes import attributes_from_latent
    named = [attributes_from_latent(z) for z in np.random.default_rng(0).standard_normal((40, 19))]
    exact = ew.latent_attribute_accuracy(named, named)
    assert exact["value"] == pytest.approx(100.0)
    wrong = [dict(r, gender="woman" if r["gender"] == "man" else "man") for r in named]
    flipped = ew.latent_attribute_accuracy(wrong, named)
    assert flipped["per_attribute"]["gender"] == 0.0 and flipped["per_attribute"]["age"] == 100.0
    men = sum(r["gender"] == "man" for r in named) / len(named)  # the world's likeliest gender: man (0.5 each; first)
    assert exact["majority_guess_per_attribute"]["gender"] == pytest.approx(100 * men)


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory):
    """A 32x32 tiny random plain (prior) generator."""
    from dreamportrait.generator import TriPlaneGenerator, preset
    path = tmp_path_factory.mktemp("prior") / "generator.safetensors"
    torch.manual_seed(0)
    TriPlaneGenerator(preset("tiny", sr_upsample=(False, False))).save_pretrained(path)
    return path


def test_prior_metrics_end_to_end_on_a_tiny_random_generator(tiny_prior, tiny_world, tmp_path, capsys):
    import json
    out = tmp_path / "prior.json"
    ev.main(["prior", str(tiny_prior), "--judge", str(tiny_world / "judge.safetensors"), "--num", "3",
             "--batch", "2", "--device", "cpu", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["kind"] == "prior" and results["seeds"] == "0..2" and results["prompt"] is None
    tv, agree = results["metrics"]["attribute_tv"], results["metrics"]["view_agreement"]
    assert set(tv["per_attribute"]) == set(agree["per_attribute"]) == set(ATTRIBUTES)
    assert all(0 <= v <= 1 for v in tv["per_attribute"].values())
    assert tv["value"] == pytest.approx(sum(tv["per_attribute"].values()) / len(ATTRIBUTES))
    assert tv["target"] == 0.1 and tv["met"] == (tv["value"] <= 0.1)
    assert all(0 <= v <= 100 for v in agree["per_attribute"].values()) and 0 <= agree["value"] <= 100
    assert all(d["readings_seen"] <= 9 for d in results["distributions"].values())  # 3 samples x 3 views
    latent = results["metrics"]["latent_attributes"]
    assert set(latent["per_attribute"]) == set(ATTRIBUTES) and 0 <= latent["majority_guess"] <= 100
    table = (tmp_path / "prior.md").read_text()
    assert "| attribute TV (mean) |" in table and "| hair_color |" in table
    assert "| frontal reading = attribute z names (%) |" in table
    assert "cross-view agreement (%)" in capsys.readouterr().out
    text_prior = ew.evaluate_prior(str(tiny_world / "generator.safetensors"), str(tiny_world / "judge.safetensors"),
                                   num=1, progress=False)
    assert text_prior["prompt"] == "" and 0 <= text_prior["metrics"]["attribute_tv"]["value"] <= 1


def test_depth_relief_tells_a_head_from_a_flat_sheet():
    """The relief of a frontal depth map: how far the cheeks recede behind the face's centre. The
    world's heads recede by 0.1-0.2; a sheet (the shipped model's failure) by nothing."""
    from dreamportrait.cameras import camera_label
    from dreamportrait.synthetic.attributes import Identity
    from dreamportrait.synthetic.render import render
    heads = render([Identity.from_seed(s) for s in range(4)], camera_label(0.0, 0.0).repeat(4, 1), 32)["depth"]
    relief = ew.depth_relief(heads)
    assert relief.shape == (4,) and bool((relief > 0.05).all() and (relief < 0.3).all()) and relief.median() > 0.1
    sheet = torch.full((2, 1, 32, 32), 2.5)
    tilted = sheet + torch.linspace(0, 0.2, 32)  # a sheet turned about the vertical axis: still no relief
    assert ew.depth_relief(sheet).abs().max() < 1e-6 and ew.depth_relief(tilted).abs().max() < 1e-6


def test_mismatched_captions_give_every_item_another_items_caption():
    captions = [f"caption {k}" for k in range(7)]
    for seed in range(5):
        other = ew.mismatched_captions(captions, seed)
        assert sorted(other) == captions  # a permutation: each caption is used once
        assert all(o != c for o, c in zip(other, captions))  # never the item's own
    assert ew.mismatched_captions(captions, 0) == ew.mismatched_captions(captions, 0) != \
        ew.mismatched_captions(captions, 1)
    with pytest.raises(ValueError, match="at least 2 items"):
        ew.mismatched_captions(["one"], 0)


def test_text_metrics_end_to_end_on_a_tiny_random_generator(tiny_world, tiny_prior, tmp_path):
    import json
    out = tmp_path / "text.json"
    root = tiny_world
    ev.main(["text", str(root / "generator.safetensors"), "--data", str(root / "data"), "--judge",
             str(root / "judge.safetensors"), "--num", "2", "--diversity-captions", "2", "--diversity-seeds", "3",
             "--batch", "3", "--device", "cpu", "--out", str(out)])
    m = json.loads(out.read_text())["metrics"]
    assert set(m) == {"attribute_accuracy", "unconditional_accuracy", "heldout_attribute_accuracy", "diversity",
                      "view_consistency", "latent_agreement", "depth_relief"}
    relief = m["depth_relief"]  # the world's own heads recede towards the cheeks; the ratio is of medians
    assert relief["items"] == 2 and relief["world"] > 0.05
    assert relief["value"] == pytest.approx(relief["generated"] / relief["world"])
    assert 0 <= m["unconditional_accuracy"]["value"] <= 100
    assert 0 <= m["attribute_accuracy"]["value"] <= 100 and m["attribute_accuracy"]["views"] == list(ew.WORLD_VIEWS)
    held = m["heldout_attribute_accuracy"]
    assert held["items"] + held["items_without_heldout_word"] == 2 and 0 <= held["value"] <= 100
    div = m["diversity"]
    assert div["captions"] == 2 and div["seeds"] == 3
    assert "skipped" in div or (div["value"] >= 0 and 0 < div["world"] <= 1 and 0 <= div["generated"] <= 1)
    assert 0 <= m["view_consistency"]["value"] <= 100
    assert "| diversity (generated / world entropy) |" in (tmp_path / "text.md").read_text()
    with pytest.raises(ValueError, match="not text-conditioned"):
        ew.evaluate_text(str(tiny_prior), str(root / "data"), str(root / "judge.safetensors"), num=2)
