"""Parity check against fixtures computed with NVIDIA's reference EG3D.

``python -m dreamportrait.eg3d.parity PREFIX`` loads ``PREFIX.safetensors`` + ``PREFIX.json`` (see
``shared/fixtures/README.md`` for the format), runs our generator and discriminator on the
fixture's inputs in float32 on the CPU, prints the relative L2 error of every output and exits
non-zero if any exceeds the tolerance (1e-4).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..discriminator import DiscriminatorConfig, DualDiscriminator
from ..generator import TriPlaneGenerator
from ..cameras import camera_rays
from .weights import generator_config_from_eg3d, load_eg3d_state_dict

TOLERANCE = 1e-4


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def load_fixture(prefix: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    prefix = str(prefix)
    for suffix in (".safetensors", ".json"):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    tensors_path, meta_path = Path(prefix + ".safetensors"), Path(prefix + ".json")
    for p in (tensors_path, meta_path):
        if not p.exists():
            raise FileNotFoundError(f"fixture file {p} not found; pass the fixture prefix, e.g. "
                                    "../shared/fixtures/eg3d_parity_128")
    return load_file(str(tensors_path)), json.loads(meta_path.read_text())


def build_models(tensors: dict[str, torch.Tensor], meta: dict) -> tuple[TriPlaneGenerator, DualDiscriminator]:
    """Our generator and discriminator loaded with the fixture's G.* and D.* weights."""
    nrr = meta["neural_rendering_resolution"]
    G = TriPlaneGenerator(generator_config_from_eg3d(meta["G_kwargs"], nrr)).eval()
    load_eg3d_state_dict(G, {k[2:]: v for k, v in tensors.items() if k.startswith("G.")})
    D = DualDiscriminator(DiscriminatorConfig.from_eg3d_kwargs(meta["D_kwargs"])).eval()
    load_eg3d_state_dict(D, {k[2:]: v for k, v in tensors.items() if k.startswith("D.")})
    return G, D


@torch.no_grad()
def compute_outputs(G: TriPlaneGenerator, D: DualDiscriminator, tensors: dict[str, torch.Tensor],
                    meta: dict) -> dict[str, torch.Tensor]:
    """Every output the fixture lists, computed with our modules."""
    z, c = tensors["in.z"], tensors["in.c"]
    noise_mode = meta.get("noise_mode", "const")
    nrr = meta["neural_rendering_resolution"]
    out = {}
    ws = G.mapping(z, c)
    out["out.ws"] = ws
    out["out.ws_psi0.7"] = G.mapping(z, c, truncation_psi=0.7)
    planes = G.synthesize_planes(ws, noise_mode=noise_mode)
    out["out.planes_stride8"] = planes.reshape(planes.shape[0], -1, *planes.shape[-2:])[:, :, ::8, ::8]
    pts = G.sample_planes(planes, tensors["in.points"])
    out["out.points_sigma"], out["out.points_rgb"] = pts["sigma"], pts["rgb"]
    out["out.ray_origins"], out["out.ray_dirs"] = camera_rays(c, nrr)
    img = G.render(planes, ws, c, neural_rendering_resolution=nrr, deterministic=True)
    out["out.image"], out["out.image_raw"], out["out.image_depth"] = img["image"], img["image_raw"], img["image_depth"]
    out["out.D_gen"] = D({"image": img["image"], "image_raw": img["image_raw"]}, c)
    out["out.D_rand"] = D({"image": tensors["in.D_image"], "image_raw": tensors["in.D_image_raw"]}, c)
    return out


def check(prefix: str | Path) -> dict[str, float]:
    """Relative L2 error of every fixture output present (``out.*`` keys)."""
    tensors, meta = load_fixture(prefix)
    G, D = build_models(tensors, meta)
    ours = compute_outputs(G, D, tensors, meta)
    return {k: relative_error(ours[k], tensors[k]) for k in sorted(tensors) if k.startswith("out.")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dreamportrait.eg3d.parity", description=__doc__.split("\n\n")[0])
    ap.add_argument("prefix", help="fixture path without extension, e.g. ../shared/fixtures/eg3d_parity_128")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    errors = check(args.prefix)
    width = max(len(k) for k in errors)
    print(f"{'output':<{width}}  rel. L2 error  status")
    for k, e in errors.items():
        print(f"{k:<{width}}  {e:13.3e}  {'ok' if e <= args.tolerance else 'FAIL'}")
    failed = [k for k, e in errors.items() if not e <= args.tolerance]
    print(f"{len(errors) - len(failed)} of {len(errors)} outputs within {args.tolerance:g}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
