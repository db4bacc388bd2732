"""Evaluation metrics, the judge (attribute classifier) and the ``train.evaluate`` CLI (CPU, seconds)."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from dreamportrait.checkpoints import CheckpointError
from dreamportrait.synthetic.attributes import ATTRIBUTES, sample_identities
from train import evaluate as ev
from train.judge import IGNORE, AttributeClassifier, JudgeConfig, train_step

TINY_JUDGE = dict(channels=(8, 8, 8, 8), feature_dim=32)


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


# ---- the judge -----------------------------------------------------------------------------------

def judge_batch(n: int = 6):
    attrs = [ident.attributes for ident in sample_identities(0, n)]
    images = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return images, attrs


def test_judge_train_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    judge = AttributeClassifier(JudgeConfig(**TINY_JUDGE))
    images, attrs = judge_batch()
    targets = judge.encode_targets(attrs)
    opt = torch.optim.Adam(judge.parameters(), lr=3e-3)
    losses = [train_step(judge, opt, images, targets) for _ in range(15)]
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
    loss.backward()
    assert torch.isfinite(loss)
    assert judge.heads["hair_color"].weight.grad.abs().max() == 0
    assert judge.heads["gender"].weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="not in the judge's vocabulary"):
        judge.encode_targets([dict(attrs[0], gender="robot")])


def test_judge_resizes_other_resolutions_with_antialiased_bilinear():
    torch.manual_seed(0)
    judge = AttributeClassifier(JudgeConfig(**TINY_JUDGE))
    big = torch.rand(2, 3, 128, 128) * 2 - 1
    small = F.interpolate(big, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
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
    torch.testing.assert_close(loaded.features(images), judge.features(images), rtol=0, atol=0)
    assert loaded.config == judge.config
    changed = dict(ATTRIBUTES, glasses=("none", "glasses", "sunglasses", "monocle"))
    with pytest.raises(CheckpointError, match=r"glasses: .*monocle"):
        AttributeClassifier.from_pretrained(path, vocabulary=changed)
