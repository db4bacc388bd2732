"""Shape export: density grid -> marching cubes -> coloured mesh in world units -> .obj / .ply / .glb.

The generator's raw density (the decoder's channel 0, before the renderer's softplus(sigma - 1))
is evaluated on EG3D's grid: N points per side over the box [-box_warp/2, box_warp/2]^3, x the
slowest index and z the fastest, so ``grid[i, j, k] = sigma(x_i, y_j, z_k)`` with
``x_i = -box_warp/2 + i * box_warp / (N - 1)``. Points are evaluated from cached tri-planes in
chunks of at most ``chunk`` points, so memory is bounded and mapping/backbone never re-run.

Unlike EG3D's scripts (which flip the grid and write vertices in voxel units), vertices here are
in the renderer's world frame: y up, the face looking toward +z, the same units as the cameras.
Faces wind counter-clockwise seen from outside (normals point toward lower density), as glTF wants.
Vertex colours are the first three colour features at the vertices, shown the way the renderer
shows them: image = feature * 2 - 1 in [-1, 1], uint8 = (image + 1) / 2 * 255.
"""
from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mcubes
import numpy as np
import torch

from .checkpoints import atomic_write
from .grid import to_uint8

Progress = Callable[[int, int], None]

DEFAULT_THRESHOLD = 10.0  # EG3D's marching-cubes level on raw sigma; its README: "usually between 2 and 20".
DEFAULT_CHUNK = 1 << 18  # points per decoder evaluation (roughly 0.3 GB of activations at 32 channels)
BORDER_VALUE = -1000.0  # what EG3D writes into trimmed border voxels

MESH_SUFFIXES = (".obj", ".ply", ".glb")


@dataclass
class Mesh:
    """A triangle mesh: vertices (V, 3) float32 world units, faces (F, 3) int64, colors (V, 3) uint8."""
    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray

    def __post_init__(self):
        self.vertices = np.ascontiguousarray(self.vertices, dtype=np.float32).reshape(-1, 3)
        self.faces = np.ascontiguousarray(self.faces, dtype=np.int64).reshape(-1, 3)
        self.colors = np.ascontiguousarray(self.colors, dtype=np.uint8).reshape(-1, 3)
        if len(self.colors) != len(self.vertices):
            raise ValueError(f"mesh has {len(self.vertices)} vertices but {len(self.colors)} colours; "
                             "give one RGB colour per vertex")
        if self.faces.size and (self.faces.min() < 0 or self.faces.max() >= len(self.vertices)):
            raise ValueError(f"face indices must lie in [0, {len(self.vertices)}), "
                             f"got [{self.faces.min()}, {self.faces.max()}]")

    def save(self, path) -> Path:
        """Write the mesh to ``path`` atomically; the format follows the suffix (.obj, .ply or .glb)."""
        path = Path(path)
        writer = _WRITERS.get(path.suffix.lower())
        if writer is None:
            raise ValueError(f"unknown mesh format {path.suffix!r} for {path}; use one of {MESH_SUFFIXES}")
        if len(self.vertices) == 0 or len(self.faces) == 0:
            raise ValueError("the mesh is empty (no vertices or faces); nothing to write to "
                             f"{path}. Extract it again with a lower threshold")
        atomic_write(path, writer(self))
        return path


# ----------------------------------------------------------------------------- extraction

