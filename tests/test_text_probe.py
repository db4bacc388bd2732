"""The text-encoder probe (world/text_probe.py): readers of the locked encoder's features trained on
training-grammar captions, read on new identities' captions and held-out paraphrase words."""
import json

import numpy as np
import pytest
import torch

from dreamportrait.synthetic.attributes import sample_identities
from dreamportrait.synthetic.captions import make_caption
from text_fixtures import tiny_bert_encoder
from train.evaluate import attribute_accuracy, mentioned_attributes
from train_data import write_tiny_dataset
from world.text_probe import READERS, Reader, encode, fit_readers, probe, read


def captions_of(seed: int, num: int):
    captions, mentioned = [], []
    for ident in sample_identities(seed, num):
        rng = np.random.default_rng(ident.seed)
        for _ in range(4):
            caption = make_caption(ident.attributes, rng)
            captions.append(caption)
            mentioned.append(mentioned_attributes(caption, ident.attributes))
    return captions, mentioned


@pytest.mark.parametrize("kind", READERS)
def test_readers_learn_attributes_that_new_identities_captions_name(kind):
    """Trained on 150 identities' captions, each reader reads 40 new identities' captions far above
    chance (a random BERT's token states still tell its words apart), and above an untrained reader."""
    encoder = tiny_bert_encoder(0)
    captions, mentioned = captions_of(1, 150)
    test_captions, test_mentioned = captions_of(2, 40)
    train_features, features = encode(encoder, captions), encode(encoder, test_captions)
    trained = attribute_accuracy(read(fit_readers(train_features, mentioned, kind, steps=150), features), test_mentioned)
    untrained = attribute_accuracy(read(fit_readers(train_features, mentioned, kind, steps=0), features), test_mentioned)
    assert trained["mean"] > 0.6, trained
    assert trained["mean"] > untrained["mean"] + 0.2, (trained["mean"], untrained["mean"])


def test_attention_reader_ignores_padding():
    """Padding positions get no attention: appending padding does not change the reading."""
    torch.manual_seed(0)
    reader = Reader("attention", 8, 3)
    tokens, mask = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    padded_tokens = torch.cat([tokens, torch.randn(2, 4, 8)], 1)
    padded_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], 1)
    torch.testing.assert_close(reader(None, tokens, mask), reader(None, padded_tokens, padded_mask))
    with pytest.raises(ValueError, match="reader 'max' unknown"):
        Reader("max", 8, 3)


def test_probe_reports_both_readers_on_both_caption_sets(tmp_path):
    """End to end on tiny world data sets: both readers, held-out captions and held-out words."""
    train = write_tiny_dataset(tmp_path / "train", num=12)
    heldout = write_tiny_dataset(tmp_path / "heldout", num=6)
    results = probe(tiny_bert_encoder(0), str(train), str(heldout), identities=12, num=6, steps=5)
    assert set(results["readers"]) == set(READERS)
    for entry in results["readers"].values():
        assert set(entry) == {"heldout_captions", "heldout_words"}
        assert 0.0 <= entry["heldout_captions"]["mean"] <= 1.0
    captions = json.loads((train / "captions.json").read_text())
    assert results["train_captions"] == sum(len(c) for c in captions.values())
