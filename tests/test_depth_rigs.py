"""LiDAR depth targets on real rigs: a KITTI frame's and a nuScenes frame's calibration (values as published:
KITTI object training 000000 calib.txt; nuScenes v1.0 calibrated_sensor of CAM_FRONT and LIDAR_TOP) imported with
``pipelines.import_calib`` into a segment, points written in the LiDAR's own frame, and the targets the export
computes (``export_plan.DepthSpec`` on the LiDAR dataset's points, the tiny student's 128x64 input and 32x16 feature
map) land on the feature pixels and depth bins that each dataset's OWN projection (KITTI: P2 R0_rect Tr_velo_to_cam;
nuScenes: sensor -> ego -> camera with its quaternions, then the camera intrinsic) puts them on in the original image."""
from __future__ import annotations

import json

import numpy as np
import torch

from e2r.data.datasets import LidarFrameDataset
from e2r.depth import NO_DEPTH, depth_grid
from e2r.models.student_config import StudentConfig
from e2r.sim.tiny import write_tiny_dataset
from e2r.workflow.export_plan import DepthSpec, split_rigs
from pipelines.import_calib import main as import_calib
from tests.fixtures import read_csv_rows, write_points_bin

KITTI_000000 = """P0: 7.215377e+02 0.000000e+00 6.095593e+02 0.000000e+00 0.000000e+00 7.215377e+02 1.728540e+02 0.000000e+00 0.000000e+00 0.000000e+00 1.000000e+00 0.000000e+00
P1: 7.215377e+02 0.000000e+00 6.095593e+02 -3.875744e+02 0.000000e+00 7.215377e+02 1.728540e+02 0.000000e+00 0.000000e+00 0.000000e+00 1.000000e+00 0.000000e+00
P2: 7.215377e+02 0.000000e+00 6.095593e+02 4.485728e+01 0.000000e+00 7.215377e+02 1.728540e+02 2.163791e-01 0.000000e+00 0.000000e+00 1.000000e+00 2.745884e-03
P3: 7.215377e+02 0.000000e+00 6.095593e+02 -3.395242e+02 0.000000e+00 7.215377e+02 1.728540e+02 2.199936e+00 0.000000e+00 0.000000e+00 1.000000e+00 2.729905e-03
R0_rect: 9.999239e-01 9.837760e-03 -7.445048e-03 -9.869795e-03 9.999421e-01 -4.278459e-03 7.402527e-03 4.351614e-03 9.999631e-01
Tr_velo_to_cam: 7.533745e-03 -9.999714e-01 -6.166020e-04 -4.069766e-03 1.480249e-02 7.280733e-04 -9.998902e-01 -7.631618e-02 9.998621e-01 7.523790e-03 1.480755e-02 -2.717806e-01
Tr_imu_to_velo: 9.999976e-01 7.553071e-04 -2.035826e-03 -8.086759e-01 -7.854027e-04 9.998898e-01 -1.482298e-02 3.195559e-01 2.024406e-03 1.482454e-02 9.998881e-01 -7.997231e-01
"""
NUSCENES = {
    "lidar": {"token": "l", "sensor_token": "s", "translation": [0.943713, 0.0, 1.84023],
              "rotation": [0.7077955119163518, -0.006492242056004365, 0.010646214713995808, -0.7063073142877817],
              "camera_intrinsic": []},
    "cameras": {"CAM_FRONT": {"translation": [1.70079118954, 0.0159456324149, 1.51095763913],
                              "rotation": [0.4998015430569128, -0.5030316162024876, 0.4997798114386805,
                                           -0.49737083824542755],
                              "camera_intrinsic": [[1266.417203046554, 0.0, 816.2670197447984],
                                                   [0.0, 1266.417203046554, 491.50706579294757], [0.0, 0.0, 1.0]]}}}
STUDENT = StudentConfig.preset_named("tiny")           # input 128x64, feature map 32x16, bins 2..50 m by 2 m


def _quat(q) -> np.ndarray:
    """nuScenes' (w, x, y, z) unit quaternion -> rotation matrix (the textbook formula, written out)."""
    w, x, y, z = np.asarray(q, np.float64) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _segment(tmp_path, kind: str, source, image_size: str, points: np.ndarray):
    """A one-segment dataset whose camera/calib.json is imported from ``source`` and whose frame 0 holds ``points``
    (N, 4) in the LiDAR's frame -> (its root, the depth targets the export computes for frame 0)."""
    root = write_tiny_dataset(tmp_path / "d", splits={"train": 1}, frames=2)
    seg = root / "train" / "segment_0000"
    (seg / "camera" / "calib.json").unlink()
    assert import_calib([kind, str(source), str(seg / "camera" / "calib.json"), "--image_size", image_size]) == 0
    write_points_bin(seg / read_csv_rows(seg / "meta" / "data.csv")[0]["lidar_filepath"], points)
    frames = LidarFrameDataset(root, "train", lidar_num_features=4)
    spec = DepthSpec(depth_grid(STUDENT), (1, *STUDENT.feat_hw), split_rigs(root, "train"))
    return spec.targets("segment_0000", frames[0]["points"])[0]


