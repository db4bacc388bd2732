"""train/: gradient routing of every loss term, torchrun with two gloo ranks, exact resume,
presets, input errors, and a chained prior -> stage1 -> stage2 run the app can load."""
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_path import REPO
from train_data import write_tiny_dataset

from dreamportrait.cameras import camera_label
from dreamportrait.generator import preset as generator_preset
from train.config import PRESETS, STAGES, apply_overrides, preset, validate
from train.gan_loss import GANLoss
from train.loop import phase_loss
from train.models import build_models
from train.sampling import BatchSampler, open_data
from world.tiny_teacher import write_tiny_teacher_folder

FAST = ["batch=4", "snapshot_every_kimg=0.008", "image_every_kimg=1000",
        "gan.blur_init_sigma=1.0", "text.minilm=null",
        'text.open_clip_config={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}',
        "generator=" + json.dumps(generator_preset("tiny", neural_rendering_resolution=16).to_dict()),
        "text.condition.text_dim=32", "text.condition.adapter_resolutions=[8,32]"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = write_tiny_dataset(root / "data", num=12)
    teacher = write_tiny_teacher_folder(root / "teacher")
    return root, data, teacher


def config(data, *extra):
    return apply_overrides(preset("synthetic-tiny"), FAST + [f"data={data}", *extra])


def grads(module) -> dict[str, bool]:
    """Which parameters received a non-zero gradient. The super-resolution's noise strengths are
    left out: EG3D runs its SR with noise_mode 'none', so no loss ever reaches them."""
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in module.named_parameters()
            if not (n.startswith("superresolution.") and n.endswith("noise_strength"))}


def test_reals_visit_every_image_once_per_pass_however_many_fakes_are_drawn(world):
    _, data, _ = world
    dataset = open_data(data)
    sampler = BatchSampler(dataset, 8, seed=0)
    everything = torch.from_numpy(np.stack([dataset[i]["image"].numpy() for i in range(len(dataset))]))
    seen = []
    for _ in range(len(dataset) // 4):  # one pass of reals, three phases of fakes per step
        seen.append(sampler.next_reals(4, "cpu").img)
        fakes = [sampler.next_fakes(4, "cpu") for _ in range(3)]
    seen = torch.cat(seen)
    match = (seen[:, None] - everything[None]).abs().flatten(2).amax(2) < 1e-6  # (real drawn, data image)
    assert match.any(1).all() and match.sum(0).eq(1).all()  # each data image exactly once
    assert all(len(f.captions) == 4 and f.c.shape == (4, 25) for f in fakes)


def test_every_loss_term_reaches_exactly_its_parameters(world):
    root, data, teacher = world
    from dreamportrait.text_generator import DreamPortraitGenerator
    from train.distribution_sds import DistributionSDS
    from train.teacher import DiffusionTeacher
    torch.manual_seed(0)
    cfg = config(data, "stage1.init=null")
    built = build_models(cfg, "stage1", torch.device("cpu"), 64)
    G, D, enc = built.G, built.D, built.text_encoder
    assert isinstance(G, DreamPortraitGenerator)
    with torch.no_grad():  # open the zero-initialised text paths so every weight is reachable
        for n, p in G.named_parameters():
            if n.endswith(".gamma"):
                p.fill_(0.5)
            if n == "semantics.fusion.weight":
                p.normal_()
    teacher = DiffusionTeacher.from_pretrained(teacher)
    sds = DistributionSDS(teacher, cfg.sds)
    sampler = BatchSampler(open_data(data), G.config.z_dim, seed=0)
    reals, fakes = sampler.next_reals(4, "cpu"), sampler.next_fakes(4, "cpu")
    cond = {"text": enc(fakes.captions)}

    def run(phase, module, gan_weight=1.0, guidance=None):
        G.zero_grad(set_to_none=True)
        D.zero_grad(set_to_none=True)
        G.requires_grad_(module == "G")
        D.requires_grad_(module == "D")
        loss, _ = phase_loss(phase, reals, fakes, cond, GANLoss(G, D, cfg.gan), guidance, gan_weight, 0)
        loss.backward()
        return grads(G), grads(D)

    g, d = run("Gmain", "G")
    assert all(g.values()) and not any(d.values())
    g, d = run("Greg", "G")  # density regularisation: planes + decoder, never the super-resolution
    assert all(v for n, v in g.items() if not n.startswith("superresolution."))
    assert not any(v for n, v in g.items() if n.startswith("superresolution.")) and not any(d.values())
    g, d = run("Gmain", "G", gan_weight=0.0, guidance=sds)  # SDS alone
    assert all(g.values()) and not any(d.values())
    g, d = run("Dmain", "D")
    assert all(d.values()) and not any(g.values())
    g, d = run("Dreg", "D")
    # R1 penalises the input gradient: with piecewise-linear activations, biases after the last
    # non-linear-in-x operation (minibatch stddev) cannot change it, so exactly these get zero.
    assert [n for n, v in d.items() if not v] == ["b4.conv.bias", "b4.fc.bias", "b4.out.bias"]
    assert not any(g.values())
    # Never the teacher, never the frozen text encoder.
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())


