"""EG3D pickle reader: tensors and configuration come out of an EG3D-layout pickle, no pickled code runs.

The pickles are built here in EG3D's layout (spec §8): persistent classes pickle as
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with their module source embedded,
while OSGDecoder, the renderer, ray sampler and ray marcher pickle by reference to ``training.*``.
Those modules exist in ``sys.modules`` only while dumping; the embedded source writes a marker
file and raises if it is ever executed.
"""
import contextlib
import copy
import copyreg
import os
import pickle
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from dreamportrait.eg3d.pickle_reader import EG3DPickleError, RestrictedUnpickler, read_eg3d_pickle

FAKE_MODULES = (
    "torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util", "training", "training.triplane",
    "training.volumetric_rendering", "training.volumetric_rendering.renderer",
    "training.volumetric_rendering.ray_sampler", "training.volumetric_rendering.ray_marcher",
)
# Spec §8.3: the globals an EG3D pickle references.
EG3D_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"), ("dnnlib.util", "EasyDict"),
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("torch.storage", "_load_from_bytes"),
    ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
    ("torch.nn.modules.container", "Sequential"), ("torch.nn.modules.activation", "Softplus"),
    ("training.triplane", "OSGDecoder"), ("training.volumetric_rendering.renderer", "ImportanceRenderer"),
    ("training.volumetric_rendering.ray_sampler", "RaySampler"),
    ("training.volumetric_rendering.ray_marcher", "MipRayMarcher2"),
}
TRAINING_SET_KWARGS = {"class_name": "training.dataset.ImageFolderDataset", "path": "/data/ffhq512.zip",
                       "use_labels": True, "max_size": 70000, "xflip": False, "resolution": 512}


def _reconstruct_persistent_obj(meta):
    raise AssertionError("EG3D's persistence loader ran; the reader must never call it")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"


def _numpy1_scalar(dtype, data):
    raise AssertionError("only a pickling target")


_numpy1_scalar.__module__, _numpy1_scalar.__qualname__ = "numpy.core.multiarray", "scalar"


class EasyDict(dict):
    """Pickles as dnnlib.util.EasyDict (attribute access maps to items, like dnnlib's)."""

    __module__ = "dnnlib.util"

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


class Persistent(nn.Module):
    """Pickles like EG3D's @persistent_class: a call to _reconstruct_persistent_obj(meta)."""

    module_src = ""  # set while dumping

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=self.module_src,
                    class_name=type(self).__name__, state=self.__getstate__())
        return _reconstruct_persistent_obj, (meta,)


class FullyConnectedLayer(Persistent):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features, self.activation = in_features, out_features, "linear"
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.register_parameter("bias", nn.Parameter(torch.randn(out_features)) if bias else None)


class MappingNetwork(Persistent):
    def __init__(self):
        super().__init__()
        self.z_dim, self.num_ws = 8, 4
        self.fc0 = FullyConnectedLayer(8, 8)
        self.register_buffer("w_avg", torch.randn(8))


class SynthesisNetwork(Persistent):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3).t())  # non-contiguous
        self.register_buffer("resample_filter", torch.randn(4, 4))
        self.register_buffer("noise_const", torch.randn(10)[3:7])  # view with a storage offset
        self.register_buffer("cache", torch.randn(3), persistent=False)


class StyleGAN2Backbone(Persistent):
    def __init__(self):
        super().__init__()
        self.mapping, self.synthesis = MappingNetwork(), SynthesisNetwork()


class SuperresolutionHybrid8XDC(Persistent):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 3).half())
        self.register_parameter("bias", None)
        self.register_buffer("resample_filter", torch.randn(4, 4).bfloat16())
        self.register_buffer("counts", torch.randint(-2**40, 2**40, (6,)))
        self.register_module("skip", None)


class OSGDecoder(nn.Module):
    __module__, __qualname__ = "training.triplane", "OSGDecoder"

    def __init__(self):
        super().__init__()
        self.hidden_dim = 8
        self.net = nn.Sequential(FullyConnectedLayer(6, 8), nn.Softplus(), FullyConnectedLayer(8, 5))


