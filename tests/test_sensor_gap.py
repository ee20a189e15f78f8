"""The sensor gap of the synthetic world (the default look): light, blur and noise reach the camera and not the
LiDAR, other cars (seen all around by the LiDAR, ahead only by the camera, obstacles in the closed loop),
held-out looks and the split layout (both directions, LiDAR-only tracks), determinism per seed."""
from __future__ import annotations

import colorsys
import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from e2r.data.datasets import CameraSequenceDataset, LidarSequenceDataset
from e2r.errors import DataError
from e2r.sim.appearance import HUE_SECTORS, LIGHTS, AppearanceConfig, draw_appearance
from e2r.sim.closed_loop import ClosedLoopConfig, SimWorld, car_contact, run_closed_loop, start_indices
from e2r.sim.policies import ExpertPolicy, Observation
from e2r.sim.preview import write_preview
from e2r.sim.sensors import CameraConfig, cast_lidar, render_camera
from e2r.sim.traffic import car_poses, clear_start
from e2r.sim.vehicle import VehicleState
from e2r.sim.world import (CSV_COLUMNS, LIDAR_ONLY_COLUMNS, MARKER, SyntheticConfig, config_dict, config_from_dict,
                           generate_dataset, light_for_index, split_for_track, track_for_index)
from pipelines.make_dataset import build_parser, config_from_args
from pipelines.make_dataset import main as make_dataset_main

CAM = CameraConfig(image_size=(96, 48))


def _pose(track, s: float) -> tuple[float, float, float]:
    """The centre-line pose (x, y, yaw) at arc length ``s``."""
    n = len(track.centre)
    i = int(round((s % track.length) / (track.length / n))) % n
    return float(track.centre[i, 0]), float(track.centre[i, 1]), float(np.arctan2(track.tangent[i, 1],
                                                                                    track.tangent[i, 0]))


def _ego_points(pts: np.ndarray, x0: float, x1: float) -> np.ndarray:
    """Raised points (not ground) at ego x in [x0, x1] near the ego's line."""
    return pts[(pts[:, 0] > x0) & (pts[:, 0] < x1) & (np.abs(pts[:, 1]) < 2.0) & (pts[:, 2] > -0.85)]


@pytest.fixture(scope="module")
def track():
    return track_for_index(SyntheticConfig(tracks=3, seed=4), 0)


# ------------------------------------------------------------------------------------------------ other cars
def test_camera_sees_a_car_ahead_only_lidar_all_around(track):
    assert track.traffic is not None and len(track.traffic) >= 2
    no_cars = replace(track, traffic=None)
    car_s = car_poses(track, track.traffic, 0.0).s[0]
    # the car 12 m behind the ego: in the LiDAR, not in the image
    x, y, yaw = _pose(track, car_s + 12.0)
    pts = cast_lidar(track, x, y, yaw, np.random.default_rng(0), t=0.0)
    assert len(_ego_points(pts, -16.0, -6.0)) > 20
    assert len(_ego_points(cast_lidar(no_cars, x, y, yaw, np.random.default_rng(0), t=0.0), -16.0, -6.0)) == 0
    assert np.array_equal(render_camera(track, x, y, yaw, CAM, t=0.0), render_camera(no_cars, x, y, yaw, CAM, t=0.0))
    # the car 12 m ahead: in both
    x, y, yaw = _pose(track, car_s - 12.0)
    assert len(_ego_points(cast_lidar(track, x, y, yaw, np.random.default_rng(0), t=0.0), 6.0, 16.0)) > 20
    seen = render_camera(track, x, y, yaw, CAM, t=0.0) != render_camera(no_cars, x, y, yaw, CAM, t=0.0)
    assert seen.any(axis=2).sum() > 50
    # the cars move: 3 s later the car is elsewhere
    assert not np.isclose(car_poses(track, track.traffic, 3.0).s[0], car_s)


class _Rammer(ExpertPolicy):
    """The expert's steering, but 20 m/s whatever is ahead."""

    def act(self, obs: Observation) -> tuple[np.ndarray, np.ndarray]:
        return super().act(obs)[0], np.full(len(obs.cars), 20.0)


def test_collision_with_another_car_ends_the_run(track):
    cfg = SyntheticConfig(tracks=3, seed=4)
    world = SimWorld("test", "segment_0000", track, cfg, [])
    n = len(track.centre)
    behind = int(round((car_poses(track, track.traffic, 0.0).s[0] - 25.0) / (track.length / n))) % n
    rammed = run_closed_loop(_Rammer("rammer"), world, [behind], ClosedLoopConfig(time_limit=30.0))[0]
    assert rammed.end == "collision" and rammed.collision_with == "car" and rammed.collisions == 1
    assert not rammed.success and rammed.sim_time < 15.0
    x, y, yaw = rammed.trajectory[-1]
    assert car_contact(track, VehicleState.create(x, y, yaw, 0.0), cfg.vehicle, rammed.sim_time)[0]
    # the expert from the same start follows the car instead
    followed = run_closed_loop(ExpertPolicy(), world, [behind], ClosedLoopConfig(time_limit=15.0))[0]
    assert followed.end == "time" and followed.collisions == 0
    # start points keep clear of the cars at t = 0
    for i in start_indices(track, 8):
        assert clear_start(track, track.traffic, i) == i


