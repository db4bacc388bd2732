"""Mesh extraction: a known density sphere must come out at the right place, size, orientation and colour.

The planes and decoder are hand-built so that raw sigma = T + K * (r^2 - |p - centre|^2) (a sphere of
radius r at the level T) and the red feature grows with x. An off-centre sphere catches axis-order,
flip and index-to-world mistakes; two box sizes catch box scaling mistakes.
"""
import itertools
import json
import struct

import numpy as np
import pytest
import torch

from dreamportrait.generator import TriPlaneGenerator, preset
from dreamportrait.mesh import (
    Mesh,
    density_grid,
    extract_mesh,
    grid_coordinates,
    load_mesh,
    vertex_normals,
)
from dreamportrait.triplane import plane_coordinate_axes

CENTRE = (0.05, -0.1, 0.12)
RADIUS = 0.25
THRESHOLD = 10.0
GAIN = 1000.0  # sigma units per squared world unit
RED_SLOPE = 4.0  # red logit per world unit of x
GREEN_LOGIT = -1.0
RESOLUTION = 48


def _set_linear(layer, weight: torch.Tensor, bias: torch.Tensor):
    """Give an equalised-lr layer the effective weight/bias (undoing its runtime gains)."""
    layer.weight.data = weight / layer.weight_gain
    layer.bias.data = bias / layer.bias_gain


def _axis_texels(resolution: int, box_warp: float) -> torch.Tensor:
    """World coordinate of each texel centre along a plane axis (grid_sample, align_corners=False)."""
    return ((torch.arange(resolution) + 0.5) / resolution * 2 - 1) * box_warp / 2


def _paint(plane: torch.Tensor, slot: int, values: torch.Tensor):
    """Fill a (H, W) plane with values along its width (slot 0) or height (slot 1) axis."""
    plane[:] = values[None, :] if slot == 0 else values[:, None]


def sphere_setup(box_warp: float):
    """A tiny generator whose decoder turns hand-made planes into the sphere field and an x-ramp red."""
    G = TriPlaneGenerator(preset("tiny", box_warp=box_warp)).eval()
    c, res = G.config.triplane_channels, G.config.triplane_resolution
    t = _axis_texels(res, box_warp)
    axes = plane_coordinate_axes()
    # One axis slot per plane such that the planes cover x, y and z once: the plane mean of channel 0
    # is then |p - centre|^2 / 3.
    slots = next(s for s in itertools.product((0, 1), repeat=3)
                 if sorted(axes[p][s[p]] for p in range(3)) == [0, 1, 2])
    planes = torch.zeros(1, 3, c, res, res)
    for p, slot in enumerate(slots):
        world_axis = axes[p][slot]
        _paint(planes[0, p, 0], slot, (t - CENTRE[world_axis]) ** 2)
    # Channel 1 carries x on the first plane that sees x: plane mean = x / 3.
    p, slot = next((p, s) for p in range(3) for s in range(2) if axes[p][s] == 0)
    _paint(planes[0, p, 1], slot, t)

    hidden = G.decoder.net[0].weight.shape[0]
    w1 = torch.zeros(hidden, c)
    w1[0, 0], w1[1, 0] = 1.0, -1.0  # softplus(m) - softplus(-m) = m: an exact linear pass-through
    w1[2, 1], w1[3, 1] = 1.0, -1.0
    _set_linear(G.decoder.net[0], w1, torch.zeros(hidden))
    w2 = torch.zeros(1 + c, hidden)
    w2[0, 0], w2[0, 1] = -3 * GAIN, 3 * GAIN  # sigma = T + K (r^2 - 3 m)
    w2[1, 2], w2[1, 3] = 3 * RED_SLOPE, -3 * RED_SLOPE  # red logit = slope * x
    b2 = torch.zeros(1 + c)
    b2[0] = THRESHOLD + GAIN * RADIUS ** 2
    b2[2] = GREEN_LOGIT
    _set_linear(G.decoder.net[2], w2, b2)
    return G, planes


def expected_red(x: np.ndarray) -> np.ndarray:
    feature = 1 / (1 + np.exp(-RED_SLOPE * x)) * 1.002 - 0.001
    return np.round(np.clip(feature * 255, 0, 255))