def test_each_phase_generates_its_own_fakes_and_shares_the_steps_reals(world, tmp_path, monkeypatch):
    """EG3D's schedule: within one step (two micro-batches), G main, G reg and D main each generate
    from their own z, cameras and captions, fresh per micro-batch, so D main never judges the
    samples G main has just optimised; D main and D R1 see the same reals, one draw per micro-batch."""
    from train.loop import train
    root, data, _ = world
    seen = {"Gmain": [], "Greg": [], "Dmain": [], "Dmain reals": [], "Dreg reals": []}
    fakes, density_loss = GANLoss.fakes, GANLoss.density_loss
    discriminator_loss, r1_loss = GANLoss.discriminator_loss, GANLoss.r1_loss

    def draw(z, c, cond):
        return z.clone(), c.clone(), cond["text"].eot.clone()  # the captions' EOT features

    def recording_fakes(self, z, c, cond, cur_nimg, update_emas=False):
        if not update_emas:  # D main's fakes are recorded by discriminator_loss
            seen["Gmain"].append(draw(z, c, cond))
        return fakes(self, z, c, cond, cur_nimg, update_emas=update_emas)

    def recording_density_loss(self, z, c, cond, cur_nimg):
        seen["Greg"].append(draw(z, c, cond))
        return density_loss(self, z, c, cond, cur_nimg)

    def recording_discriminator_loss(self, z, c, cond, real_img, real_c, cur_nimg, real_cond=None):
        seen["Dmain"].append(draw(z, c, cond))
        seen["Dmain reals"].append((real_img.clone(), real_c.clone()))
        return discriminator_loss(self, z, c, cond, real_img, real_c, cur_nimg, real_cond)

    def recording_r1_loss(self, real_img, real_c, cur_nimg, real_cond=None):
        seen["Dreg reals"].append((real_img.clone(), real_c.clone()))
        return r1_loss(self, real_img, real_c, cur_nimg, real_cond)

    for name, f in (("fakes", recording_fakes), ("density_loss", recording_density_loss),
                    ("discriminator_loss", recording_discriminator_loss), ("r1_loss", recording_r1_loss)):
        monkeypatch.setattr(GANLoss, name, f)
    train(config(data, "stage1.kimg=0.004", "stage1.init=null", "stage1.grad_accum=2"), "stage1", tmp_path / "run",
          progress=False)  # one step of every phase: batch 4 = 2 micro-batches of 2
    assert {k: len(v) for k, v in seen.items()} == {k: 2 for k in seen}
    draws = [d for phase in ("Gmain", "Greg", "Dmain") for d in seen[phase]]
    assert torch.cat([z for z, _, _ in draws]).unique(dim=0).shape[0] == 12  # every phase, every micro-batch
    for (_, c_g, text_g), (_, c_d, text_d) in zip(seen["Gmain"], seen["Dmain"]):
        assert not torch.equal(c_g, c_d) and not torch.equal(text_g, text_d)  # cameras and captions too
    for (img_d, c_d), (img_r, c_r) in zip(seen["Dmain reals"], seen["Dreg reals"]):
        assert torch.equal(img_d, img_r) and torch.equal(c_d, c_r)
    assert not torch.equal(seen["Dmain reals"][0][0], seen["Dmain reals"][1][0])  # each micro-batch its reals


def weights_digest(module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def torchrun_two_ranks(stage, data, run_dir, *overrides) -> list[dict]:
    """Train STAGE with two gloo ranks; each rank's digests of what it ended with."""
    script = Path(__file__).with_name("train_dist_worker.py")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), "train", stage, str(data), str(run_dir), *FAST, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_gloo_ranks_via_torchrun_end_with_identical_weights(world, tmp_path):
    root, data, _ = world
    digests = torchrun_two_ranks("prior", data, tmp_path / "run", "prior.kimg=0.012")
    assert digests[0]["steps"] == digests[1]["steps"] == 3
    assert digests[0]["G"] == digests[1]["G"] and digests[0]["D"] == digests[1]["D"]
    assert digests[0]["G"] != digests[0]["G_init"]  # they trained
    assert (tmp_path / "run" / "generator.safetensors").exists()


def test_two_gloo_ranks_keep_one_vsd_particle(world, stage1_run, tmp_path):
    """Each rank fits the particle on its own renders; its gradients are averaged over the ranks, so
    the replicas' particles (and generators) stay identical while they train."""
    root, data, teacher = world
    digests = torchrun_two_ranks("stage2", data, tmp_path / "run", "stage2.kimg=0.008", f"stage2.init={stage1_run}",
                                 f"teacher={teacher}", "guidance=variational_sds", "vsd.particle_lr=0.01")
    assert digests[0]["steps"] == digests[1]["steps"] == 2
    assert digests[0]["particle"] == digests[1]["particle"]
    assert digests[0]["particle"] != digests[0]["particle_init"]  # it trained
    assert digests[0]["G"] == digests[1]["G"] and digests[0]["D"] == digests[1]["D"]


def test_two_gloo_ranks_average_w_avg_but_never_send_constant_buffers(tmp_path):
    script = Path(__file__).with_name("train_dist_worker.py")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), "buffers", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["averaged"] == ["backbone.mapping.w_avg"]  # what training changed, nothing else
        assert r["again"] == []  # unchanged since: nothing to send
        assert r["constants_untouched"]  # each rank keeps its own noise inputs and filters
    mean = (np.array(ranks[0]["local_w_avg"]) + np.array(ranks[1]["local_w_avg"])) / 2
    assert ranks[0]["local_w_avg"] != ranks[1]["local_w_avg"]
    assert ranks[0]["w_avg"] == ranks[1]["w_avg"]
    np.testing.assert_allclose(ranks[0]["w_avg"], mean, rtol=1e-6, atol=1e-7)


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines()]


