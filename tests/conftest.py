"""Test-session settings.

The suite runs on 2-core machines where test subprocesses (app server, torchrun ranks, CLIs)
compete with the pytest process; two OpenMP threads per process then spin against each other
and slow everything down many times over. One intra-op thread keeps timings stable.
"""
import torch

torch.set_num_threads(1)
