"""The shipped model (checkpoints/default, what `python app.py` runs) follows a prompt.

Protects the product's main job against a wrong or damaged file in checkpoints/default: for each
of the synthetic world's five background colours (train/RESULTS.md: background 96 % on held-out
captions), the image border's mean colour is nearest, among the five, to the one the prompt
names, for several seeds; and the text, not only the seed, changes the picture.
"""
from pathlib import Path

import pytest
import torch

from dreamportrait.app_logic import CHECKPOINTS_DIR, DEFAULT_MODEL_NAME, load_pipeline
from dreamportrait.synthetic.heads import BACKGROUND

DEFAULT = Path(CHECKPOINTS_DIR) / DEFAULT_MODEL_NAME


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(DEFAULT, "cpu")


def border_colour(image: torch.Tensor, width: int = 6) -> torch.Tensor:
    """Mean RGB in [0, 1] of the outer ``width`` pixels of a (3, H, W) image in [-1, 1]."""
    mask = torch.ones(image.shape[1:], dtype=torch.bool)
    mask[width:-width, width:-width] = False
    return (image[:, mask].mean(1) + 1) / 2


def nearest_background(rgb: torch.Tensor) -> str:
    return min(BACKGROUND, key=lambda name: float((rgb - torch.tensor(BACKGROUND[name])).norm()))


@pytest.mark.parametrize("colour", sorted(BACKGROUND))
def test_the_default_model_draws_the_background_its_prompt_names(pipe, colour):
    assert pipe.text_conditioned and pipe.info.get("stage") == "stage2"
    for seed in (0, 1, 2):
        image = pipe.generate(f"A young man against a {colour} background.", seed, 0.7)[1]["image"][0]
        assert nearest_background(border_colour(image)) == colour, (seed, border_colour(image).tolist())


def test_the_default_model_changes_the_portrait_with_the_text(pipe):
    a = pipe.generate("An old man with a full beard, wearing glasses.", 0, 0.7)[1]["image"][0]
    b = pipe.generate("A young woman with long blond hair.", 0, 0.7)[1]["image"][0]
    assert (a - b).abs().mean() > 0.1  # images in [-1, 1]
