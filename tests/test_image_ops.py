"""Shared image helpers: uint8 conversion with an explicit input range, and antialiased resizing."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dreamportrait.grid import to_uint8
from dreamportrait.ops import resize


def test_to_uint8_maps_the_given_range_to_0_255_rounding_halves_up():
    levels = torch.tensor([0.0, 0.5, 1.0, 127.5, 254.5, 255.0]) / 255
    x = levels.reshape(1, 1, 1, -1).expand(1, 3, 1, -1)
    np.testing.assert_array_equal(to_uint8(x, value_range=(0, 1))[0, 0, :, 0], [0, 1, 1, 128, 255, 255])
    np.testing.assert_array_equal(to_uint8(x * 2 - 1)[0, 0, :, 0], [0, 1, 1, 128, 255, 255])  # default (-1, 1)
    assert to_uint8(torch.tensor([-3.0, 3.0]).reshape(1, 1, 2), (-1, 1)).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    gray = to_uint8(torch.full((2, 1, 4, 5), 0.5), value_range=(0, 1))
    assert gray.shape == (2, 4, 5, 3) and gray.dtype == np.uint8 and (gray == 128).all()
    with pytest.raises(ValueError, match="high > low"):
        to_uint8(x, value_range=(1, 0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_resize_of_half_precision_images_runs_in_float32_and_keeps_the_dtype(dtype):
    x = torch.randn(2, 3, 32, 32)
    reference = F.interpolate(x.to(dtype).float(), size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    y = resize(x.to(dtype), 16)
    assert y.dtype == dtype and y.shape == (2, 3, 16, 16)
    assert torch.equal(y, reference.to(dtype))


def test_resize_is_eg3d_filtered_resizing_in_float32():
    x = torch.randn(1, 4, 24, 24)
    expect = F.interpolate(x, size=(10, 12), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(resize(x, (10, 12)), expect)
    assert torch.equal(resize(x, 48, antialias=False), F.interpolate(x, size=(48, 48), mode="bilinear",
                                                                     align_corners=False))


def test_discriminator_reads_bfloat16_renders_under_autocast():
    """Its resize of the raw render used to fail: "compute_index_ranges_weights" not implemented for 'BFloat16'."""
    from dreamportrait.cameras import camera_label
    from dreamportrait.discriminator import DiscriminatorConfig, DualDiscriminator
    torch.manual_seed(0)
    D = DualDiscriminator(DiscriminatorConfig(img_resolution=32, channel_base=256, channel_max=32))
    img = {"image": torch.randn(2, 3, 32, 32).bfloat16(), "image_raw": torch.randn(2, 3, 16, 16).bfloat16()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = D(img, camera_label([0.0, 10.0], [0.0, 0.0]))
    assert logits.shape == (2, 1) and torch.isfinite(logits.float()).all()
