"""Command line: write a synthetic portrait data set in EG3D's layout.

    python -m dreamportrait.synthetic --out data/synthetic64 --num 10000 --res 64 --seed 0
    python -m dreamportrait.synthetic --out data/heldout64 --num 500 --split heldout --views 8 --zip
    python -m dreamportrait.synthetic --out data/synthetic64 --num 10000 --res 64 --seed 0 --resume  # a killed job
"""
from __future__ import annotations

import argparse

from .attributes import SPLITS
from .dataset_writer import write_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dreamportrait.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (or .zip file)")
    parser.add_argument("--num", type=int, required=True, help="number of identities")
    parser.add_argument("--res", type=int, default=64, help="image resolution (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="data set seed (default 0)")
    parser.add_argument("--views", type=int, default=1, help="views per identity (default 1)")
    parser.add_argument("--split", choices=SPLITS, default="train",
                        help="train: no held-out attribute combination (default); heldout: only those; all")
    parser.add_argument("--zip", action="store_true", help="write an uncompressed zip like EG3D's dataset_tool")
    parser.add_argument("--batch", type=int, default=64, help="images rendered together (default 64)")
    parser.add_argument("--workers", type=int, default=0,
                        help="render in this many single-threaded processes (0: in this process, default)")
    parser.add_argument("--radius-jitter", type=float, default=0.0, help="relative std of the camera radius")
    parser.add_argument("--pivot-jitter", type=float, default=0.0, help="std of the look-at pivot coordinates")
    parser.add_argument("--resume", action="store_true",
                        help="continue an unfinished folder output (a killed job) with the same options")
    args = parser.parse_args(argv)
    try:
        path = write_dataset(args.out, args.num, args.res, args.seed, args.views, args.split, args.zip,
                             args.batch, args.radius_jitter, args.pivot_jitter, workers=args.workers,
                             resume=args.resume)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    print(f"wrote {args.num * args.views} images of {args.num} identities to {path}")


if __name__ == "__main__":
    main()
