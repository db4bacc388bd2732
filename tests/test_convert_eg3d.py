"""EG3D .pkl -> model files: parity through the converter, no pickled code runs, clear errors.

The test pickles are built here in EG3D's layout from the shared 128 parity fixture: G_ema and D
hold the fixture's G.* / D.* tensors nested as EG3D's modules (persistent classes with a poisoned
``module_src``; the decoder by reference to ``training.triplane.OSGDecoder`` with a
Sequential(FC, Softplus, FC) ``net``; renderer and ray sampler by reference), G holds different
weights, and the init kwargs, ``rendering_kwargs`` and ``neural_rendering_resolution`` come from
the fixture's json. The layout helpers are shared with tests/test_eg3d_pickle.py.
"""
import copy
import hashlib
import pickle
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from dreamportrait.checkpoints import (DISCRIMINATOR_FILE, GENERATOR_FILE, CheckpointError, read_model_metadata,
                                       save_model_file)
from dreamportrait.discriminator import DiscriminatorConfig, DualDiscriminator
from dreamportrait.eg3d.convert import main
from dreamportrait.eg3d.parity import TOLERANCE, compute_outputs, load_fixture, relative_error
from dreamportrait.generator import TriPlaneGenerator
from fixtures_path import REPO, fixture_prefix
from test_eg3d_pickle import (EG3D_GLOBALS, FAKE_MODULES, EasyDict, ImportanceRenderer, OSGDecoder, Persistent,
                              RaySampler, _poison_source, eg3d_modules, pickled_globals)

BUFFER_NAMES = {"w_avg", "noise_const", "resample_filter", "dataset_label_std"}
# EG3D class names of the persistent modules the reader reports (inner layers need no exact name).
CLASS_NAMES = {"backbone": "StyleGAN2Backbone", "mapping": "MappingNetwork", "synthesis": "SynthesisNetwork",
               "superresolution": "SuperresolutionHybrid2X"}
_persistent_classes: dict[str, type] = {}


@dataclass
class NetSpec:
    """One network to pickle: EG3D class name, flat EG3D state dict, constructor kwargs."""

    class_name: str
    tensors: dict
    init_kwargs: dict = field(default_factory=dict)
    neural_rendering_resolution: int | None = None


def _persistent(class_name: str) -> nn.Module:
    if class_name not in _persistent_classes:
        _persistent_classes[class_name] = type(class_name, (Persistent,), {})
    return _persistent_classes[class_name]()


def _by_reference(cls) -> nn.Module:
    """An empty instance of a by-reference EG3D module class (its children are added afterwards)."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    return module


def _nest(flat: dict, path: str, class_name: str) -> nn.Module:
    """Turn a flat dotted state dict into nested modules the way EG3D's networks are built."""
    if path == "decoder":
        module = _by_reference(OSGDecoder)
    elif path == "decoder.net":
        module = nn.Sequential()
    else:
        module = _persistent(class_name)
    children = {}
    for name, tensor in flat.items():
        head, _, rest = name.partition(".")
        if rest:
            children.setdefault(head, {})[rest] = tensor
        elif head in BUFFER_NAMES:
            module.register_buffer(head, tensor.clone())
        else:
            module.register_parameter(head, nn.Parameter(tensor.clone(), requires_grad=False))
    if isinstance(module, nn.Sequential):  # FC, Softplus, FC: the activation holds no tensors
        children = {str(i): children.get(str(i)) for i in range(max(map(int, children)) + 1)}
    for name, sub in children.items():
        child_path = f"{path}.{name}".lstrip(".")
        module.add_module(name, nn.Softplus() if sub is None else
                          _nest(sub, child_path, CLASS_NAMES.get(name, "Layer")))
    return module


def _easydict(value):
    return EasyDict({k: _easydict(v) for k, v in value.items()}) if isinstance(value, dict) else value


def _network(spec: NetSpec) -> nn.Module:
    module = _nest(spec.tensors, "", spec.class_name)
    module._init_args, module._init_kwargs = (), _easydict(spec.init_kwargs)
    if spec.neural_rendering_resolution is not None:  # a TriPlaneGenerator
        module.rendering_kwargs = module._init_kwargs["rendering_kwargs"]  # the same object, as in EG3D
        module.neural_rendering_resolution = spec.neural_rendering_resolution
        module.renderer, module.ray_sampler = ImportanceRenderer(), RaySampler()
    return module


