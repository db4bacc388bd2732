"""The shipped model (checkpoints/default, what `python app.py` runs) follows a prompt.

Protects the product's main job against a wrong or damaged file in checkpoints/default: for each
of the synthetic world's five background colours (train/RESULTS.md: background 96 % on held-out
captions), the image border's mean colour is nearest, among the five, to the one the prompt
names, for several seeds; and the text, not only the seed, changes the picture.

The five references are the border colours of the world's own frontal renders, measured here, not
the palette's values: hair, shoulders and shading fill part of the border, so the world's own
blue-background renders sit nearer the palette's teal or purple than its blue for more than half
of them (train/RESULTS.md, session 12), and a palette reference would reward a generator that
draws a bluer blue than the world does.
"""
from pathlib import Path

import pytest
import torch

from dreamportrait.app_logic import CHECKPOINTS_DIR, DEFAULT_MODEL_NAME, load_pipeline
from dreamportrait.cameras import camera_label
from dreamportrait.synthetic.attributes import sample_identities
from dreamportrait.synthetic.heads import BACKGROUND
from dreamportrait.synthetic.render import render

DEFAULT = Path(CHECKPOINTS_DIR) / DEFAULT_MODEL_NAME


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(DEFAULT, "cpu")


def border_colour(image: torch.Tensor, width: int = 6) -> torch.Tensor:
    """Mean RGB in [0, 1] of the outer ``width`` pixels of a (3, H, W) image in [-1, 1]."""
    mask = torch.ones(image.shape[1:], dtype=torch.bool)
    mask[width:-width, width:-width] = False
    return (image[:, mask].mean(1) + 1) / 2


def nearest_background(rgb: torch.Tensor, references: dict[str, torch.Tensor]) -> str:
    return min(references, key=lambda name: float((rgb - references[name]).norm()))


@pytest.fixture(scope="module")
def world_borders() -> tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor, str]]]:
    """The world's frontal renders of 300 heads: each background's mean border colour over the
    first 200 (the references), and the last 100 (border colour, background) to check them on."""
    heads = sample_identities(seed=0, num=300)
    images = render(heads, camera_label([0.0] * len(heads), [0.0] * len(heads)), 64)["rgb"] * 2 - 1
    borders = [(border_colour(image), head.attributes["background"]) for image, head in zip(images, heads)]
    references = {name: torch.stack([rgb for rgb, b in borders[:200] if b == name]).mean(0) for name in BACKGROUND}
    return references, borders[200:]


def test_the_world_renders_match_their_own_background_reference(world_borders):
    """The criterion below is one the world itself meets: 97 of these 100 when measured (the
    palette's values as references: 87 of 100)."""
    references, held = world_borders
    assert sum(nearest_background(rgb, references) == name for rgb, name in held) >= 95


@pytest.mark.parametrize("colour", sorted(BACKGROUND))
def test_the_default_model_draws_the_background_its_prompt_names(pipe, world_borders, colour):
    assert pipe.text_conditioned and pipe.info.get("stage") == "stage2"
    references = world_borders[0]
    for seed in (0, 1, 2):
        image = pipe.generate(f"A young man against a {colour} background.", seed, 0.7)[1]["image"][0]
        rgb = border_colour(image)
        assert nearest_background(rgb, references) == colour, (seed, rgb.tolist(), references[colour].tolist())


def test_the_default_model_changes_the_portrait_with_the_text(pipe):
    a = pipe.generate("An old man with a full beard, wearing glasses.", 0, 0.7)[1]["image"][0]
    b = pipe.generate("A young woman with long blond hair.", 0, 0.7)[1]["image"][0]
    assert (a - b).abs().mean() > 0.1  # images in [-1, 1]
