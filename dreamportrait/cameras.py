"""EG3D camera conventions: 25-d labels, look-at poses, camera rays, yaw/pitch and orbit paths.

World frame (EG3D's FFHQ): y up, the face looks toward +z, the frontal camera sits at +z.
Poses are OpenCV cam-to-world matrices (+x right, +y down, +z forward); intrinsics are
normalised by the image size. A camera label is ``concat(cam2world.flatten(), K.flatten())``.

Angles: EG3D's ``LookAtPoseSampler`` takes a horizontal angle h and a vertical angle v (both
pi/2 at the frontal view; v is mapped area-uniformly to the polar angle). The user-facing API
here takes yaw/pitch in degrees relative to the frontal view: positive yaw moves the camera
toward +x, positive pitch moves it up (it looks down on the face).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

FFHQ_PIVOT = (0.0, 0.0, 0.2)
FFHQ_RADIUS = 2.7
# Focal length in EG3D's FFHQ dataset labels and gen_videos.py (2985.29 / 700).
FFHQ_DATASET_FOCAL = 4.2647


def fov_to_focal(fov_degrees: float) -> float:
    """EG3D's ``FOV_to_intrinsics`` focal: f = 1 / (tan(fov * 3.14159 / 360) * 1.414).

    With 18.837 degrees this gives 4.2634, not the dataset's 4.2647; both stay reproducible.
    """
    return 1.0 / (math.tan(fov_degrees * 3.14159 / 360.0) * 1.414)


def intrinsics(focal: float = FFHQ_DATASET_FOCAL, batch: int = 1, device=None) -> torch.Tensor:
    """Normalised 3x3 intrinsics with principal point (0.5, 0.5), shape (batch, 3, 3)."""
    K = torch.tensor([[focal, 0.0, 0.5], [0.0, focal, 0.5], [0.0, 0.0, 1.0]], device=device)
    return K.unsqueeze(0).repeat(batch, 1, 1)


def cam2world_from_forward(forward: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
    """EG3D's ``create_cam2world_matrix``: columns (right, up, forward), world up = +y."""
    forward = torch.nn.functional.normalize(forward, dim=-1)
    up_world = torch.tensor([0.0, 1.0, 0.0], dtype=forward.dtype, device=forward.device).expand_as(forward)
    right = -torch.nn.functional.normalize(torch.cross(up_world, forward, dim=-1), dim=-1)
    up = torch.nn.functional.normalize(torch.cross(forward, right, dim=-1), dim=-1)
    pose = torch.eye(4, dtype=forward.dtype, device=forward.device).unsqueeze(0).repeat(forward.shape[0], 1, 1)
    pose[:, :3, :3] = torch.stack((right, up, forward), dim=-1)
    pose[:, :3, 3] = origin
    return pose


def lookat_pose(h: torch.Tensor, v: torch.Tensor, pivot: Sequence[float] = FFHQ_PIVOT,
                radius: float = FFHQ_RADIUS) -> torch.Tensor:
    """EG3D's ``LookAtPoseSampler`` without noise: (B,) angles in radians -> (B, 4, 4) cam2world.

    The camera sits on a sphere of ``radius`` around the world origin and looks at ``pivot``.
    """
    h = torch.as_tensor(h, dtype=torch.float32).reshape(-1)
    v = torch.as_tensor(v, dtype=torch.float32).reshape(-1)
    v = torch.clamp(v, 1e-5, math.pi - 1e-5)
    theta = h
    phi = torch.arccos(1 - 2 * v / math.pi)
    origin = torch.stack((radius * torch.sin(phi) * torch.cos(math.pi - theta),
                          radius * torch.cos(phi),
                          radius * torch.sin(phi) * torch.sin(math.pi - theta)), dim=-1)
    target = torch.tensor(pivot, dtype=torch.float32).expand_as(origin)
    return cam2world_from_forward(target - origin, origin)


def yaw_pitch_to_hv(yaw_deg, pitch_deg) -> tuple[torch.Tensor, torch.Tensor]:
    """Degrees relative to the frontal view -> EG3D's (h, v) sampler angles in radians."""
    yaw = torch.as_tensor(yaw_deg, dtype=torch.float32).reshape(-1)
    pitch = torch.as_tensor(pitch_deg, dtype=torch.float32).reshape(-1)
    return math.pi / 2 + torch.deg2rad(yaw), math.pi / 2 - torch.deg2rad(pitch)