def test_starts_behind_cars_close_in_on_them(track):
    traffic, n = track.traffic, len(track.centre)
    ds, m = track.length / n, len(track.traffic)
    poses = car_poses(track, traffic, 0.0)
    starts = start_indices(track, m + 1, behind_car=1)
    assert starts[-1] == starts[0]                          # car 1 + m is car 1 again
    for k, i in enumerate(starts):
        assert clear_start(track, traffic, i) == i
        c = (1 + k) % m
        gap = (poses.s[c] - traffic.half_length[c] - i * ds) % track.length   # to the car's rear, m
        assert traffic.cfg.start_clear_behind < gap <= traffic.cfg.start_clear_behind + 2 * ds
    # the expert from there catches up with the car (within 20 m of it after 10 s) without a collision; even
    # starts differ, and a track without other cars keeps them
    world = SimWorld("test", "segment_0000", track, SyntheticConfig(tracks=3, seed=4), [])
    run = run_closed_loop(ExpertPolicy(), world, starts[:1], ClosedLoopConfig(time_limit=10.0))[0]
    assert run.end == "time" and run.collisions == 0
    x, y, _ = run.trajectory[-1]
    car = car_poses(track, traffic, run.sim_time)
    assert np.hypot(car.x[1] - x, car.y[1] - y) < 20.0
    assert start_indices(track, 2) != start_indices(track, 2, behind_car=0)
    no_cars = replace(track, traffic=None)
    assert start_indices(no_cars, 2, behind_car=0) == start_indices(no_cars, 2)


# ------------------------------------------------------------------------------------- light, blur, noise
@pytest.fixture(scope="module")
def lit(track):
    """The same track geometry and materials (same draws) under each light."""
    return {light: draw_appearance(np.random.default_rng(5), track, light, "train", AppearanceConfig())
            for light in LIGHTS}


def _render(track, look, speed=0.0, rng=None) -> np.ndarray:
    x, y, yaw = _pose(track, 40.0)
    return render_camera(replace(track, look=look, traffic=None), x, y, yaw, CAM, speed=speed, rng=rng)


def test_night_is_darker_and_noisier_than_noon(track, lit):
    assert np.array_equal(lit["noon"].paint_state, lit["night"].paint_state)
    assert lit["noon"].exposure_ev == lit["night"].exposure_ev
    mean = {light: _render(track, look).mean() for light, look in lit.items()}
    assert mean["night"] < 0.5 * mean["noon"] and mean["night"] < mean["dusk"] < mean["noon"]
    noise = {}
    for light in ("noon", "night"):
        a = _render(track, lit[light], rng=np.random.default_rng(1)).astype(float)
        noise[light] = np.std(a - _render(track, lit[light]))
    assert noise["night"] > 1.5 * noise["noon"] > 0