def grid_coordinates(indices: torch.Tensor, resolution: int, box_warp: float) -> torch.Tensor:
    """World points (M, 3) of flat grid indices (x slowest, z fastest)."""
    n = resolution
    ijk = torch.stack((indices // (n * n), (indices // n) % n, indices % n), dim=-1)
    return ijk.to(torch.float64).mul(box_warp / (n - 1)).sub(box_warp / 2).to(torch.float32)


def _check_planes(planes: torch.Tensor):
    if planes.ndim != 5 or planes.shape[0] != 1 or planes.shape[1] != 3:
        raise ValueError(f"planes must have shape (1, 3, C, H, W) (one shape at a time), got {tuple(planes.shape)}; "
                         "pass planes[i:i + 1] for the i-th sample")


@torch.no_grad()
def density_grid(G, planes: torch.Tensor, resolution: int = 128, chunk: int = DEFAULT_CHUNK,
                 progress: Progress | None = None) -> np.ndarray:
    """Raw density (N, N, N) float32 on EG3D's grid, ``grid[i, j, k] = sigma(x_i, y_j, z_k)``.

    ``progress(done_points, total_points)`` is called after every chunk.
    """
    _check_planes(planes)
    if resolution < 2:
        raise ValueError(f"resolution must be at least 2 points per side, got {resolution}")
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of points, got {chunk}")
    total = resolution ** 3
    out = np.empty(total, dtype=np.float32)
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        idx = torch.arange(start, stop, device=planes.device)
        points = grid_coordinates(idx, resolution, G.config.box_warp).unsqueeze(0)
        out[start:stop] = G.sample_planes(planes, points)["sigma"].reshape(-1).float().cpu().numpy()
        if progress is not None:
            progress(stop, total)
    return out.reshape(resolution, resolution, resolution)


def trim_border(grid: np.ndarray, border: int) -> np.ndarray:
    """Set ``border`` voxels on every face of the grid to -1000 (EG3D's trim), closing the surface there."""
    if border < 0 or 2 * border >= min(grid.shape):
        raise ValueError(f"border must be in [0, {(min(grid.shape) - 1) // 2}] voxels, got {border}")
    if border:
        grid = grid.copy()
        for axis in range(3):
            index = [slice(None)] * 3
            index[axis] = np.r_[0:border, grid.shape[axis] - border:grid.shape[axis]]
            grid[tuple(index)] = BORDER_VALUE
    return grid


def marching_cubes(grid: np.ndarray, threshold: float, box_warp: float) -> tuple[np.ndarray, np.ndarray]:
    """Iso-surface of ``grid`` at ``threshold`` -> (vertices (V, 3) world units, faces (F, 3)).

    Raises ValueError naming the density range when the threshold lies outside it.
    """
    vertices, faces = mcubes.marching_cubes(grid, float(threshold))
    if len(faces) == 0:
        lo, hi = float(grid.min()), float(grid.max())
        if threshold >= hi:
            fix = f"the threshold is too high: lower it below {hi:.4g}"
        else:
            fix = f"everything is inside: raise the threshold above {lo:.4g}, or trim the border (border=1)"
        raise ValueError(f"no surface at threshold {threshold:g}: raw density on the grid ranges over "
                         f"[{lo:.4g}, {hi:.4g}]; {fix} (EG3D uses {DEFAULT_THRESHOLD:g} for trained models, "
                         "usually between 2 and 20)")
    # mcubes returns vertices as (axis 0, axis 1, axis 2) grid indices, i.e. (x, y, z) here.
    n = grid.shape[0]
    world = vertices * (box_warp / (n - 1)) - box_warp / 2
    return world.astype(np.float32), faces.astype(np.int64)


@torch.no_grad()
def vertex_colors(G, planes: torch.Tensor, vertices: np.ndarray, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """uint8 RGB (V, 3) from the first three colour features at world points ``vertices``.

    Converted like a rendered pixel: the renderer shows feature f as f * 2 - 1, then ``to_uint8``.
    """
    _check_planes(planes)
    points = torch.from_numpy(np.ascontiguousarray(vertices, dtype=np.float32)).to(planes.device)
    features = torch.cat([G.sample_planes(planes, points[s:s + chunk].unsqueeze(0))["rgb"][0, :, :3]
                          for s in range(0, len(points), chunk)])
    return to_uint8((features * 2 - 1).T.unsqueeze(-1)).reshape(-1, 3)  # (3, V, 1) "image" -> (V, 3)


def extract_mesh(G, planes: torch.Tensor, resolution: int = 128, threshold: float = DEFAULT_THRESHOLD,
                 chunk: int = DEFAULT_CHUNK, border: int = 0, progress: Progress | None = None) -> Mesh:
    """The iso-surface ``raw sigma == threshold`` of cached planes (1, 3, C, H, W) as a coloured mesh.

    ``resolution`` points per side over the box (EG3D's scripts use 512). ``threshold`` is on the raw
    density (EG3D: 10). ``border`` trims that many voxels on each face, as EG3D does with
    ``int(30 * N / 256)`` to drop floaters near the box and close the surface. ``progress(done, total)``
    reports grid points evaluated.
    """
    grid = trim_border(density_grid(G, planes, resolution, chunk, progress), border)
    vertices, faces = marching_cubes(grid, threshold, G.config.box_warp)
    return Mesh(vertices, faces, vertex_colors(G, planes, vertices, chunk))


# ----------------------------------------------------------------------------- writers

def obj_bytes(mesh: Mesh) -> bytes:
    """Wavefront OBJ with per-vertex colours as ``v x y z r g b`` (r, g, b in [0, 1])."""
    buf = io.StringIO()
    buf.write("# DreamPortrait mesh, world units, y up\n")
    np.savetxt(buf, np.hstack([mesh.vertices, mesh.colors / 255.0]), fmt="v %.7g %.7g %.7g %.6f %.6f %.6f")
    np.savetxt(buf, mesh.faces + 1, fmt="f %d %d %d")
    return buf.getvalue().encode("ascii")


_PLY_VERTEX = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
_PLY_FACE = np.dtype([("count", "u1"), ("indices", "<i4", (3,))])


def ply_bytes(mesh: Mesh) -> bytes:
    """Binary little-endian PLY with float x/y/z and uchar red/green/blue vertex properties."""
    properties = "".join(f"property {'float' if _PLY_VERTEX[name].kind == 'f' else 'uchar'} {name}\n"
                         for name in _PLY_VERTEX.names)
    header = ("ply\nformat binary_little_endian 1.0\ncomment DreamPortrait mesh, world units, y up\n"
              f"element vertex {len(mesh.vertices)}\n{properties}"
              f"element face {len(mesh.faces)}\nproperty list uchar int vertex_indices\nend_header\n")
    vertices = np.empty(len(mesh.vertices), _PLY_VERTEX)
    for axis, name in enumerate("xyz"):
        vertices[name] = mesh.vertices[:, axis]
    for channel, name in enumerate(("red", "green", "blue")):
        vertices[name] = mesh.colors[:, channel]
    faces = np.empty(len(mesh.faces), _PLY_FACE)
    faces["count"] = 3
    faces["indices"] = mesh.faces
    return header.encode("ascii") + vertices.tobytes() + faces.tobytes()


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> linear (glTF vertex colours are linear)."""
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * np.power(np.maximum(c, 0.0031308), 1 / 2.4) - 0.055)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit area-weighted vertex normals following the face winding ((0, 1, 0) where undefined)."""
    tri = vertices[faces].astype(np.float64)
    face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals = np.zeros((len(vertices), 3))
    for corner in range(3):
        np.add.at(normals, faces[:, corner], face_n)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.where(length > 1e-20, normals / np.maximum(length, 1e-20), [0.0, 1.0, 0.0])
    return normals.astype(np.float32)


_GLB_MAGIC, _GLB_JSON, _GLB_BIN = 0x46546C67, 0x4E4F534A, 0x004E4942
_FLOAT, _UBYTE, _USHORT, _UINT = 5126, 5121, 5123, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963


def _pad4(data: bytes, fill: bytes) -> bytes:
    return data + fill * (-len(data) % 4)


def glb_bytes(mesh: Mesh) -> bytes:
    """Binary glTF 2.0: one triangle primitive with POSITION, NORMAL, COLOR_0 (linear float) and uint32 indices.

    The material is white, non-metallic and double-sided so the vertex colours show as they are.
    """
    positions = mesh.vertices
    blocks = [  # (data, accessor fields, bufferView target)
        (positions, {"componentType": _FLOAT, "type": "VEC3", "min": positions.min(0).tolist(),
                     "max": positions.max(0).tolist()}, _ARRAY_BUFFER),
        (vertex_normals(mesh.vertices, mesh.faces), {"componentType": _FLOAT, "type": "VEC3"}, _ARRAY_BUFFER),
        (srgb_to_linear(mesh.colors / 255.0).astype(np.float32), {"componentType": _FLOAT, "type": "VEC3"},
         _ARRAY_BUFFER),
        (mesh.faces.astype(np.uint32).reshape(-1), {"componentType": _UINT, "type": "SCALAR"}, _ELEMENT_ARRAY_BUFFER),
    ]
    binary, views, accessors = b"", [], []
    for i, (array, accessor, target) in enumerate(blocks):
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        views.append({"buffer": 0, "byteOffset": len(binary), "byteLength": len(data), "target": target})
        accessors.append({"bufferView": i, "count": len(array), **accessor})
        binary = _pad4(binary + data, b"\0")
    document = {
        "asset": {"version": "2.0", "generator": "DreamPortrait"},
        "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0, "NORMAL": 1, "COLOR_0": 2},
                                    "indices": 3, "material": 0, "mode": 4}]}],
        "materials": [{"pbrMetallicRoughness": {"baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0,
                                                "roughnessFactor": 1.0}, "doubleSided": True}],
        "buffers": [{"byteLength": len(binary)}], "bufferViews": views, "accessors": accessors,
    }
    json_chunk = _pad4(json.dumps(document, separators=(",", ":")).encode("utf-8"), b" ")
    body = (struct.pack("<II", len(json_chunk), _GLB_JSON) + json_chunk
            + struct.pack("<II", len(binary), _GLB_BIN) + binary)
    return struct.pack("<III", _GLB_MAGIC, 2, 12 + len(body)) + body


