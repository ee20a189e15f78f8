"""LiDAR depth targets of the Lift-Splat depth distribution (e2r.depth): points land on the feature pixels and
depth bins the camera model says, the nearest point of a pixel wins, points behind the camera or beyond the
lift's range give none; on KITTI's calibration the targets agree with KITTI's own projection formula; the
cross-entropy of a sample is the mean over its pixels that have a target."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from e2r.data.calib import calib_from_kitti, scale_intrinsics
from e2r.data.readers import cameras_from_doc
from e2r.depth import NO_DEPTH, depth_cross_entropy, lidar_depth_bins

BINS = (2.0, 50.0, 1.0)        # 48 bins: bin k = depth 2 + k
# a forward camera 1.5 m up at the ego origin: camera x right = ego -y, y down = ego -z, z forward = ego x
CAM2EGO = torch.tensor([[0.0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 1.5], [0, 0, 0, 1]], dtype=torch.float64)
K_FEAT = torch.tensor([[16.0, 0, 15.5], [0, 16.0, 7.5], [0, 0, 1]], dtype=torch.float64)      # a 32x16 map


def _ego_point(u: float, v: float, depth: float) -> list[float]:
    """The ego point seen at feature pixel (u, v) at z-depth ``depth``."""
    cam = torch.linalg.inv(K_FEAT) @ torch.tensor([u, v, 1.0], dtype=torch.float64) * depth
    return (CAM2EGO[:3, :3] @ cam + CAM2EGO[:3, 3]).tolist()


def test_points_land_on_their_pixel_and_bin_and_the_nearest_wins():
    pts = torch.tensor([_ego_point(3, 4, 10.0), _ego_point(3, 4, 20.0),      # the same pixel: 10 m wins
                        _ego_point(20.3, 9.2, 7.4),                          # rounds to pixel (20, 9), bin 5
                        _ego_point(31, 15, 49.4),                            # the last bin, corner pixel
                        _ego_point(10, 10, 1.0),                             # nearer than the first bin
                        _ego_point(12, 3, 60.0),                             # beyond the last bin
                        _ego_point(40, 3, 10.0)])                            # off the map
    behind = torch.tensor([[-5.0, 0.0, 1.5]])                                # behind the camera
    target = lidar_depth_bins(torch.cat([pts, behind]), K_FEAT[None], CAM2EGO[None], (16, 32), BINS)
    assert target.shape == (1, 16, 32) and target.dtype == torch.uint8
    want = torch.full((16, 32), NO_DEPTH, dtype=torch.uint8)
    want[4, 3], want[9, 20], want[15, 31] = 8, 5, 47
    assert torch.equal(target[0], want)
    # a second camera looking backwards sees none of them but the one behind
    back = CAM2EGO.clone()
    back[:3, :3] = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)) @ CAM2EGO[:3, :3]
    two = lidar_depth_bins(torch.cat([pts, behind]), K_FEAT.expand(2, 3, 3), torch.stack([CAM2EGO, back]),
                           (16, 32), BINS)
    assert torch.equal(two[0], want) and two[1][two[1] != NO_DEPTH].tolist() == [3]          # 5 m on its axis
    with pytest.raises(ValueError, match="one byte"):
        lidar_depth_bins(pts, K_FEAT[None], CAM2EGO[None], (16, 32), (1.0, 300.0, 1.0))


def test_targets_on_a_kitti_rig_agree_with_kittis_projection_formula():
    """KITTI calibration with a rectifying rotation and a full P2 (the velodyne is the ego frame): each
    velodyne point's target is at the feature pixel and z-depth that P2 R0_rect Tr_velo_to_cam gives."""
    fx, a = 721.5, 0.02
    R0 = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    Tr = np.array([[0.0, -1, 0, 0.01], [0, 0, -1, -0.08], [1, 0, 0, -0.27]])
    P2 = np.array([[fx, 0, 609.6, 44.85], [0, fx, 172.9, 0.21], [0, 0, 1, 0.0027]])
    text = "".join(f"{name}: {' '.join(repr(float(x)) for x in m.ravel())}\n"
                   for name, m in (("P0", P2), ("P2", P2), ("R0_rect", R0), ("Tr_velo_to_cam", Tr)))
    (cam,) = cameras_from_doc(calib_from_kitti(text, "calib.txt", (1242, 375)), "calib.txt")
    h, w = 24, 78                                          # the 1242x375 image at stride 16
    K_feat = torch.tensor(scale_intrinsics(cam.K, w / 1242, h / 375))
    rng = np.random.default_rng(0)
    velo = np.c_[rng.uniform(5, 45, 400), rng.uniform(-15, 15, 400), rng.uniform(-1.5, 1.0, 400)]
    target = lidar_depth_bins(torch.tensor(velo), K_feat[None], torch.tensor(cam.cam2ego)[None], (h, w), BINS)[0]
    R0_4, Tr_4 = np.eye(4), np.eye(4)
    R0_4[:3, :3], Tr_4[:3] = R0, Tr
    proj = (P2 @ R0_4 @ Tr_4 @ np.c_[velo, np.ones(len(velo))].T).T
    z = proj[:, 2]                                         # camera 2's z-depth (P2's third row)
    u = np.round((proj[:, 0] / z + 0.5) * (w / 1242) - 0.5).astype(int)
    v = np.round((proj[:, 1] / z + 0.5) * (h / 375) - 0.5).astype(int)
    nearest: dict[tuple[int, int], float] = {}
    for ui, vi, zi in zip(u, v, z):
        if 0 <= ui < w and 0 <= vi < h and 1.5 <= zi < 49.5:
            nearest[(vi, ui)] = min(zi, nearest.get((vi, ui), np.inf))
    assert len(nearest) > 100
    want = torch.full((h, w), NO_DEPTH, dtype=torch.uint8)
    for (vi, ui), zi in nearest.items():
        want[vi, ui] = int(round(zi - 2.0))
    assert torch.equal(target, want)


def test_depth_cross_entropy_is_per_sample_over_its_labelled_pixels():
    target = torch.full((3, 2, 3, 4), NO_DEPTH, dtype=torch.uint8)        # B=3 samples, N=2 frames x cameras
    target[0, 1, 1, 2], target[1, 0, 0, 0], target[1, 1, 2, 3] = 3, 0, 4     # sample 2: no target at all
    logits = torch.zeros(3, 2, 5, 3, 4, requires_grad=True)
    per = depth_cross_entropy(logits.softmax(2), target)
    assert per.shape == (3,) and torch.allclose(per.detach(), torch.tensor([math.log(5), math.log(5), 0.0]))
    per.sum().backward()
    assert logits.grad[0, 1, :, 1, 2].abs().sum() > 0 and logits.grad[0, 0].abs().sum() == 0
    assert logits.grad[2].abs().sum() == 0
    sure = torch.full((3, 2, 5, 3, 4), -30.0)
    sure[0, 1, 3, 1, 2] = sure[1, 0, 0, 0, 0] = sure[1, 1, 4, 2, 3] = 30.0
    assert float(depth_cross_entropy(sure.softmax(2), target).max()) < 1e-6
    wrong = torch.full((3, 2, 5, 3, 4), -30.0)
    wrong[:, :, 1] = 30.0                                                  # always bin 1
    assert float(depth_cross_entropy(wrong.softmax(2), target)[0]) > 10
    with pytest.raises(ValueError, match="target"):
        depth_cross_entropy(torch.rand(3, 2, 5, 3, 4), target[:1])