def test_resumed_run_reproduces_the_uninterrupted_losses(world, tmp_path):
    from train.loop import train
    root, data, _ = world
    full = train(config(data, "prior.kimg=0.012", "snapshot_every_kimg=0.004"), "prior", tmp_path / "full",
                 progress=False)
    assert full.cur_nimg == 12
    train(config(data, "prior.kimg=0.008", "snapshot_every_kimg=0.004"), "prior", tmp_path / "split", progress=False)
    resumed = train(config(data, "prior.kimg=0.012", "snapshot_every_kimg=0.004"), "prior", tmp_path / "split",
                    resume=True, progress=False)
    a, b = read_log(tmp_path / "full"), read_log(tmp_path / "split")
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k in ra:
            if k.startswith("loss/"):
                assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), (ra["step"], k)
    assert weights_digest(resumed.G_ema) == weights_digest(full.G_ema)


@pytest.fixture(scope="module")
def stage1_run(world):
    """A stage-1 run folder for stage-2 runs to start from (exported before any step)."""
    from train.loop import train
    root, data, _ = world
    train(config(data, "stage1.kimg=0", "stage1.init=null"), "stage1", root / "stage1-init", progress=False)
    return root / "stage1-init"


def assert_resume_is_exact(stage, data, tmp_path, *overrides):
    """Three steps in one run, and two steps then a resumed third: the same losses and EMA weights."""
    from train.loop import train
    cfg = lambda kimg: config(data, f"{stage}.kimg={kimg}", "snapshot_every_kimg=0.004", *overrides)
    full = train(cfg(0.012), stage, tmp_path / "full", progress=False)
    train(cfg(0.008), stage, tmp_path / "split", progress=False)
    resumed = train(cfg(0.012), stage, tmp_path / "split", resume=True, progress=False)
    a, b = read_log(tmp_path / "full"), read_log(tmp_path / "split")
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        losses = lambda r: {k: v for k, v in r.items() if k.startswith("loss/")}
        assert losses(rb) == pytest.approx(losses(ra), rel=1e-5, abs=1e-7), ra["step"]
    assert weights_digest(resumed.G_ema) == weights_digest(full.G_ema)


def test_stage1_resume_draws_the_same_captions(world, tmp_path):
    """The caption sampler's state is saved with the run, so a resumed stage 1 sees the same prompts."""
    assert_resume_is_exact("stage1", world[1], tmp_path, "stage1.init=null")


@pytest.mark.parametrize("guidance", [
    [],
    # The particle learns fast enough here that a resumed run without its weights and Adam moments
    # would log other losses at step 3.
    ["guidance=variational_sds", "vsd.particle_lr=0.01"],
    ["guidance=classifier_score"],
], ids=["distribution_sds", "variational_sds", "classifier_score"])
def test_stage2_resume_draws_the_same_captions_and_sds_noise(world, stage1_run, tmp_path, guidance):
    root, data, teacher = world
    assert_resume_is_exact("stage2", data, tmp_path, f"stage2.init={stage1_run}", f"teacher={teacher}", *guidance)


def test_stage2_resume_refuses_a_teacher_folder_replaced_since(world, stage1_run, tmp_path):
    """A run records its teacher's files (sha256); another U-Net under the same folder name is refused
    on --resume, while logs or evaluations added to the folder change nothing."""
    import dataclasses
    import shutil
    from train.loop import train
    from train.teacher import teacher_files_sha256
    from world.tiny_teacher import TinyTeacherConfig
    root, data, teacher = world
    folder = shutil.copytree(teacher, tmp_path / "teacher")
    digest = teacher_files_sha256(folder)
    (folder / "eval-heldout.json").write_text("{}")
    assert teacher_files_sha256(folder) == digest
    cfg = lambda kimg: config(data, f"stage2.kimg={kimg}", f"stage2.init={stage1_run}", f"teacher={folder}")
    train(cfg(0.004), "stage2", tmp_path / "run", progress=False)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["guidance"] == {"teacher_sha256": digest}
    other = write_tiny_teacher_folder(tmp_path / "other", dataclasses.replace(TinyTeacherConfig(), seed=1))
    shutil.rmtree(folder / "unet")
    shutil.copytree(other / "unet", folder / "unet")
    assert teacher_files_sha256(folder) != digest
    with pytest.raises(ValueError, match="not the ones the run was trained with"):
        train(cfg(0.008), "stage2", tmp_path / "run", resume=True, progress=False)


def draws() -> tuple:
    return float(torch.rand(1)), float(np.random.rand()), random.random()


def test_run_state_round_trips_every_rng_as_plain_data(tmp_path):
    from train.run_files import RunFiles
    run = RunFiles(tmp_path, {"a": 1}, total=10, progress=False)
    np.random.normal()  # numpy's cached Gaussian is part of its state too
    run.save({"weights": {"w": torch.ones(2)}, "note": "x"}, rank_state={"sampler": {"pos": 3}})
    run.close()
    expected = draws()
    draws()
    resumed = RunFiles(tmp_path, {"a": 1}, total=10, resume=True, progress=False)
    assert draws() == expected
    assert resumed.state["note"] == "x" and resumed.rank_state == {"sampler": {"pos": 3}}
    resumed.close()


def test_resume_accepts_a_setting_added_later_only_at_its_default(tmp_path):
    """A run saved before an option existed resumes while the option is at its default (the old
    behaviour); set to anything else, or any saved setting changed, it is refused by name."""
    from train.run_files import RunFiles
    run = RunFiles(tmp_path, {"a": 1, "stage2": {"lr": 2}}, total=10, progress=False)
    run.save({"note": "saved"})
    run.close()
    defaults = {"a": 0, "stage2": {"lr": 0, "new_option": False}}
    for settings, refused in (({"new_option": True}, "stage2.new_option"), ({"lr": 3}, "stage2.lr")):
        with pytest.raises(ValueError, match=rf"settings differ.*\['{refused}'\]"):
            RunFiles(tmp_path, {"a": 1, "stage2": {"lr": 2, "new_option": False, **settings}}, total=10,
                     resume=True, progress=False, defaults=defaults)
    with pytest.raises(ValueError, match=r"settings differ.*\['stage2.new_option'\]"):  # no defaults given
        RunFiles(tmp_path, {"a": 1, "stage2": {"lr": 2, "new_option": False}}, total=10, resume=True,
                 progress=False)
    resumed = RunFiles(tmp_path, {"a": 1, "stage2": {"lr": 2, "new_option": False}}, total=10, resume=True,
                       progress=False, defaults=defaults)
    assert resumed.state["note"] == "saved"
    resumed.close()


