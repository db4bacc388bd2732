"""Interoperability with NVIDIA's EG3D: read its network pickles without running their code
(:mod:`.pickle_reader`), map its constructor kwargs and state dicts onto this project's modules
(:mod:`.weights`), convert its release pickles to model files (``python -m
dreamportrait.eg3d.convert``) and check parity with its reference outputs (``python -m
dreamportrait.eg3d.parity``).
"""
