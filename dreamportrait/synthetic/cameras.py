"""FFHQ-like camera poses for the synthetic world, as EG3D 25-d labels.

Yaw follows a normal distribution (std 16 degrees, so about 97 % of views lie within +-35
degrees), clipped at +-50; pitch a normal distribution (std 5 degrees) clipped at +-15. The
camera sits on EG3D's FFHQ sphere (radius 2.7 around the origin) looking at the FFHQ pivot
(0, 0, 0.2) with the dataset focal length 4.2647, like the labels of EG3D's FFHQ data set.
Jitter of the radius and pivot is off by default (FFHQ's labels are all at radius 2.7).
"""
from __future__ import annotations

import numpy as np
import torch

from dreamportrait.cameras import (FFHQ_DATASET_FOCAL, FFHQ_PIVOT, FFHQ_RADIUS, camera_label,
                                   intrinsics, make_label, pose_from_yaw_pitch)

YAW_STD, YAW_LIMIT = 16.0, 50.0
PITCH_STD, PITCH_LIMIT = 5.0, 15.0


def sample_yaw_pitch(rng: np.random.Generator, num: int) -> tuple[np.ndarray, np.ndarray]:
    """``num`` (yaw, pitch) pairs in degrees relative to the frontal view."""
    yaw = np.clip(rng.normal(0.0, YAW_STD, num), -YAW_LIMIT, YAW_LIMIT)
    pitch = np.clip(rng.normal(0.0, PITCH_STD, num), -PITCH_LIMIT, PITCH_LIMIT)
    return yaw, pitch


def sample_labels(rng: np.random.Generator, num: int, radius_jitter: float = 0.0,
                  pivot_jitter: float = 0.0) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """``num`` FFHQ-like labels (num, 25) with their yaw and pitch in degrees.

    ``radius_jitter`` is the relative std of the camera radius, ``pivot_jitter`` the std of
    each pivot coordinate (world units); with both 0 every camera is at radius 2.7 looking
    at (0, 0, 0.2).
    """
    if radius_jitter < 0 or pivot_jitter < 0:
        raise ValueError("camera jitter must be >= 0")
    yaw, pitch = sample_yaw_pitch(rng, num)
    if radius_jitter == 0 and pivot_jitter == 0:
        return camera_label(yaw.tolist(), pitch.tolist()), yaw, pitch
    radius = FFHQ_RADIUS * (1.0 + radius_jitter * rng.standard_normal(num))
    pivot = np.asarray(FFHQ_PIVOT) + pivot_jitter * rng.standard_normal((num, 3))
    poses = torch.cat([pose_from_yaw_pitch(float(y), float(p), tuple(c), float(r))
                       for y, p, c, r in zip(yaw, pitch, pivot, radius)])
    return make_label(poses, intrinsics(FFHQ_DATASET_FOCAL, num)), yaw, pitch
