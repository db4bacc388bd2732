"""A tiny random BERT text encoder that knows every word of the world's captions (test helper)."""
import functools

import numpy as np
import torch

from dreamportrait.synthetic.attributes import sample_identities
from dreamportrait.synthetic.captions import make_caption
from dreamportrait.text_encoder import TextEncoder


@functools.lru_cache(maxsize=1)
def _caption_words() -> tuple[str, ...]:
    """The words of the world's captions (a tiny BERT vocabulary that knows them all)."""
    from transformers import BasicTokenizer
    words = set()
    for ident in sample_identities(0, 300, split="all"):
        rng = np.random.default_rng(ident.seed)
        for k in (2, 4, 99):
            words.update(BasicTokenizer(do_lower_case=True).tokenize(make_caption(ident.attributes, rng, mentions=k)))
    return tuple(sorted(words))


def tiny_bert_encoder(seed: int) -> TextEncoder:
    """A random small BertModel read like all-MiniLM-L6-v2 (TextEncoder.from_bert), as in test_text_encoder."""
    from transformers import BertConfig, BertModel, BertTokenizer
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_caption_words()]
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=128))
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    return TextEncoder.from_bert(model, tokenizer, {"source": "test", "name": "test/tiny-bert", "sha256": f"{seed:064d}"})
