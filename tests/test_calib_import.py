"""``python -m pipelines.import_calib`` and the LiDAR extrinsic end to end: hand-made KITTI / nuScenes files whose
expected matrices are worked out by hand here (not with the converter's formulas), read back by the datasets."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from e2r.data.datasets import LidarSequenceDataset, PairedSequenceDataset
from e2r.data.readers import read_calib
from pipelines.import_calib import main
from tests.fixtures import read_csv_rows, write_points_bin, write_tiny_dataset

S = math.sqrt(0.5)
# a y-forward LiDAR (nuScenes LIDAR_TOP-like): its +y axis points along the car's +x, i.e. rotated -90 deg about z
LIDAR_RECORD = {"token": "l", "sensor_token": "s", "translation": [0.9, 0.1, 1.8], "rotation": [S, 0.0, 0.0, -S],
                "camera_intrinsic": []}
# a forward camera: camera z (optical axis) -> ego +x, camera x (right) -> ego -y, camera y (down) -> ego -z
CAMERA_RECORD = {"translation": [1.5, 0.2, 1.6], "rotation": [0.5, -0.5, 0.5, -0.5],
                 "camera_intrinsic": [[1266.4, 0.0, 816.3], [0.0, 1266.4, 491.5], [0.0, 0.0, 1.0]]}
FX, BASELINE = 700.0, 0.06


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def write_records(path, lidar=LIDAR_RECORD, cameras=None):
    doc = {"lidar": lidar} if cameras is None else {"lidar": lidar, "cameras": cameras}
    path.write_text(json.dumps(doc))
    return path


def kitti_text(P2=None, R0="1 0 0 0 1 0 0 0 1", Tr="0 -1 0 0 0 0 -1 -0.08 1 0 0 -0.27", tracking=False) -> str:
    """KITTI object calib (tracking format: no colons, R_rect / Tr_velo_cam). Tr: velodyne (x fwd, y left, z up)
    -> camera 0 (x right, y down, z fwd), the camera 0.27 m ahead of and 0.08 m below the velodyne."""
    P2 = P2 or f"{FX} 0 600 {FX * BASELINE} 0 {FX} 180 0 0 0 1 0"
    names = ("P2", "R_rect", "Tr_velo_cam") if tracking else ("P2:", "R0_rect:", "Tr_velo_to_cam:")
    return (f"P0{'' if tracking else ':'} {FX} 0 600 0 0 {FX} 180 0 0 0 1 0\n{names[0]} {P2}\n{names[1]} {R0}\n"
            f"{names[2]} {Tr}\nTr_imu_to_velo: 1 0 0 0 0 1 0 0 0 0 1 0\n")


def test_nuscenes_y_forward_lidar_and_camera(tmp_path, capsys):
    src = write_records(tmp_path / "records.json", cameras={"CAM_FRONT": CAMERA_RECORD})
    out = tmp_path / "seg" / "camera" / "calib.json"
    code, printed, err = run(capsys, "nuscenes", src, out, "--image_size", "1600x900", "--ground_z", "0")
    assert code == 0, err
    assert f"wrote {out}" in printed and '"lidar2ego"' in printed and "CAM_FRONT" in printed
    doc = json.loads(out.read_text())
    L = np.array(doc["lidar2ego"])
    np.testing.assert_allclose(L[:3, :3], [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-12)
    np.testing.assert_allclose(L @ [0, 5, 0, 1], [5 + 0.9, 0.1, 1.8, 1], atol=1e-12)     # ahead of the LiDAR
    np.testing.assert_allclose(L @ [-2, 0, 0, 1], [0.9, 2.1, 1.8, 1], atol=1e-12)       # its -x is the car's left
    (cam,) = read_calib(out)
    assert cam.name == "CAM_FRONT" and cam.image_size == (1600, 900)
    np.testing.assert_allclose(cam.K, CAMERA_RECORD["camera_intrinsic"])
    np.testing.assert_allclose(cam.cam2ego @ [0, 0, 2, 1], [3.5, 0.2, 1.6, 1], atol=1e-12)   # 2 m along the axis
    np.testing.assert_allclose(cam.cam2ego[:3, :3] @ [1, 0, 0], [0, -1, 0], atol=1e-12)       # right -> -y
    np.testing.assert_allclose(cam.cam2ego[:3, :3] @ [0, 1, 0], [0, 0, -1], atol=1e-12)       # down -> -z
    # the default ground_z (-1.0, the contract's ego frame) lowers every sensor by nuScenes' ground height
    code, _, _ = run(capsys, "nuscenes", src, out, "--image_size", "1600x900", "--force")
    assert code == 0
    doc = json.loads(out.read_text())
    np.testing.assert_allclose(np.array(doc["lidar2ego"]) @ [0, 5, 0, 1], [5.9, 0.1, 0.8, 1], atol=1e-12)
    np.testing.assert_allclose(np.array(doc["cameras"][0]["cam2ego"])[:3, 3], [1.5, 0.2, 0.6], atol=1e-12)


def test_extrinsic_applied_on_read_by_the_datasets(tmp_path, capsys):
    """Points written in a y-forward LiDAR's frame come out of the LiDAR and paired datasets in the ego frame."""
    root = write_tiny_dataset(tmp_path / "d", splits={"train": 1}, frames=4)
    seg = root / "train" / "segment_0000"
    src = write_records(tmp_path / "records.json", cameras={"front": CAMERA_RECORD})
    (seg / "camera" / "calib.json").unlink()
    assert run(capsys, "nuscenes", src, seg / "camera" / "calib.json", "--image_size", "32x16")[0] == 0
    rows = read_csv_rows(seg / "meta" / "data.csv")
    pts = np.array([[0, 5, 0, 7], [-2, 0, -1, 0], [3, 0, 0, 65535]], np.float32)
    write_points_bin(seg / rows[1]["lidar_filepath"], np.tile(pts, (100, 1)))
    for ds in (LidarSequenceDataset(root, "train", seq_len=2, lidar_num_features=4),
               PairedSequenceDataset(root, "train", seq_len=2, lidar_num_features=4)):
        got = ds[0]["points"][1][:3].numpy()
        np.testing.assert_allclose(got, [[5.9, 0.1, 0.8, 7], [0.9, 2.1, -0.2, 0], [0.9, -2.9, 0.8, 65535]],
                                   atol=1e-5)
        assert ds.tables["segment_0000"].lidar2ego is not None
    # the export records the extrinsic it applied in the store's provenance
    from e2r.workflow.export_config import ExportConfig
    from e2r.workflow.export_run import lidar_extrinsics
    from stores import Provenance

    got = lidar_extrinsics(ExportConfig(data_root=str(root), split=["train"], store="x", seq_len=2,
                                        lidar_num_features=4))
    assert list(got) == ["train/segment_0000"]
    np.testing.assert_allclose(np.array(got["train/segment_0000"]) @ [0, 5, 0, 1], [5.9, 0.1, 0.8, 1], atol=1e-6)
    prov = Provenance("ab" * 32, lidar2ego=got)
    assert Provenance.from_dict(prov.to_dict()).lidar2ego == got


