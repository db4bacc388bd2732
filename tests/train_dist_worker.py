"""Run by tests/test_train.py under torchrun: train a few prior steps, then each rank writes a
digest of its weights so the test can check that all replicas ended identical."""
import json
import sys
from pathlib import Path


from test_train import config, weights_digest  # noqa: E402  (tests/ is on sys.path as the script dir)
from train import loop


def main():
    data, run_dir, *overrides = sys.argv[1:]
    cfg = config(data, *overrides)
    init = {}
    build = loop.build_models

    def recording_build(*args, **kwargs):
        built = build(*args, **kwargs)
        init["G"] = weights_digest(built.G)
        return built
    loop.build_models = recording_build
    result = loop.train(cfg, "prior", Path(run_dir), progress=False)
    rank = int(__import__("os").environ["RANK"])
    out = {"steps": result.cur_nimg // cfg.batch, "G": weights_digest(result.G), "D": weights_digest(result.D),
           "G_init": init["G"]}
    Path(run_dir, f"rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