def test_motion_blur_grows_with_speed(track, lit):
    sharpness = []
    for speed in (0.0, 8.0, 16.0, 24.0):
        img = _render(track, lit["night"], speed=speed).astype(float)[CAM.image_size[1] // 2:]
        sharpness.append(np.abs(np.diff(img, axis=1)).mean())
    assert all(a > b for a, b in zip(sharpness, sharpness[1:])), sharpness
    assert sharpness[-1] < 0.9 * sharpness[0]


def test_lidar_ignores_the_light(track, lit):
    clouds = [cast_lidar(replace(track, look=look), *_pose(track, 40.0), np.random.default_rng(3), t=2.0)
              for look in lit.values()]
    assert len(clouds[0]) > 1000
    for other in clouds[1:]:
        assert np.array_equal(clouds[0], other)


# ------------------------------------------------------------------------------------- splits and looks
def test_split_layout_directions_and_held_out_looks():
    cfg = SyntheticConfig(tracks=10, valid_tracks=2, test_tracks=4, lidar_only_tracks=4, seed=2)
    splits = [split_for_track(i, 10, 2, 4, 4) for i in range(14)]
    assert splits == ["train"] * 4 + ["valid"] * 2 + ["test"] * 4 + ["train"] * 4
    tracks = [track_for_index(cfg, i) for i in range(14)]
    by_split: dict[str, list] = {}
    for split, tr in zip(splits, tracks):
        by_split.setdefault(split, []).append(tr)
    for split, trs in by_split.items():
        cw = [t.clockwise for t in trs]
        assert 0 < sum(cw) < len(cw), f"{split} has one driving direction only"
        if split != "valid":
            assert {light_for_index(cfg, i) for i, s in enumerate(splits) if s == split} == set(LIGHTS)
    assert sum(t.clockwise for t in by_split["train"]) == len(by_split["train"]) // 2      # balanced turns
    for split, tr in zip(splits, tracks):
        for side in range(2):
            hue = colorsys.rgb_to_hsv(*tr.look.wall_colours[side, 0])[0]
            assert int(hue * 12) % 12 in HUE_SECTORS[split], (split, hue)
    looks = {tuple(np.round(t.look.wall_colours.ravel(), 6)) for t in tracks}
    assert len(looks) == len(tracks)                                         # every track its own look
    assert len({t.fingerprint() for t in tracks}) == len(tracks)
    # the command line: new layout by default, --tracks keeps the original one
    parse = build_parser().parse_args
    new = config_from_args(parse(["--out", "x"]))
    assert (new.tracks, new.valid_tracks, new.test_tracks, new.appearance) == (10, 2, 4, "gap")
    old = config_from_args(parse(["--out", "x", "--tracks", "6", "--appearance", "clean"]))
    assert (old.tracks, old.valid_tracks, old.test_tracks, old.appearance) == (6, 1, 1, "clean")
    with pytest.raises(ValueError, match="--train_tracks"):
        config_from_args(parse(["--out", "x", "--tracks", "6", "--train_tracks", "2"]))
    # worlds written before the gap were clean
    assert config_from_dict({"generator_version": 2, "tracks": 3}).appearance == "clean"
    assert config_from_dict(config_dict(cfg)) == cfg


def test_lidar_only_tracks_determinism_and_datasets(tmp_path):
    cfg = SyntheticConfig(tracks=3, frames=4, seed=9, image_size=(32, 16), lidar_only_tracks=2)
    a, b = tmp_path / "a", tmp_path / "b"
    summary = generate_dataset(a, config=cfg, workers=1, progress=False)
    generate_dataset(b, config=cfg, workers=2, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs between runs"
    assert summary["splits"]["train"] == ["segment_0000", "segment_0003", "segment_0004"]
    for name, camera in (("segment_0000", True), ("segment_0003", False), ("segment_0004", False)):
        seg = a / "train" / name
        with open(seg / "meta" / "data.csv", newline="") as fh:
            header = next(csv.reader(fh))
        assert tuple(header) == (CSV_COLUMNS if camera else LIDAR_ONLY_COLUMNS)
        assert (seg / "camera").is_dir() == camera
        assert json.loads((seg / "meta" / "track.json").read_text())["camera"] == camera
    cam = CameraSequenceDataset(a, "train", seq_len=2, image_size=(32, 16))
    assert list(cam.tables) == ["segment_0000"] and cam.lidar_only_segments == ["segment_0003", "segment_0004"]
    assert len(LidarSequenceDataset(a, "train", seq_len=2).tables) == 3
    # a split without any camera segment is an error for the camera dataset
    (a / "only").mkdir()
    (a / "train" / "segment_0003").rename(a / "only" / "segment_0003")
    with pytest.raises(DataError, match="LiDAR-only"):
        CameraSequenceDataset(a, "only", seq_len=2)
    # another seed, other bytes
    c = tmp_path / "c"
    generate_dataset(c, config=replace(cfg, seed=10, lidar_only_tracks=0), workers=1, progress=False)
    assert (c / "train/segment_0000/camera/000001.png").read_bytes() != \
        (a / "train/segment_0000/camera/000001.png").read_bytes()


def test_preview_of_gap_and_lidar_only_segments(tmp_path):
    out = tmp_path / "w"
    args = ["--out", str(out), "--train_tracks", "1", "--valid_tracks", "1", "--test_tracks", "2",
            "--lidar_only_tracks", "1", "--frames", "2", "--image_size", "64x32", "--workers", "1", "--no_progress",
            "--preview", str(tmp_path / "pv.png")]
    assert make_dataset_main(args) == 0
    made = json.loads((out / MARKER).read_text())
    assert made["splits"] == {"train": ["segment_0000", "segment_0004"], "valid": ["segment_0001"],
                              "test": ["segment_0002", "segment_0003"]}
    for png, seg in ((tmp_path / "pv.png", None), (tmp_path / "lo.png", out / "train" / "segment_0004")):
        if seg is not None:
            write_preview(seg, png)
        with Image.open(png) as im:
            assert np.asarray(im.convert("RGB")).std() > 10
