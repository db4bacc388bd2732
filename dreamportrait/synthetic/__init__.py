"""The synthetic portrait world: procedural 3D heads with known attributes and captions.

CLEVR for text-to-3D portraits: identities are drawn from a seed (:mod:`.attributes`), built
from signed-distance shapes (:mod:`.heads`, :mod:`.proportions`), sphere-traced from EG3D
cameras (:mod:`.render`, :mod:`.cameras`), described in words (:mod:`.captions`) and written
in EG3D's data set layout (:mod:`.dataset_writer`, ``python -m dreamportrait.synthetic``).
"""
from .attributes import ATTRIBUTES, HELDOUT_COMBINATIONS, Identity, heldout_pairs, sample_identities
from .captions import make_captions, parse_caption
from .render import HeadBatch

# Functions are re-exported under names unlike the submodules' (``render`` stays the module).
__all__ = ["ATTRIBUTES", "HELDOUT_COMBINATIONS", "Identity", "heldout_pairs", "sample_identities",
           "make_captions", "parse_caption", "HeadBatch"]
