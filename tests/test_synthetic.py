"""The synthetic racing world: layout, determinism, splits, sensor plausibility and agreement, expert.
(The sensor gap itself, the default look: tests/test_sensor_gap.py; the clean look is checked here.)"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from e2r.sim.expert import ExpertConfig, drive_expert
from e2r.sim.preview import project_to_image, write_preview
from e2r.sim.sensors import LIDAR_HEIGHT, CameraConfig, cast_lidar, render_camera
from e2r.sim.world import CSV_COLUMNS, MARKER, SyntheticConfig, generate_dataset, split_for_track, track_for_index
from pipelines.make_dataset import main as make_dataset_main

TRACKS, FRAMES, SIZE = 3, 5, (96, 48)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "ds"
    summary = generate_dataset(out, tracks=TRACKS, frames=FRAMES, seed=7, image_size=SIZE, workers=1,
                               progress=False)
    return out, summary


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """The clean look (uniform light, red/white left and blue/white right walls, no other cars)."""
    out = tmp_path_factory.mktemp("synth") / "clean"
    generate_dataset(out, config=SyntheticConfig(tracks=TRACKS, frames=FRAMES, seed=7, image_size=SIZE,
                                                 appearance="clean"), workers=1, progress=False)
    return out


def _segments(root: Path) -> list[Path]:
    return sorted(p.parent.parent for p in root.glob("*/*/meta/data.csv"))


def _read_csv(seg: Path) -> list[dict]:
    with open(seg / "meta" / "data.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_layout_csv_and_calib(dataset):
    root, summary = dataset
    segs = _segments(root)
    assert [f"{s.parent.name}/{s.name}" for s in segs] == [
        "test/segment_0002", "train/segment_0000", "valid/segment_0001"]
    assert summary["splits"] == {"train": ["segment_0000"], "valid": ["segment_0001"], "test": ["segment_0002"]}
    assert not list(root.glob(".tmp-*")), "temp folders left behind"
    assert json.loads((root / MARKER).read_text())["status"] == "complete"
    for seg in segs:
        header = (seg / "meta" / "data.csv").read_text().splitlines()[0]
        assert header.split(",") == list(CSV_COLUMNS)
        rows = _read_csv(seg)
        assert len(rows) == FRAMES
        stamps = [float(r["timestamp"]) for r in rows]
        assert np.allclose(np.diff(stamps), 0.05)                       # 20 Hz
        for r in rows:
            assert r["lidar_filepath"].startswith("lidar/") and r["image_filepath"].startswith("camera/")
            raw = (seg / r["lidar_filepath"]).read_bytes()
            assert len(raw) % 16 == 0 and len(raw) > 16 * 1000
            with Image.open(seg / r["image_filepath"]) as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == SIZE
        cams = json.loads((seg / "camera" / "calib.json").read_text())["cameras"]
        assert len(cams) == 1 and cams[0]["name"] == "front" and cams[0]["image_size"] == list(SIZE)
        K, c2e = np.array(cams[0]["K"]), np.array(cams[0]["cam2ego"])
        assert K.shape == (3, 3) and c2e.shape == (4, 4)
        assert np.allclose(c2e[3], [0, 0, 0, 1]) and np.allclose(c2e[:3, :3] @ c2e[:3, :3].T, np.eye(3), atol=1e-6)
        assert np.allclose(K[:2, 2], np.array(SIZE) / 2) and K[0, 0] > 0
        # optical axis (camera +z) looks forward and slightly down in the ego frame
        axis = c2e[:3, 2]
        assert axis[0] > 0.95 and -0.2 < axis[2] < 0


def test_deterministic_for_a_seed(dataset, tmp_path):
    root, _ = dataset
    again = tmp_path / "again"
    generate_dataset(again, tracks=TRACKS, frames=FRAMES, seed=7, image_size=SIZE, workers=2, progress=False)
    files_a = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), f"{rel} differs between runs"
    other = tmp_path / "other"
    generate_dataset(other, tracks=TRACKS, frames=2, seed=8, image_size=SIZE, workers=1, progress=False)
    a = (root / "train/segment_0000/lidar/000000.bin").read_bytes()
    assert a != (other / "train/segment_0000/lidar/000000.bin").read_bytes()


def test_splits_use_different_tracks(dataset):
    _, summary = dataset
    fp = {g["split"]: g["track_fingerprint"] for g in summary["segments"]}
    assert len(set(fp.values())) == 3
    cfg = SyntheticConfig(tracks=5, frames=1, seed=7)
    assert [split_for_track(i, 5) for i in range(5)] == ["train", "train", "train", "valid", "test"]
    tracks = [track_for_index(cfg, i) for i in range(5)]
    assert len({t.fingerprint() for t in tracks}) == 5
    assert [t.clockwise for t in tracks] == [False, True, False, True, False]
    with pytest.raises(ValueError, match="tracks must be >= 3"):
        SyntheticConfig(tracks=2)
    with pytest.raises(ValueError, match="tracks must be >= 7"):
        SyntheticConfig(tracks=6, valid_tracks=2, test_tracks=4)
    with pytest.raises(ValueError, match="appearance"):
        SyntheticConfig(appearance="foggy")


def test_lidar_points_plausible(dataset):
    root, _ = dataset
    seg = root / "train" / "segment_0000"
    pts = np.fromfile(seg / "lidar" / "000000.bin", dtype="<f4").reshape(-1, 4)
    assert np.isfinite(pts).all()
    rng_m = np.linalg.norm(pts[:, :3], axis=1)
    assert rng_m.max() <= 80.5 and rng_m.min() > 1.0
    assert (pts[:, 3] >= 0).all() and (pts[:, 3] <= 1).all()
    z = pts[:, 2]
    assert z.min() > -LIDAR_HEIGHT - 0.15 and z.max() < 0.55         # nothing below ground or above car roofs
    ground = np.abs(z + LIDAR_HEIGHT) < 0.05
    assert ground.mean() > 0.3
    # walls on both sides of the car: raised points just ahead, left and right, 3-8 m away
    near_wall = (z > -0.8) & (np.abs(pts[:, 0]) < 3)
    left, right = pts[near_wall & (pts[:, 1] > 0), 1], pts[near_wall & (pts[:, 1] < 0), 1]
    assert len(left) > 20 and len(right) > 20
    assert 2.5 < np.median(left) < 8 and -8 < np.median(right) < -2.5
    # paint is brighter than asphalt
    assert pts[ground, 3].max() > 0.6 and np.median(pts[ground, 3]) < 0.2


def test_lidar_and_camera_agree(clean):
    """Wall points the LiDAR sees project (through K and cam2ego) into the image onto wall pixels, and
    ground points onto road pixels (clean look: its colours are known)."""
    seg = clean / "valid" / "segment_0001"
    cam = json.loads((seg / "camera" / "calib.json").read_text())["cameras"][0]
    K, c2e = np.array(cam["K"]), np.array(cam["cam2ego"])
    for row in _read_csv(seg)[::2]:
        pts = np.fromfile(seg / row["lidar_filepath"], dtype="<f4").reshape(-1, 4)
        img = np.asarray(Image.open(seg / row["image_filepath"]).convert("RGB")).astype(int)
        az = np.degrees(np.arctan2(pts[:, 1], pts[:, 0]))
        ahead = (pts[:, 0] > 4) & (pts[:, 0] < 25) & (np.abs(az) < 35)
        for kind, sel in (("wall", ahead & (pts[:, 2] > -0.7) & (pts[:, 2] < 0.0)),
                          ("ground", ahead & (pts[:, 2] < -0.95) & (pts[:, 0] < 15))):
            assert sel.sum() > 20, f"too few {kind} points ahead in {row['lidar_filepath']}"
            uv, depth = project_to_image(pts[sel], K, c2e)
            assert (depth > 0).all()
            assert ((uv[:, 0] >= 0) & (uv[:, 0] < SIZE[0]) & (uv[:, 1] >= 0) & (uv[:, 1] < SIZE[1])).all()
            px = img[np.clip(np.round(uv[:, 1]).astype(int), 0, SIZE[1] - 1),
                     np.clip(np.round(uv[:, 0]).astype(int), 0, SIZE[0] - 1)]
            grey = (px.max(1) - px.min(1) < 25) & (px.mean(1) > 55) & (px.mean(1) < 120)  # asphalt
            sky = (px[:, 2] > 200) & (px[:, 2] - px[:, 0] > 20)                               # light blue
            if kind == "wall":
                assert (~grey & ~sky).mean() > 0.95, f"LiDAR wall points land off the walls in {row}"
                # left wall is red/white, right wall blue/white: a mirrored rig would swap them
                left = pts[sel, 1] > 0
                blue, red = px[:, 2] - px[:, 0] > 60, px[:, 0] - px[:, 2] > 60
                assert left.any() and (~left).any()
                assert red[left].mean() > blue[left].mean() + 0.2, f"walls swapped in {row}"
                assert blue[~left].mean() > red[~left].mean() + 0.2, f"walls swapped in {row}"
            else:
                assert (~sky).all() and grey.mean() > 0.7, f"LiDAR ground points land off the road in {row}"


def test_sensors_see_a_barrel():
    cfg = SyntheticConfig(tracks=3, frames=1, seed=3, appearance="clean")
    track = track_for_index(cfg, 0)
    b = 0
    # stand 10 m before barrel b on the centre line, facing along the track, look at it
    i = int(np.argmin(np.linalg.norm(track.centre - track.obs_xy[b], axis=1)))
    j = (i - 10) % len(track.centre)
    x, y = track.centre[j]
    yaw = float(np.arctan2(track.tangent[j, 1], track.tangent[j, 0]))
    pts = cast_lidar(track, x, y, yaw, np.random.default_rng(0))
    c, s = np.cos(yaw), np.sin(yaw)
    rel = track.obs_xy[b] - (x, y)
    bx, by = c * rel[0] + s * rel[1], -s * rel[0] + c * rel[1]
    near = np.hypot(pts[:, 0] - bx, pts[:, 1] - by) < track.obs_radius[b] + 0.1
    assert (near & (pts[:, 2] > -0.9)).sum() > 5 and pts[near & (pts[:, 2] > -0.9), 3].min() > 0.8
    img = render_camera(track, x, y, yaw, CameraConfig(image_size=(128, 64)))
    orange = (img[..., 0] > 200) & (img[..., 1] > 80) & (img[..., 1] < 160) & (img[..., 2] < 60)
    assert orange.sum() > 10


def test_expert_steering_and_speed_plausible():
    cfg = SyntheticConfig(tracks=3, frames=1, seed=11, appearance="clean")     # no other cars to follow
    ecfg = ExpertConfig()
    for idx in (0, 1):
        track = track_for_index(cfg, idx)
        d = drive_expert(track, 1200, np.random.default_rng(idx), ecfg)
        assert np.abs(d.wheel_angle).max() <= ecfg.max_wheel_angle_deg
        assert np.abs(d.wheel_angle).max() > 3.0
        assert (d.velocity > 0).all() and d.velocity.max() <= ecfg.v_max + 1.0
        # steers into the curve, slower where the track bends more
        assert np.corrcoef(d.curvature, d.wheel_angle)[0, 1] > 0.7
        bend = np.abs(d.curvature)
        assert d.velocity[bend > np.quantile(bend, 0.75)].mean() < d.velocity[bend < np.quantile(bend, 0.25)].mean() - 1
        # stays on the track, away from the walls
        lat = ((np.stack([d.x, d.y], 1) - track.centre[d.index]) * track.normal[d.index]).sum(1)
        assert (np.abs(lat) < track.width[d.index] / 2 - 1.0).all()
        # about one lap per ~30 s: the car moves forward along the lap
        assert len(np.unique(d.index)) > 0.5 * len(track.centre)


def test_preview_png(dataset, tmp_path):
    root, _ = dataset
    out = write_preview(root, tmp_path / "p" / "preview.png")
    with Image.open(out) as im:
        arr = np.asarray(im.convert("RGB"))
    assert arr.shape[1] > 2 * SIZE[0] and arr.std() > 20


def test_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_dataset(out, tracks=3, frames=1, image_size=(32, 16), workers=1, progress=False)
    with pytest.raises(FileExistsError, match=MARKER):
        generate_dataset(out, tracks=3, frames=1, image_size=(32, 16), workers=1, progress=False, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    ds = tmp_path / "ds2"
    args = ["--out", str(ds), "--tracks", "3", "--frames", "2", "--image_size", "32x16", "--workers", "1", "--no_progress"]
    assert make_dataset_main(args) == 0
    assert make_dataset_main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert make_dataset_main(args + ["--overwrite", "--preview", str(tmp_path / "pv.png")]) == 0
    assert (tmp_path / "pv.png").is_file() and len(_segments(ds)) == 3
    with pytest.raises(SystemExit):
        make_dataset_main(["--out", str(ds), "--image_size", "32by16"])


def test_dart_perturbs_the_executed_steering_not_the_label():
    """With DART the recorded wheel angle is the expert's command; the car's path differs from an unperturbed
    drive from the same start (the executed steering was perturbed), and the drive stays on the track."""
    import numpy as np

    from e2r.sim.expert import ExpertConfig, drive_expert
    from e2r.sim.world import SyntheticConfig, track_for_index

    cfg = SyntheticConfig(tracks=3, frames=200, appearance="clean")
    track = track_for_index(cfg, 0)
    plain = drive_expert(track, 200, np.random.default_rng(1), ExpertConfig(dart_steer_deg=0.0), start_index=0)
    dart = drive_expert(track, 200, np.random.default_rng(1), ExpertConfig(dart_steer_deg=2.0), start_index=0)
    gap = np.hypot(plain.x - dart.x, plain.y - dart.y)
    assert gap.max() > 0.2                                   # the perturbation moved the car
    lateral = np.hypot(dart.x - track.centre[dart.index, 0], dart.y - track.centre[dart.index, 1])
    assert lateral.max() < track.width.min() / 2 - 0.5      # and the expert brought it back each time