def test_sphere_construction_is_the_intended_field():
    """Guards the fixture: sigma and red at random points match the analytic field."""
    G, planes = sphere_setup(1.0)
    points = torch.rand(1, 500, 3) * 0.8 - 0.4
    out = G.sample_planes(planes, points)
    q = ((points[0] - torch.tensor(CENTRE)) ** 2).sum(-1)
    # Bilinear sampling of a quadratic is off by at most texel^2 / 4 per axis.
    bilinear_error = 3 * (1.0 / G.config.triplane_resolution) ** 2 / 4 * GAIN
    torch.testing.assert_close(out["sigma"][0, :, 0], THRESHOLD + GAIN * (RADIUS ** 2 - q),
                               atol=1.01 * bilinear_error, rtol=0)
    torch.testing.assert_close(out["rgb"][0, :, 0], torch.sigmoid(RED_SLOPE * points[0, :, 0]) * 1.002 - 0.001,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("box_warp", [1.0, 1.6])
def test_sphere_mesh_centre_radius_orientation_and_colour(box_warp):
    G, planes = sphere_setup(box_warp)
    calls = []
    mesh = extract_mesh(G, planes, resolution=RESOLUTION, threshold=THRESHOLD, chunk=50_000,
                        progress=lambda done, total: calls.append((done, total)))
    voxel = box_warp / (RESOLUTION - 1)
    centre = np.array(CENTRE)
    offset = mesh.vertices - centre
    dist = np.linalg.norm(offset, axis=1)

    # Position and size in world units. Measured errors are <= 0.06 voxel (centre) and <= 0.045 voxel
    # (radius); an x/z swap or an axis flip moves the centre by >= 3 voxels, and a box / N voxel size
    # instead of box / (N - 1) shrinks the radius by 0.25 voxel.
    assert np.abs(mesh.vertices.mean(0) - centre).max() < 0.25 * voxel
    assert abs(dist.mean() - RADIUS) < 0.08 * voxel
    assert np.abs(dist - RADIUS).max() < 0.15 * voxel
    # Faces wind counter-clockwise from outside (normals point away from the centre).
    tri = mesh.vertices[mesh.faces].astype(np.float64)
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area = np.linalg.norm(normals, axis=1)
    outward = (normals * (tri.mean(1) - centre)).sum(1) / np.maximum(area, 1e-30)
    assert np.all(outward[area > 1e-12] > 0)
    assert np.all((vertex_normals(mesh.vertices, mesh.faces) * offset / dist[:, None]).sum(1) > 0.9)
    # Colours: the rendered-image convention of the red feature at each vertex, constant green.
    assert np.abs(mesh.colors[:, 0].astype(int) - expected_red(mesh.vertices[:, 0])).max() <= 1
    right, left = offset[:, 0] > RADIUS / 2, offset[:, 0] < -RADIUS / 2
    assert mesh.colors[right, 0].mean() > mesh.colors[left, 0].mean() + 50
    green = round((1 / (1 + np.exp(-GREEN_LOGIT)) * 1.002 - 0.001) * 255)
    assert np.all(np.abs(mesh.colors[:, 1].astype(int) - green) <= 1)
    # Chunked evaluation reports every chunk and ends at the full grid.
    total = RESOLUTION ** 3
    assert calls[-1] == (total, total) and len(calls) == -(-total // 50_000)


def test_density_grid_is_x_slowest_z_fastest_in_world_units():
    """grid[i, j, k] = sigma(x_i, y_j, z_k) with x_i = -box/2 + i * box / (N - 1), independent of chunking."""
    torch.manual_seed(0)
    G = TriPlaneGenerator(preset("tiny", box_warp=1.2)).eval()
    planes = torch.randn(1, 3, G.config.triplane_channels, 64, 64)
    n = 9
    grid = density_grid(G, planes, resolution=n, chunk=100)
    assert grid.shape == (n, n, n)
    np.testing.assert_allclose(grid, density_grid(G, planes, resolution=n, chunk=n ** 3), rtol=0, atol=1e-5)
    ijk = torch.tensor([[0, 0, 0], [8, 0, 0], [0, 8, 0], [0, 0, 8], [2, 5, 7], [7, 1, 3]])
    points = (ijk.float() * 1.2 / (n - 1) - 0.6).unsqueeze(0)
    sigma = G.sample_planes(planes, points)["sigma"][0, :, 0].detach().numpy()
    np.testing.assert_allclose(grid[ijk[:, 0], ijk[:, 1], ijk[:, 2]], sigma, rtol=0, atol=1e-5)
    torch.testing.assert_close(grid_coordinates(torch.tensor([n ** 3 - 1, 2 * 81 + 5 * 9 + 7]), n, 1.2),
                               torch.tensor([[0.6, 0.6, 0.6], [-0.3, 0.15, 0.45]]))


def test_threshold_outside_density_range_names_the_fix():
    G, planes = sphere_setup(1.0)
    with pytest.raises(ValueError, match=r"too high: lower it below 71\.7"):
        extract_mesh(G, planes, resolution=16, threshold=1e6)
    with pytest.raises(ValueError, match=r"raise the threshold above -75.*border=1"):
        extract_mesh(G, planes, resolution=16, threshold=-1e6)


def test_border_trim_closes_a_surface_that_fills_the_box():
    """With every voxel inside, only the trimmed border makes a surface: a closed cube just inside the box.

    border=2 sets voxels 0-1 and 14-15 to -1000; with density ~1e5 inside, the level-10 crossing lies
    1% of a voxel past index 1 (and 14), i.e. at |coordinate| = 0.5 - 1.01 voxel on every face.
    """
    G, planes = sphere_setup(1.0)
    G.decoder.net[2].bias.data[0] += 1e5 / G.decoder.net[2].bias_gain  # density far above T everywhere
    mesh = extract_mesh(G, planes, resolution=16, threshold=THRESHOLD, border=2)
    voxel = 1.0 / 15
    np.testing.assert_allclose(mesh.vertices.max(0), 0.5 - 1.01 * voxel, atol=0.005 * voxel)
    np.testing.assert_allclose(mesh.vertices.min(0), -0.5 + 1.01 * voxel, atol=0.005 * voxel)


@pytest.fixture(scope="module")
def sphere_mesh() -> Mesh:
    G, planes = sphere_setup(1.0)
    return extract_mesh(G, planes, resolution=32, threshold=THRESHOLD)


@pytest.mark.parametrize("suffix", [".obj", ".ply", ".glb"])
def test_round_trip(tmp_path, sphere_mesh, suffix):
    path = sphere_mesh.save(tmp_path / f"sphere{suffix}")
    back = load_mesh(path)
    assert back.vertices.shape == sphere_mesh.vertices.shape
    np.testing.assert_allclose(back.vertices, sphere_mesh.vertices, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(back.faces, sphere_mesh.faces)
    np.testing.assert_array_equal(back.colors, sphere_mesh.colors)
    assert sphere_mesh.colors.std(0)[0] > 10  # the colours round-tripped are not a constant default
    assert [p.name for p in tmp_path.iterdir()] == [f"sphere{suffix}"]  # no temp files left behind


def test_glb_is_a_valid_gltf_container(tmp_path, sphere_mesh):
    """Header length, 4-byte chunk alignment, buffer size and POSITION min/max as glTF 2.0 requires."""
    data = sphere_mesh.save(tmp_path / "s.glb").read_bytes()
    magic, version, length = struct.unpack_from("<4sII", data)
    assert (magic, version, length) == (b"glTF", 2, len(data))
    json_len, json_type = struct.unpack_from("<I4s", data, 12)
    bin_len, bin_type = struct.unpack_from("<I4s", data, 20 + json_len)
    assert (json_type, bin_type) == (b"JSON", b"BIN\0")
    assert json_len % 4 == 0 and bin_len % 4 == 0 and 28 + json_len + bin_len == len(data)
    doc = json.loads(data[20:20 + json_len])
    assert doc["asset"]["version"] == "2.0" and doc["buffers"][0]["byteLength"] == bin_len
    prim = doc["meshes"][0]["primitives"][0]
    position = doc["accessors"][prim["attributes"]["POSITION"]]
    assert position["min"] == sphere_mesh.vertices.min(0).tolist()
    assert position["max"] == sphere_mesh.vertices.max(0).tolist()
    assert {"POSITION", "NORMAL", "COLOR_0"} <= set(prim["attributes"])
    for view in doc["bufferViews"]:
        assert view["byteOffset"] % 4 == 0 and view["byteOffset"] + view["byteLength"] <= bin_len


def test_bad_saves_name_the_problem(tmp_path, sphere_mesh):
    with pytest.raises(ValueError, match=r"unknown mesh format '\.stl'.*\.obj"):
        sphere_mesh.save(tmp_path / "s.stl")
    empty = Mesh(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match="empty.*lower threshold"):
        empty.save(tmp_path / "e.glb")
    with pytest.raises(ValueError, match="one RGB colour per vertex"):
        Mesh(np.zeros((4, 3)), np.zeros((1, 3)), np.zeros((3, 3)))