class MipRayMarcher2(nn.Module):
    __module__, __qualname__ = "training.volumetric_rendering.ray_marcher", "MipRayMarcher2"


class RaySampler(nn.Module):
    __module__, __qualname__ = "training.volumetric_rendering.ray_sampler", "RaySampler"

    def __init__(self):
        super().__init__()
        self.ray_origins_h, self.ray_directions, self.depths = None, None, None


class ImportanceRenderer(nn.Module):
    __module__, __qualname__ = "training.volumetric_rendering.renderer", "ImportanceRenderer"

    def __init__(self):
        super().__init__()
        self.ray_marcher = MipRayMarcher2()
        self.plane_axes = torch.eye(3).expand(3, 3, 3)  # plain tensor attribute, not state


class TriPlaneGenerator(Persistent):
    def __init__(self, **kwargs):
        super().__init__()
        self._init_args, self._init_kwargs = (), copy.deepcopy(kwargs)
        self.z_dim, self.c_dim, self.w_dim = kwargs["z_dim"], kwargs["c_dim"], kwargs["w_dim"]
        self.img_resolution, self.img_channels = kwargs["img_resolution"], kwargs["img_channels"]
        self.rendering_kwargs = kwargs["rendering_kwargs"]
        self.neural_rendering_resolution = 32
        self._last_planes = None
        self.renderer, self.ray_sampler = ImportanceRenderer(), RaySampler()
        self.backbone = StyleGAN2Backbone()
        self.superresolution = SuperresolutionHybrid8XDC()
        self.decoder = OSGDecoder()
        self.register_buffer("dataset_label_std", torch.rand(25))


class DualDiscriminator(Persistent):
    def __init__(self):
        super().__init__()
        self._init_args, self._init_kwargs = (), {"c_dim": 25, "img_resolution": 512, "img_channels": 3}
        self.b4 = FullyConnectedLayer(8, 1)


def _generator_kwargs():
    rendering = EasyDict(superresolution_module="training.superresolution.SuperresolutionHybrid8XDC",
                         depth_resolution=48, depth_resolution_importance=48, ray_start=2.25, ray_end=3.3,
                         box_warp=np.float64(1.0), avg_camera_pivot=[0, 0, 0.2], c_gen_conditioning_zero=False)
    return dict(z_dim=8, w_dim=8, c_dim=25, img_resolution=64, img_channels=3, sr_num_fp16_res=4,
                mapping_kwargs=EasyDict(num_layers=2), rendering_kwargs=rendering,
                sr_kwargs=EasyDict(channels=16, sr_antialias=True), channel_base=2048, channel_max=64)


@contextlib.contextmanager
def eg3d_modules(module_src: str):
    """EG3D's modules (torch_utils, dnnlib, training.*) exist in sys.modules only inside this block,
    and persistent classes carry ``module_src``: the state in which EG3D writes its pickles."""
    with pytest.MonkeyPatch.context() as m:
        for name in FAKE_MODULES:
            m.setitem(sys.modules, name, types.ModuleType(name))
        for obj in (_reconstruct_persistent_obj, EasyDict, OSGDecoder, ImportanceRenderer, RaySampler,
                    MipRayMarcher2):
            setattr(sys.modules[obj.__module__], obj.__qualname__, obj)
        m.setattr(Persistent, "module_src", module_src)
        yield m


