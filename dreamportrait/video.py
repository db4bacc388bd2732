"""Orbit videos: render cached tri-planes along a camera path and write H.264 / yuv420p mp4.

Frames are rendered with deterministic depth sampling (bin midpoints, evenly spaced importance
samples), so the same camera always gives the same pixels and orbits do not flicker. The camera
paths are EG3D's ``gen_videos.py`` ellipse (:func:`dreamportrait.cameras.eg3d_orbit`) and a yaw
sweep, looking at the generator's average camera pivot from its average radius.

yuv420p stores chroma at half resolution, so H.264 needs even frame sizes: odd widths/heights are
padded by one replicated row/column (never resized), and decoded videos are then one pixel larger.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import imageio_ffmpeg
import numpy as np
import torch
import torch.nn.functional as F

from .cameras import FFHQ_DATASET_FOCAL, camera_label, eg3d_orbit, yaw_sweep
from .checkpoints import atomic_file
from .grid import to_uint8

Progress = Callable[[int, int], None]
ORBITS = ("eg3d", "yaw")
OUTPUTS = ("image", "image_raw")


def _as_uint8_frames(frames) -> Iterator[np.ndarray]:
    """A (T, 3, H, W) tensor in [-1, 1] or an iterable of (H, W, 3) uint8 arrays -> uint8 arrays."""
    if isinstance(frames, torch.Tensor):
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"a frame tensor must have shape (T, 3, H, W) in [-1, 1], got {tuple(frames.shape)}")
        yield from to_uint8(frames)
        return
    for i, frame in enumerate(frames):
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"frame {i} must be an (H, W, 3) uint8 array, got {frame.dtype} {frame.shape}; "
                             "convert [-1, 1] images with dreamportrait.grid.to_uint8")
        yield frame


def _pad_even(frame: np.ndarray) -> np.ndarray:
    """Replicate the last row/column where the height/width is odd (yuv420p needs even sizes)."""
    h, w, _ = frame.shape
    if h % 2 or w % 2:
        frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return np.ascontiguousarray(frame)


def write_video(frames, path, fps: float = 30, quality: float = 7) -> Path:
    """Write frames as an H.264 (libx264, yuv420p) mp4, atomically (temp file, then rename).

    frames: an iterable of (H, W, 3) uint8 arrays (consumed lazily) or a (T, 3, H, W) tensor in
    [-1, 1]. quality: imageio-ffmpeg's 1-10 scale (7 -> x264 crf 15). Returns the path.
    """
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"video path must end in .mp4 (H.264 in MP4), got {path}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = _as_uint8_frames(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError("no frames to write; pass at least one frame")
    size = first.shape[:2]
    padded = _pad_even(first)
    with atomic_file(path) as tmp:
        writer = imageio_ffmpeg.write_frames(str(tmp), (padded.shape[1], padded.shape[0]), fps=fps, codec="libx264",
                                             pix_fmt_in="rgb24", pix_fmt_out="yuv420p", quality=quality,
                                             macro_block_size=2, output_params=["-movflags", "+faststart"])
        try:
            writer.send(None)
            writer.send(padded)
            for i, frame in enumerate(frames, start=1):
                if frame.shape[:2] != size:
                    raise ValueError(f"frame {i} is {frame.shape[:2]} but frame 0 is {size}; all frames need one size")
                writer.send(_pad_even(frame))
        finally:
            writer.close()
    return path


def orbit_cameras(G, num_frames: int, kind: str = "eg3d", max_yaw_deg: float = 30.0,
                  focal: float = FFHQ_DATASET_FOCAL) -> torch.Tensor:
    """(num_frames, 25) camera labels along EG3D's video ellipse ('eg3d') or a yaw sweep ('yaw')."""
    if kind not in ORBITS:
        raise ValueError(f"unknown orbit {kind!r}; choose one of {ORBITS}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    yaw, pitch = eg3d_orbit(num_frames) if kind == "eg3d" else yaw_sweep(num_frames, max_yaw_deg)
    return camera_label(yaw, pitch, focal, G.config.avg_camera_pivot, G.config.avg_camera_radius)


def render_orbit(G, planes: torch.Tensor, ws: torch.Tensor, num_frames: int = 60, kind: str = "eg3d",
                 resolution: int | None = None, upscale: int = 1, output: str = "image", batch_size: int = 4,
                 depth_multiplier: int = 1, max_yaw_deg: float = 30.0,
                 progress: Progress | None = None) -> Iterator[np.ndarray]:
    """(H, W, 3) uint8 frames of cached planes (1, 3, C, H, W) with ws (1, num_ws, w_dim) along an orbit.

    Arguments are checked now; frames are rendered lazily as the returned iterator is consumed,
    ``batch_size`` cameras at a time (bounding memory), with deterministic depth sampling.
    resolution: neural rendering resolution (None: the generator's). upscale: integer bilinear
    enlargement of each frame (e.g. for the tiny preset's 64-pixel output). output: 'image'
    (super-resolved) or 'image_raw' (the neural render). depth_multiplier: samples per ray x this
    (EG3D's videos use 2). ``progress(done_frames, num_frames)`` is called after every batch.
    """
    if planes.ndim != 5 or planes.shape[0] != 1 or ws.ndim != 3 or ws.shape[0] != 1:
        raise ValueError(f"render one subject at a time: planes (1, 3, C, H, W) and ws (1, num_ws, w_dim), "
                         f"got {tuple(planes.shape)} and {tuple(ws.shape)}")
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; choose one of {OUTPUTS}")
    if int(upscale) != upscale or upscale < 1 or batch_size < 1:
        raise ValueError(f"upscale and batch_size must be positive integers, got {upscale} and {batch_size}")
    cameras = orbit_cameras(G, num_frames, kind, max_yaw_deg).to(planes.device)
    return _render_frames(G, planes, ws, cameras, resolution, int(upscale), output, batch_size, depth_multiplier,
                          progress)


@torch.no_grad()
def _render_frames(G, planes, ws, cameras, resolution, upscale, output, batch_size, depth_multiplier, progress):
    total = cameras.shape[0]
    for start in range(0, total, batch_size):
        c = cameras[start:start + batch_size]
        n = c.shape[0]
        images = G.render(planes.expand(n, -1, -1, -1, -1), ws.expand(n, -1, -1), c, resolution,
                          deterministic=True, depth_multiplier=depth_multiplier)[output]
        if upscale > 1:
            images = F.interpolate(images.float(), scale_factor=upscale, mode="bilinear", align_corners=False)
        yield from to_uint8(images)
        if progress is not None:
            progress(start + n, total)


def orbit_video(G, planes: torch.Tensor, ws: torch.Tensor, path, num_frames: int = 60, fps: float = 30,
                kind: str = "eg3d", progress: Progress | None = None, **render_kwargs) -> Path:
    """Render an orbit of cached planes straight into an mp4 (frames stream; memory stays bounded).

    ``render_kwargs`` go to :func:`render_orbit` (resolution, upscale, output, batch_size, ...).
    """
    frames = render_orbit(G, planes, ws, num_frames, kind, progress=progress, **render_kwargs)
    return write_video(frames, path, fps)
