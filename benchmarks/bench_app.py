"""The app through its real server: request latency and a multi-client load test, printed as Markdown.

    python -m benchmarks.bench_app                              # the model under checkpoints/, on the CPU
    python -m benchmarks.bench_app --checkpoint runs/synthetic-tiny/stage1 --requests 50 --clients 8

Starts ``python app.py`` on a free loopback port and drives it with gradio_client:

* latency: ``--requests`` generate requests (new seed each, prompts cycling over the examples)
  and as many camera-only re-renders (yaw sweeping ±60°), one client, after a warm-up; median
  and p95 round-trip times. Also the server-side compute alone, in this process: the pipeline's
  re-render of cached planes in frames/s, and the model time of a prompt it has not seen.
* load: ``--clients`` concurrent clients x ``--per-client`` mixed requests (generate, re-render,
  mix, mesh at a ``--mesh-resolution`` grid), each client with its own seeds; every answer is
  checked against the pipeline run locally (the same picture up to float summation order, the
  same vertex count within 0.5% for meshes), so a cross-session mix-up of cached planes counts
  as a failure. The whole load
  test is bounded by ``--timeout``; requests not done by then count as failed. Reports the
  server's resident memory (VmRSS) and peak (VmHWM) afterwards.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreamportrait.app_logic import (
    DISPLAY_MIN_SIZE, app_process, describe_model, display_scale, find_default_checkpoint, load_pipeline, offline_env,
    read_example_prompts,
)
from dreamportrait.grid import make_grid, to_uint8
from dreamportrait.mesh import density_grid, extract_mesh, load_mesh


def true_pixels(path, scale: int) -> np.ndarray:
    """A displayed (enlarged) image file back at its true resolution."""
    return np.asarray(Image.open(path).convert("RGB"))[::scale, ::scale]


def same_picture(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal up to float summation order: two processes may split CPU reductions differently, which
    moves a few pixels by a level or two; another session's seed changes most pixels by far more."""
    if got.shape != want.shape:
        return False
    diff = np.abs(got.astype(int) - want)
    return diff.max() <= 2 and (diff > 0).mean() < 0.01


def summary(times: list[float]) -> str:
    ms = np.array(times) * 1000
    return f"{np.median(ms):.0f} | {np.percentile(ms, 95):.0f} | {len(ms)}"


class Reference:
    """What the server must answer, computed with the same pipeline in this process (true resolution)."""

    def __init__(self, pipeline, prompts: list[str], psi: float):
        self.pipeline, self.prompts, self.psi = pipeline, prompts, psi
        self.scale = display_scale(int(pipeline.info["resolution"]), DISPLAY_MIN_SIZE)

    def view(self, prompt: str, seed: int, yaw: float) -> np.ndarray:
        return to_uint8(self.pipeline.generate(prompt, seed, self.psi, yaw, 0.0)[1]["image"][0])

    def strip(self, prompts: list[str], seed: int) -> np.ndarray:
        return make_grid(torch.cat(self.pipeline.mix(prompts, seed, self.psi)), ncol=len(prompts))

    def mesh_vertices(self, prompt: str, seed: int, resolution: int, threshold: float) -> int:
        planes = self.pipeline.portrait(prompt, seed, self.psi).planes
        return len(extract_mesh(self.pipeline.G, planes, resolution, threshold).vertices)


def client_for(url: str, folder: Path):
    from gradio_client import Client
    return Client(url, verbose=False, download_files=str(folder), analytics_enabled=False,
                  httpx_kwargs={"timeout": 600})


def latency(url: str, ref: Reference, requests: int, folder: Path) -> dict[str, list[float]]:
    """Round-trip times of generate (new seed each) and camera-only re-render, one client."""
    client = client_for(url, folder)
    prompts = ref.prompts
    for i in range(3):  # warm-up: first requests pay for lazy initialisation
        client.predict(prompts[i % len(prompts)], str(i), ref.psi, 0, 0, api_name="/generate")
        client.predict(10.0 * i, 0, api_name="/render")
    times = {"generate": [], "render": []}
    for i in range(requests):
        t0 = time.perf_counter()
        client.predict(prompts[i % len(prompts)], str(100 + i), ref.psi, 0, 0, api_name="/generate")
        times["generate"].append(time.perf_counter() - t0)
    for i in range(requests):
        yaw = -60 + (i * 7) % 121
        t0 = time.perf_counter()
        client.predict(yaw, 0, api_name="/render")
        times["render"].append(time.perf_counter() - t0)
    return times


