"""Frozen CLIP text encoder giving DreamPortrait's hierarchical text condition.

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
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from dreamportrait.checkpoints import atomic_folder

SD_TEXT_ENCODER_DIR = "text_encoder"
SD_TOKENIZER_DIR = "tokenizer"
_SOT_ID = 49406  # "<|startoftext|>" in CLIP's BPE vocabulary
_EOT_ID = 49407  # "<|endoftext|>": the largest id, so argmax of the ids finds it
_PROBE_PROMPT = "a portrait photo of a smiling person"  # fixed input of the identity fingerprint


@dataclass
class TextEncoding:
    """Penultimate-layer CLIP features of a batch of prompts.

    eot: (B, D) feature at the EOT position (global condition).
    tokens: (B, L, D) features of all L = context-length positions (local condition; also
        exactly SD2's UNet conditioning).
    mask: (B, L) bool, True at real tokens (SOT, words, EOT), False at padding.
    num_tokens: (B,) long, number of True entries of ``mask``.
    truncated: (B,) bool, the prompt did not fit the context and was cut.
    prompt_tokens: (B,) long, BPE tokens of the whole prompt (without SOT/EOT) before cutting.
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


class OpenClipPenultimate(nn.Module):
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


class TransformersPenultimate(nn.Module):
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


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Run a model constructor with a private, seeded RNG so random weights are reproducible."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class TextEncoder(nn.Module):
    """Frozen CLIP text encoder: prompts -> :class:`TextEncoding` (penultimate-layer features).

    Always in eval mode with ``requires_grad=False``; encoding runs under ``no_grad``.
    ``identity`` is a JSON-able description for checkpoint metadata: where the weights come
    from, plus a fingerprint (8 EOT feature values of a fixed prompt) with which
    :meth:`from_identity` checks that the rebuilt encoder computes the same features.
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
        ids = ids.to(device)
        eot_index = ids.argmax(dim=-1)
        rows = torch.arange(ids.shape[0], device=device)
        if not bool((ids[rows, eot_index] == _EOT_ID).all()):
            raise ValueError(f"token ids lack the EOT token {_EOT_ID} as their largest id; "
                             "use the tokenizer that belongs to this text model")
        feats = self.tower(ids)
        mask = torch.arange(ids.shape[1], device=device)[None, :] <= eot_index[:, None]
        prompt_tokens = prompt_tokens.to(device)
        return TextEncoding(eot=feats[rows, eot_index], tokens=feats, mask=mask, num_tokens=mask.sum(1),
                            truncated=prompt_tokens > ids.shape[1] - 2, prompt_tokens=prompt_tokens)

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
        else:
            raise ValueError(f"unknown text encoder source {source!r}; expected open_clip, open_clip_config, "
                             "open_clip_folder or sd_pipeline")
        for key in ("width", "context_length"):
            if key in identity and identity[key] != enc.identity[key]:
                raise ValueError(f"text encoder {key} is {enc.identity[key]} but the checkpoint expects "
                                 f"{identity[key]}; it is not the encoder the checkpoint was trained with")
        if "fingerprint" in identity:
            want, got = torch.tensor(identity["fingerprint"]), torch.tensor(enc.identity["fingerprint"])
            if (want - got).abs().max() > 1e-3 * max(1.0, float(want.abs().max())):
                raise ValueError(f"text encoder from {source} computes different features than the one the "
                                 f"checkpoint was trained with (fingerprint {got.tolist()} vs {want.tolist()}); "
                                 "its weights differ: check the pretrained tag, weights file or folder")
        return enc



def _context(text: nn.Module) -> int:
    return text.positional_embedding.shape[0]


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
