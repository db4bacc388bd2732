"""Orbit videos: decodable H.264/yuv420p mp4 with the right frames, sizes and order; atomic writes."""
import imageio_ffmpeg
import numpy as np
import pytest
import torch

from dreamportrait.generator import TriPlaneGenerator, preset
from dreamportrait.grid import to_uint8
from dreamportrait.video import orbit_video, render_orbit, write_video

FRAMES = 8


def decode(path):
    """(metadata, list of (H, W, 3) uint8 frames) read back with ffmpeg."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    return meta, [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in reader]


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def subject():
    """A tiny random generator's ws and planes; the planes are scaled x4 so the random density field
    is opaque and structured enough that the neural render changes visibly along the orbit. The
    random field is the one of the tiny preset's earlier decoder and depth sampling (64 hidden,
    16+16 samples), whose structure these tests were written against."""
    torch.manual_seed(0)
    G = TriPlaneGenerator(preset("tiny", decoder_hidden=64, depth_resolution=16, depth_resolution_importance=16)).eval()
    with torch.no_grad():
        ws = G.mapping(torch.randn(1, G.config.z_dim), G.conditioning_label())
        planes = G.synthesize_planes(ws, noise_mode="const") * 4
    return G, planes, ws


def test_orbit_video_decodes_to_the_rendered_frames_in_order(tmp_path, subject):
    G, planes, ws = subject
    kwargs = dict(output="image_raw", resolution=16, upscale=4)  # 16^2 neural render enlarged to 64^2
    calls = []
    frames = list(render_orbit(G, planes, ws, FRAMES, batch_size=3, progress=lambda *a: calls.append(a), **kwargs))
    assert calls == [(3, FRAMES), (6, FRAMES), (FRAMES, FRAMES)]
    assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in frames)
    # Deterministic depth sampling: the same cameras give the same pixels whatever the batching.
    again = list(render_orbit(G, planes, ws, FRAMES, batch_size=FRAMES, **kwargs))
    assert max(np.abs(a.astype(int) - b).max() for a, b in zip(frames, again)) <= 1

    path = orbit_video(G, planes, ws, tmp_path / "orbit.mp4", num_frames=FRAMES, fps=12, **kwargs)
    meta, decoded = decode(path)
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert meta["size"] == (64, 64) and meta["fps"] == 12
    assert len(decoded) == FRAMES
    # Each decoded frame is its own rendered frame up to compression, and neighbours differ by more
    # than that: the camera really moves, in order.
    err = np.array([[mean_abs(d, f) for f in frames] for d in decoded])
    assert np.diag(err).max() < 4
    off_diagonal = err + np.diag(np.full(FRAMES, np.inf))
    assert np.all(off_diagonal.min(1) > 2 * np.diag(err))
    assert [p.name for p in tmp_path.iterdir()] == ["orbit.mp4"]


def test_yaw_sweep_moves_the_subject_across_the_frame(subject):
    """The yaw sweep's end frames differ from each other far more than neighbouring frames do."""
    G, planes, ws = subject
    frames = list(render_orbit(G, planes, ws, 5, kind="yaw", output="image_raw", resolution=16, batch_size=5))
    assert mean_abs(frames[0], frames[-1]) > 2 * mean_abs(frames[1], frames[2]) > 0


def test_tensor_frames_with_odd_size_are_padded_not_resized(tmp_path):
    """(T, 3, 33, 47) in [-1, 1] -> the exact picture inside a 48x34 video, last row/column replicated.

    A grey 4-pixel checker survives yuv420p nearly losslessly (measured error 0.5 levels); resizing
    to 48x34 instead would smear its edges (measured error 40 levels).
    """
    t, h, w = 5, 33, 47
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    checker = ((yy // 4 + xx // 4) % 2).float() * 1.2 - 0.6
    frames = torch.stack([(checker - 0.3 + 0.15 * i).expand(3, h, w) for i in range(t)])
    meta, decoded = decode(write_video(frames, tmp_path / "odd.mp4", fps=5))
    assert meta["size"] == (w + 1, h + 1) and len(decoded) == t
    for d, e in zip(decoded, to_uint8(frames)):  # frames stay in order: each has its own brightness
        assert mean_abs(d[:h, :w], e) < 1.5
        assert mean_abs(d[:h, w], e[:, -1]) < 1.5 and mean_abs(d[h, :w], e[-1]) < 1.5


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "keep.mp4"
    path.write_bytes(b"previous video")

    def frames():
        yield np.zeros((16, 16, 3), np.uint8)
        yield np.zeros((16, 16, 3), np.uint8)
        raise RuntimeError("renderer crashed")

    with pytest.raises(RuntimeError, match="renderer crashed"):
        write_video(frames(), path)
    with pytest.raises(ValueError, match="frame 1 is .* all frames need one size"):
        write_video([np.zeros((16, 16, 3), np.uint8), np.zeros((16, 18, 3), np.uint8)], path)
    assert path.read_bytes() == b"previous video"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.mp4"]


def test_bad_inputs_name_the_fix(tmp_path, subject):
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8.*to_uint8"):
        write_video([np.zeros((8, 8, 3), np.float32)], tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="no frames"):
        write_video([], tmp_path / "a.mp4")
    with pytest.raises(ValueError, match=r"\.mp4"):
        write_video([np.zeros((8, 8, 3), np.uint8)], tmp_path / "a.avi")
    G, planes, ws = subject
    with pytest.raises(ValueError, match="unknown orbit 'spiral'"):
        render_orbit(G, planes, ws, 4, kind="spiral")
    with pytest.raises(ValueError, match="one subject at a time"):
        render_orbit(G, planes.expand(2, -1, -1, -1, -1), ws.expand(2, -1, -1), 4)