def test_lidar_only_segment_takes_lidar_calib_json(tmp_path, capsys):
    root = write_tiny_dataset(tmp_path / "d", splits={"train": 1}, frames=3, camera=False)
    seg = root / "train" / "segment_0000"
    src = write_records(tmp_path / "records.json")
    code, printed, err = run(capsys, "nuscenes", src, seg / "lidar" / "calib.json", "--ground_z", "0")
    assert code == 0, err
    assert set(json.loads((seg / "lidar" / "calib.json").read_text())) == {"lidar2ego"}
    rows = read_csv_rows(seg / "meta" / "data.csv")
    write_points_bin(seg / rows[0]["lidar_filepath"], np.tile(np.float32([[0, 5, 0, 1]]), (64, 1)))
    ds = LidarSequenceDataset(root, "train", seq_len=1, lidar_num_features=4)
    np.testing.assert_allclose(ds[0]["points"][0][0].numpy(), [5.9, 0.1, 1.8, 1], atol=1e-5)


@pytest.mark.parametrize("tracking", [False, True])
def test_kitti_camera_centre_and_projection(tmp_path, capsys, tracking):
    src = tmp_path / "000000.txt"
    src.write_text(kitti_text(tracking=tracking))
    out = tmp_path / "calib.json"
    code, printed, err = run(capsys, "kitti", src, out, "--image_size", "1242x375")
    assert code == 0, err
    (cam,) = read_calib(out)
    assert cam.name == "front" and cam.image_size == (1242, 375)
    np.testing.assert_allclose(cam.K, [[FX, 0, 600], [0, FX, 180], [0, 0, 1]])
    # by hand: camera 2 sits 6 cm left of camera 0 (P2's 4th column = K b), which is 0.27 m ahead of and
    # 0.08 m below the velodyne (= ego): centre (0.27, 0.06, -0.08); its axes as those of the forward camera
    np.testing.assert_allclose(cam.cam2ego, [[0, 0, 1, 0.27], [-1, 0, 0, 0.06], [0, -1, 0, -0.08], [0, 0, 0, 1]],
                               atol=1e-12)
    np.testing.assert_array_equal(json.loads(out.read_text())["lidar2ego"], np.eye(4))


