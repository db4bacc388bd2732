"""EG3D camera conventions: frontal pose, focal lengths, yaw/pitch round trip, orbits."""
import math

import torch

from dreamportrait import cameras as C


def test_frontal_pose_is_eg3d_ffhq_frontal():
    label = C.camera_label(0.0, 0.0)
    pose, K = C.split_label(label)
    expected = torch.tensor([[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 2.7], [0, 0, 0, 1.0]])
    torch.testing.assert_close(pose[0], expected, atol=1e-6, rtol=0)
    assert abs(K[0, 0, 0].item() - C.FFHQ_DATASET_FOCAL) < 1e-6 and K[0, 0, 2].item() == 0.5


def test_two_focal_lengths_reproducible():
    assert abs(C.fov_to_focal(18.837) - 4.2634) < 5e-5
    assert C.FFHQ_DATASET_FOCAL == 4.2647
    # The dataset focal corresponds to a 13.37 degree horizontal field of view.
    assert abs(math.degrees(2 * math.atan(0.5 / C.FFHQ_DATASET_FOCAL)) - 13.37) < 0.01


def test_yaw_pitch_round_trip_and_directions():
    yaw = torch.tensor([-40.0, -10.0, 0.0, 25.0, 50.0])
    pitch = torch.tensor([-20.0, 5.0, 0.0, 15.0, -5.0])
    label = C.camera_label(yaw, pitch)
    y2, p2 = C.label_to_yaw_pitch(label)
    torch.testing.assert_close(y2, yaw, atol=1e-3, rtol=0)
    torch.testing.assert_close(p2, pitch, atol=1e-3, rtol=0)
    pose, _ = C.split_label(label)
    origin = pose[:, :3, 3]
    # Positive yaw moves the camera toward +x, positive pitch moves it up (+y).
    assert origin[4, 0] > 0 > origin[0, 0]
    assert origin[3, 1] > 0 > origin[0, 1]
    torch.testing.assert_close(origin.norm(dim=1), torch.full((5,), 2.7), atol=1e-5, rtol=0)
    # Every camera looks at the pivot: the forward column points from the origin to it.
    to_pivot = torch.nn.functional.normalize(torch.tensor(C.FFHQ_PIVOT) - origin, dim=1)
    torch.testing.assert_close(pose[:, :3, 2], to_pivot, atol=1e-5, rtol=0)
    R = pose[:, :3, :3]
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(3).expand(5, 3, 3), atol=1e-5, rtol=0)


def test_eg3d_video_orbit_ellipse():
    yaw, pitch = C.eg3d_orbit(120)
    assert yaw.shape == (120,)
    # yaw = 0.35 rad * sin, pitch = 0.05 rad - 0.25 rad * cos (pitch up positive).
    assert abs(yaw.max().item() - math.degrees(0.35)) < 0.01
    assert abs(pitch[0].item() - math.degrees(0.05 - 0.25)) < 1e-3
    assert abs(pitch[60].item() - math.degrees(0.05 + 0.25)) < 1e-3
