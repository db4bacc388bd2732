"""The synthetic world's small CLIP: its folder, penultimate features, retrieval metric, training."""
import json

import numpy as np
import pytest
import torch

from clip_reference import hand_run
from dreamportrait.synthetic.attributes import sample_identities
from dreamportrait.synthetic.captions import make_caption, mentionable, parse_caption
from dreamportrait.text_encoder import TextEncoder, save_sd_text_encoder
from world.clip_training import (SMALL_CLIP_CONFIG, build_clip, retrieval, save_clip_folder, train)
from train.data import DatasetError
from train_data import write_tiny_dataset

PROMPTS = ["A young woman with curly red hair, wearing sunglasses.", "The old man has a full beard."]
TINY_CFG = {"embed_dim": 16,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    model = build_clip(SMALL_CLIP_CONFIG, seed=1).eval()
    folder = save_clip_folder(model, SMALL_CLIP_CONFIG, tmp_path_factory.mktemp("clip") / "synthetic-clip")
    return model, folder


def test_clip_folder_gives_penultimate_features_of_the_trained_config(small_clip):
    model, folder = small_clip
    enc = TextEncoder.from_clip_folder(folder)
    heads, layers = SMALL_CLIP_CONFIG["text_cfg"]["heads"], SMALL_CLIP_CONFIG["text_cfg"]["layers"]
    assert enc.width == SMALL_CLIP_CONFIG["text_cfg"]["width"] and enc.context_length == 77
    assert len(enc.tower.blocks) == layers - 1
    ids, counts = enc.tokenize(PROMPTS)
    got = enc.encode_ids(ids, counts)
    stored = build_clip(SMALL_CLIP_CONFIG, seed=1).eval()  # the folder keeps float16 weights
    stored.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                            for k, v in model.state_dict().items()})
    with torch.no_grad():
        expected = hand_run(stored, ids, heads)
    torch.testing.assert_close(got.tokens, expected, atol=1e-5, rtol=1e-5)
    eot = ids.argmax(1)
    torch.testing.assert_close(got.eot, expected[torch.arange(len(PROMPTS)), eot], atol=1e-5, rtol=1e-5)
    # The teacher's copy (SD2 layout) computes the same features; the identity rebuilds the encoder.
    save_sd_text_encoder(enc, folder.parent / "teacher")
    torch.testing.assert_close(TextEncoder.from_sd_pipeline(folder.parent / "teacher")(PROMPTS).tokens,
                               got.tokens, atol=1e-5, rtol=1e-5)
    again = TextEncoder.from_identity(enc.describe())
    assert again.describe()["fingerprint"] == enc.describe()["fingerprint"]


def test_clip_folder_is_an_open_clip_folder_under_40_mb(small_clip):
    import open_clip
    model, folder = small_clip
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size < 40e6, f"{size / 1e6:.1f} MB"
    cfg = json.loads((folder / "open_clip_config.json").read_text())
    assert cfg["model_cfg"] == SMALL_CLIP_CONFIG
    loaded = open_clip.create_model(f"local-dir:{folder}").eval()
    image = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(image), model.encode_image(image), atol=2e-2, rtol=2e-2)


def test_clip_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        TextEncoder.from_clip_folder(tmp_path)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        TextEncoder.from_clip_folder(tmp_path)


def test_full_caption_names_every_visible_attribute():
    for ident in sample_identities(4, 30):
        a = ident.attributes
        caption = make_caption(a, np.random.default_rng(0), mentions=99)
        found = parse_caption(caption)
        for name in mentionable(a):
            assert found.get(name) == {a[name]}, (name, caption)


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


def test_training_lowers_the_loss_and_a_stopped_run_resumes_exactly(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", num=16, res=32)
    kw = dict(kimg=0.096, batch=8, lr=2e-3, warmup=1, model_cfg=TINY_CFG, progress=False,
              checkpoint_seconds=1e9)
    full = train(str(data), str(tmp_path / "full"), out=str(tmp_path / "clip"), **kw)
    train(str(data), str(tmp_path / "split"), stop_after=48, **kw)
    resumed = train(str(data), str(tmp_path / "split"), resume=True, **kw)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    losses = [json.loads(line)["clip/loss"] for line in open(tmp_path / "full" / "log.jsonl")]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1
    assert (tmp_path / "clip" / "logs" / "clip-log.jsonl").is_file()
    TextEncoder.from_clip_folder(tmp_path / "clip")


def test_training_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetError, match="python -m dreamportrait.synthetic"):
        train(str(tmp_path / "missing"), str(tmp_path / "run"), kimg=0.01, model_cfg=TINY_CFG, progress=False)
    data = write_tiny_dataset(tmp_path / "data", num=4, res=64)
    with pytest.raises(ValueError, match="32px"):
        train(str(data), str(tmp_path / "run"), kimg=0.01, model_cfg=TINY_CFG, progress=False)
    with pytest.raises(FileNotFoundError, match="--resume"):
        train(str(data), str(tmp_path / "run"), kimg=0.01, model_cfg=SMALL_CLIP_CONFIG, resume=True,
              progress=False)
