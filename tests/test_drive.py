"""Closed-loop racing (e2r.sim.vehicle, closed_loop, policies, drive; pipelines.drive): the bicycle's circle,
steering-rate and speed limits, the lap counter, wall contact, the expert completing every start, determinism,
model inputs built as the datasets build them, checkpoint policies, and the command line's outputs and errors."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from e2r.checkpoints import save_checkpoint
from e2r.data.datasets import CameraSequenceDataset
from e2r.data.readers import prepare_image
from e2r.models.config import TeacherConfig
from e2r.models.student import CameraBEVStudent
from e2r.models.student_config import StudentConfig
from e2r.models.teacher import LiDARBEVTeacher
from e2r.sim.closed_loop import (ClosedLoopConfig, LapCounter, car_contact, load_world, run_closed_loop,
                                 start_indices, wall_contact)
from e2r.sim.drive import DriveConfig, drive, summarize
from e2r.sim.policies import ConstantPolicy, ExpertPolicy, Observation, Policy, StudentPolicy, TeacherPolicy
from e2r.sim.sensors import render_camera
from e2r.sim.traffic import boxes_overlap, car_corners, car_poses
from e2r.sim.vehicle import VehicleConfig, VehicleState, advance, body_corners, step
from e2r.sim.world import CSV_COLUMNS, camera_rng, generate_dataset
from pipelines.drive import main as drive_main
from tests.fixtures import one_thread  # noqa: F401 (module-scoped autouse fixture)

SIZE = (64, 32)


@pytest.fixture(scope="module")
def world_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("drive") / "world"
    generate_dataset(root, tracks=3, frames=6, seed=3, image_size=SIZE, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def world(world_root):
    return load_world(world_root, "test", "segment_0002")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny untrained teacher and student checkpoints whose output layer is perturbed (a zero-initialised
    residual head would just repeat its inputs, blind to the sensors)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    tc = TeacherConfig.preset_named("tiny")
    sc = StudentConfig.from_teacher(tc, "tiny", image_size=(32, 16))
    out = {}
    for kind, model, cfg in (("teacher", LiDARBEVTeacher(tc), tc), ("student", CameraBEVStudent(sc), sc)):
        with torch.no_grad():
            model.head[2].weight.normal_(0.0, 0.05)
        out[kind] = save_checkpoint(tmp / f"{kind}.pt", {"model": model.state_dict(), "config": cfg.to_dict()},
                                    kind=kind)
    return out


# ---------------------------------------------------------------------------------------------------- vehicle
def test_constant_steering_traces_the_bicycle_circle():
    cfg = VehicleConfig()
    delta = np.array([5.0, 12.0, -20.0])
    state = VehicleState.create(0.0, 0.0, 0.3, 8.0, delta)
    xs, ys = [], []
    for _ in range(200):
        state = advance(state, delta, np.full(3, 8.0), 0.05, cfg)
        xs.append(state.x.copy())
        ys.append(state.y.copy())
    xs, ys = np.array(xs), np.array(ys)
    for b in range(3):
        # algebraic (Kasa) circle fit of the trajectory: x^2 + y^2 + D x + E y + F = 0
        A = np.stack([xs[:, b], ys[:, b], np.ones(len(xs))], 1)
        D, E, F = np.linalg.lstsq(A, -(xs[:, b] ** 2 + ys[:, b] ** 2), rcond=None)[0]
        radius = np.sqrt(D ** 2 / 4 + E ** 2 / 4 - F)
        expected = cfg.wheelbase / np.tan(np.radians(abs(delta[b])))
        assert radius == pytest.approx(expected, rel=1e-6)
    assert np.allclose(state.v, 8.0) and np.allclose(state.steer, delta)


def test_steering_rate_and_speed_limits():
    cfg = VehicleConfig(steer_rate_max_deg_s=100.0, accel_max=3.0, brake_max=6.0, speed_gain=100.0)
    s = step(VehicleState.create(0.0, 0.0, 0.0, 10.0, 0.0), np.array([30.0]), np.array([20.0]), 0.05, cfg)
    assert s.steer[0] == pytest.approx(5.0) and s.v[0] == pytest.approx(10.15)
    s = step(s, np.array([-90.0]), np.array([0.0]), 0.05, cfg)
    assert s.steer[0] == pytest.approx(0.0) and s.v[0] == pytest.approx(9.85)
    s = advance(VehicleState.create(0.0, 0.0, 0.0, 1.0, 0.0), np.array([0.0]), np.array([-5.0]), 1.0, cfg)
    assert s.v[0] == 0.0                                        # no reversing


# ------------------------------------------------------------------------------------------- laps, collisions
def test_lap_counter_counts_a_full_lap_once_and_no_reverse_crossing():
    k = 100
    forward = LapCounter(k, np.array([5.0]))
    for pos in list(range(6, 100)) + list(range(0, 12)):
        forward.update(np.array([float(pos)]))
    assert forward.laps[0] == 1 and forward.progress[0] == pytest.approx(1.06)
    for pos in list(range(11, -1, -1)) + [99, 98, 97] + list(range(98, 100)) + list(range(0, 15)):
        forward.update(np.array([float(pos % k)]))             # back across the start line and forward again
    assert forward.laps[0] == 1
    reverse = LapCounter(k, np.array([5.0]))
    for pos in [4, 3, 2, 1, 0, 99, 98, 95, 90, 95, 99, 0, 3, 6, 10]:
        reverse.update(np.array([float(pos)]))
    assert reverse.laps[0] == 0 and reverse.progress[0] == pytest.approx(0.05)
    masked = LapCounter(k, np.array([0.0, 0.0]))
    masked.update(np.array([40.0, 40.0]), np.array([True, False]))
    assert masked.progress.tolist() == [0.4, 0.0]


def test_wall_contact(world):
    track, cfg = world.track, world.config.vehicle
    i = 40
    yaw = np.arctan2(track.tangent[i, 1], track.tangent[i, 0])
    lateral = np.array([0.0, track.width[i] / 2 - 1.5, track.width[i] / 2, -track.width[i] / 2 + 0.5])
    xy = track.centre[i] + lateral[:, None] * track.normal[i]
    state = VehicleState.create(xy[:, 0], xy[:, 1], yaw, 0.0)
    assert wall_contact(track, state, cfg).tolist() == [False, False, True, True]
    across = VehicleState.create(track.centre[i, 0], track.centre[i, 1], yaw + np.pi / 2, 0.0)
    assert not wall_contact(track, across, VehicleConfig(length_front=1.0, length_rear=1.0))[0]
    assert wall_contact(track, across, VehicleConfig(length_front=track.width[i], length_rear=0.5))[0]


def _touches_reference(track, state, cfg) -> np.ndarray:
    """Textbook segment-rectangle contact over every wall segment: an end point inside the body, or a crossing
    with one of its edges (orientation tests)."""
    corners = body_corners(state, cfg)                                                  # (B, 4, 2)
    a, b = track.seg_a[None, :, None], track.seg_b[None, :, None]                       # (1, S, 1, 2)
    c, d = corners[:, None], np.roll(corners, -1, axis=1)[:, None]                      # (B, 1, 4, 2)

    def orient(p, q, r):
        return (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])

    crossing = ((orient(a, b, c) * orient(a, b, d) <= 0) & (orient(c, d, a) * orient(c, d, b) <= 0)).any(axis=2)
    cos, sin = np.cos(state.yaw)[:, None], np.sin(state.yaw)[:, None]
    inside = np.zeros(crossing.shape, bool)
    for end in (track.seg_a, track.seg_b):
        dx, dy = end[None, :, 0] - state.x[:, None], end[None, :, 1] - state.y[:, None]
        lx, ly = cos * dx + sin * dy, -sin * dx + cos * dy
        inside |= (-cfg.length_rear <= lx) & (lx <= cfg.length_front) & (np.abs(ly) <= cfg.width / 2)
    return (crossing | inside).any(axis=1)


def test_contacts_skip_only_what_cannot_touch(world):
    """wall_contact / car_contact test only the walls and cars near the bodies: the same answers as the
    textbook test over every wall segment and the separating-axis test against every other car."""
    track, cfg = world.track, world.config.vehicle
    rng = np.random.default_rng(5)
    i = rng.integers(len(track.centre), size=400)
    xy = track.centre[i] + track.normal[i] * (rng.uniform(-0.7, 0.7, 400) * track.width[i])[:, None]
    t = 3.0
    if track.traffic is not None and len(track.traffic):
        poses = car_poses(track, track.traffic, t)
        j = rng.integers(len(poses.x), size=200)
        xy[:200] = np.stack([poses.x[j], poses.y[j]], 1) + rng.normal(0.0, 3.0, (200, 2))
    state = VehicleState.create(xy[:, 0], xy[:, 1], rng.uniform(-np.pi, np.pi, 400), 5.0)
    walls = wall_contact(track, state, cfg)
    assert walls.any() and not walls.all()
    assert np.array_equal(walls, _touches_reference(track, state, cfg))
    cars = car_contact(track, state, cfg, t)
    if track.traffic is not None and len(track.traffic):
        everyone = boxes_overlap(body_corners(state, cfg), car_corners(car_poses(track, track.traffic, t), track.traffic))
        assert cars.any() and np.array_equal(cars, everyone)
    else:
        assert not cars.any()


class _HardLeft(Policy):
    def act(self, obs: Observation) -> tuple[np.ndarray, np.ndarray]:
        return np.full(len(obs.cars), 30.0), obs.speed[:, -1]


def test_wall_contact_ends_the_run_as_a_collision(world):
    run = run_closed_loop(_HardLeft("left"), world, [0, 100], ClosedLoopConfig(time_limit=30.0))
    for r in run:
        assert r.end == "collision" and r.collisions == 1 and not r.success and r.laps == 0
        assert r.collision_with == "wall"
        assert r.sim_time < 10.0 and len(r.trajectory) == r.steps + 1
        x, y, yaw = r.trajectory[-1]
        assert wall_contact(world.track, VehicleState.create(x, y, yaw, 0.0), world.config.vehicle)[0]
        x, y, yaw = r.trajectory[-2]
        assert not wall_contact(world.track, VehicleState.create(x, y, yaw, 0.0), world.config.vehicle)[0]
    rows = summarize(run)
    assert rows[0]["collision_with"] == f"wall:{len(run)}" and rows[0]["end"] == f"collision:{len(run)}"


# ------------------------------------------------------------------------------------------------- expert
def test_expert_completes_every_start_and_runs_are_deterministic(world):
    starts = start_indices(world.track, 8)
    assert len(set(starts)) == 8
    res = run_closed_loop(ExpertPolicy(), world, starts, ClosedLoopConfig(laps=1, time_limit=120.0))
    assert [r.success for r in res] == [True] * 8
    for r in res:
        assert r.end == "laps" and r.laps == 1 and r.collisions == 0 and 1.0 <= r.progress < 1.05
        assert np.isfinite(r.lap_time) and r.lap_time == pytest.approx(world.track.length / r.mean_speed, rel=0.1)
        assert r.max_abs_lateral < 1.0 and r.mean_speed > world.config.expert.v_min
    again = run_closed_loop(ExpertPolicy(), world, starts[:2], ClosedLoopConfig(laps=1, time_limit=120.0))
    assert [r.lap_time for r in again] == [r.lap_time for r in res[:2]]


def test_constant_baseline_crashes(world):
    res = run_closed_loop(ConstantPolicy(), world, start_indices(world.track, 2), ClosedLoopConfig(time_limit=60.0))
    assert all(r.end in ("collision", "time") and not r.success for r in res)


# ----------------------------------------------------------------------------------- inputs = dataset inputs
def test_camera_input_is_built_like_the_dataset(world_root, world):
    """A frame rendered from the csv pose (x, y, yaw) at the frame's time and speed with the frame's camera-noise
    stream, prepared as the closed loop does, equals the CameraSequenceDataset item of that frame (up to the
    csv's 0.1 mm pose rounding)."""
    seg = world_root / "test" / "segment_0002"
    with open(seg / "meta" / "data.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(CSV_COLUMNS)
    ds = CameraSequenceDataset(world_root, "test", seq_len=2, image_size=(32, 16))
    item = ds[0]
    for t in range(2):
        x, y, yaw = (float(rows[t][k]) for k in ("x", "y", "yaw"))
        mine = prepare_image(render_camera(world.track, x, y, yaw, world.config.camera, t=t / world.rate_hz,
                                           speed=float(rows[t]["velocity"]), rng=camera_rng(world.config, 2, t)),
                             (32, 16))
        theirs = item["images"][t, 0].numpy()
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype
        assert np.mean(mine == theirs) > 0.99 and np.abs(mine - theirs).mean() < 2e-3
    with Image.open(seg / rows[0]["image_filepath"]) as im:
        assert np.array_equal(prepare_image(im.convert("RGB"), (32, 16)), item["images"][0, 0].numpy())


def test_model_policy_equals_forward_on_the_window(world, checkpoints):
    """Encoding each frame once and running the temporal part on the kept window = model.forward(window)."""
    policy = TeacherPolicy("teacher", checkpoints["teacher"], torch.device("cpu"))
    policy.reset(world.track, world.config, 2, 3)
    rng = np.random.default_rng(0)
    clouds, speed, steer = [], [], []
    for t in range(4):
        pts = [rng.normal(0, 10, (300, 4)).astype(np.float32) for _ in range(2)]
        clouds.append(pts)
        speed.append(rng.uniform(5, 15, 2))
        steer.append(rng.uniform(-5, 5, 2))
        T = min(t + 1, 3)
        obs = Observation(t=t, cars=np.array([0, 1]), state=None, index=np.zeros(2, np.int64),
                          speed=np.array(speed[-T:], np.float32).T, steering=np.array(steer[-T:], np.float32).T,
                          points=pts)
        out = policy.act(obs)
    window = [torch.from_numpy(clouds[t][b]) for b in range(2) for t in range(1, 4)]
    with torch.no_grad():
        ref = policy.model(window, torch.from_numpy(obs.speed), torch.from_numpy(obs.steering))[:, -1]
    assert np.allclose(out[0], ref[:, 0].numpy(), atol=1e-4) and np.allclose(out[1], ref[:, 1].numpy(), atol=1e-4)


# ------------------------------------------------------------------------------------ checkpoints, pipeline
def test_checkpoint_policies_drive_a_few_steps_deterministically(world, checkpoints):
    cfg = ClosedLoopConfig(time_limit=0.4, seq_len=3, seed=1)
    for cls, kind in ((TeacherPolicy, "teacher"), (StudentPolicy, "student")):
        policy = cls(kind, checkpoints[kind], torch.device("cpu"))
        with torch.no_grad():
            a = run_closed_loop(policy, world, [0, 150], cfg)
            b = run_closed_loop(policy, world, [0, 150], cfg)
        for r, s in zip(a, b):
            assert r.steps == 8 and r.policy == kind
            for m in ("progress", "mean_abs_lateral", "max_abs_lateral", "mean_speed", "sim_time"):
                assert np.isfinite(getattr(r, m)) and getattr(r, m) == getattr(s, m)
            assert np.isfinite(r.commands).all() and np.array_equal(r.trajectory, s.trajectory)
        if kind == "teacher":     # the LiDAR noise follows the seed, and the perturbed head sees it
            with torch.no_grad():
                other = run_closed_loop(policy, world, [0, 150], ClosedLoopConfig(time_limit=0.4, seq_len=3, seed=2))
            assert not np.array_equal(other[0].commands, a[0].commands)


def test_drive_pipeline_outputs_and_errors(world_root, checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--data_root", str(world_root), "--policy", "expert", "--policy", f"t={checkpoints['teacher']}",
            "--policy", f"train_mean={checkpoints['student']}", "--starts", "2", "--time_limit", "0.3",
            "--device", "cpu", "--no_progress", "--csv_path", str(out / "d.csv"), "--plot_path", str(out / "t.png"),
            "--video", str(out / "v.gif"), "--video_policy", "expert", "--video_start", "1"]
    assert drive_main(args) == 0
    printed = capsys.readouterr().out
    assert "success" in printed and "steps/s" in printed and "train_mean" in printed
    with open(out / "d.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["row"] for r in rows] == ["run"] * 6 + ["aggregate"] * 3
    assert all(r["collision_with"] in ("", "wall", "car") for r in rows[:6])
    assert {r["policy"] for r in rows} == {"expert", "t", "train_mean"}
    with Image.open(out / "v.gif") as im:
        assert im.n_frames >= 2
    assert (out / "t.png").stat().st_size > 1000
    res = drive(DriveConfig(data_root=str(world_root), policy=["expert"], starts=1, time_limit=0.2, no_progress=True,
                            device="cpu"))
    assert len(res["runs"]) == 1 and res["summary"][0]["runs"] == 1
    bad = {"missing checkpoint": ["--policy", f"t={tmp_path / 'nope.pt'}"], "unknown policy": ["--policy", "wizard"],
           "not synthetic": ["--split", "nosuch"], "bad starts": ["--starts", "0"],
           "negative car": ["--start_behind_car", "-1"],
           "two placements": ["--start_behind_car", "0", "--start_fraction", "0.5"]}
    for what, extra in bad.items():
        root = ["--data_root", str(world_root)]
        assert drive_main(root + ["--no_progress", "--device", "cpu"] + extra) == 1, what
        err = capsys.readouterr().err
        assert err.startswith("drive: error:"), (what, err)
    (tmp_path / "plain" / "test" / "s" / "meta").mkdir(parents=True)
    assert drive_main(["--data_root", str(tmp_path / "plain"), "--no_progress"]) == 1
    assert "synthetic_dataset.json" in capsys.readouterr().err