def write_eg3d_pickle(path, networks: dict[str, NetSpec], module_src: str) -> None:
    """Pickle ``networks`` in EG3D's snapshot layout; EG3D's modules exist only while dumping."""
    with eg3d_modules(module_src):
        snapshot = {"training_set_kwargs": EasyDict(resolution=128, use_labels=True), "augment_pipe": None,
                    **{name: _network(spec) for name, spec in networks.items()}}
        with open(path, "wb") as f:
            pickle.dump(snapshot, f, protocol=4)
    assert not any(name in sys.modules for name in FAKE_MODULES)


@pytest.fixture(scope="module")
def fixture():
    return load_fixture(fixture_prefix("eg3d_parity_128"))


def eg3d_networks(fixture) -> dict[str, NetSpec]:
    """G_ema and D with the fixture's weights; G (the non-averaged generator) with other weights."""
    tensors, meta = fixture
    g = {k[2:]: v for k, v in tensors.items() if k.startswith("G.")}
    d = {k[2:]: v for k, v in tensors.items() if k.startswith("D.")}
    g_other = {k: v if k.endswith("resample_filter") else v + 0.5 for k, v in g.items()}
    nrr = meta["neural_rendering_resolution"]
    return {"G": NetSpec("TriPlaneGenerator", g_other, copy.deepcopy(meta["G_kwargs"]), nrr),
            "D": NetSpec("DualDiscriminator", d, copy.deepcopy(meta["D_kwargs"])),
            "G_ema": NetSpec("TriPlaneGenerator", g, copy.deepcopy(meta["G_kwargs"]), nrr)}


