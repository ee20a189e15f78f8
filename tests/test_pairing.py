"""Weak and missing pairing (issue 13): the synthetic world's camera recorded apart from the LiDAR (own root, rate
and clock offset; camera-only drives), camera windows paired with LiDAR windows by the time of their last frame
(e2r.workflow.pairing), and student training weighting each pair's KD by its confidence."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from e2r.data.datasets import CameraSequenceDataset, LidarSequenceDataset
from e2r.data.layout import is_camera_only, is_lidar_only, read_segment_table
from e2r.data.readers import DataError
from e2r.errors import ConfigError
from e2r.kd import KDWeights, kd_losses
from stores.keys import parse_key
from e2r.workflow.configs import StudentEvalConfig
from e2r.workflow.evaluate import evaluate_student
from e2r.workflow.kd_data import CameraBatches, TeacherTargets
from e2r.workflow.pairing import TimestampPairing, pair_confidence
from e2r.workflow.train import train_student as run_train_student
from pipelines import make_dataset, train_student
from tests.fixtures import read_csv_rows
from tests.kd_fixtures import fake_rows, write_bank

SEQ = 3
WORLD = ["--train_tracks", "1", "--valid_tracks", "1", "--test_tracks", "1", "--frames", "12",
         "--image_size", "32x16", "--workers", "1", "--no_progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """LiDAR root + camera root at 15 Hz, 20 ms late, one camera-only drive per train track."""
    tmp = tmp_path_factory.mktemp("pairing")
    lidar, cam = tmp / "lidar", tmp / "cam"
    assert make_dataset.main(["--out", str(lidar), "--camera_root", str(cam), "--camera_rate_hz", "15",
                              "--camera_offset_ms", "20", "--camera_only_drives", "1", *WORLD]) == 0
    keys = LidarSequenceDataset(lidar, "train", SEQ, 1).keys + LidarSequenceDataset(lidar, "valid", SEQ, 1).keys
    bank = write_bank(tmp / "mb.zarr", fake_rows(keys), bev_feat=False)
    return {"lidar": lidar, "cam": cam, "bank": bank, "keys": keys, "tmp": tmp}


def test_camera_root_has_the_camera_times_and_out_is_lidar_only(world):
    lidar, cam = world["lidar"], world["cam"]
    for split, seg in (("train", "segment_0000"), ("valid", "segment_0001"), ("test", "segment_0002")):
        rows = read_csv_rows(cam / split / seg / "meta" / "data.csv")
        assert list(rows[0]) == ["timestamp", "image_filepath", "velocity", "wheel_angle", "speed_command",
                                 "x", "y", "yaw"]
        t = np.array([float(r["timestamp"]) for r in rows])
        f = np.arange(len(t))
        np.testing.assert_allclose(t, f / 15 + 0.020, atol=1e-6)
        assert len(t) == 8                               # 0.02 + 7/15 <= 11/20 < 0.02 + 8/15
        assert is_camera_only(cam, split, seg) and not (cam / split / seg / "lidar").exists()
        assert is_lidar_only(lidar, split, seg) and not (lidar / split / seg / "camera").exists()
        lrows = read_csv_rows(lidar / split / seg / "meta" / "data.csv")
        assert "image_filepath" not in lrows[0] and len(lrows) == 12
        # the same drive: the camera's interpolated pose lies between the LiDAR's 20 Hz poses around it
        lx = np.array([float(r["x"]) for r in lrows])
        cx = np.array([float(r["x"]) for r in rows])
        np.testing.assert_allclose(cx, np.interp(t, np.arange(12) / 20, lx), atol=2e-3)
    assert CameraSequenceDataset(cam, "train", SEQ).camera_only_segments == []
    lid = LidarSequenceDataset(cam.parent / "lidar", "train", SEQ)
    assert lid.camera_only_segments == [] and set(lid.tables) == {"segment_0000"}
    marker = json.loads((cam / "synthetic_dataset.json").read_text())
    assert marker["status"] == "complete" and marker["camera_recording"]["camera_rate_hz"] == 15


def test_camera_at_20hz_without_offset_is_the_paired_world(tmp_path):
    small = ["--train_tracks", "1", "--valid_tracks", "1", "--test_tracks", "1", "--frames", "5",
             "--image_size", "32x16", "--workers", "1", "--no_progress"]
    assert make_dataset.main(["--out", str(tmp_path / "paired"), *small]) == 0
    assert make_dataset.main(["--out", str(tmp_path / "l"), "--camera_root", str(tmp_path / "c"), *small]) == 0
    seg = Path("train/segment_0000")
    for f in range(5):
        assert ((tmp_path / "c" / seg / f"camera/{f:06d}.png").read_bytes()
                == (tmp_path / "paired" / seg / f"camera/{f:06d}.png").read_bytes())
    a = read_segment_table(tmp_path / "c", "train", "segment_0000")
    b = read_segment_table(tmp_path / "paired", "train", "segment_0000")
    np.testing.assert_allclose(a.timestamp, b.timestamp)
    for name in ("velocity", "wheel_angle", "speed_command", "pose"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=1e-6)


def _expected(world, tolerance_ms):
    """Brute force: every camera window of train/segment_0000 -> nearest LiDAR window by last-frame time."""
    cam_t = read_segment_table(world["cam"], "train", "segment_0000").timestamp
    lid = read_segment_table(world["lidar"], "train", "segment_0000")
    starts = np.arange(lid.target_frames - SEQ + 1)
    lid_end = lid.timestamp[starts + SEQ - 1]
    out = {}
    for s in range(len(cam_t) - SEQ + 1):
        dt = lid_end - cam_t[s + SEQ - 1]
        j = int(np.argmin(np.abs(dt)))
        ok = abs(dt[j]) * 1000 <= tolerance_ms + 1e-6
        out[f"train/segment_0000:{s}"] = ((f"train/segment_0000:{starts[j]}", 1 - abs(dt[j]) * 1000 / tolerance_ms)
                                          if ok else (None, 0.0))
    return out


def test_pairing_takes_the_nearest_lidar_window_and_refuses_beyond_tolerance(world):
    cam_ds = CameraSequenceDataset(world["cam"], "train", SEQ, image_size=(32, 16))
    for tol in (30.0, 10.0):
        pairing = TimestampPairing.build(cam_ds, world["lidar"], tol)
        want = _expected(world, tol)
        got_keys, conf = pairing.pair(list(want))
        assert got_keys == [w[0] for w in want.values()]
        np.testing.assert_allclose(conf, [w[1] for w in want.values()], atol=1e-4)
        assert pairing.missing_segments == ["segment_0000_d1"]            # a camera-only drive: no LiDAR twin
        assert pairing.pair(["train/segment_0000_d1:0"])[0] == [None]
    assert sum(k is None for k, _ in _expected(world, 10.0).values()) > 0  # 10 ms refuses some (dt up to 25 ms)
    assert all(k is not None for k, _ in _expected(world, 30.0).values())
    assert np.isnan(pair_confidence(np.array([0.011]), 10.0)[0]) and pair_confidence(np.array([0.0]), 0.0)[0] == 1


def test_missing_timestamp_column_is_a_data_error_naming_the_csv(world, tmp_path):
    lidar = tmp_path / "lidar"
    shutil.copytree(world["lidar"] / "train", lidar / "train")
    csv = lidar / "train" / "segment_0000" / "meta" / "data.csv"
    lines = [",".join(line.split(",")[1:]) for line in csv.read_text().splitlines()]
    csv.write_text("\n".join(lines) + "\n")
    cam_ds = CameraSequenceDataset(world["cam"], "train", SEQ, image_size=(32, 16))
    with pytest.raises(DataError, match="timestamp") as e:
        TimestampPairing.build(cam_ds, lidar, 30.0)
    assert str(csv) in str(e.value)


def test_batches_read_the_paired_rows_with_their_confidence(world):
    cam_ds = CameraSequenceDataset(world["cam"], "train", SEQ, image_size=(32, 16))
    pairing = TimestampPairing.build(cam_ds, world["lidar"], 10.0)
    data = CameraBatches(cam_ds, TeacherTargets(world["bank"], ("actions", "bev_vec", "gru_out"), pairing=pairing))
    batch = data[list(range(len(cam_ds)))]
    store_keys, conf = pairing.pair(batch["keys"])
    rows = fake_rows(world["keys"])
    for i, k in enumerate(store_keys):
        assert bool(batch["has_kd"][i]) == (k is not None)
        assert float(batch["kd_weight"][i]) == pytest.approx(conf[i] if k is not None else 1.0)
        if k is not None:
            np.testing.assert_array_equal(batch["teacher"]["actions"][i].numpy(), rows[k]["actions"])
    plain = CameraBatches(cam_ds, TeacherTargets(world["bank"], ("actions",)))[[0, 1]]
    assert plain["kd_weight"].tolist() == [1.0, 1.0]


def test_kd_weight_scales_each_samples_terms_and_ones_change_nothing():
    torch.manual_seed(0)
    B, T = 3, SEQ
    pred = torch.randn(B, T, 2)
    aux = {"bev_vec_seq": torch.randn(B, T, 8), "gru_out": torch.randn(B, T, 4)}
    teacher = {"actions": torch.randn(B, T, 2), "bev_vec": torch.randn(B, T, 8), "gru_out": torch.randn(B, T, 4)}
    has = torch.tensor([True, True, False])
    args = (pred, aux, teacher, has, lambda a: a, KDWeights())
    base, ones = kd_losses(*args), kd_losses(*args, sample_weight=torch.ones(B))
    half = kd_losses(*args, sample_weight=torch.full((B,), 0.5))
    for k in ("kd_action", "kd_bev_vec", "kd_temporal", "kd_total"):
        assert torch.equal(base[k], ones[k])
        torch.testing.assert_close(half[k], base[k] * 0.5)


def test_training_on_split_roots_counts_paired_and_unpaired(world, tmp_path, capsys):
    cam_ds = CameraSequenceDataset(world["cam"], "train", SEQ, image_size=(32, 16))
    summary = TimestampPairing.build(cam_ds, world["lidar"], 10.0).summary(cam_ds.keys)
    out = run_train_student(train_student.parse_config([
        "--data_root", str(world["cam"]), "--pair_lidar_root", str(world["lidar"]), "--pair_tolerance_ms", "10",
        "--memorybank", world["bank"], "--preset", "tiny", "--batch_size", "4", "--seq_len", str(SEQ),
        "--device", "cpu", "--no_progress", "--epochs", "1", "--save_path", str(tmp_path / "s.pt")]))
    h = out["history"][0]
    assert h["paired_samples"] == summary["paired"] and h["unpaired_samples"] == summary["unpaired"]
    assert h["kd_samples"] == summary["paired"] and h["bc_only_samples"] == summary["unpaired"]
    assert 0 < h["pair_confidence_mean"] <= 1
    assert h["pair_confidence_mean"] == pytest.approx(summary["mean_confidence"], abs=1e-5)
    text = capsys.readouterr().out
    assert "1 camera segment(s) have no LiDAR segment" in text and "pairs by time" in text
    ev = evaluate_student(StudentEvalConfig(data_root=str(world["cam"]), split="train", seq_len=SEQ,
                                            student_ckpt=str(tmp_path / "s.pt"), memorybank=world["bank"],
                                            pair_lidar_root=str(world["lidar"]), pair_tolerance_ms=10.0,
                                            device="cpu", no_progress=True))
    assert ev["kd_gap"]["kd_n"] == summary["paired"]
    assert f"{summary['paired']} of {summary['paired'] + summary['unpaired']} windows paired" in ev["pairing"]
    with pytest.raises(ConfigError, match="--memorybank"):
        train_student.parse_config(["--data_root", str(world["cam"]), "--pair_lidar_root", str(world["lidar"])])


def test_camera_only_drives_have_own_names_the_tracks_fingerprint_and_no_store_key(world):
    cam, lidar = world["cam"], world["lidar"]
    drives = sorted(p.name for p in (cam / "train").iterdir())
    assert drives == ["segment_0000", "segment_0000_d1"]
    assert not (cam / "valid" / "segment_0001_d1").exists()                # train tracks only
    own = json.loads((lidar / "train/segment_0000/meta/track.json").read_text())
    d1 = json.loads((cam / "train/segment_0000_d1/meta/track.json").read_text())
    assert d1["track_index"] == own["track_index"] and d1["track_fingerprint"] == own["track_fingerprint"]
    assert d1["drive"] == 1 and d1["lidar"] is False
    drive_keys = CameraSequenceDataset(cam, "train", SEQ, image_size=(32, 16), segments=["segment_0000_d1"]).keys
    assert drive_keys and not set(drive_keys) & set(world["keys"])
    assert all(parse_key(k).segment == "segment_0000_d1" for k in drive_keys)
    a = read_segment_table(cam, "train", "segment_0000_d1").pose[0]
    b = read_segment_table(cam, "train", "segment_0000").pose[0]
    assert np.hypot(*(a[:2] - b[:2])) > 20                                  # another place on the track


def test_camera_only_drives_without_camera_root_sit_beside_the_paired_segments(tmp_path):
    out = tmp_path / "w"
    assert make_dataset.main(["--out", str(out), "--camera_only_drives", "2", "--lidar_only_tracks", "1",
                              *WORLD[:6], "--frames", "5", "--image_size", "32x16", "--workers", "1", "--no_progress"]) == 0
    names = sorted(p.name for p in (out / "train").iterdir())
    assert names == ["segment_0000", "segment_0000_d1", "segment_0000_d2", "segment_0003", "segment_0003_d1",
                     "segment_0003_d2"]                      # paired and LiDAR-only train tracks both get drives
    t = read_segment_table(out, "train", "segment_0003_d2").timestamp
    np.testing.assert_allclose(t, np.arange(5) / 20, atol=1e-6)
    lid = LidarSequenceDataset(out, "train", SEQ)
    assert lid.camera_only_segments == ["segment_0000_d1", "segment_0000_d2", "segment_0003_d1", "segment_0003_d2"]
    cam = CameraSequenceDataset(out, "train", SEQ, image_size=(32, 16))
    assert cam.lidar_only_segments == ["segment_0003"] and len(cam.tables) == 5
    starts = [tuple(read_segment_table(out, "train", s).pose[0, :2]) for s in ("segment_0003", "segment_0003_d1",
                                                                               "segment_0003_d2")]
    assert len({np.round(p, 1).tobytes() for p in map(np.array, starts)}) == 3