def server_side_fps(ref: Reference, frames: int) -> float:
    """Re-renders of cached planes per second in this process (no HTTP, no PNG)."""
    portrait = ref.pipeline.portrait(ref.prompts[0], 0, ref.psi)
    ref.pipeline.render(portrait, 0, 0)
    times = []
    for i in range(frames):
        t0 = time.perf_counter()
        ref.pipeline.render(portrait, -60 + (i * 7) % 121, 0)
        times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def server_side_new_prompt_ms(ref: Reference, prompts: int) -> float:
    """Median model time of a prompt the pipeline has not seen (text encoding, mapping, synthesis
    and a frontal render), in this process: each prompt is an example with a new count of
    years in it, so the text cache never answers."""
    ref.pipeline.generate("A person.", 0, ref.psi)
    times = []
    for i in range(prompts):
        prompt = f"{ref.prompts[i % len(ref.prompts)]} {20 + i} years old."
        t0 = time.perf_counter()
        ref.pipeline.generate(prompt, 1000 + i, ref.psi)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def plan(client_index: int, per_client: int, prompts: list[str]) -> list[tuple]:
    """One client's mixed requests: (op, args) with its own seeds; a generate always comes first."""
    ops = []
    seed = 10_000 + 1000 * client_index
    prompt = prompts[client_index % len(prompts)]
    for i in range(per_client):
        kind = ("generate", "render", "render", "mix", "render", "mesh", "render", "render")[i % 8]
        if kind == "generate":
            seed += 1
            ops.append(("generate", prompt, seed))
        elif kind == "render":
            ops.append(("render", prompt, seed, float(-60 + (client_index * 13 + i * 29) % 121)))
        elif kind == "mix":
            ops.append(("mix", [prompt, prompts[(client_index + 1) % len(prompts)]], seed))
        else:
            ops.append(("mesh", prompt, seed))
    return ops


def expected(ref: Reference, op: tuple, mesh_resolution: int, threshold: float):
    kind = op[0]
    if kind == "generate":
        return ref.view(op[1], op[2], 0.0)
    if kind == "render":
        return ref.view(op[1], op[2], op[3])
    if kind == "mix":
        return ref.strip(op[1], op[2])
    return ref.mesh_vertices(op[1], op[2], mesh_resolution, threshold)


