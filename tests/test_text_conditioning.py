"""Semantics mapping, 3D-aware gated cross-attention adapters and prompt interpolation."""
import pytest
import torch

from dreamportrait.text_conditioning import (AdapterStack, GatedCrossAttention3D, SemanticsMapping,
                                             adapter_resolutions, interpolate_encodings, triplane_aware_features)
from dreamportrait.text_encoder import TextEncoding
from dreamportrait.triplane import project_onto_planes, sample_from_planes

TEXT_DIM, L = 16, 10


def words(batch=2, lengths=(4, 7), seed=0):
    """Random word tokens with a SOT..EOT mask of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, L, TEXT_DIM, generator=g)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    return tokens, mask


def open_adapter(channels, gamma=0.7, seed=0, **kw):
    torch.manual_seed(seed)
    adapter = GatedCrossAttention3D(channels, TEXT_DIM, **kw)
    with torch.no_grad():
        adapter.gamma.fill_(gamma)
    return adapter


# ---- semantics mapping ----------------------------------------------------------------------------

def test_semantics_mapping_is_exactly_the_identity_at_initialisation():
    torch.manual_seed(0)
    sm = SemanticsMapping(TEXT_DIM, 24)
    w = torch.randn(3, 5, 24)
    assert torch.equal(sm(w, torch.randn(3, TEXT_DIM)), w)


def test_semantics_mapping_gradients_reach_every_layer_and_text_changes_w_t():
    torch.manual_seed(0)
    sm = SemanticsMapping(TEXT_DIM, 24)
    w, eot = torch.randn(2, 5, 24), torch.randn(2, TEXT_DIM)
    sm(w, eot).square().sum().backward()
    assert sm.fusion.weight.grad.abs().sum() > 0  # the zero-initialised layer learns first
    with torch.no_grad():
        sm.fusion.weight.normal_()
    sm.zero_grad()
    out = sm(w, eot)
    out.square().sum().backward()
    for name, p in sm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert (sm(w, eot + 1.0) - out).abs().max() > 1e-4
    # each of the num_ws style vectors is mapped by itself
    torch.testing.assert_close(sm(w[:, 2:3], eot), out[:, 2:3])


# ---- 3D-aware features ----------------------------------------------------------------------------

def test_3d_aware_features_are_the_renderers_line_averages():
    """Ground truth from the renderer: for every grid-centre point of the volume, sample all
    planes; the context plane q gives plane p's cell is the average of q's samples over the points
    that project onto that cell."""
    s, c = 6, 2
    torch.manual_seed(0)
    planes = torch.randn(1, 3, c, s, s)
    centres = (2 * torch.arange(s) + 1) / s - 1
    pts = torch.stack(torch.meshgrid(centres, centres, centres, indexing="ij"), -1).reshape(1, -1, 3)
    samples = sample_from_planes(planes, pts, box_warp=2.0)[0]  # (3, M, C)
    cells = ((project_onto_planes(pts) + 1) * s / 2 - 0.5).round().long()  # (3, M, 2): (width, height)
    feats = triplane_aware_features(planes)[0]  # (3, 3C, S, S)
    for p in range(3):
        flat = cells[p, :, 1] * s + cells[p, :, 0]
        count = torch.zeros(s * s).index_add_(0, flat, torch.ones(flat.shape[0]))
        assert bool((count == s).all())  # every cell of p sees exactly one line of S points
        for slot, q in enumerate([p, (p + 1) % 3, (p + 2) % 3]):
            mean = torch.zeros(s * s, c).index_add_(0, flat, samples[q]) / s
            expected = mean.T.reshape(c, s, s)
            torch.testing.assert_close(feats[p, slot * c:(slot + 1) * c], expected, atol=1e-5, rtol=1e-5)


def test_perturbing_plane_2_changes_only_the_predicted_rows_and_columns():
    # EG3D planes: 0 = (x, y), 1 = (x, z), 2 = (z, x) as (width, height). A change on plane 2 at
    # width z=i, height x=j reaches plane 0 along the whole column x=j (pooled over z), plane 1
    # at the single point (x=j, z=i) (planes 1 and 2 share both axes), plane 2 only at itself.
    s, c, i, j = 8, 3, 2, 5
    torch.manual_seed(0)
    planes = torch.randn(1, 3, c, s, s)
    bumped = planes.clone()
    bumped[0, 2, :, j, i] += 1.0
    changed = (triplane_aware_features(bumped) - triplane_aware_features(planes))[0].abs().amax(1) > 0
    expected = torch.zeros(3, s, s, dtype=torch.bool)
    expected[0, :, j] = True
    expected[1, i, j] = True
    expected[2, j, i] = True
    assert torch.equal(changed, expected)


def test_other_planes_reach_a_plane_only_through_their_axis_pools():
    # Moving feature mass along plane 2's z axis (its width) keeps its pools over z, so plane 0's
    # 3D feature (which sees plane 2 only pooled over z) stays the same; plane 1 sees it pointwise.
    s, c = 8, 3
    torch.manual_seed(1)
    planes = torch.randn(1, 3, c, s, s)
    moved = planes.clone()
    moved[0, 2, :, 4, 1] += 2.0
    moved[0, 2, :, 4, 6] -= 2.0
    before, after = triplane_aware_features(planes)[0], triplane_aware_features(moved)[0]
    torch.testing.assert_close(after[0], before[0], atol=1e-6, rtol=0)
    assert (after[1] - before[1]).abs().max() > 1.0


# ---- adapters ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [12, 20])  # 12 = 3 x 4 planes; 20 needs the 1x1 projections
def test_fresh_adapter_leaves_features_bitwise_unchanged(channels):
    torch.manual_seed(0)
    adapter = GatedCrossAttention3D(channels, TEXT_DIM)
    assert (adapter.proj_in is None) == (channels % 3 == 0)
    x = torch.randn(2, channels, 8, 8)
    tokens, mask = words()
    assert torch.equal(adapter(x, tokens, mask), x)


def test_adapter_attention_matches_a_naive_masked_softmax():
    adapter = open_adapter(12, heads=2, head_dim=8)
    x = torch.randn(2, 12, 4, 4)
    tokens, mask = words()
    feats = triplane_aware_features(x.reshape(2, 3, 4, 4, 4)).flatten(3).transpose(2, 3)  # (B, 3, N, 12)
    q = adapter.to_q(adapter.norm(feats)).unflatten(-1, (2, 8))
    k, v = adapter.to_k(tokens).unflatten(-1, (2, 8)), adapter.to_v(tokens).unflatten(-1, (2, 8))
    logits = torch.einsum("bpnhd,bplhd->bphnl", q, k) / 8 ** 0.5
    logits = logits.masked_fill(~mask[:, None, None, None, :], float("-inf"))
    attn = torch.einsum("bphnl,bplhd->bpnhd", logits.softmax(-1), v).flatten(-2)
    update = adapter.to_out(attn).transpose(2, 3).reshape(2, 12, 4, 4)
    expected = x + adapter.beta * torch.tanh(adapter.gamma) * update
    torch.testing.assert_close(adapter(x, tokens, mask), expected, atol=1e-5, rtol=1e-5)


def test_gate_gets_gradient_at_init_and_every_adapter_weight_once_open():
    torch.manual_seed(0)
    adapter = GatedCrossAttention3D(20, TEXT_DIM)
    x = torch.randn(2, 20, 8, 8)
    tokens, mask = words()
    adapter(x, tokens, mask).square().sum().backward()
    assert adapter.gamma.grad.abs() > 0
    assert adapter.to_q.weight.grad.abs().max() == 0  # closed gate: the branch is not yet trained
    adapter = open_adapter(20)
    x.requires_grad_(True)
    adapter(x, tokens, mask).square().sum().backward()
    for name, p in adapter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_padding_tokens_have_no_effect():
    adapter = open_adapter(12)
    x = torch.randn(2, 12, 8, 8)
    tokens, mask = words()
    out = adapter(x, tokens, mask)
    noisy = torch.where(mask[..., None], tokens, 50 * torch.randn_like(tokens))
    torch.testing.assert_close(adapter(x, noisy, mask), out, atol=1e-6, rtol=0)
    real = tokens.clone()
    real[:, 1] += 1.0  # a real word does matter
    assert (adapter(x, real, mask) - out).abs().max() > 1e-4


def test_float_key_weights_of_ones_and_zeros_equal_the_bool_mask():
    adapter = open_adapter(12)
    x = torch.randn(2, 12, 8, 8)
    tokens, mask = words()
    out = adapter(x, tokens, mask)
    torch.testing.assert_close(adapter(x, tokens, mask.float()), out, atol=1e-6, rtol=0)
    half = mask.float()
    half[:, 2] = 0.5
    assert (adapter(x, tokens, half) - out).abs().max() > 1e-5
    with pytest.raises(ValueError, match="no token"):
        adapter(x, tokens, torch.zeros_like(mask))


def test_adapter_placements_and_stack():
    blocks = [4, 8, 16, 32, 64, 128, 256]
    assert adapter_resolutions(blocks, 6) == [4, 8, 16, 64, 128, 256]
    assert adapter_resolutions(blocks, 4) == [4, 16, 64, 256]
    assert adapter_resolutions(blocks, 2) == [4, 256]
    with pytest.raises(ValueError, match="cannot place 6"):
        adapter_resolutions([4, 8, 16, 32, 64], 6)
    channels = {4: 12, 8: 12, 16: 10, 32: 8}
    torch.manual_seed(0)
    stack = AdapterStack({r: channels[r] for r in adapter_resolutions(channels, 2)}, TEXT_DIM)
    assert stack.resolutions == [4, 32]
    tokens, mask = words()
    hook = stack.block_hook(tokens, mask)
    x8 = torch.randn(2, 12, 8, 8)
    assert hook(8, x8) is x8  # no adapter at 8
    with torch.no_grad():
        stack["32"].gamma.fill_(0.5)
    x32 = torch.randn(2, 8, 32, 32)
    assert (hook(32, x32) - x32).abs().max() > 0
    assert torch.equal(stack(32, x32, tokens, mask), hook(32, x32))


def test_bad_adapter_inputs_name_the_problem():
    adapter = GatedCrossAttention3D(12, TEXT_DIM)
    tokens, mask = words()
    with pytest.raises(ValueError, match="expects"):
        adapter(torch.randn(2, 9, 8, 8), tokens, mask)
    with pytest.raises(ValueError, match="tokens must be"):
        adapter(torch.randn(2, 12, 8, 8), tokens[..., :8], mask)


# ---- prompt interpolation -----------------------------------------------------------------------------

def encoding(lengths, seed):
    tokens, mask = words(lengths=lengths, seed=seed)
    eot_idx = torch.tensor(lengths) - 1
    return TextEncoding(eot=tokens[torch.arange(2), eot_idx], tokens=tokens, mask=mask, num_tokens=mask.sum(1),
                        truncated=torch.zeros(2, dtype=torch.bool), prompt_tokens=torch.tensor(lengths) - 2)


def test_interpolation_endpoints_are_the_prompts_and_the_midpoint_blends():
    a, b = encoding((3, 7), seed=1), encoding((6, 4), seed=2)
    start, end, mid = (interpolate_encodings(a, b, t) for t in (0.0, 1.0, 0.5))
    assert torch.equal(start.eot, a.eot) and torch.equal(start.tokens, a.tokens)
    assert torch.equal(end.eot, b.eot) and torch.equal(end.tokens, b.tokens)
    torch.testing.assert_close(mid.tokens, (a.tokens + b.tokens) / 2)
    assert torch.equal(mid.mask, a.mask | b.mask) and mid.num_tokens.tolist() == [6, 7]
    adapter = open_adapter(12)
    x = torch.randn(2, 12, 8, 8)
    # the adapters see exactly prompt a at t=0 and prompt b at t=1, although the masks were OR-ed
    torch.testing.assert_close(adapter(x, start.tokens, start.attention_mask()), adapter(x, a.tokens, a.mask),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(adapter(x, end.tokens, end.attention_mask()), adapter(x, b.tokens, b.mask),
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="t must lie"):
        interpolate_encodings(a, b, 1.5)


def test_adapter_cost_follows_prompt_length_not_context_length(monkeypatch):
    """Padding after the longest prompt of a batch is cut before attention: same output, fewer keys."""
    adapter = open_adapter(12)
    tokens, mask = words(lengths=(4, 7))
    x = torch.randn(2, 12, 8, 8)
    longer = torch.cat([tokens, torch.randn(2, 10, TEXT_DIM)], 1)  # 10 more padding positions of garbage
    longer_mask = torch.cat([mask, torch.zeros(2, 10, dtype=torch.bool)], 1)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(k.shape[-2])
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    out = adapter(x, tokens, mask)
    out_longer = adapter(x, longer, longer_mask)
    out_weights = adapter(x, longer, longer_mask.float())
    assert seen == [7, 7, 7]
    torch.testing.assert_close(out_longer, out, atol=0, rtol=0)
    torch.testing.assert_close(out_weights, out, atol=1e-6, rtol=0)
