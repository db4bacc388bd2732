"""Training throughput per stage: seconds per optimiser step, several setups interleaved in one run.

    python -m benchmarks.bench_training --data data/synthetic-64-400 \\
        --setup "1 thread:python:1" --setup "2 ranks:torchrun2:1" --stages prior stage1 stage2
    python -m benchmarks.bench_training --data ... --setup "main:python:1" \\
        --setup "bf16:python:1:bf16=true" --setup "old:python:1::/path/to/other/checkout"

A setup is ``LABEL:LAUNCHER:THREADS[:OVERRIDES[:CHECKOUT]]``: LAUNCHER ``python`` (one process) or
``torchrunN`` (N gloo ranks via torchrun), THREADS the OpenMP threads per process, OVERRIDES
space-separated ``key=value`` training overrides, CHECKOUT another clone of the project (its own
code is run; default this one). Every setup runs the real ``python -m train`` command on the same
data; each setup first writes its own one-step prior and stage-1 runs to start the later stages from.

Rounds alternate the setups (A B C, A B C, ...) so that all of them see the same machine load; a
ratio between two setups of one run is the number to trust on a busy machine. In each round a setup
trains ``--warmup`` steps, then ``--steps`` timed steps (default 16 = one whole cycle of EG3D's lazy
regularisation, G every 4 and D every 16 steps, so regularisation phases count in proportion); the
step time of the round is their mean (from consecutive ``sec`` stamps of ``log.jsonl``) and the
reported figure is the median over rounds. Results go to stdout as a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Setup:
    label: str
    launcher: str
    threads: int
    overrides: list[str] = field(default_factory=list)
    checkout: Path = ROOT

    @classmethod
    def parse(cls, spec: str) -> "Setup":
        parts = spec.split(":")
        if len(parts) < 3 or not (parts[1] == "python" or parts[1].startswith("torchrun")):
            raise SystemExit(f"--setup {spec!r}: expected LABEL:python|torchrunN:THREADS[:OVERRIDES[:CHECKOUT]]")
        overrides = parts[3].split() if len(parts) > 3 else []
        checkout = Path(parts[4]).resolve() if len(parts) > 4 and parts[4] else ROOT
        return cls(parts[0], parts[1], int(parts[2]), overrides, checkout)

    def command(self) -> list[str]:
        if self.launcher == "python":
            return [sys.executable, "-m", "train"]
        n = int(self.launcher[len("torchrun"):] or 2)
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "train"]


def run_stage(setup: Setup, stage: str, run_dir: Path, steps: int, args, init: Path | None) -> list[float]:
    """Train ``steps`` steps of ``stage``; returns the per-step durations read from log.jsonl."""
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"data={Path(args.data).resolve()}", f"batch={args.batch}", f"{stage}.kimg={steps * args.batch / 1000}",
                 "snapshot_every_kimg=1000000", "image_every_kimg=1000000"]
    if init is not None:
        overrides.append(f"{stage}.init={init}")
    cmd = setup.command() + ["--preset", args.preset, "--stage", stage, "--run-dir", str(run_dir), "--no-progress",
                             *overrides, *setup.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(setup.threads), "PYTHONPATH": str(setup.checkout)}
    done = subprocess.run(cmd, cwd=setup.checkout, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"[{setup.label}] {stage} failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    secs = [json.loads(line)["sec"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [b - a for a, b in zip(secs, secs[1:])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="EG3D-format data set with captions.json")
    ap.add_argument("--preset", default="synthetic-tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--setup", action="append", required=True, help="LABEL:LAUNCHER:THREADS[:OVERRIDES[:CHECKOUT]]")
    ap.add_argument("--stages", nargs="+", default=["prior", "stage1", "stage2"], choices=["prior", "stage1", "stage2"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args(argv)
    setups = [Setup.parse(s) for s in args.setup]
    work = Path(tempfile.mkdtemp(prefix="bench-training-"))
    try:
        inits: dict[tuple[str, str], Path] = {}
        for s in setups:  # one-step runs to start stage 1 and stage 2 from, with each setup's own code
            prev = None
            for stage in ("prior", "stage1"):
                run_stage(s, stage, work / s.label / f"{stage}-init", 1, args, prev)
                inits[(s.label, stage)] = prev = work / s.label / f"{stage}-init"
        times: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for stage in args.stages:
                for s in setups:
                    init = {"prior": None, "stage1": inits[(s.label, "prior")],
                            "stage2": inits[(s.label, "stage1")]}[stage]
                    steps = run_stage(s, stage, work / s.label / stage, args.warmup + args.steps, args, init)
                    timed = steps[args.warmup - 1:]  # durations after the warm-up steps
                    times.setdefault((s.label, stage), []).append(statistics.fmean(timed))
                    print(f"round {r + 1} {stage:6s} {s.label:20s} {times[(s.label, stage)][-1]:.3f} s/step",
                          file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; load average at end "
          f"{os.getloadavg()[0]:.2f}; {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up, "
          f"batch {args.batch}, preset {args.preset}\n")
    print("| stage | setup | s/step (median; rounds) | kimg/h | vs first setup |")
    print("|---|---|---|---|---|")
    for stage in args.stages:
        base = statistics.median(times[(setups[0].label, stage)])
        for s in setups:
            t = times[(s.label, stage)]
            med = statistics.median(t)
            print(f"| {stage} | {s.label} | {med:.3f} ({', '.join(f'{x:.3f}' for x in t)}) | "
                  f"{args.batch / med * 3.6:.1f} | {base / med:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
