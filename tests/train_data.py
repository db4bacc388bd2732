"""A tiny captioned data set for training tests, written by the synthetic world's writer."""
from pathlib import Path

from dreamportrait.synthetic.dataset_writer import write_dataset


def write_tiny_dataset(out: Path, num: int = 12, res: int = 64) -> Path:
    return write_dataset(out, num=num, resolution=res, seed=0, progress=False)
