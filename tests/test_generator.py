"""Generator stages, presets and deterministic rendering."""
import pytest
import torch

from dreamportrait.cameras import camera_label
from dreamportrait.generator import PRESETS, GeneratorConfig, TriPlaneGenerator, preset


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return TriPlaneGenerator(preset("tiny")).eval()


def test_tiny_preset_shapes(tiny):
    cfg = tiny.config
    z = torch.randn(2, cfg.z_dim)
    c = camera_label([0.0, 20.0], [0.0, -10.0])
    with torch.no_grad():
        out = tiny(z, c, noise_mode="const")
    assert out["image"].shape == (2, 3, 64, 64)
    assert out["image_raw"].shape == (2, 3, 32, 32)
    assert out["image_depth"].shape == (2, 1, 32, 32)
    assert out["planes"].shape == (2, 3, cfg.triplane_channels, 64, 64)
    # Depth is a ray distance inside the sampled range.
    assert out["image_depth"].min() >= cfg.ray_start and out["image_depth"].max() <= cfg.ray_end + 0.1


def test_deterministic_render_is_repeatable_and_cached_planes_match(tiny):
    z = torch.randn(1, tiny.config.z_dim)
    c = camera_label(15.0, 5.0)
    with torch.no_grad():
        ws = tiny.mapping(z, c)
        full = tiny.synthesis(ws, c, noise_mode="const", deterministic=True)
        again = tiny.render(full["planes"], ws, c, deterministic=True)
        stochastic = tiny.render(full["planes"], ws, c, deterministic=False)
    assert torch.equal(full["image"], again["image"])
    assert not torch.equal(full["image_raw"], stochastic["image_raw"])


def test_truncation_moves_toward_w_avg(tiny):
    z = torch.randn(3, tiny.config.z_dim)
    c = camera_label(0.0, 0.0).repeat(3, 1)
    tiny.backbone.mapping.w_avg.normal_()
    ws = tiny.mapping(z, c)
    ws_half = tiny.mapping(z, c, truncation_psi=0.5)
    torch.testing.assert_close(ws_half, tiny.backbone.mapping.w_avg.lerp(ws, 0.5))
    ws_cut = tiny.mapping(z, c, truncation_psi=0.5, truncation_cutoff=4)
    torch.testing.assert_close(ws_cut[:, :4], ws_half[:, :4])
    torch.testing.assert_close(ws_cut[:, 4:], ws[:, 4:])


def test_presets_and_config_round_trip():
    assert PRESETS["eg3d-ffhq-512"].img_resolution == 512
    assert PRESETS["tiny"].img_resolution == 64
    for cfg in PRESETS.values():
        assert GeneratorConfig.from_dict(cfg.to_dict()) == cfg
    big = TriPlaneGenerator("eg3d-ffhq-512")
    # EG3D's FFHQ parameter counts (spec section 1.4).
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(big.backbone.mapping) == 800_768
    assert count(big.backbone.synthesis) == 28_207_533
    assert count(big.superresolution) == 1_649_578
    assert count(big.decoder) == 4_257
    assert big.num_ws == 14


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown generator config keys"):
        GeneratorConfig.from_dict({"triplane_res": 64})
    with pytest.raises(ValueError, match="power of two"):
        GeneratorConfig(triplane_resolution=48)
    with pytest.raises(ValueError, match="unknown generator preset"):
        preset("huge")