def run_client(url: str, ops: list[tuple], answers: list, ref: Reference, mesh_resolution: int, threshold: float,
               folder: Path, deadline: float, results: list):
    """Send one client's requests in order; append (op kind, seconds, ok, error) per request."""
    try:
        client = client_for(url, folder)
    except Exception as exc:  # a client that cannot connect fails all its requests
        results.extend((op[0], 0.0, False, f"connect: {exc}") for op in ops)
        return
    for op, want in zip(ops, answers):
        if time.monotonic() > deadline:
            results.append((op[0], 0.0, False, "not sent: load-test time limit reached"))
            continue
        t0 = time.perf_counter()
        try:
            kind = op[0]
            if kind == "generate":
                got = true_pixels(client.predict(op[1], str(op[2]), ref.psi, 0, 0, api_name="/generate")[0], ref.scale)
            elif kind == "render":
                got = true_pixels(client.predict(op[3], 0, api_name="/render")[0], ref.scale)
            elif kind == "mix":
                got = true_pixels(client.predict("\n".join(op[1]), str(op[2]), ref.psi, 0, 0, api_name="/mix")[0],
                                  ref.scale)
            else:
                glb, _, _ = client.predict(mesh_resolution, threshold, api_name="/mesh")
                got = len(load_mesh(glb).vertices)
            # meshes: the vertex count may move by a few where a density value sits on the threshold
            ok = abs(got - want) <= max(2, want // 200) if kind == "mesh" else same_picture(got, want)
            results.append((kind, time.perf_counter() - t0, ok, None if ok else "wrong answer (another session's?)"))
        except Exception as exc:  # count every failure, keep going
            results.append((op[0], time.perf_counter() - t0, False, f"{type(exc).__name__}: {exc}"))


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process in KiB (Linux)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def load_test(url: str, pid: int, ref: Reference, clients: int, per_client: int, mesh_resolution: int,
              threshold: float, timeout: float, folder: Path) -> tuple[list, float, dict]:
    plans = [plan(c, per_client, ref.prompts) for c in range(clients)]
    answers = [[expected(ref, op, mesh_resolution, threshold) for op in ops] for ops in plans]
    per_client_results = [[] for _ in range(clients)]
    deadline = time.monotonic() + timeout
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(run_client, url, plans[c], answers[c], ref, mesh_resolution, threshold,
                               folder / f"client{c}", deadline, per_client_results[c]) for c in range(clients)]
        wait(futures, timeout=timeout + 600)
    elapsed = time.perf_counter() - t0
    return [r for rs in per_client_results for r in rs], elapsed, memory_kib(pid)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_app", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="model (default: the app's model under checkpoints/)")
    ap.add_argument("--device", default=None, help="device for the server and the reference (default: auto)")
    ap.add_argument("--requests", type=int, default=50, help="latency requests per kind (default 50)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients in the load test (default 8)")
    ap.add_argument("--per-client", type=int, default=25, help="requests per client (default 25)")
    ap.add_argument("--mesh-resolution", type=int, default=32, help="mesh grid in the load test (default 32)")
    ap.add_argument("--mesh-threshold", type=float, default=None,
                    help="density level for meshes (default: the median density of the first client's portrait)")
    ap.add_argument("--psi", type=float, default=0.7, help="truncation psi (default 0.7)")
    ap.add_argument("--timeout", type=float, default=900, help="time limit of the load test in s (default 900)")
    ap.add_argument("--max-rss-mib", type=float, default=None,
                    help="fail (exit 1) if the server's resident memory after the load test exceeds this")
    ap.add_argument("--server-flags", default="", help="extra app.py flags, e.g. '--concurrency 4'")
    args = ap.parse_args(argv)

    os.environ.update({k: v for k, v in offline_env().items() if k.lower() == "no_proxy"})
    checkpoint = Path(args.checkpoint) if args.checkpoint else find_default_checkpoint()
    pipeline = load_pipeline(checkpoint, args.device)
    prompts = read_example_prompts() or ["A young woman with long blond hair and blue eyes."]
    ref = Reference(pipeline, prompts, args.psi)
    threshold = args.mesh_threshold
    if threshold is None:
        first = pipeline.portrait(prompts[0], 10_001, args.psi).planes
        threshold = float(np.median(density_grid(pipeline.G, first, 16)))
    device = pipeline.device
    flags = ["--max-sessions", str(max(32, 2 * args.clients)), *args.server_flags.split()]
    if args.device:
        flags += ["--device", args.device]

    with tempfile.TemporaryDirectory(prefix="bench-app-") as tmp:
        tmp = Path(tmp)
        with app_process(checkpoint, tmp / "app.log", *flags) as (url, proc):
            times = latency(url, ref, args.requests, tmp / "latency")
            fps = server_side_fps(ref, args.requests)
            new_prompt_ms = server_side_new_prompt_ms(ref, args.requests)
            results, elapsed, memory = load_test(url, proc.pid, ref, args.clients, args.per_client,
                                                 args.mesh_resolution, threshold, args.timeout, tmp / "load")

    failures = [r for r in results if not r[2]]
    total = args.clients * args.per_client
    cpu = platform.processor() or platform.machine()
    print(f"### App latency and load ({time.strftime('%Y-%m-%d')})\n")
    print(f"- Machine: {platform.node()} · {cpu} · {os.cpu_count()} CPU threads · torch {torch.__version__} · "
          f"device `{device}`" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    print(f"- Model: {describe_model(pipeline)}")
    print(f"- Command: `python -m benchmarks.bench_app {' '.join(argv if argv is not None else sys.argv[1:])}`")
    print("- Client: gradio_client on loopback, round trip including PNG encoding and download\n")
    print("| request | median ms | p95 ms | n |\n|---|---|---|---|")
    print(f"| generate (new seed; mapping + synthesis + render) | {summary(times['generate'])} |")
    print(f"| re-render, camera only (cached tri-planes) | {summary(times['render'])} |")
    print(f"\nServer-side re-render of cached planes (no HTTP/PNG): **{fps:.1f} frames/s** "
          f"(median of {args.requests}); a new prompt (text encoding, mapping, synthesis, frontal render): "
          f"**{new_prompt_ms:.0f} ms** (median of {args.requests} prompts never seen before).\n")
    by_kind = {}
    for kind, seconds, ok, _ in results:
        by_kind.setdefault(kind, []).append(seconds)
    print(f"Load: {args.clients} concurrent clients x {args.per_client} mixed requests ({total} in all; mesh grid "
          f"{args.mesh_resolution}^3) in {elapsed:.1f} s: **{len(failures)} failed**, "
          f"{len(results) - len(failures)} correct for their own session.\n")
    print("| request | median ms | p95 ms | n |\n|---|---|---|---|")
    for kind, seconds in sorted(by_kind.items()):
        print(f"| {kind} | {summary(seconds)} |")
    print(f"\nServer memory after the load test: resident {memory['VmRSS'] / 1024:.0f} MiB, "
          f"peak {memory['VmHWM'] / 1024:.0f} MiB.")
    rss_ok = args.max_rss_mib is None or memory["VmRSS"] / 1024 <= args.max_rss_mib
    if args.max_rss_mib is not None:
        print(f"Bound: resident memory ≤ {args.max_rss_mib:g} MiB: **{'met' if rss_ok else 'EXCEEDED'}**.")
    for kind, _, _, error in failures[:10]:
        print(f"- failed {kind}: {error}")
    return 0 if not failures and len(results) == total and rss_ok else 1


if __name__ == "__main__":
    sys.exit(main())