def test_kitti_projection_matches_the_kitti_formula(tmp_path, capsys):
    """With a rectifying rotation and a full P2, a velodyne point projects to the same pixel through our
    calib (K inv(cam2ego)) as through KITTI's own formula P2 R0_rect Tr_velo_to_cam."""
    a = 0.02
    R0 = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    Tr = np.array([[0.0, -1, 0, 0.01], [0, 0, -1, -0.08], [1, 0, 0, -0.27]])
    P2 = np.array([[FX, 0, 600, 44.85], [0, FX * 1.01, 180, 0.21], [0, 0, 1, 0.0027]])
    src = tmp_path / "k.txt"
    src.write_text(kitti_text(*(" ".join(repr(float(v)) for v in m.ravel()) for m in (P2, R0, Tr))))
    out = tmp_path / "calib.json"
    assert run(capsys, "kitti", src, out, "--image_size", "1242x375")[0] == 0
    (cam,) = read_calib(out)
    rng = np.random.default_rng(0)
    velo = np.c_[rng.uniform(5, 40, 20), rng.uniform(-5, 5, 20), rng.uniform(-1.5, 1, 20), np.ones(20)]
    R0_4, Tr_4 = np.eye(4), np.eye(4)
    R0_4[:3, :3], Tr_4[:3] = R0, Tr
    kitti = (P2 @ R0_4 @ Tr_4 @ velo.T).T
    ours = (cam.K @ (np.linalg.inv(cam.cam2ego) @ velo.T)[:3]).T
    np.testing.assert_allclose(ours[:, :2] / ours[:, 2:], kitti[:, :2] / kitti[:, 2:], atol=1e-9)


@pytest.mark.parametrize("text,field", [
    (kitti_text().replace("R0_rect:", "R9:"), "R0_rect or R_rect"),
    (kitti_text().replace("P2: 700.0", "P2: abc"), "P2 (line 2): not a list of numbers"),
    (kitti_text(R0="1 0 0 0 1 0 0 0"), "R0_rect (line 3): expected 9 numbers, got 8"),
    (kitti_text(R0="2 0 0 0 1 0 0 0 1"), "R0_rect is not a rigid transform"),
    (kitti_text(Tr="0 1 0 0 0 0 -1 0 1 0 0 0"), "Tr_velo_to_cam is not a rigid transform"),    # a mirror
    (kitti_text(P2="700 0 600 0 0 700 180 0 0 0 2 0"), "P2 is not of the form K [I | b]"),
    (kitti_text(R0="1 0 0 0 1 0 0 0 nan"), "R0_rect (line 3) has non-finite values"),
])
def test_kitti_errors_name_file_and_field(tmp_path, capsys, text, field):
    src = tmp_path / "k.txt"
    src.write_text(text)
    out = tmp_path / "o" / "calib.json"
    code, printed, err = run(capsys, "kitti", src, out, "--image_size", "64x32")
    assert code == 2 and str(src) in err and field in err, err
    assert not out.exists() and printed == ""