def test_converted_release_pickle_reproduces_every_fixture_output(tmp_path, fixture):
    tensors, meta = fixture
    marker = tmp_path / "executed.txt"
    pkl, out = tmp_path / "ffhq512-128.pkl", tmp_path / "converted"
    write_eg3d_pickle(pkl, eg3d_networks(fixture), _poison_source(marker))
    assert str(marker).encode() in pkl.read_bytes()  # the poison is really embedded
    assert pickled_globals(pkl) == EG3D_GLOBALS - {("numpy._core.multiarray", "scalar"), ("numpy", "dtype")}

    proc = subprocess.run([sys.executable, "-m", "dreamportrait.eg3d.convert", str(pkl), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not marker.exists(), "the pickle's embedded module source was executed"
    assert "networks D, G, G_ema" in proc.stdout and "validated by a strict load" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [DISCRIMINATOR_FILE, GENERATOR_FILE]
    G = TriPlaneGenerator.from_pretrained(out / GENERATOR_FILE)
    D = DualDiscriminator.from_pretrained(out / DISCRIMINATOR_FILE)
    ours = compute_outputs(G, D, tensors, meta)
    errors = {k: relative_error(ours[k], tensors[k]) for k in tensors if k.startswith("out.")}
    assert set(errors) == set(ours) and max(errors.values()) <= TOLERANCE, errors

    # Configuration read from the pickle, not defaults: 12+12 depth samples, neural res 32, 2X SR.
    assert (G.config.depth_resolution, G.config.neural_rendering_resolution, G.config.img_resolution) == (12, 32, 128)
    extra = read_model_metadata(out / GENERATOR_FILE).extra
    assert extra["source"] == "ffhq512-128.pkl"
    assert extra["sha256"] == hashlib.sha256(pkl.read_bytes()).hexdigest()
    assert extra["eg3d_class"] == "TriPlaneGenerator" and extra["neural_rendering_resolution"] == 32
    assert extra["eg3d_init_kwargs"] == meta["G_kwargs"]
    assert read_model_metadata(out / DISCRIMINATOR_FILE, "dual-discriminator").config == {
        "eg3d_init_kwargs": meta["D_kwargs"]}


def _convert(capsys, *argv):
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_pickle_without_g_ema_is_a_clear_error(tmp_path, fixture, capsys):
    networks = eg3d_networks(fixture)
    del networks["G_ema"]
    pkl, out = tmp_path / "no_ema.pkl", tmp_path / "out"
    write_eg3d_pickle(pkl, networks, "")
    rc, _, err = _convert(capsys, pkl, out)
    assert rc == 1
    assert f"error: {pkl} has no network 'G_ema'; it has ['D', 'G']" in err
    assert not out.exists()


def test_other_network_and_no_discriminator_flags(tmp_path, fixture, capsys):
    networks = eg3d_networks(fixture)
    del networks["D"]
    pkl, out = tmp_path / "no_d.pkl", tmp_path / "out"
    write_eg3d_pickle(pkl, networks, "")
    rc, _, err = _convert(capsys, pkl, out)
    assert rc == 1 and "has no network 'D'" in err and "pass --no-discriminator" in err
    assert not out.exists()  # nothing is written unless every requested network converts

    rc, stdout, _ = _convert(capsys, pkl, out, "--network", "G", "--no-discriminator")
    assert rc == 0 and "discriminator: skipped" in stdout
    assert [p.name for p in out.iterdir()] == [GENERATOR_FILE]
    G = TriPlaneGenerator.from_pretrained(out / GENERATOR_FILE)
    assert torch.equal(G.decoder.net[2].bias, networks["G"].tensors["decoder.net.2.bias"])


def test_converted_discriminator_keeps_every_pickled_tensor_but_unused_filters(tmp_path, fixture, capsys):
    networks = eg3d_networks(fixture)
    pkl, out = tmp_path / "snapshot.pkl", tmp_path / "out"
    write_eg3d_pickle(pkl, networks, "")
    rc, stdout, _ = _convert(capsys, pkl, out)
    assert rc == 0 and "validated by a strict load into dreamportrait.discriminator.DualDiscriminator" in stdout
    D = DualDiscriminator.from_pretrained(out / DISCRIMINATOR_FILE)
    kept, pickled = D.state_dict(), networks["D"].tensors
    assert all(k.endswith("resample_filter") for k in set(pickled) - set(kept))  # only unused filters dropped
    assert all(torch.equal(t, pickled[k]) for k, t in kept.items())


def _edited(fixture, edit):
    networks = eg3d_networks(fixture)
    edit(networks)
    return networks


def _unsupported_sr(n):
    n["G_ema"].init_kwargs["rendering_kwargs"]["superresolution_module"] = "training.superresolution.Hybrid16X"


def _narrow_decoder(n):
    n["G_ema"].tensors["decoder.net.2.weight"] = n["G_ema"].tensors["decoder.net.2.weight"][:32]


def _narrow_discriminator(n):
    n["D"].tensors["b4.out.weight"] = n["D"].tensors["b4.out.weight"][:, :32]


def _no_neural_resolution(n):
    n["G_ema"].neural_rendering_resolution = 0


@pytest.mark.parametrize("edit, message", [
    (_unsupported_sr, "unsupported EG3D super-resolution module 'training.superresolution.Hybrid16X'"),
    (_narrow_decoder, "shape mismatch [('decoder.net.2.weight', (32, 64), (33, 64))]"),
    (_narrow_discriminator, "cannot convert network 'D' of bad.pkl: EG3D weights do not fit this architecture"),
    (_no_neural_resolution, "neural_rendering_resolution is 0, expected a positive integer"),
])
def test_unconvertible_networks_are_clear_errors_and_write_nothing(tmp_path, fixture, capsys, edit, message):
    pkl, out = tmp_path / "bad.pkl", tmp_path / "out"
    write_eg3d_pickle(pkl, _edited(fixture, edit), "")
    rc, _, err = _convert(capsys, pkl, out)
    assert rc == 1 and message in err, err
    assert not out.exists()


def test_not_a_pickle_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "model.pkl"
    bad.write_text("<html>404 Not Found</html>")
    rc, _, err = _convert(capsys, bad, tmp_path / "out")
    assert rc == 1 and "model.pkl is not a readable EG3D pickle" in err


def test_discriminator_file_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    cfg = DiscriminatorConfig(img_resolution=32, channel_base=256, channel_max=32, mapping_layers=2,
                              mbstd_group_size=2)
    D = DualDiscriminator(cfg).eval()
    path = tmp_path / "D.safetensors"
    D.save_pretrained(path)
    loaded = DualDiscriminator.from_pretrained(path)
    assert loaded.config == cfg
    assert all(torch.equal(a, b) for a, b in zip(D.state_dict().values(), loaded.state_dict().values()))
    img = {"image": torch.randn(2, 3, 32, 32), "image_raw": torch.randn(2, 3, 16, 16)}
    c = torch.randn(2, 25)
    with torch.no_grad():
        assert torch.equal(D(img, c), loaded(img, c))

    save_model_file(tmp_path / "bad.safetensors", D.state_dict(), {"preset": "tiny"}, "dual-discriminator")
    with pytest.raises(CheckpointError, match=r"must hold exactly one of \['eg3d_init_kwargs', 'discriminator'\]"):
        DualDiscriminator.from_pretrained(tmp_path / "bad.safetensors")
    small = DualDiscriminator(DiscriminatorConfig(img_resolution=32, channel_base=128, channel_max=16,
                                                  mapping_layers=2))
    save_model_file(tmp_path / "mismatch.safetensors", small.state_dict(), {"discriminator": cfg.to_dict()},
                    "dual-discriminator")
    with pytest.raises(CheckpointError, match="does not fit the discriminator its config describes"):
        DualDiscriminator.from_pretrained(tmp_path / "mismatch.safetensors")
