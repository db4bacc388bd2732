"""Training entry point.

    python -m train --preset synthetic-tiny --stage paired [key=value ...] [--resume]
    python -m train --preset synthetic-tiny --stage prior prior.init=runs/synthetic-tiny/paired
    torchrun --nproc_per_node 8 -m train --preset celebatext-512 --stage stage1

Overrides use dotted keys of train.config.TrainConfig, values in JSON: ``batch=16``,
``stage2.kimg=2``, ``sds.guidance_scale=50``, ``data=data/my-set``. Each stage writes to
``--run-dir`` (default runs/PRESET/STAGE): generator.safetensors (EMA weights, loadable by the
app), discriminator.safetensors (not in ``paired``, which trains G alone on the synthetic
world's renders), state.pt (resume), config.json, log.jsonl, tensorboard/,
samples/. A stage's ``init`` is the previous stage's run folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dreamportrait.checkpoints import GENERATOR_FILE
from train.config import PRESETS, STAGES, apply_overrides, preset, validate
from train.loop import train
from train.paired import train_paired


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS), help="named configuration")
    ap.add_argument("--stage", default="stage1", choices=STAGES, help=" | ".join(STAGES))
    ap.add_argument("--run-dir", default=None, help="output folder (default runs/PRESET/STAGE)")
    ap.add_argument("--resume", action="store_true", help="continue from RUN_DIR/state.pt (a longer STAGE.kimg "
                    "may be given; every other setting must be the run's)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("overrides", nargs="*", help="key=value overrides (dotted keys, JSON values)")
    args = ap.parse_intermixed_args(argv)  # overrides may come before and after options
    try:
        cfg = apply_overrides(preset(args.preset), args.overrides)
        validate(cfg, args.stage)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import json
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    run_dir = Path(args.run_dir or f"runs/{args.preset}/{args.stage}")
    try:
        if args.stage == "paired":
            _, nimg = train_paired(cfg, run_dir, resume=args.resume, progress=not args.no_progress)
            generator_file = run_dir / GENERATOR_FILE
        else:
            out = train(cfg, args.stage, run_dir, resume=args.resume, progress=not args.no_progress)
            generator_file, nimg = out.generator_file, out.cur_nimg
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {generator_file} ({nimg / 1000:.3f} kimg)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