_WRITERS = {".obj": obj_bytes, ".ply": ply_bytes, ".glb": glb_bytes}


# ----------------------------------------------------------------------------- readers

def _read_obj(data: bytes) -> Mesh:
    vertices, faces = [], []
    for line in data.decode("utf-8").splitlines():
        parts = line.split()
        if parts and parts[0] == "v":
            vertices.append([float(p) for p in parts[1:7]])
        elif parts and parts[0] == "f":
            if len(parts) != 4:
                raise ValueError(f"only triangle faces are supported, got {line!r}")
            faces.append([int(p.split("/")[0]) - 1 for p in parts[1:]])
    v = np.array(vertices, dtype=np.float64).reshape(-1, 6 if vertices and len(vertices[0]) == 6 else 3)
    colors = np.round(v[:, 3:6] * 255) if v.shape[1] == 6 else np.full((len(v), 3), 255)
    return Mesh(v[:, :3], np.array(faces), colors)


_PLY_TYPES = {"char": "i1", "uchar": "u1", "short": "<i2", "ushort": "<u2", "int": "<i4", "uint": "<u4",
              "float": "<f4", "double": "<f8", "int8": "i1", "uint8": "u1", "int32": "<i4", "uint32": "<u4",
              "float32": "<f4", "float64": "<f8"}


