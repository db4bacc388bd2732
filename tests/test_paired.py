"""The paired warm start of the prior (train/paired.py): the world's identity as a function of a
Gaussian latent, the deterministic render stream, exact resume, and the hand-over to the GAN prior."""
import hashlib
import json

import numpy as np
import pytest
import torch

from dreamportrait.generator import TriPlaneGenerator
from dreamportrait.generator import preset as generator_preset
from dreamportrait.synthetic.attributes import (ATTRIBUTES, LATENT_DIMS, attribute_distribution,
                                                attributes_from_latent, in_split)
from train.config import apply_overrides, preset
from train.loop import param_groups
from train.paired import paired_batch, paired_loss, train_paired

TINY_G = generator_preset("tiny", neural_rendering_resolution=16)
FAST = ["batch=4", "snapshot_every_kimg=0.004", "image_every_kimg=1000", "paired.workers=0",
        "generator=" + json.dumps(TINY_G.to_dict())]


def config(*extra):
    return apply_overrides(preset("synthetic-tiny"), FAST + list(extra))


def digest(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_gaussian_latents_name_attributes_with_the_worlds_exact_distribution():
    rng = np.random.default_rng(1)
    drawn = [attributes_from_latent(rng.standard_normal(LATENT_DIMS)) for _ in range(6000)]
    exact = attribute_distribution("all")
    for name, values in ATTRIBUTES.items():
        seen = [a[name] for a in drawn if a[name] is not None]
        tv = 0.5 * sum(abs(seen.count(v) / len(seen) - exact[name][v]) for v in values)
        assert tv < 0.03, (name, tv)  # 6,000 draws: sampling error of a few thousandths
    assert all(a["beard"] == "none" for a in drawn if a["gender"] == "woman")  # zero-probability values never come
    z = rng.standard_normal(64)
    tail = z.copy()
    tail[LATENT_DIMS:] = rng.standard_normal(64 - LATENT_DIMS)
    assert attributes_from_latent(z) == attributes_from_latent(tail)  # only the first LATENT_DIMS components count
    big, small = np.zeros(64), np.zeros(64)
    big[0], small[0] = 1.0, -1.0  # gender is uniform over (man, woman): the sign of z[0]
    assert (attributes_from_latent(small)["gender"], attributes_from_latent(big)["gender"]) == ("man", "woman")
    with pytest.raises(ValueError, match="at least 19 components"):
        attributes_from_latent(np.zeros(5))


def test_a_latent_completes_given_attributes_with_values_that_fit_them():
    """attributes_from_latent(z, given): the given values stay; the others come from z among the
    values that fit them (none hides a given attribute, makes it impossible or forms a held-out
    pair); with nothing given it is the plain map, and unrelated attributes keep the world's odds."""
    rng = np.random.default_rng(2)
    zs = rng.standard_normal((3000, LATENT_DIMS))
    assert all(attributes_from_latent(z, {}) == attributes_from_latent(z) for z in zs[:200])
    cases = [{"eye_color": "blue", "chin": "pointed", "hair_color": "red"},   # no sunglasses, full beard, bald
             {"beard": "full beard"}, {"lips": "red lipstick"},              # only men / only women
             {"hair_color": "white"}, {"glasses": "sunglasses"}]             # held-out partners: young; red hair
    for given in cases:
        drawn = [attributes_from_latent(z, given) for z in zs]
        assert all(a[n] == v for a in drawn for n, v in given.items()), given
        assert all(in_split(a, "train") for a in drawn), given
        for a in drawn:
            assert a["glasses"] != "sunglasses" or "eye_color" not in given
            assert a["beard"] != "full beard" or "chin" not in given
            assert a["hair_style"] != "bald" or "hair_color" not in given
        if "beard" in given:
            assert {a["gender"] for a in drawn} == {"man"}
        if "lips" in given:
            assert {a["gender"] for a in drawn} == {"woman"}
        background = [a["background"] for a in drawn]
        assert max(abs(background.count(v) / len(drawn) - 0.2) for v in ATTRIBUTES["background"]) < 0.03
    assert len({attributes_from_latent(z, {"gender": "man"})["age"] for z in zs[:50]}) == 3  # z still decides
    with pytest.raises(ValueError, match="not a value"):
        attributes_from_latent(zs[0], {"beard": "goatee"})


def test_paired_batches_are_a_function_of_seed_and_step_and_hold_training_identities_only():
    a, b, c = (paired_batch(0, s, 6, 32, 16) for s in (3, 3, 4))
    assert torch.equal(a.z, b.z) and torch.equal(a.c, b.c) and torch.equal(a.target, b.target)
    assert not torch.equal(a.z, c.z)
    assert a.target.shape == (6, 3, 16, 16) and a.target.min() >= -1 and a.target.max() <= 1
    rng = np.random.default_rng(0)
    from train.paired import train_latents
    latents = train_latents(rng, 400, 32)
    assert all(in_split(attributes_from_latent(z), "train") for z in latents)
    # the redraw is needed: about 5 % of N(0, I) latents name a held-out pair
    raw = np.random.default_rng(0).standard_normal((2000, 32))
    assert sum(not in_split(attributes_from_latent(z), "train") for z in raw) > 40


def test_paired_loss_fits_the_worlds_renders():
    torch.manual_seed(0)
    G = TriPlaneGenerator(TINY_G).train()
    batch = paired_batch(0, 0, 4, TINY_G.z_dim, TINY_G.img_resolution)
    opt = torch.optim.Adam(G.parameters(), lr=0.005, betas=(0.9, 0.99))
    losses = []
    for _ in range(12):
        loss, stats = paired_loss(G, batch, raw_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(stats) == {"loss/l1_image", "loss/l1_raw"}
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("full_rate, ratio", [(True, (0.3, 3.0)), (False, (0.003, 0.03))])
def test_with_full_rate_the_mapping_moves_as_fast_as_the_synthesis(full_rate, ratio):
    torch.manual_seed(0)
    G = TriPlaneGenerator(TINY_G).train()
    groups = param_groups(G, list(G.parameters()), 0.002, full_rate)
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in G.parameters())
    fc0, conv = G.backbone.mapping.fc0.weight, G.backbone.synthesis.b4.conv1.weight
    before = fc0.detach().clone(), conv.detach().clone()
    opt = torch.optim.Adam(groups, betas=(0.9, 0.99))
    paired_loss(G, paired_batch(0, 0, 2, TINY_G.z_dim, TINY_G.img_resolution), 1.0)[0].backward()
    opt.step()
    moved = [float((p.detach() - b).norm() / b.norm()) for p, b in zip((fc0, conv), before)]
    assert ratio[0] < moved[0] / moved[1] < ratio[1], moved


def test_paired_resume_is_exact_and_rendering_workers_keep_the_order(tmp_path):
    full_G, nimg = train_paired(config("paired.kimg=0.012", "paired.workers=1"), tmp_path / "full", progress=False)
    assert nimg == 12
    train_paired(config("paired.kimg=0.008"), tmp_path / "split", progress=False)
    resumed_G, _ = train_paired(config("paired.kimg=0.012"), tmp_path / "split", resume=True, progress=False)
    read = lambda d: [json.loads(l) for l in (d / "log.jsonl").read_text().splitlines()]
    a, b = read(tmp_path / "full"), read(tmp_path / "split")
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert rb["loss/l1_image"] == pytest.approx(ra["loss/l1_image"], rel=1e-5)
    assert digest(resumed_G) == digest(full_G)
    assert list((tmp_path / "full" / "samples").glob("paired-*.png"))


def test_the_gan_prior_starts_from_a_paired_run(tmp_path):
    from train.loop import train
    from train_data import write_tiny_dataset
    paired, _ = train_paired(config("paired.kimg=0.004"), tmp_path / "paired", progress=False)
    data = write_tiny_dataset(tmp_path / "data", num=8)
    out = train(config(f"data={data}", "prior.kimg=0.004", f"prior.init={tmp_path / 'paired'}"), "prior",
                tmp_path / "prior", progress=False)
    assert out.cur_nimg == 4
    from dreamportrait.checkpoints import read_model_metadata
    meta = read_model_metadata(out.generator_file)
    assert meta.extra["stage"] == "prior" and meta.extra["kimg_total"] == pytest.approx(0.008)
    with pytest.raises(ValueError, match="own loop"):
        train(config(f"data={data}"), "paired", tmp_path / "nope", progress=False)