def _write_eg3d_pickle(path, module_src, protocol=4, numpy1=False):
    """Pickle an EG3D-layout snapshot to ``path``; return torch's own state dicts for comparison."""
    with eg3d_modules(module_src) as m:
        torch.manual_seed(0)
        nets = {"G": TriPlaneGenerator(**_generator_kwargs()), "D": DualDiscriminator(),
                "G_ema": TriPlaneGenerator(**_generator_kwargs())}
        with open(path, "wb") as f:
            pickler = pickle.Pickler(f, protocol=protocol)
            if numpy1:  # numpy 1.x wrote scalars as numpy.core.multiarray.scalar
                m.setitem(sys.modules, "numpy.core.multiarray", types.ModuleType("numpy.core.multiarray"))
                sys.modules["numpy.core.multiarray"].scalar = _numpy1_scalar
                pickler.dispatch_table = {**copyreg.dispatch_table,
                                          np.float64: lambda x: (_numpy1_scalar, (x.dtype, x.tobytes()))}
            pickler.dump(dict(training_set_kwargs=dict(TRAINING_SET_KWARGS), augment_pipe=None, **nets))
        return {name: OrderedDict((k, v.clone()) for k, v in net.state_dict().items()) for name, net in nets.items()}


def _poison_source(marker) -> str:
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('executed')\nraise RuntimeError('ran')\n"


def _bits(tensor):
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    return tensor.view(ints[tensor.dtype]) if tensor.dtype in ints else tensor


@pytest.mark.parametrize("protocol", [4, 5])
def test_reads_eg3d_layout_bit_exactly_without_running_code(tmp_path, protocol):
    marker = tmp_path / "executed.txt"
    path = tmp_path / "network-snapshot.pkl"
    expected = _write_eg3d_pickle(path, _poison_source(marker), protocol=protocol)
    assert not any(name in sys.modules for name in FAKE_MODULES)

    ckpt = read_eg3d_pickle(path)

    assert not marker.exists(), "embedded module_src was executed"
    assert not any(name in sys.modules for name in FAKE_MODULES), "reader imported EG3D modules"
    assert set(ckpt.networks) == {"G", "D", "G_ema"}
    for name, reference in expected.items():
        got = ckpt.networks[name].state_dict
        assert list(got) == list(reference), name  # same names, same order as nn.Module.state_dict()
        for key, tensor in reference.items():
            assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, f"{name}.{key}"
            assert torch.equal(_bits(got[key]), _bits(tensor)), f"{name}.{key}"
    G = ckpt.network("G_ema").state_dict
    # persistent -> by-reference -> Sequential -> persistent nesting, and what state_dict() leaves out
    assert {"decoder.net.0.weight", "decoder.net.2.bias", "backbone.mapping.fc0.weight",
            "backbone.mapping.w_avg", "dataset_label_std", "superresolution.counts"} <= set(G)
    assert not {"backbone.synthesis.cache", "superresolution.bias", "renderer.plane_axes"} & set(G)
    assert not torch.equal(G["decoder.net.0.weight"], ckpt.networks["G"].state_dict["decoder.net.0.weight"])


def test_recovers_configuration_and_source_text(tmp_path):
    marker = tmp_path / "executed.txt"
    path = tmp_path / "ffhq512-128.pkl"
    source = _poison_source(marker)
    _write_eg3d_pickle(path, source)

    ckpt = read_eg3d_pickle(path)
    G = ckpt.network("G_ema")
    assert (G.class_name, G.module_name, G.module_src) == ("TriPlaneGenerator", None, source)
    expected_kwargs = _generator_kwargs()
    expected_kwargs["rendering_kwargs"]["box_warp"] = 1.0
    assert G.init_kwargs == expected_kwargs and G.init_args == ()
    assert type(G.init_kwargs["rendering_kwargs"]) is dict and type(G.init_kwargs["sr_kwargs"]) is dict
    assert type(G.init_kwargs["rendering_kwargs"]["box_warp"]) is float  # numpy scalar -> Python float
    assert G.attributes["rendering_kwargs"] == expected_kwargs["rendering_kwargs"]
    assert G.attributes["neural_rendering_resolution"] == 32
    assert (G.attributes["z_dim"], G.attributes["c_dim"], G.attributes["img_resolution"]) == (8, 25, 64)
    assert "_last_planes" not in G.attributes and "training" not in G.attributes
    assert ckpt.network("D").init_kwargs == {"c_dim": 25, "img_resolution": 512, "img_channels": 3}
    assert ckpt.training_set_kwargs == TRAINING_SET_KWARGS
    with pytest.raises(EG3DPickleError, match=r"has no network 'augment_pipe'; it has \['D', 'G', 'G_ema'\]"):
        ckpt.network("augment_pipe")
    assert not marker.exists()