@pytest.mark.parametrize("doc,field", [
    ({"lidar": {**LIDAR_RECORD, "rotation": [1, 0, 0, 0.5]}}, "lidar.rotation [1.0, 0.0, 0.0, 0.5] is not a unit"),
    ({"lidar": {"rotation": [1, 0, 0, 0]}}, "lidar has no 'translation'"),
    ({"lidar": {**LIDAR_RECORD, "translation": [0, 0]}}, "lidar.translation must have shape (3,)"),
    ({"lidar": {**LIDAR_RECORD, "translation": [0, 1e3, 0]}}, "lidar translation"),
    ({"lidar": LIDAR_RECORD, "cameras": {"front": {k: v for k, v in CAMERA_RECORD.items()
                                                   if k != "camera_intrinsic"}}}, "cameras.front has no 'camera_"),
    ({"lidar": LIDAR_RECORD, "cameras": {"front": {**CAMERA_RECORD, "camera_intrinsic": [[1, 0], [0, 1]]}}},
     "cameras.front.camera_intrinsic must have shape (3, 3)"),
    ({"lidar": LIDAR_RECORD, "cameras": [CAMERA_RECORD]}, "cameras must be an object"),
    ({"cameras": {}}, "expected {\"lidar\""),
    # valid JSON, but a K unusable in float32: caught by reading the converted file back, before it is written
    ({"lidar": LIDAR_RECORD, "cameras": {"front": {**CAMERA_RECORD, "camera_intrinsic":
                                                   [[1e-300, 0, 1], [0, 1e-300, 1], [0, 0, 1]]}}},
     "the converted calibration is unusable: cameras[0].K is not usable in float32"),
    # issue 25: a K whose field of view is not physical for the image size (fx = fy = 1e30: 0 degrees)
    ({"lidar": LIDAR_RECORD, "cameras": {"front": {**CAMERA_RECORD, "camera_intrinsic":
                                                   [[1e30, 0, 32], [0, 1e30, 16], [0, 0, 1]]}}},
     "the converted calibration is unusable: cameras[0].K: fx = 1e+30 gives the 64-pixel image side a field of view"),
])
def test_nuscenes_errors_name_file_and_field(tmp_path, capsys, doc, field):
    src = tmp_path / "r.json"
    src.write_text(json.dumps(doc))
    out = tmp_path / "o" / "calib.json"
    code, printed, err = run(capsys, "nuscenes", src, out, "--image_size", "64x32")
    assert code == 2 and str(src) in err and field in err, err
    assert not out.exists() and [p.name for p in (tmp_path / "o").glob("*")] == []   # no temporary file left


def test_existing_output_needs_force_and_is_replaced_whole(tmp_path, capsys):
    src = write_records(tmp_path / "r.json", cameras={"front": CAMERA_RECORD})
    out = tmp_path / "calib.json"
    out.write_text("old")
    code, _, err = run(capsys, "nuscenes", src, out, "--image_size", "64x32")
    assert code == 2 and "exists; pass --force" in err and out.read_text() == "old"
    code, _, err = run(capsys, "nuscenes", src, tmp_path / "new.json")
    assert code == 2 and "image size (W, H) must be given" in err and not (tmp_path / "new.json").exists()
    assert run(capsys, "nuscenes", src, out, "--image_size", "64x32", "--force")[0] == 0
    assert read_calib(out)[0].image_size == (64, 32) and os.stat(out).st_mode & 0o644 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.json", "r.json"]
    code, _, err = run(capsys, "nuscenes", tmp_path / "none.json", tmp_path / "x.json")
    assert code == 2 and "none.json: file is missing" in err


def test_help_and_usage_errors():
    res = subprocess.run([sys.executable, "-m", "pipelines.import_calib", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "kitti" in res.stdout and "nuscenes" in res.stdout and "Exit status" in res.stdout
    res = subprocess.run([sys.executable, "-m", "pipelines.import_calib", "kitti", "--help"], capture_output=True,
                         text=True)
    assert res.returncode == 0 and "--image_size" in res.stdout and "R0_rect" in res.stdout
    with pytest.raises(SystemExit) as e:     # KITTI's calib has no image size: the flag is required
        main(["kitti", "a.txt", "b.json"])
    assert e.value.code == 2