def _expected(u: np.ndarray, v: np.ndarray, z: np.ndarray, image_wh: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """Targets from image pixels (u, v) (pixel centres at integers) and z-depths: the feature pixel whose image
    area holds the point (edges aligned, `scale_intrinsics`' convention), the nearest point per pixel, its bin."""
    (h, w), (W, H) = STUDENT.feat_hw, image_wh
    uf, vf = (u + 0.5) * w / W - 0.5, (v + 0.5) * h / H - 0.5
    d_min, _, step = STUDENT.depth_bins
    b = (z - d_min) / step
    n_bins = depth_grid(STUDENT)["n_bins"]
    ties = (np.abs(uf - np.round(uf) - 0.5) < 1e-3) | (np.abs(vf - np.round(vf) - 0.5) < 1e-3) \
        | (np.abs(b - np.round(b) - 0.5) < 1e-3)
    assert ties.sum() < 0.01 * len(u) + 3          # points on a rounding boundary are rare
    uf, vf, bi = np.round(uf).astype(int), np.round(vf).astype(int), np.round(b).astype(int)
    nearest: dict[tuple[int, int], float] = {}
    for ui, vi, bb, zi in zip(uf, vf, bi, z):
        if zi > 0 and 0 <= ui < w and 0 <= vi < h and 0 <= bb < n_bins:
            nearest[(vi, ui)] = min(zi, nearest.get((vi, ui), np.inf))
    want = torch.full((h, w), NO_DEPTH, dtype=torch.uint8)
    for (vi, ui), zi in nearest.items():
        want[vi, ui] = int(round((zi - d_min) / step))
    return want, int(ties.sum())


def _compare(got: torch.Tensor, want: torch.Tensor, ties: int) -> None:
    assert (want != NO_DEPTH).sum() > 150
    assert int((got != want).sum()) <= ties, (got != want).nonzero()


def test_kitti_frame_targets_land_where_p2_r0_tr_projects(tmp_path):
    src = tmp_path / "000000.txt"
    src.write_text(KITTI_000000)
    rng = np.random.default_rng(0)
    velo = np.c_[rng.uniform(3, 52, 3000), rng.uniform(-25, 25, 3000), rng.uniform(-1.7, 2.5, 3000),
                 rng.uniform(0, 1, 3000)].astype(np.float32)
    got = _segment(tmp_path, "kitti", src, "1242x375", velo)
    mats = {line.split(":")[0]: np.array(line.split()[1:], np.float64) for line in KITTI_000000.splitlines()}
    P2, R0, Tr = mats["P2"].reshape(3, 4), np.eye(4), np.eye(4)
    R0[:3, :3], Tr[:3] = mats["R0_rect"].reshape(3, 3), mats["Tr_velo_to_cam"].reshape(3, 4)
    proj = (P2 @ R0 @ Tr @ np.c_[velo[:, :3].astype(np.float64), np.ones(len(velo))].T).T
    z = proj[:, 2]
    want, ties = _expected(proj[:, 0] / z, proj[:, 1] / z, z, (1242, 375))
    _compare(got, want, ties)


def test_nuscenes_frame_targets_land_where_the_cam_front_intrinsic_projects(tmp_path):
    src = tmp_path / "records.json"
    src.write_text(json.dumps(NUSCENES))
    rng = np.random.default_rng(1)
    # LIDAR_TOP's frame: y forward, x right, z up
    lidar = np.c_[rng.uniform(-25, 25, 3000), rng.uniform(3, 52, 3000), rng.uniform(-2.0, 2.0, 3000),
                  rng.uniform(0, 1, 3000)].astype(np.float32)
    got = _segment(tmp_path, "nuscenes", src, "1600x900", lidar)
    rec_l, rec_c = NUSCENES["lidar"], NUSCENES["cameras"]["CAM_FRONT"]
    ego = lidar[:, :3].astype(np.float64) @ _quat(rec_l["rotation"]).T + rec_l["translation"]
    cam = (ego - rec_c["translation"]) @ _quat(rec_c["rotation"])      # R^T (p - t), row vectors
    pix = cam @ np.array(rec_c["camera_intrinsic"]).T
    z = cam[:, 2]
    want, ties = _expected(pix[:, 0] / z, pix[:, 1] / z, z, (1600, 900))
    _compare(got, want, ties)
