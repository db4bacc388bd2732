"""Convert NVIDIA's released EG3D pickles (ffhq512-128.pkl, ffhqrebalanced512-128.pkl) to model files.

``python -m dreamportrait.eg3d.convert IN.pkl OUT_DIR`` reads the pickle with the restricted
reader of :mod:`dreamportrait.eg3d.pickle_reader` (no pickled code is ever executed), builds the
generator's configuration from what the pickle records (constructor kwargs, ``rendering_kwargs``
and ``neural_rendering_resolution``), loads the weights strictly into our modules (which checks
every name and shape) and writes ``OUT_DIR/generator.safetensors`` and
``OUT_DIR/discriminator.safetensors``. Both networks are validated before either file is written.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoints import DISCRIMINATOR_FILE, GENERATOR_FILE, CheckpointError, save_model_file, sha256_file
from ..discriminator import DiscriminatorConfig, DualDiscriminator
from ..generator import TriPlaneGenerator
from .pickle_reader import EG3DNetwork, read_eg3d_pickle
from .weights import filter_eg3d_state_dict, generator_config_from_eg3d, load_eg3d_state_dict

EG3D_GENERATOR_CLASS = "TriPlaneGenerator"
EG3D_DISCRIMINATOR_CLASS = "DualDiscriminator"


class ConversionError(CheckpointError):
    """An EG3D pickle cannot be converted: wrong network, unsupported options or mismatched weights."""


@dataclass
class ConvertedNetwork:
    """One converted network: the tensors to write and their config."""

    name: str
    eg3d: EG3DNetwork
    tensors: dict[str, torch.Tensor]
    config: dict

    @property
    def num_values(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def _json_plain(value, what: str):
    """``value`` unchanged if it survives a JSON round trip as data, else a clear error."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{what} cannot be stored as JSON ({exc}); is this an unmodified EG3D pickle?") from exc


def _check_class(net: EG3DNetwork, name: str, expected: str, source: Path) -> None:
    if net.class_name != expected:
        raise ConversionError(
            f"network {name!r} of {source.name} is a {net.class_name}, expected EG3D's {expected}; "
            "pass the right network name (see --help)")
    if net.init_args:
        raise ConversionError(f"network {name!r} of {source.name} was built with positional arguments "
                              f"{net.init_args!r}; EG3D builds its networks from keyword arguments only")


def generator_kwargs(net: EG3DNetwork, source: Path) -> tuple[dict, int]:
    """EG3D generator kwargs (with the ``rendering_kwargs`` the network last used) and its neural
    rendering resolution, both as recorded in the pickle."""
    kwargs = dict(net.init_kwargs)
    rendering = net.attributes.get("rendering_kwargs", kwargs.get("rendering_kwargs"))
    if not isinstance(rendering, dict):
        raise ConversionError(f"{source.name}: the generator records no rendering_kwargs; "
                              "this is not an EG3D TriPlaneGenerator snapshot")
    kwargs["rendering_kwargs"] = rendering
    nrr = net.attributes.get("neural_rendering_resolution")
    if not isinstance(nrr, int) or isinstance(nrr, bool) or nrr <= 0:
        raise ConversionError(f"{source.name}: the generator's neural_rendering_resolution is {nrr!r}, "
                              "expected a positive integer; this is not an EG3D TriPlaneGenerator snapshot")
    return kwargs, nrr


def _conversion_error(exc: Exception, name: str, source: Path) -> ConversionError:
    detail = f"missing option {exc}" if isinstance(exc, KeyError) else str(exc)
    return ConversionError(f"cannot convert network {name!r} of {source.name}: {detail}")


def convert_generator(net: EG3DNetwork, name: str, source: Path) -> tuple[TriPlaneGenerator, dict]:
    """Our generator loaded strictly with an EG3D generator's weights, and its EG3D kwargs."""
    _check_class(net, name, EG3D_GENERATOR_CLASS, source)
    kwargs, nrr = generator_kwargs(net, source)
    try:
        G = TriPlaneGenerator(generator_config_from_eg3d(kwargs, nrr))
        load_eg3d_state_dict(G, net.state_dict)
    except (KeyError, TypeError, ValueError) as exc:
        raise _conversion_error(exc, name, source) from exc
    return G.eval(), kwargs