def pose_from_yaw_pitch(yaw_deg, pitch_deg, pivot: Sequence[float] = FFHQ_PIVOT,
                        radius: float = FFHQ_RADIUS) -> torch.Tensor:
    """Cam2world (B, 4, 4) for yaw/pitch in degrees relative to the frontal view."""
    h, v = yaw_pitch_to_hv(yaw_deg, pitch_deg)
    return lookat_pose(h, v, pivot, radius)


def make_label(cam2world: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """(B, 4, 4) cam2world and (B, 3, 3) normalised intrinsics -> (B, 25) label."""
    return torch.cat((cam2world.reshape(-1, 16), K.reshape(-1, 9)), dim=1)


def split_label(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 25) label -> ((B, 4, 4) cam2world, (B, 3, 3) intrinsics)."""
    if c.ndim != 2 or c.shape[1] != 25:
        raise ValueError(f"camera labels must have shape (B, 25), got {tuple(c.shape)}; "
                         "build them with dreamportrait.cameras.camera_label")
    return c[:, :16].reshape(-1, 4, 4), c[:, 16:25].reshape(-1, 3, 3)


def camera_rays(c: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EG3D's ray sampler: (B, 25) labels -> ray origins and unit directions, both (B, R*R, 3).

    One ray per pixel centre ((i + 0.5) / R in normalised image coordinates), row-major: ray
    index = row * R + column, the column along camera +x (u) and the row along camera +y (v).
    The operation order is EG3D's, so rays match its renderer to the last bit.
    """
    cam2world, K = split_label(c)
    n = c.shape[0]
    fx, fy, cx, cy, sk = K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 0, 1]
    idx = torch.arange(resolution, dtype=torch.float32, device=c.device) / resolution + 0.5 / resolution
    v, u = torch.meshgrid(idx, idx, indexing="ij")
    u = u.reshape(1, -1).expand(n, -1)
    v = v.reshape(1, -1).expand(n, -1)
    fx, fy, cx, cy, sk = (t.unsqueeze(-1) for t in (fx, fy, cx, cy, sk))
    x_lift = (u - cx + cy * sk / fy - sk * v / fy) / fx
    y_lift = (v - cy) / fy
    ones = torch.ones_like(x_lift)
    cam_points = torch.stack((x_lift, y_lift, ones, ones), dim=-1)
    world = torch.bmm(cam2world, cam_points.permute(0, 2, 1)).permute(0, 2, 1)[:, :, :3]
    origin = cam2world[:, :3, 3]
    dirs = torch.nn.functional.normalize(world - origin[:, None, :], dim=2)
    return origin.unsqueeze(1).expand(-1, dirs.shape[1], -1).contiguous(), dirs


def camera_label(yaw_deg=0.0, pitch_deg=0.0, focal: float = FFHQ_DATASET_FOCAL,
                 pivot: Sequence[float] = FFHQ_PIVOT, radius: float = FFHQ_RADIUS) -> torch.Tensor:
    """(B, 25) labels for yaw/pitch in degrees (scalars or sequences)."""
    pose = pose_from_yaw_pitch(yaw_deg, pitch_deg, pivot, radius)
    return make_label(pose, intrinsics(focal, pose.shape[0]))


def label_to_yaw_pitch(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`camera_label`: recover yaw/pitch in degrees from the camera position."""
    pose, _ = split_label(c)
    origin = pose[:, :3, 3].double()
    r = origin.norm(dim=-1)
    phi = torch.arccos((origin[:, 1] / r).clamp(-1, 1))
    v = math.pi * (1 - torch.cos(phi)) / 2
    theta = math.pi - torch.atan2(origin[:, 2], origin[:, 0])
    yaw = torch.rad2deg(theta - math.pi / 2)
    pitch = torch.rad2deg(math.pi / 2 - v)
    return yaw.float(), pitch.float()


def yaw_sweep(num_frames: int, max_yaw_deg: float = 30.0, pitch_deg: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-to-right yaw sweep: (yaw, pitch) in degrees, each of shape (num_frames,)."""
    yaw = torch.linspace(-max_yaw_deg, max_yaw_deg, num_frames)
    return yaw, torch.full_like(yaw, pitch_deg)


def eg3d_orbit(num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EG3D gen_videos.py's ellipse as (yaw, pitch) in degrees relative to the frontal view.

    h = pi/2 + 0.35 sin(2 pi t / T), v = pi/2 - 0.05 + 0.25 cos(2 pi t / T).
    """
    t = torch.arange(num_frames, dtype=torch.float64) / num_frames * 2 * math.pi
    h = math.pi / 2 + 0.35 * torch.sin(t)
    v = math.pi / 2 - 0.05 + 0.25 * torch.cos(t)
    return torch.rad2deg(h - math.pi / 2).float(), torch.rad2deg(math.pi / 2 - v).float()