def _read_ply(data: bytes) -> Mesh:
    """Binary little-endian PLY with a vertex element (x, y, z[, red, green, blue]) and triangle faces."""
    end = data.index(b"end_header\n") + len(b"end_header\n")
    lines = data[:end].decode("ascii").splitlines()
    if "format binary_little_endian 1.0" not in lines:
        raise ValueError("only binary little-endian PLY files can be read")
    elements = []  # [name, count, [(prop, dtype)], list (count dtype, index dtype) or None]
    for line in lines:
        parts = line.split()
        if parts[0] == "element":
            elements.append([parts[1], int(parts[2]), [], None])
        elif parts[0] == "property" and parts[1] == "list":
            elements[-1][3] = (_PLY_TYPES[parts[2]], _PLY_TYPES[parts[3]])
        elif parts[0] == "property":
            elements[-1][2].append((parts[2], _PLY_TYPES[parts[1]]))
    offset, arrays = end, {}
    for name, count, props, list_types in elements:
        dtype = np.dtype([("count", list_types[0]), ("indices", list_types[1], (3,))]) if list_types \
            else np.dtype(props)
        arrays[name] = np.frombuffer(data, dtype, count, offset)
        offset += dtype.itemsize * count
    v, f = arrays["vertex"], arrays["face"]
    if np.any(f["count"] != 3):
        raise ValueError("only triangle faces are supported")
    colors = np.stack([v[c] for c in ("red", "green", "blue")], 1) if "red" in v.dtype.names \
        else np.full((len(v), 3), 255)
    return Mesh(np.stack([v["x"], v["y"], v["z"]], 1), f["indices"], colors)


def _read_glb(data: bytes) -> Mesh:
    """The first primitive of a GLB: tightly packed POSITION, COLOR_0 and indices."""
    magic, version, length = struct.unpack_from("<III", data, 0)
    if magic != _GLB_MAGIC or version != 2 or length != len(data):
        raise ValueError("not a glTF 2.0 binary file (bad header)")
    json_len, _ = struct.unpack_from("<II", data, 12)
    document = json.loads(data[20:20 + json_len])
    bin_start = 20 + json_len + 8
    kinds = {_FLOAT: "<f4", _UBYTE: "u1", _USHORT: "<u2", _UINT: "<u4"}
    widths = {"SCALAR": 1, "VEC3": 3, "VEC4": 4}

    def accessor(index: int) -> np.ndarray:
        acc = document["accessors"][index]
        view = document["bufferViews"][acc["bufferView"]]
        if view.get("byteStride", 0) not in (0, np.dtype(kinds[acc["componentType"]]).itemsize * widths[acc["type"]]):
            raise ValueError("interleaved glTF buffers are not supported")
        start = bin_start + view.get("byteOffset", 0) + acc.get("byteOffset", 0)
        array = np.frombuffer(data, kinds[acc["componentType"]], acc["count"] * widths[acc["type"]], start)
        if acc.get("normalized"):
            array = array / np.iinfo(array.dtype).max
        return array.reshape(acc["count"], widths[acc["type"]])

    primitive = document["meshes"][0]["primitives"][0]
    vertices = accessor(primitive["attributes"]["POSITION"])
    if "COLOR_0" in primitive["attributes"]:
        colors = np.round(linear_to_srgb(accessor(primitive["attributes"]["COLOR_0"])[:, :3]) * 255)
    else:
        colors = np.full((len(vertices), 3), 255)
    return Mesh(vertices, accessor(primitive["indices"]).reshape(-1, 3), colors)


_READERS = {".obj": _read_obj, ".ply": _read_ply, ".glb": _read_glb}


def load_mesh(path) -> Mesh:
    """Read a mesh written by :meth:`Mesh.save` (.obj, .ply or .glb)."""
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"unknown mesh format {path.suffix!r} for {path}; use one of {MESH_SUFFIXES}")
    return reader(path.read_bytes())
