"""DreamPortrait's hierarchical latent condition (paper Sec. 3.2, 3.3 and Appendix A).

* Global: :class:`SemanticsMapping` fuses the CLIP EOT feature with the style code w into the
  semantics latent w_t that modulates the synthesis convolutions. It is residual with a
  zero-initialised fusion layer, so w_t == w at initialisation and a fresh text-conditioned
  generator reproduces the EG3D generator it starts from.
* Local: :class:`GatedCrossAttention3D` adapters between synthesis blocks let every tri-plane
  position (with the features of the lines it shares with the other two planes) attend to the
  word tokens; the result enters through the gate ``v + beta * tanh(gamma) * attn`` with
  gamma = 0 at initialisation, so a fresh adapter changes nothing.
* :func:`interpolate_encodings`: blending two prompts' encodings (prompt interpolation).

Plane geometry comes from :func:`dreamportrait.triplane.plane_coordinate_axes`, the same table
the renderer samples with, so "the line a point projects to" is true for this model, including
EG3D's quirk that planes 1 and 2 span the same two world axes.
"""
from __future__ import annotations

import math
from dataclasses import replace
from functools import lru_cache
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import FullyConnectedLayer
from .ops import normalize_2nd_moment
from .text_encoder import TextEncoding
from .triplane import plane_coordinate_axes


# ---- global condition ------------------------------------------------------------------------

