"""Run by tests/test_train.py under torchrun, in one of two modes:

* ``train STAGE DATA RUN_DIR OVERRIDES...``: train a few steps of STAGE, then each rank writes a
  digest of its weights (and of the guidance's particle, when it has one) so the test can check
  that all replicas ended identical.
* ``buffers OUT_DIR``: each rank gives a generator's constant buffers rank-specific values, updates
  its w_avg from its own latents and averages the buffers, then writes what it holds.
"""
import json
import os
import sys
from pathlib import Path

import torch

from test_train import config, weights_digest  # noqa: E402  (tests/ is on sys.path as the script dir)
from train import loop


def train(stage, data, run_dir, *overrides):
    cfg = config(data, *overrides)
    init = {}
    build = loop.build_models

    def recording_build(*args, **kwargs):
        built = build(*args, **kwargs)
        init["G"] = weights_digest(built.G)
        init["guidance"] = built.guidance
        if hasattr(built.guidance, "particle"):
            init["particle"] = weights_digest(built.guidance.particle)
        return built
    loop.build_models = recording_build
    result = loop.train(cfg, stage, Path(run_dir), progress=False)
    rank = int(os.environ["RANK"])
    out = {"steps": result.cur_nimg // cfg.batch, "G": weights_digest(result.G), "D": weights_digest(result.D),
           "G_init": init["G"]}
    if "particle" in init:
        out.update(particle_init=init["particle"], particle=weights_digest(init["guidance"].particle))
    Path(run_dir, f"rank{rank}.json").write_text(json.dumps(out))


def buffers(out_dir):
    from dreamportrait.generator import TriPlaneGenerator, preset
    from train.distributed import BufferAverager, init_distributed
    info = init_distributed("cpu")
    torch.manual_seed(0)
    G = TriPlaneGenerator(preset("tiny", neural_rendering_resolution=16))
    with torch.no_grad():
        for name, b in G.named_buffers():
            if name != "backbone.mapping.w_avg":
                b += info.rank  # constants that differ per rank: averaging would show
    constants = {name: b.clone() for name, b in G.named_buffers() if name != "backbone.mapping.w_avg"}
    assert constants, "the generator should hold constant buffers (noise inputs, resampling filters)"
    average = BufferAverager(G, info)
    torch.manual_seed(1 + info.rank)
    with torch.no_grad():
        G.mapping(torch.randn(4, G.config.z_dim), torch.randn(4, G.config.c_dim), update_emas=True)
    local = G.backbone.mapping.w_avg.tolist()
    out = {"averaged": average(), "again": average(), "local_w_avg": local,
           "w_avg": G.backbone.mapping.w_avg.tolist(),
           "constants_untouched": all(torch.equal(b, constants[n]) for n, b in G.named_buffers() if n in constants)}
    Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"train": train, "buffers": buffers}[mode](*args)