def convert_discriminator(net: EG3DNetwork, name: str, source: Path) -> ConvertedNetwork:
    """EG3D discriminator tensors (filtered to the ones we keep, validated by a strict load into
    our DualDiscriminator) with its kwargs as config."""
    _check_class(net, name, EG3D_DISCRIMINATOR_CLASS, source)
    init_kwargs = _json_plain(net.init_kwargs, f"the init kwargs of {name!r}")
    try:
        tensors = filter_eg3d_state_dict(net.state_dict)
        load_eg3d_state_dict(DualDiscriminator(DiscriminatorConfig.from_eg3d_kwargs(init_kwargs)), tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise _conversion_error(exc, name, source) from exc
    return ConvertedNetwork(name, net, tensors, {"eg3d_init_kwargs": init_kwargs})


@dataclass
class ConversionResult:
    """What :func:`convert_eg3d_pickle` read and wrote."""

    source: Path
    sha256: str
    networks_found: list[str]
    generator: ConvertedNetwork
    discriminator: ConvertedNetwork | None
    generator_path: Path
    discriminator_path: Path | None


def convert_eg3d_pickle(pkl_path, out_dir, network: str = "G_ema",
                        discriminator: str | None = "D") -> ConversionResult:
    """Convert ``network`` (and ``discriminator`` unless None) of an EG3D pickle into ``out_dir``."""
    source, out_dir = Path(pkl_path), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConversionError(f"output {out_dir} exists and is not a directory; pass a directory path")
    ckpt = read_eg3d_pickle(source)
    digest = sha256_file(source)
    g_net = ckpt.network(network)
    G, g_kwargs = convert_generator(g_net, network, source)
    generator = ConvertedNetwork(network, g_net, G.state_dict(), G.checkpoint_config())
    D = None
    if discriminator is not None:
        if discriminator not in ckpt.networks:
            raise ConversionError(f"{source.name} has no network {discriminator!r} (it has "
                                  f"{sorted(ckpt.networks)}); pass --no-discriminator to convert the generator only")
        D = convert_discriminator(ckpt.network(discriminator), discriminator, source)

    provenance = {"source": source.name, "sha256": digest}
    g_path = out_dir / GENERATOR_FILE
    G.save_pretrained(g_path, extra={
        **provenance, "eg3d_class": g_net.class_name,
        "eg3d_init_kwargs": _json_plain(g_net.init_kwargs, f"the init kwargs of {network!r}"),
        "eg3d_rendering_kwargs": _json_plain(g_kwargs["rendering_kwargs"], "rendering_kwargs"),
        "neural_rendering_resolution": G.config.neural_rendering_resolution})
    d_path = None
    if D is not None:
        d_path = out_dir / DISCRIMINATOR_FILE
        save_model_file(d_path, D.tensors, D.config, DualDiscriminator.KIND,
                        extra={**provenance, "eg3d_class": D.eg3d.class_name})
    return ConversionResult(source, digest, sorted(ckpt.networks), generator, D, g_path, d_path)


def summary(result: ConversionResult) -> str:
    """Human-readable report of a conversion."""
    G = result.generator
    lines = [f"read {result.source} (sha256 {result.sha256}): networks {', '.join(result.networks_found)}",
             f"{G.name}: {G.eg3d.class_name}, {len(G.tensors)} tensors, {G.num_values:,} values (parameters + buffers)",
             f"  config: {json.dumps(G.config['generator'])}",
             f"wrote {result.generator_path}"]
    D = result.discriminator
    if D is None:
        lines.append("discriminator: skipped (--no-discriminator)")
    else:
        lines += [f"{D.name}: {D.eg3d.class_name}, {len(D.tensors)} tensors, {D.num_values:,} values "
                  "(validated by a strict load into dreamportrait.discriminator.DualDiscriminator)",
                  f"  config: {json.dumps(D.config['eg3d_init_kwargs'])}",
                  f"wrote {result.discriminator_path}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dreamportrait.eg3d.convert",
        description="Convert an EG3D release pickle (e.g. ffhq512-128.pkl) into DreamPortrait model files "
                    f"OUT_DIR/{GENERATOR_FILE} and OUT_DIR/{DISCRIMINATOR_FILE}, without executing any code "
                    "stored in the pickle.")
    ap.add_argument("pkl", metavar="IN.pkl", help="EG3D network pickle (a dict with G, D and G_ema)")
    ap.add_argument("out_dir", metavar="OUT_DIR", help="directory to write the model files into (created if missing)")
    ap.add_argument("--network", default="G_ema",
                    help="generator network to convert (default: G_ema, the weight average EG3D samples with)")
    ap.add_argument("--discriminator", default="D", metavar="NAME",
                    help="discriminator network to convert (default: D)")
    ap.add_argument("--no-discriminator", action="store_true",
                    help=f"convert the generator only and do not write {DISCRIMINATOR_FILE}")
    args = ap.parse_args(argv)
    try:
        result = convert_eg3d_pickle(args.pkl, args.out_dir, network=args.network,
                                     discriminator=None if args.no_discriminator else args.discriminator)
    except CheckpointError as exc:
        print(f"dreamportrait.eg3d.convert: error: {exc}", file=sys.stderr)
        return 1
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
