"""CLIP's text transformer written out by hand, the reference for penultimate-layer features."""
import torch
import torch.nn.functional as F


def hand_run(tower, ids: torch.Tensor, heads: int) -> torch.Tensor:
    """Embeddings, all blocks but the last, ln_final (``tower``: an open_clip text tower or CLIP)."""
    x = tower.token_embedding(ids) + tower.positional_embedding
    length = ids.shape[1]
    causal = torch.full((length, length), float("-inf")).triu(1)
    for blk in list(tower.transformer.resblocks)[:-1]:
        h = F.layer_norm(x, (x.shape[-1],), blk.ln_1.weight, blk.ln_1.bias)
        q, k, v = (h @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias).chunk(3, dim=-1)
        split = lambda t: t.reshape(t.shape[0], length, heads, -1).transpose(1, 2)
        q, k, v = split(q), split(k), split(v)
        att = ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5 + causal).softmax(-1) @ v
        x = x + blk.attn.out_proj(att.transpose(1, 2).reshape(x.shape))
        h = F.layer_norm(x, (x.shape[-1],), blk.ln_2.weight, blk.ln_2.bias)
        x = x + blk.mlp.c_proj(F.gelu(blk.mlp.c_fc(h)))
    return tower.ln_final(x)