def test_numpy1_scalar_name_is_accepted(tmp_path):
    path = tmp_path / "old.pkl"
    _write_eg3d_pickle(path, "", numpy1=True)
    assert b"numpy.core.multiarray" in path.read_bytes()
    rendering = read_eg3d_pickle(path).network("G").attributes["rendering_kwargs"]
    assert rendering["box_warp"] == 1.0 and type(rendering["box_warp"]) is float


def pickled_globals(path) -> set[tuple[str, str]]:
    """Every global a pickle references (guards a test pickle's EG3D layout)."""
    seen = set()

    class Recorder(RestrictedUnpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    with open(path, "rb") as f:
        Recorder(f).load()
    return seen


def test_fixture_references_exactly_the_eg3d_globals(tmp_path):
    """Guards the test pickle's layout: it must reference the globals of spec §8.3, no more, no less."""
    path = tmp_path / "snapshot.pkl"
    _write_eg3d_pickle(path, "")
    assert pickled_globals(path) == EG3D_GLOBALS


class _Call:
    """Pickles as ``func(*args)``: the classic pickle code-execution exploit."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _touch(path):
    open(path, "w").close()


@pytest.mark.parametrize("make_exploit, global_name", [
    (lambda marker: _Call(os.system, f"touch '{marker}'"), f"{os.system.__module__}.system"),
    (lambda marker: _Call(eval, f"open({str(marker)!r}, 'w').close()"), "builtins.eval"),
    (lambda marker: _Call(_touch, str(marker)), f"{__name__}._touch"),
])
def test_refuses_unknown_globals_without_executing(tmp_path, make_exploit, global_name):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    payload = pickle.dumps({"training_set_kwargs": {"x": make_exploit(marker)}, "G_ema": None}, protocol=4)
    path.write_bytes(payload)

    with pytest.raises(EG3DPickleError) as info:
        read_eg3d_pickle(path)
    message = str(info.value)
    assert f"refusing to load global {global_name} from {path}" in message
    assert "not part of an EG3D checkpoint" in message
    assert not marker.exists()

    pickle.loads(payload)  # positive control: a plain unpickler does run the payload
    assert marker.exists()


def test_storage_blobs_are_loaded_weights_only(tmp_path):
    """A storage blob is itself a pickle; one that carries an exploit must be refused, not run."""
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_Call(_touch, str(marker)), protocol=2)
    payload = pickle.dumps({"G_ema": _Call(torch.storage._load_from_bytes, blob)}, protocol=4)
    path = tmp_path / "evil_storage.pkl"
    path.write_bytes(payload)

    with pytest.raises(EG3DPickleError, match="not a readable EG3D pickle.*Weights only load failed"):
        read_eg3d_pickle(path)
    assert not marker.exists()

    with pytest.raises(Exception):
        pickle.loads(payload)  # positive control: torch's own _load_from_bytes runs the blob
    assert marker.exists()


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(EG3DPickleError, match="does not exist; download NVIDIA's released EG3D models"):
        read_eg3d_pickle(tmp_path / "missing.pkl")

    good = tmp_path / "good.pkl"
    _write_eg3d_pickle(good, "")
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(EG3DPickleError, match="truncated.pkl is not a readable EG3D pickle.*re-download"):
        read_eg3d_pickle(truncated)

    not_dict = tmp_path / "list.pkl"
    not_dict.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(EG3DPickleError, match="holds a list, not an EG3D snapshot dict"):
        read_eg3d_pickle(not_dict)

    empty = tmp_path / "empty.pkl"
    empty.write_bytes(pickle.dumps({"training_set_kwargs": {}, "G_ema": None}))
    with pytest.raises(EG3DPickleError, match="contains no networks"):
        read_eg3d_pickle(empty)
