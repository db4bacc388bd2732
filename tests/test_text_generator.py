"""The text-conditioned generator: identity at initialisation, text reaches the output, checkpoints."""
import pytest
import torch

from dreamportrait.cameras import camera_label
from dreamportrait.checkpoints import save_model_file
from dreamportrait.generator import TriPlaneGenerator, preset
from dreamportrait.eg3d.parity import build_models, load_fixture, relative_error
from dreamportrait.text_encoder import TextEncoder
from dreamportrait.text_generator import DreamPortraitGenerator, TextConditionConfig
from fixtures_path import fixture_prefix

TEXT_CFG = dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2)


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder.from_config(TEXT_CFG, seed=0)


def test_fresh_text_generator_on_eg3d_weights_is_eg3d(encoder):
    tensors, meta = load_fixture(fixture_prefix("eg3d_parity_128"))
    G, _ = build_models(tensors, meta)
    DP = DreamPortraitGenerator.from_eg3d(G, TextConditionConfig(text_dim=encoder.width, adapter_count=6)).eval()
    assert DP.adapters.resolutions == [4, 8, 16, 64, 128, 256]
    z, c = tensors["in.z"], tensors["in.c"]
    text = encoder(["A smiling woman with red lipstick.", "An old man with a full beard and glasses."])
    with torch.no_grad():
        plain = G.synthesis(G.mapping(z, c), c, noise_mode="const", neural_rendering_resolution=32, deterministic=True)
        ours = DP(z, c, text=text, noise_mode="const", neural_rendering_resolution=32, deterministic=True)
    for k in ("image", "image_raw", "image_depth"):
        assert torch.equal(ours[k], plain[k]), k
    assert relative_error(ours["image"], tensors["out.image"]) <= 1e-4


def test_text_changes_output_once_gates_open_and_gradients_reach_text_parts(encoder):
    torch.manual_seed(0)
    G = DreamPortraitGenerator(preset("tiny"), TextConditionConfig(text_dim=encoder.width, adapter_count=3))
    z = torch.randn(1, G.config.z_dim)
    c = camera_label(0.0, 0.0)
    a, b = encoder(["A woman with long red hair."]), encoder(["A bald man with sunglasses."])
    out = G(z, c, text=a, noise_mode="const", deterministic=True)
    out["image"].square().mean().backward()
    # At initialisation the gate's gamma and the fusion layer receive gradient.
    for name, p in G.named_parameters():
        if name.endswith(".gamma") or name.startswith("semantics.fusion"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    G.zero_grad()
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(0.5)
            if name == "semantics.fusion.weight":
                p.normal_()
    out_a = G(z, c, text=a, noise_mode="const", deterministic=True)
    out_a["image"].square().mean().backward()
    for name, p in G.named_parameters():
        if name.startswith("adapters.") or name.startswith("semantics."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        out_b = G(z, c, text=b, noise_mode="const", deterministic=True)
    assert (out_a["image"] - out_b["image"]).abs().max() > 1e-3


def test_text_generator_checkpoint_round_trip(tmp_path, encoder):
    torch.manual_seed(1)
    G = DreamPortraitGenerator(preset("tiny"), TextConditionConfig(text_dim=encoder.width, adapter_count=2))
    with torch.no_grad():
        for p in G.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "g.safetensors"
    G.save_pretrained(path, extra={"text_encoder": encoder.describe()})
    G2 = DreamPortraitGenerator.from_pretrained(path)
    sd1, sd2 = G.state_dict(), G2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    with pytest.raises(ValueError, match="expected a 'triplane-generator' model"):
        TriPlaneGenerator.from_pretrained(path)


def test_checkpoints_with_the_old_adapters_adapters_names_still_load(tmp_path, encoder):
    """Files written before the adapters' parameters lost their stutter (``adapters.adapters.<res>.*``,
    before 2026-12-01) load into ``adapters.<res>.*`` with identical outputs."""
    torch.manual_seed(2)
    G = DreamPortraitGenerator(preset("tiny"), TextConditionConfig(text_dim=encoder.width, adapter_count=2)).eval()
    with torch.no_grad():
        for p in G.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    state = G.state_dict()
    assert any(k.startswith("adapters.64.") for k in state)
    assert not any(k.startswith("adapters.adapters.") for k in state)
    old = {("adapters." + k if k.startswith("adapters.") else k): v for k, v in state.items()}
    save_model_file(tmp_path / "old.safetensors", old, G.checkpoint_config(), G.KIND)
    G2 = DreamPortraitGenerator.from_pretrained(tmp_path / "old.safetensors")  # strict load
    assert G2.state_dict().keys() == state.keys() and all(torch.equal(G2.state_dict()[k], v) for k, v in state.items())
    z, c, text = torch.randn(1, G.config.z_dim), camera_label(10.0, 0.0), encoder(["A bald man with sunglasses."])
    with torch.no_grad():
        assert torch.equal(G2(z, c, text=text, noise_mode="const", deterministic=True)["image"],
                           G(z, c, text=text, noise_mode="const", deterministic=True)["image"])