class SemanticsMapping(nn.Module):
    """(w, EOT feature) -> w_t: two text layers, two style layers, one fusion layer (Appendix A).

    w_t = w + fusion([text_layers(eot), style_layers(w)]); the fusion layer starts at zero, so
    w_t is exactly w until training moves it. The EOT feature is normalised to unit second moment
    first, as StyleGAN's mapping normalises its inputs. w: (B, num_ws, w_dim), each style vector
    mapped separately with the same text feature; eot: (B, text_dim).
    ``lr_multiplier`` defaults to EG3D's mapping-network value.
    """

    def __init__(self, text_dim: int, w_dim: int, lr_multiplier: float = 0.01):
        super().__init__()
        self.text_dim, self.w_dim = text_dim, w_dim
        self.text_layers = nn.Sequential(
            FullyConnectedLayer(text_dim, w_dim, activation="lrelu", lr_multiplier=lr_multiplier),
            FullyConnectedLayer(w_dim, w_dim, activation="lrelu", lr_multiplier=lr_multiplier))
        self.style_layers = nn.Sequential(
            FullyConnectedLayer(w_dim, w_dim, activation="lrelu", lr_multiplier=lr_multiplier),
            FullyConnectedLayer(w_dim, w_dim, activation="lrelu", lr_multiplier=lr_multiplier))
        self.fusion = FullyConnectedLayer(2 * w_dim, w_dim, lr_multiplier=lr_multiplier)
        nn.init.zeros_(self.fusion.weight)

    def forward(self, w: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        if w.ndim != 3 or w.shape[-1] != self.w_dim:
            raise ValueError(f"w must be (B, num_ws, {self.w_dim}), got {tuple(w.shape)}")
        if eot.shape != (w.shape[0], self.text_dim):
            raise ValueError(f"eot must be ({w.shape[0]}, {self.text_dim}), got {tuple(eot.shape)}; "
                             "the text encoder width must match the semantics mapping's text_dim")
        b, n, d = w.shape
        text = self.text_layers(normalize_2nd_moment(eot.to(w.dtype)))
        style = self.style_layers(w.reshape(b * n, d))
        fused = torch.cat([text.repeat_interleave(n, dim=0), style], dim=1)
        return w + self.fusion(fused).reshape(b, n, d)


# ---- 3D-aware features -----------------------------------------------------------------------

@lru_cache(maxsize=None)
def _context_recipes(axes: tuple[tuple[int, int], ...]) -> list[list[tuple]]:
    """How each plane sees the two others, derived from the plane-axis table.

    For plane p with grid axes (a_p, b_p) (width, height) the points behind one of its positions
    form a line along the remaining world axis f. On another plane q:

    * if q contains f, that line is a row/column of q: average q along its f axis ("pool"),
      leaving a 1-D feature indexed by the world axis q shares with p, then broadcast it along
      p's grid axis of that world axis;
    * otherwise q spans the same two world axes as p (EG3D's planes 1 and 2) and the whole line
      lands on one position of q: take q's feature there ("point"), transposed if q lists the
      axes in the other order.

    Returns, per plane p, [(kind, q, dim_on_q, dim_on_p) or (kind, q, transpose)] for
    q = p+1, p+2 (mod 3); dims are -1 (width) or -2 (height).
    """
    if len(axes) != 3 or any(len(set(a)) != 2 or not set(a) <= {0, 1, 2} for a in axes):
        raise ValueError(f"plane axes must be three pairs of distinct world axes in 0..2, got {axes}")
    recipes = []
    for p, (a_p, b_p) in enumerate(axes):
        free = 3 - a_p - b_p
        ops = []
        for q in ((p + 1) % 3, (p + 2) % 3):
            a_q, b_q = axes[q]
            if free in (a_q, b_q):
                shared = b_q if a_q == free else a_q
                ops.append(("pool", q, -1 if a_q == free else -2, -1 if a_p == shared else -2))
            else:
                ops.append(("point", q, a_q != a_p))
        recipes.append(ops)
    return recipes


def _plane_context(plane: torch.Tensor, op: tuple) -> torch.Tensor:
    """Another plane's features (B, C, S, S) brought onto a plane's grid per one recipe entry."""
    if op[0] == "point":
        return plane.transpose(-1, -2) if op[2] else plane
    _, _, dim_q, dim_p = op
    line = plane.mean(dim=dim_q)  # (B, C, S): indexed by the shared world axis
    line = line.unsqueeze(-2) if dim_p == -1 else line.unsqueeze(-1)
    return line.expand_as(plane)


def triplane_aware_features(planes: torch.Tensor, axes: Optional[Sequence[tuple[int, int]]] = None) -> torch.Tensor:
    """3D-aware features: (B, 3, C, S, S) planes -> (B, 3, 3C, S, S).

    Plane p's feature at each position is [its own feature, context from plane p+1, context from
    plane p+2] (mod 3), the contexts being the other planes' features along the line through
    that position (see :func:`_context_recipes`). ``axes`` defaults to the renderer's table.
    """
    if planes.ndim != 5 or planes.shape[1] != 3 or planes.shape[-1] != planes.shape[-2]:
        raise ValueError(f"planes must be (B, 3, C, S, S) with square planes, got {tuple(planes.shape)}")
    axes = plane_coordinate_axes() if axes is None else axes
    recipes = _context_recipes(tuple(tuple(int(i) for i in a) for a in axes))
    out = []
    for p, ops in enumerate(recipes):
        parts = [planes[:, p]] + [_plane_context(planes[:, op[1]], op) for op in ops]
        out.append(torch.cat(parts, dim=1))
    return torch.stack(out, dim=1)


# ---- local condition: gated cross-attention ----------------------------------------------------

class _PerPlaneLinear(nn.Module):
    """Three independent linear maps, one per plane: (B, 3, N, in) or shared (B, N, in) -> (B, 3, N, out)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(3, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(3, 1, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        y = torch.einsum("bni,pio->bpno", x, w) if x.ndim == 3 else torch.einsum("bpni,pio->bpno", x, w)
        return y + self.bias.to(x.dtype)


def key_padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) bool mask (True = attend) or float key weights in [0, 1] -> an SDPA ``attn_mask``.

    Float weights become the additive bias log(w): weight 1 leaves a key unchanged, 0 removes it,
    values between scale its share of attention (used by prompt interpolation).
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be (B, L), got {tuple(mask.shape)}")
    present = mask if mask.dtype == torch.bool else mask > 0
    if not bool(present.any(dim=1).all()):
        raise ValueError("a mask row has no token to attend to; text masks always keep SOT and EOT")
    if mask.dtype == torch.bool:
        return mask[:, None, None, :]
    return torch.log(mask.clamp(0.0, 1.0)).to(dtype)[:, None, None, :]


class GatedCrossAttention3D(nn.Module):
    """The paper's 3D-aware gated cross-attention adapter on a backbone feature map.

    The C channels of x (B, C, S, S) are viewed as three planes of C' channels; when C is not
    3C' a 1x1 convolution maps C -> 3C' first and another maps the update back. Each plane
    position, with the context of the lines through it (:func:`triplane_aware_features`), is a
    1x1 query token (LayerNorm, then per-plane projections) attending to the word tokens (keys
    and values; padding masked) with ``scaled_dot_product_attention``. The per-plane update is
    added through the gate: x + beta * tanh(gamma) * update, beta = 1 and gamma = 0 initially.
    """

    def __init__(self, channels: int, text_dim: int, plane_channels: Optional[int] = None,
                 heads: Optional[int] = None, head_dim: int = 64):
        super().__init__()
        if plane_channels is None:
            plane_channels = math.ceil(channels / 3)
        if heads is None:
            heads = max(1, plane_channels // head_dim)
        self.channels, self.text_dim, self.plane_channels = channels, text_dim, plane_channels
        self.heads, self.head_dim = heads, head_dim
        projected = 3 * plane_channels != channels
        self.proj_in = nn.Conv2d(channels, 3 * plane_channels, 1) if projected else None
        self.proj_out = nn.Conv2d(3 * plane_channels, channels, 1) if projected else None
        inner = heads * head_dim
        self.norm = nn.LayerNorm(3 * plane_channels)
        self.to_q = _PerPlaneLinear(3 * plane_channels, inner)
        self.to_k = _PerPlaneLinear(text_dim, inner)
        self.to_v = _PerPlaneLinear(text_dim, inner)
        self.to_out = _PerPlaneLinear(inner, plane_channels)
        self.beta = nn.Parameter(torch.ones([]))
        self.gamma = nn.Parameter(torch.zeros([]))

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, text_dim={self.text_dim}, plane_channels={self.plane_channels}, "
                f"heads={self.heads}, head_dim={self.head_dim}")

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, 3, N, heads*head_dim) -> (B*3, heads, N, head_dim)."""
        b, p, n, _ = t.shape
        return t.reshape(b * p, n, self.heads, self.head_dim).transpose(1, 2)

    def attention(self, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The ungated update (B, C, S, S) for features x, word tokens (B, L, D) and mask (B, L)."""
        b, c, h, w = x.shape
        if c != self.channels or h != w:
            raise ValueError(f"adapter expects (B, {self.channels}, S, S) features, got {tuple(x.shape)}")
        if tokens.ndim != 3 or tokens.shape[0] != b or tokens.shape[-1] != self.text_dim:
            raise ValueError(f"tokens must be ({b}, L, {self.text_dim}), got {tuple(tokens.shape)}")
        if mask.shape != tokens.shape[:2]:
            raise ValueError(f"mask must be {tuple(tokens.shape[:2])}, got {tuple(mask.shape)}")
        # Keys that no prompt of the batch attends to (padding after the longest prompt) are cut:
        # attention ignores them, so the cost follows the prompts' length, not the context length.
        used = (mask if mask.dtype == torch.bool else mask > 0).any(0)
        if bool(used.any()):
            keep = int(used.nonzero().max()) + 1
            tokens, mask = tokens[:, :keep], mask[:, :keep]
        v = self.proj_in(x) if self.proj_in is not None else x
        planes = v.reshape(b, 3, self.plane_channels, h, w)
        feats = triplane_aware_features(planes).flatten(3).transpose(2, 3)  # (B, 3, S*S, 3C')
        q = self._heads(self.to_q(self.norm(feats)))
        tokens = tokens.to(x.dtype)
        k, val = self._heads(self.to_k(tokens)), self._heads(self.to_v(tokens))
        bias = key_padding_bias(mask.to(x.device), x.dtype).repeat_interleave(3, dim=0)
        attn = F.scaled_dot_product_attention(q, k, val, attn_mask=bias)  # (B*3, heads, N, head_dim)
        attn = attn.transpose(1, 2).reshape(b, 3, h * w, self.heads * self.head_dim)
        update = self.to_out(attn).transpose(2, 3).reshape(b, 3 * self.plane_channels, h, w)
        return self.proj_out(update) if self.proj_out is not None else update

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x + (self.beta * torch.tanh(self.gamma)).to(x.dtype) * self.attention(x, tokens, mask)


def adapter_resolutions(block_resolutions: Sequence[int], count: int = 6) -> list[int]:
    """Which synthesis blocks get an adapter: ``count`` spread evenly from the first to the last.

    The paper places six adapters "covering a range from 4^2 to 256^2" over EG3D's seven blocks
    (4 ... 256) and ablates 2/4/6; it does not list them. Spreading evenly with both ends kept
    gives 6 -> 4, 8, 16, 64, 128, 256; 4 -> 4, 16, 64, 256; 2 -> 4, 256.
    """
    res = sorted(block_resolutions)
    if not 0 <= count <= len(res):
        raise ValueError(f"cannot place {count} adapters on {len(res)} synthesis blocks {res}; "
                         f"choose a count between 0 and {len(res)} or list resolutions explicitly")
    if count == 1:
        return [res[-1]]
    return [res[round(i * (len(res) - 1) / (count - 1))] for i in range(count)]


class AdapterStack(nn.ModuleDict):
    """The local-condition adapters of a generator: :class:`GatedCrossAttention3D` modules keyed by
    synthesis-block resolution (as a string, so parameters are named ``<res>.*``).

    ``placements`` maps resolution -> backbone channels at that block's output (e.g.
    ``{r: block_channels[r] for r in adapter_resolutions(block_channels)}``). Call
    ``stack(res, x, tokens, mask)`` after the block at ``res``; resolutions without an adapter
    pass x through. :meth:`block_hook` gives the ``(res, x) -> x`` hook the synthesis takes.
    State dicts of the earlier layout (``adapters.<res>.*`` inside the stack) still load.
    """

    def __init__(self, placements: Mapping[int, int], text_dim: int, **adapter_kwargs):
        super().__init__({str(r): GatedCrossAttention3D(c, text_dim, **adapter_kwargs)
                          for r, c in sorted(placements.items())})
        self.register_load_state_dict_pre_hook(_rename_legacy_adapter_keys)

    @property
    def resolutions(self) -> list[int]:
        return [int(r) for r in self]

    def forward(self, res: int, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self[str(res)](x, tokens, mask) if str(res) in self else x

    def block_hook(self, tokens: torch.Tensor, mask: torch.Tensor):
        """A ``(res, x) -> x`` hook for the synthesis network, bound to one batch of word tokens."""
        return lambda res, x: self(res, x, tokens, mask)


def _rename_legacy_adapter_keys(stack: AdapterStack, state_dict: dict, prefix: str, *_) -> None:
    """Load-time upgrade of checkpoints from when the stack held its adapters in a child named
    ``adapters``: ``<prefix>adapters.<res>.*`` -> ``<prefix><res>.*``."""
    legacy = prefix + "adapters."
    for key in [k for k in state_dict if k.startswith(legacy)]:
        state_dict[prefix + key[len(legacy):]] = state_dict.pop(key)


# ---- prompt operations ------------------------------------------------------------------------

def interpolate_encodings(a: TextEncoding, b: TextEncoding, t: float) -> TextEncoding:
    """Blend two prompt encodings: (1 - t) * a + t * b, globally (EOT) and locally (tokens).

    Tokens are aligned on the padded token axis. ``mask`` is the OR of both masks (positions real
    in either prompt) and ``key_weights`` = (1 - t) * mask_a + t * mask_b, so a position real in
    only one prompt fades in or out with t instead of switching on abruptly: at t = 0 and t = 1
    the adapters see exactly prompt a or b. Pass ``encoding.attention_mask()`` to the adapters.
    """
    if a.tokens.shape != b.tokens.shape:
        raise ValueError(f"encodings differ in shape {tuple(a.tokens.shape)} vs {tuple(b.tokens.shape)}; "
                         "encode both with the same text encoder and batch size (use expand() for one prompt)")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"interpolation weight t must lie in [0, 1], got {t}")
    weights = torch.lerp(a.attention_mask().to(a.tokens.dtype), b.attention_mask().to(a.tokens.dtype), t)
    mask = a.mask | b.mask
    return replace(a, eot=torch.lerp(a.eot, b.eot, t), tokens=torch.lerp(a.tokens, b.tokens, t), mask=mask,
                   num_tokens=mask.sum(1), truncated=a.truncated | b.truncated,
                   prompt_tokens=torch.maximum(a.prompt_tokens, b.prompt_tokens), key_weights=weights)