def test_save_refuses_state_that_would_not_load_as_plain_data(tmp_path):
    from train.run_files import RunFiles
    run = RunFiles(tmp_path, {}, total=10, progress=False)
    with pytest.raises(TypeError, match=r"state\['opt'\]\['lr'\] is a numpy.float64.*tensors, numbers"):
        run.save({"opt": {"lr": np.float64(0.1)}})
    with pytest.raises(TypeError, match=r"rank_state\['sampler'\] is a numpy.ndarray.*torch.from_numpy"):
        run.save({}, rank_state={"sampler": np.zeros(3)})
    assert not (tmp_path / "state.pt").exists()
    run.close()


class _MakesADirectory:
    """Unpickling this calls os.mkdir: a stand-in for whatever code a crafted pickle could run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_state_file_holding_a_python_object_is_refused_without_running_it(tmp_path):
    from train.run_files import RunFiles
    RunFiles(tmp_path, {}, total=10, progress=False).close()
    marker = tmp_path / "code-ran"
    torch.save({"G": {"w": torch.ones(1)}, "payload": _MakesADirectory(str(marker)), "nimg": 0, "steps": 0,
                "ranks": [{}]}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match=r"state.pt holds objects other than tensors.*\w+\.mkdir"
                                         r".*not loaded.*start a new --run-dir"):
        RunFiles(tmp_path, {}, total=10, resume=True, progress=False)
    assert not marker.exists()


def test_bf16_autocast_trains_every_phase_of_stage2(world, stage1_run, tmp_path):
    """bf16=true is offered, so it must run: G, D (antialiased resizes included), R1, density
    regularisation and distribution SDS, with finite losses."""
    from train.loop import train
    root, data, teacher = world
    train(config(data, "bf16=true", "stage2.kimg=0.004", f"stage2.init={stage1_run}", f"teacher={teacher}"),
          "stage2", tmp_path / "run", progress=False)
    (record,) = read_log(tmp_path / "run")
    losses = {k: v for k, v in record.items() if k.startswith("loss/")}
    assert sorted(losses) == ["loss/D_fake", "loss/D_real", "loss/G", "loss/density_reg", "loss/r1", "loss/sds"]
    assert all(np.isfinite(v) for v in losses.values())


def test_stage2_without_the_gan_term_trains_g_by_sds_alone_and_leaves_d_as_it_was(world, stage1_run, tmp_path):
    """The ablation "distribution SDS without GAN regularisation" (stage2.gan_weight=0): G's only
    loss is SDS, D is neither run nor trained (its exported weights are stage 1's), and G moves."""
    from safetensors.torch import load_file
    from train.loop import train
    root, data, teacher = world
    train(config(data, "stage2.gan_weight=0", "stage2.kimg=0.008", f"stage2.init={stage1_run}", f"teacher={teacher}"),
          "stage2", tmp_path / "run", progress=False)
    log = read_log(tmp_path / "run")
    assert len(log) == 2 and all("loss/sds" in r for r in log)
    assert not any(k in r for r in log for k in ("loss/G", "loss/D_fake", "loss/D_real", "loss/r1"))
    d0, d1 = (load_file(f / "discriminator.safetensors") for f in (Path(stage1_run), tmp_path / "run"))
    assert d0.keys() == d1.keys() and all(torch.equal(d0[k], d1[k]) for k in d0)
    g0, g1 = (load_file(f / "generator.safetensors") for f in (Path(stage1_run), tmp_path / "run"))
    assert any(not torch.equal(g0[k], g1[k]) for k in g0 if k in g1)
    with pytest.raises(ValueError, match="stage1.gan_weight=0 leaves G without an objective"):
        validate(config(data, "stage1.gan_weight=0"), "stage1")


def test_exported_generator_records_the_trained_rendering_resolution(world, tmp_path):
    """The neural rendering resolution fades from the generator's own to gan.*_final; the exported
    generator renders at the value it was trained at."""
    from dreamportrait.generator import TriPlaneGenerator
    from train.loop import train
    root, data, _ = world
    train(config(data, "prior.kimg=0.008", "gan.neural_rendering_resolution_final=32",
                 "gan.neural_rendering_resolution_fade_kimg=0.008"), "prior", tmp_path / "run", progress=False)
    G = TriPlaneGenerator.from_pretrained(tmp_path / "run" / "generator.safetensors")
    assert G.config.neural_rendering_resolution == 24  # 16 -> 32 over 8 images; the last step ran at 4 images
    c = G.conditioning_label()
    ws = G.mapping(torch.randn(1, G.config.z_dim), c)
    assert G.render(G.synthesize_planes(ws), ws, c)["image_raw"].shape[-1] == 24


def test_stage_init_must_be_a_run_folder(world, tmp_path):
    from train.loop import train
    root, data, _ = world
    train(config(data, "prior.kimg=0"), "prior", tmp_path / "prior", progress=False)
    with pytest.raises(FileNotFoundError, match="init is a run folder"):
        train(config(data, f"stage1.init={tmp_path / 'prior' / 'generator.safetensors'}"), "stage1", tmp_path / "s1",
              progress=False)


def test_every_preset_validates_for_every_stage():
    for name in PRESETS:
        for stage in STAGES:
            cfg = preset(name)
            if name == "celebatext-512" and stage == "prior":
                continue  # paper scale starts from EG3D's released weights, not a prior run
            validate(cfg, stage)
    with pytest.raises(ValueError, match="unknown key"):
        apply_overrides(preset("synthetic-tiny"), ["stage1.kimgs=3"])
    with pytest.raises(ValueError, match="needs teacher"):
        validate(apply_overrides(preset("synthetic-tiny"), ["teacher=null"]), "stage2")
    with pytest.raises(ValueError, match="several text encoders"):
        validate(apply_overrides(preset("synthetic-tiny"), ['text.open_clip_config={"width": 32}']), "stage1")
    with pytest.raises(ValueError, match="several text encoders"):
        validate(apply_overrides(preset("synthetic-tiny"), ["text.open_clip_folder=checkpoints/synthetic-clip"]),
                 "stage1")
    with pytest.raises(ValueError, match="needs a text encoder"):
        validate(apply_overrides(preset("synthetic-tiny"), ["text.minilm=null"]), "stage1")
    with pytest.raises(ValueError, match="guidance='vsd' unknown; choose one of"):
        validate(apply_overrides(preset("synthetic-tiny"), ["guidance=vsd"]), "stage2")


def test_missing_inputs_are_clear_errors_before_any_work(world, tmp_path):
    from train.loop import train
    root, data, teacher = world
    with pytest.raises(FileNotFoundError, match="data set .* not found"):
        train(config(tmp_path / "nope"), "prior", tmp_path / "r1", progress=False)
    with pytest.raises(FileNotFoundError, match="no generator.safetensors"):
        train(config(data, f"stage1.init={tmp_path}"), "stage1", tmp_path / "r2", progress=False)
    with pytest.raises(Exception, match="teacher|not found"):
        train(config(data, f"teacher={tmp_path / 'missing-teacher'}", f"stage2.init={tmp_path}"), "stage2",
              tmp_path / "r3", progress=False)
    with pytest.raises(FileNotFoundError, match="--resume"):
        train(config(data), "prior", tmp_path / "r4", resume=True, progress=False)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r4").exists()


def test_chained_stages_write_checkpoints_the_pipeline_loads(world, tmp_path):
    from dreamportrait.pipeline import DreamPortraitPipeline
    from train.loop import train
    root, data, teacher = world
    runs = tmp_path / "runs"
    train(config(data, "prior.kimg=0.004"), "prior", runs / "prior", progress=False)
    train(config(data, "stage1.kimg=0.004", f"stage1.init={runs / 'prior'}"), "stage1", runs / "stage1", progress=False)
    out = train(config(data, "stage2.kimg=0.004", f"stage2.init={runs / 'stage1'}", f"teacher={teacher}"),
                "stage2", runs / "stage2", progress=False)
    assert "loss/sds" in read_log(runs / "stage2")[0]
    pipe = DreamPortraitPipeline.from_pretrained(out.generator_file)
    assert pipe.info["stage"] == "stage2" and pipe.text_conditioned
    assert pipe.info["kimg_total"] == pytest.approx(0.012)  # 4 images in each of the three stages
    _, img = pipe.generate("A young woman with long red hair.", seed=1)
    assert img["image"].shape == (1, 3, 64, 64) and torch.isfinite(img["image"]).all()


def test_command_line_takes_overrides_before_and_after_options(capsys):
    """`python -m train ... a=1 --run-dir R b=2` (as the RESULTS commands are often written)."""
    from train.__main__ import main
    assert main(["--preset", "synthetic-tiny", "data=somewhere", "--stage", "stage1", "--print-config",
                 "stage1.kimg=2"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["data"] == "somewhere" and cfg["stage1"]["kimg"] == 2


def test_mode_seeking_extension_pairs_fakes_and_pushes_a_pairs_images_apart(world, stage1_run, tmp_path):
    """stage2.mode_seeking_weight (MSGAN's term, an extension): G main's fakes come in pairs that
    share camera and caption and differ in z; the term falls as a pair's images move apart; a run
    logs it; an odd micro-batch is refused."""
    from train.loop import mode_seeking_loss, train
    from train.sampling import Fakes
    root, data, teacher = world
    fakes = Fakes(torch.randn(4, 8), torch.arange(100.0).reshape(4, 25), ["a", "b", "c", "d"]).in_pairs()
    assert fakes.captions == ["a", "a", "c", "c"] and torch.equal(fakes.c[1], fakes.c[0])
    assert torch.equal(fakes.c[3], fakes.c[2]) and not torch.equal(fakes.c[2], fakes.c[0])
    z, images = torch.randn(4, 8), torch.zeros(4, 3, 8, 8)
    near, far = images.clone(), images.clone()
    near[1::2] += 0.01
    far[1::2] += 0.5
    assert mode_seeking_loss(z, far) < mode_seeking_loss(z, near) / 10
    images.requires_grad_(True)
    mode_seeking_loss(z, images + torch.linspace(0, 0.1, 4).view(4, 1, 1, 1)).backward()
    assert (images.grad[1::2] < 0).all() and (images.grad[0::2] > 0).all()  # descent moves b up and a down: apart
    train(config(data, "stage2.mode_seeking_weight=1", "stage2.kimg=0.004", f"stage2.init={stage1_run}",
                 f"teacher={teacher}"), "stage2", tmp_path / "run", progress=False)
    (record,) = read_log(tmp_path / "run")
    assert record["loss/mode_seeking"] > 0 and "loss/sds" in record and "loss/G" in record
    with pytest.raises(ValueError, match="micro-batch \\(3\\) must be even"):
        train(config(data, "batch=3", "stage2.mode_seeking_weight=1", f"stage2.init={stage1_run}",
                     f"teacher={teacher}"), "stage2", tmp_path / "odd", progress=False)


def test_latent_prompt_extension_gives_the_guidance_each_latents_completed_caption(world, stage1_run, tmp_path,
                                                                                   monkeypatch):
    """stage2.latent_prompt_mentions (an extension for the synthetic world): G reads the caption, the
    guidance reads it completed from each fake's own z; the wording is a function of z (so resume
    stays exact); latents too short to name attributes and stages without guidance are refused."""
    from dreamportrait.synthetic.attributes import attributes_from_latent
    from dreamportrait.synthetic.captions import parse_caption
    from train.distribution_sds import DistributionSDS
    from train.loop import train
    from train.sampling import Fakes
    root, data, teacher = world
    caption = "A young woman with long black hair."
    fakes = Fakes(torch.randn(4, 64, generator=torch.Generator().manual_seed(3)), torch.zeros(4, 25), [caption] * 4)
    prompts = fakes.completed_captions(6)
    assert prompts == fakes.completed_captions(6) and len(set(prompts)) == 4
    for z, prompt in zip(fakes.z, prompts):
        said = {n: next(iter(v)) for n, v in parse_caption(prompt).items()}
        truth = attributes_from_latent(z.numpy(), {"gender": "woman", "age": "young", "hair_style": "long",
                                                   "hair_color": "black"})
        assert said.items() >= {"gender": "woman", "age": "young", "hair_style": "long"}.items()
        assert all(truth[n] == v for n, v in said.items()) and len(said) > 4
    many = Fakes(torch.randn(400, 64, generator=torch.Generator().manual_seed(4)), torch.zeros(400, 25), [caption] * 400)
    whole, half = many.completed_captions(6), many.completed_captions(6, share=0.5)
    kept = [h == caption for h in half]
    assert 160 < sum(kept) < 240 and half == many.completed_captions(6, share=0.5)  # about half, the same on resume
    assert all(h == w for h, w, k in zip(half, whole, kept) if not k)  # the completed ones worded as with share 1
    assert many.completed_captions(6, share=0.0) == many.captions and caption not in whole
    seen = {"captions": [], "prompts": []}
    real_fakes, real_call = BatchSampler.next_fakes, DistributionSDS.__call__
    monkeypatch.setattr(BatchSampler, "next_fakes", lambda self, n, device: seen["captions"].append(
        real_fakes(self, n, device)) or seen["captions"][-1])
    monkeypatch.setattr(DistributionSDS, "__call__", lambda self, prompts, images, **kw: seen["prompts"].append(
        prompts) or real_call(self, prompts, images, **kw))
    train(config(data, "stage2.latent_prompt_mentions=6", "stage2.kimg=0.004", f"stage2.init={stage1_run}",
                 f"teacher={teacher}"), "stage2", tmp_path / "run", progress=False)
    (record,) = read_log(tmp_path / "run")
    assert "loss/sds" in record and len(seen["prompts"]) == 1
    (completed,) = seen["prompts"]
    g_main = next(f for f in seen["captions"] if f.completed_captions(6) == completed)  # G main's own fakes
    assert all(parse_caption(c).items() <= parse_caption(d).items() for c, d in zip(g_main.captions, completed))
    assert completed != g_main.captions
    with pytest.raises(ValueError, match="only stage2"):
        validate(config(data, "stage1.latent_prompt_mentions=6"), "stage1")
    with pytest.raises(ValueError, match="must be >= 0"):
        validate(config(data, "stage2.latent_prompt_mentions=-1", f"stage2.init={stage1_run}", f"teacher={teacher}"),
                 "stage2")
    with pytest.raises(ValueError, match="latent_prompt_share=1.5 must be in"):
        validate(config(data, "stage2.latent_prompt_mentions=6", "stage2.latent_prompt_share=1.5",
                        f"stage2.init={stage1_run}", f"teacher={teacher}"), "stage2")
    with pytest.raises(ValueError, match="needs stage2.latent_prompt_mentions > 0"):
        validate(config(data, "stage2.latent_prompt_share=0.5", f"stage2.init={stage1_run}", f"teacher={teacher}"),
                 "stage2")
    with pytest.raises(ValueError, match="z has 8: set it to 0"):
        Fakes(torch.randn(2, 8), torch.zeros(2, 25), [caption] * 2).completed_captions(6)


def test_world_depth_extension_holds_the_rendered_depth_to_the_worlds_head(world, stage1_run, tmp_path):
    """stage2.world_depth_weight (an extension for the synthetic world): the world's depth of each
    fake's person is zero-loss for a generator that renders it, a flat sheet in front of the head
    (the shipped model's failure) costs about the head's relief, and training logs the term."""
    from train.loop import train, world_depth_loss
    from train.sampling import Fakes
    root, data, teacher = world
    z = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    fakes = Fakes(z, camera_label(20.0, 0.0).repeat(4, 1), ["A young woman with long black hair."] * 4)
    view = fakes.world_view(32)
    depth, mask = view["depth"], view["mask"]
    assert depth.shape == mask.shape == (4, 1, 32, 32) and 0.2 < mask.mean() < 0.8
    assert torch.equal(depth, fakes.world_view(32)["depth"]) and not torch.equal(depth[0], depth[1])  # z's heads
    far = depth.flatten(1).amax(1).view(-1, 1, 1, 1)
    exact = torch.where(mask > 0, depth, far + 0.3)
    assert world_depth_loss(exact, depth, mask).item() < 1e-6
    sheet = torch.full_like(depth, float(depth[mask > 0.5].min()))
    relief = float(((depth - sheet) * mask).sum() / mask.sum())
    assert world_depth_loss(sheet, depth, mask).item() > relief > 0.05
    train(config(data, "stage2.world_depth_weight=1", "stage2.kimg=0.004", f"stage2.init={stage1_run}",
                 f"teacher={teacher}"), "stage2", tmp_path / "run", progress=False)
    (record,) = read_log(tmp_path / "run")
    assert record["loss/world_depth"] > 0
    with pytest.raises(ValueError, match="world_depth_weight=-1 must be >= 0"):
        validate(config(data, "stage2.world_depth_weight=-1", f"stage2.init={stage1_run}", f"teacher={teacher}"),
                 "stage2")


def test_world_colour_extension_holds_the_images_to_the_worlds_render_of_each_fakes_person(world, stage1_run,
                                                                                           tmp_path, monkeypatch):
    """stage2.world_colour_weight (an extension for the synthetic world): the target is the world's
    render of the fake's person (the caption's named attributes, the rest from z) from its camera,
    at the final resolution (the raw image against it resized); images that are that render cost
    nothing, a blurred one costs, another person's render costs more, training logs the term (with
    the depth term, from one trace of the world per step), and a negative weight is refused."""
    from train.loop import image_l1, train
    from train.sampling import Fakes
    from dreamportrait.ops import resize
    root, data, teacher = world
    z = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    caption = "A young woman with long black hair."
    front = Fakes(z, camera_label(0.0, 0.0).repeat(4, 1), [caption] * 4).world_view(32)["rgb"]
    side = Fakes(z, camera_label(40.0, 0.0).repeat(4, 1), [caption] * 4).world_view(32)["rgb"]
    assert front.shape == (4, 3, 32, 32) and -1 <= front.min() and front.max() <= 1
    assert (front - side).abs().mean() > 0.02  # the camera's own view, not one picture for every view
    exact = image_l1({"image_raw": resize(front, 16), "image": front}, front)
    assert exact[0].item() == 0 and exact[1].item() < 1e-6
    blurred = resize(resize(front, 16), 32)  # right colours, detail lost: the final image's term sees it
    assert image_l1({"image_raw": resize(front, 16), "image": blurred}, front)[0].item() > 0.02
    other = sum(image_l1({"image_raw": resize(front.roll(1, 0), 16), "image": front.roll(1, 0)}, front)).item()
    assert other > 0.1  # another person's render
    from dreamportrait.synthetic.render import render
    traced = []  # with both world terms on, the world is traced once per G step, at the final resolution
    monkeypatch.setattr("train.sampling.render", lambda *a, **k: traced.append(a[2]) or render(*a, **k))
    train(config(data, "stage2.world_colour_weight=1", "stage2.world_depth_weight=1", "stage2.kimg=0.004",
                 f"stage2.init={stage1_run}", f"teacher={teacher}"), "stage2", tmp_path / "run", progress=False)
    (record,) = read_log(tmp_path / "run")
    assert record["loss/world_colour"] > 0 and record["loss/world_depth"] > 0
    assert traced == [generator_preset("tiny").img_resolution]  # 64: not again at the depth's 16
    with pytest.raises(ValueError, match="world_colour_weight=-2 must be >= 0"):
        validate(config(data, "stage2.world_colour_weight=-2", f"stage2.init={stage1_run}", f"teacher={teacher}"),
                 "stage2")


def test_mapping_full_rate_moves_the_mapping_layers_as_fast_as_the_rest(world, stage1_run, tmp_path):
    """STAGE.mapping_full_rate (an extension): the z mapping and the semantics mapping learn at G's
    lr instead of EG3D's lr x 0.01, so one step moves them about 100x as far; the synthesis moves
    as before."""
    from dreamportrait.checkpoints import GENERATOR_FILE
    from dreamportrait.text_generator import DreamPortraitGenerator
    from train.loop import train
    root, data, _ = world
    start = DreamPortraitGenerator.from_pretrained(stage1_run / GENERATOR_FILE).state_dict()
    moved = {}
    for flag in ("false", "true"):
        torch.manual_seed(0)
        G = train(config(data, "stage1.kimg=0.004", f"stage1.init={stage1_run}", f"stage1.mapping_full_rate={flag}"),
                  "stage1", tmp_path / flag, progress=False).G
        now = G.state_dict()
        moved[flag] = {name: float((now[name] - start[name]).norm() / start[name].norm())
                       for name in now if name.endswith(("mapping.fc0.weight", "synthesis.b4.conv1.weight"))}
    mapping = [n for n in moved["true"] if n.endswith("mapping.fc0.weight")]
    synthesis = [n for n in moved["true"] if n.endswith("synthesis.b4.conv1.weight")]
    assert mapping and synthesis
    for n in mapping:
        assert moved["true"][n] > 20 * moved["false"][n] > 0, (n, moved)
    for n in synthesis:
        assert moved["true"][n] == pytest.approx(moved["false"][n], rel=0.5), (n, moved)


def test_text_discriminator_extension_reads_each_images_own_caption_and_learns_it(world, stage1_run, tmp_path):
    """STAGE.text_discriminator (an extension): a text-blind D gains a zero-initialised projection
    of the sentence feature, so it first judges exactly as before; the reals come with one of their
    own captions, and D main also sees them with a neighbour's caption as fakes (matching-aware);
    training moves the projection; a text-reading D is not silently dropped."""
    from dreamportrait.checkpoints import DISCRIMINATOR_FILE, CheckpointError
    from dreamportrait.discriminator import DualDiscriminator
    from train.loop import train
    root, data, teacher = world
    dataset = open_data(data)
    sampler = BatchSampler(dataset, 8, seed=0)
    fakes_before = sampler.next_fakes(4, "cpu")
    reals = sampler.next_reals(4, "cpu")
    everything = torch.from_numpy(np.stack([dataset[i]["image"].numpy() for i in range(len(dataset))]))
    which = [int(((everything - img).abs().flatten(1).amax(1) < 1e-6).nonzero()) for img in reals.img]
    assert all(cap in dataset.captions[i] for cap, i in zip(reals.captions, which))
    plain = BatchSampler(dataset, 8, seed=0)  # drawing the reals' captions changes no fake
    assert plain.next_fakes(4, "cpu").captions == fakes_before.captions

    torch.manual_seed(0)
    blind = build_models(config(data, f"stage1.init={stage1_run}"), "stage1", torch.device("cpu"), 64)
    torch.manual_seed(0)
    reading = build_models(config(data, f"stage1.init={stage1_run}", "stage1.text_discriminator=true"), "stage1",
                           torch.device("cpu"), 64)
    assert blind.D.config.text_dim == 0 and reading.D.config.text_dim == reading.text_encoder.width == 32
    cond = {"text": reading.text_encoder(reals.captions)}
    img = {"image": reals.img, "image_raw": reals.img}
    with torch.no_grad():  # the same weights and, until it learns, the same judgement
        assert torch.equal(blind.D(img, reals.c), reading.D(img, reals.c, cond["text"].eot))
    with pytest.raises(ValueError, match="reads a sentence feature of width 32"):
        reading.D(img, reals.c)
    with pytest.raises(ValueError, match="no text condition was given"):
        GANLoss(reading.G, reading.D, config(data).gan).logits(img, reals.c, 0)

    gan = GANLoss(reading.G, reading.D, config(data).gan)
    with torch.no_grad():
        reading.D.text_mapping.fc1.weight.normal_()  # a D that reads text: the mismatched reals are judged apart
    fk = BatchSampler(dataset, reading.G.config.z_dim, seed=1).next_fakes(4, "cpu")
    _, stats = gan.discriminator_loss(fk.z, fk.c, {"text": reading.text_encoder(fk.captions)}, reals.img, reals.c, 0,
                                      cond)
    with torch.no_grad():
        expected = torch.nn.functional.softplus(gan.logits(gan.reals(reals.img, 0), reals.c, 0, {"text": reading.text_encoder(
            reals.captions[-1:] + reals.captions[:-1])})).mean()  # each real shown with its neighbour's caption
    assert stats["loss/D_mismatch"] == pytest.approx(expected.item(), rel=1e-5)
    assert stats["loss/D_mismatch"] != pytest.approx(stats["loss/D_real"], rel=1e-3)

    train(config(data, "stage1.kimg=0.008", f"stage1.init={stage1_run}", "stage1.text_discriminator=true"),
          "stage1", tmp_path / "stage1", progress=False)
    assert "loss/D_mismatch" in read_log(tmp_path / "stage1")[0]
    D = DualDiscriminator.from_pretrained(tmp_path / "stage1" / DISCRIMINATOR_FILE)
    assert D.config.text_dim == 32 and D.text_mapping.fc1.weight.abs().sum() > 0  # it learned to read text
    from train.evaluate import main as evaluate_main  # the run's own text encoder and raw resolution
    assert evaluate_main(["discriminator", str(tmp_path / "stage1"), "--data", str(data), "--num", "4"])["images"] == 4
    other = torch.stack([reading.text_encoder(["A bald man with a full beard."]).eot[0]] * 4)
    with torch.no_grad():
        assert not torch.allclose(D(img, reals.c, cond["text"].eot), D(img, reals.c, other))
    with pytest.raises(CheckpointError, match="reads text \\(text_dim=32\\); continue with stage2.text_discriminator=true"):
        train(config(data, "stage2.kimg=0.004", f"stage2.init={tmp_path / 'stage1'}", f"teacher={teacher}"),
              "stage2", tmp_path / "stage2", progress=False)
    with pytest.raises(ValueError, match="prior.text_discriminator: only stage1 and stage2"):
        validate(config(data, "prior.text_discriminator=true"), "prior")


def test_discriminator_text_margin_is_zero_for_a_d_that_ignores_the_text(world, stage1_run):
    """`python -m train.evaluate discriminator`: own caption vs a neighbour's, on real images."""
    from train.evaluate import discriminator_text_margin
    root, data, _ = world
    torch.manual_seed(0)
    built = build_models(config(data, f"stage1.init={stage1_run}", "stage1.text_discriminator=true"), "stage1",
                         torch.device("cpu"), 64)
    unread = discriminator_text_margin(built.D, built.text_encoder, data, 8, raw_resolution=16, batch=4)
    assert unread["images"] == 8 and unread["margin_mean"] == 0 and unread["own_caption_higher"] == 0
    with torch.no_grad():
        built.D.text_mapping.fc1.weight.normal_()
    read = discriminator_text_margin(built.D, built.text_encoder, data, 8, raw_resolution=16, batch=4)
    assert abs(read["margin_mean"]) > 1e-3
    blind = build_models(config(data, f"stage1.init={stage1_run}"), "stage1", torch.device("cpu"), 64)
    with pytest.raises(ValueError, match="does not read text"):
        discriminator_text_margin(blind.D, blind.text_encoder, data, 8, raw_resolution=16)
