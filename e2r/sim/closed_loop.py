"""Closed-loop racing: B cars at once on one recorded track, each driven by a policy from its own sensors.

Per step (the dataset's rate, 20 Hz; the vehicle sub-steps, ``e2r.sim.vehicle``): render the sensors from
every active car's pose with the code that wrote the dataset (``cast_lidar``, ``render_camera``, the world's
configs from its marker), build the model inputs as the datasets do (points (N, 4) float32; the image
through ``e2r.data.readers.prepare_image`` at the policy's size, K scaled with ``scale_intrinsics`` from
calib.json), keep the last ``seq_len`` speeds (measured) and steering inputs (the policy's previous
commands, 0 at the start), ask the policy for ``(steering, speed command)``, advance the vehicle.

Bookkeeping per car: progress along the centre line (:class:`LapCounter`, from the nearest centre-line
sample, wrap-around handled; a lap is a full lap from the car's start point, counted once; reversing
back across the start does not count), collision = the body rectangle touching a wall polyline
(:func:`wall_contact`) or another car of a gap-world track (:func:`car_contact`: the other cars move on
their own schedule, time = step / rate, as in the recording; they do not react, so a car that stops on
the track is hit from behind, a collision too); barrels are not obstacles. A car stops on a collision,
after ``laps`` laps or at ``time_limit``. Deterministic per ``seed`` (the LiDAR and camera noise of car k
come from their own seeded streams). The camera is rendered as the dataset's: at the step's time, with
the car's speed (motion blur) and sensor noise.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np

from e2r.data.calib import cameras_from_doc, scale_intrinsics
from e2r.data.readers import CameraCalib, prepare_image, read_calib
from e2r.sim.expert import nearest_index, speed_profile
from e2r.sim.policies import Observation, Policy
from e2r.sim.sensors import cast_lidar, render_camera
from e2r.sim.track import Track
from e2r.sim.traffic import boxes_overlap, car_corners, car_poses, clear_start, start_behind
from e2r.sim.vehicle import VehicleConfig, VehicleState, advance, body_corners
from e2r.sim.world import SyntheticConfig, calib_dict, track_for_segment

if TYPE_CHECKING:
    from e2r.sim.record import DriveRecorder

__all__ = ["SimWorld", "load_world", "ClosedLoopConfig", "RunResult", "LapCounter", "wall_contact",
           "car_contact", "centre_position", "start_indices", "run_closed_loop"]


@dataclass
class SimWorld:
    """One recorded segment as a place to drive: its rebuilt track, the world's configs, its cameras
    (calib.json, as the datasets read it)."""
    split: str
    segment: str
    track: Track
    config: SyntheticConfig
    cameras: list[CameraCalib]

    @property
    def rate_hz(self) -> float:
        return float(self.config.expert.rate_hz)


def load_world(root: str | Path, split: str, segment: str) -> SimWorld:
    """The segment ``root/split/segment`` of a synthetic world (ValueError when it is not one). A LiDAR-only
    segment (no camera/calib.json) gets the world's own camera rig, so any policy can drive it."""
    track, cfg, _ = track_for_segment(root, split, segment)
    calib = Path(root) / split / segment / "camera" / "calib.json"
    cameras = read_calib(calib) if calib.exists() else cameras_from_doc(calib_dict(cfg), calib)
    return SimWorld(split, segment, track, cfg, cameras)


@dataclass
class ClosedLoopConfig:
    """laps to drive; time_limit (s of simulated time); seq_len: frames per model window; seed of the
    sensor noise; start_speed (m/s; None = the expert's speed profile at the start point); record_camera:
    the car (index into the starts) whose camera frames are kept (for a video), or None."""
    laps: int = 1
    time_limit: float = 120.0
    seq_len: int = 5
    seed: int = 0
    start_speed: Optional[float] = None
    record_camera: Optional[int] = None


@dataclass
class RunResult:
    """One car's run. ``trajectory`` (S + 1, 3) poses x, y, yaw at each step and at the end, ``commands``
    (S, 2) [steer deg, speed m/s] issued at each step; ``camera_frames``: (H, W, 3) uint8 per step when recorded. ``steps_per_s``: simulated car-steps per
    wall-clock second of the whole batch it ran in."""
    policy: str
    split: str
    segment: str
    start_index: int
    success: bool
    laps: int
    progress: float
    collisions: int
    lap_time: float
    mean_abs_lateral: float
    max_abs_lateral: float
    mean_speed: float
    sim_time: float
    steps: int
    end: str
    steps_per_s: float = float("nan")
    collision_with: str = ""            # "wall" or "car" when end == "collision"
    trajectory: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)), repr=False)
    commands: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)), repr=False)
    camera_frames: list[np.ndarray] = field(default_factory=list, repr=False)

    METRICS = ("success", "laps", "progress", "collisions", "lap_time", "mean_abs_lateral", "max_abs_lateral",
               "mean_speed", "sim_time", "steps", "steps_per_s")


def centre_position(track: Track, x: np.ndarray, y: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Continuous position along the centre line (B,) in samples, in [0, K): nearest sample ``index`` plus
    the projection onto the segment to the next sample."""
    n = len(track.centre)
    seg = track.centre[(index + 1) % n] - track.centre[index]
    rel = np.stack([x, y], 1) - track.centre[index]
    frac = np.clip((rel * seg).sum(1) / np.maximum((seg * seg).sum(1), 1e-9), -0.5, 1.0)
    return (index + frac) % n


class LapCounter:
    """Unwrapped progress along a closed centre line of ``samples`` samples, for B cars.

    ``update(pos)`` with positions (B,) in [0, K): the step is taken the short way round (|step| < K/2), so
    crossing the start line forwards adds and backwards subtracts. ``progress`` (B,) = laps as a float
    (negative when reversing from the start); ``laps`` (B,) = full laps completed, never decreasing, each
    counted once: reversing across the start and driving forward again only restores what was lost.
    """

    def __init__(self, samples: int, start_pos: np.ndarray) -> None:
        self.samples = int(samples)
        self.pos = np.asarray(start_pos, dtype=np.float64).copy()
        self.travelled = np.zeros(len(self.pos))
        self.best = np.zeros(len(self.pos))

    def update(self, pos: np.ndarray, mask: Optional[np.ndarray] = None) -> None:
        """New positions (B,) (entries where ``mask`` is False are ignored)."""
        mask = np.ones(len(self.pos), bool) if mask is None else mask
        k = self.samples
        step = (np.asarray(pos, dtype=np.float64) - self.pos + k / 2) % k - k / 2
        self.travelled = np.where(mask, self.travelled + step, self.travelled)
        self.pos = np.where(mask, pos, self.pos)
        self.best = np.maximum(self.best, self.travelled)

    @property
    def progress(self) -> np.ndarray:
        return self.travelled / self.samples

    @property
    def laps(self) -> np.ndarray:
        return np.floor(np.maximum(self.best, 0.0) / self.samples + 1e-9).astype(np.int64)


def _reach(vehicle: VehicleConfig) -> float:
    """How far the body rectangle reaches from the reference point (m): its corners' distance, plus 0.5 m.
    Whatever lies farther from every car cannot touch one, and the contact tests skip it."""
    return float(np.hypot(max(vehicle.length_front, vehicle.length_rear), vehicle.width / 2)) + 0.5


def wall_contact(track: Track, state: VehicleState, vehicle: VehicleConfig) -> np.ndarray:
    """(B,) bool: the body rectangle of each car touches (intersects or contains part of) a wall segment.

    The segments whose bounding box comes within the body's reach of some car are moved into each car's body
    frame and clipped against the rectangle (Liang-Barsky), all (B, S') pairs at once."""
    reach = _reach(vehicle)
    lo, hi = np.minimum(track.seg_a, track.seg_b) - reach, np.maximum(track.seg_a, track.seg_b) + reach  # (S, 2)
    x, y = state.x[:, None], state.y[:, None]
    near = np.flatnonzero(((lo[:, 0] <= x) & (x <= hi[:, 0]) & (lo[:, 1] <= y) & (y <= hi[:, 1])).any(axis=0))
    if len(near) == 0:
        return np.zeros(len(state), bool)
    c, s = np.cos(state.yaw)[:, None], np.sin(state.yaw)[:, None]

    def local(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dx, dy = p[None, :, 0] - state.x[:, None], p[None, :, 1] - state.y[:, None]
        return c * dx + s * dy, -s * dx + c * dy

    x0, y0 = local(track.seg_a[near])
    x1, y1 = local(track.seg_b[near])
    dx, dy = x1 - x0, y1 - y0
    t0, t1 = np.zeros_like(x0), np.ones_like(x0)
    reject = np.zeros(x0.shape, bool)
    half = vehicle.width / 2
    for p, q in ((-dx, x0 + vehicle.length_rear), (dx, vehicle.length_front - x0), (-dy, y0 + half), (dy, half - y0)):
        parallel = np.abs(p) < 1e-12
        reject |= parallel & (q < 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(parallel, 0.0, q / np.where(parallel, 1.0, p))
        t0 = np.where(~parallel & (p < 0), np.maximum(t0, r), t0)
        t1 = np.where(~parallel & (p > 0), np.minimum(t1, r), t1)
    return (~reject & (t0 <= t1)).any(axis=1)


def car_contact(track: Track, state: VehicleState, vehicle: VehicleConfig, t: float) -> np.ndarray:
    """(B,) bool: the body rectangle of each car touches one of the track's other cars at time ``t`` (s);
    all False on a track without other cars. Only the cars whose centre is within both bodies' reach of some
    car are tested (separating axes)."""
    traffic = track.traffic
    if traffic is None or len(traffic) == 0:
        return np.zeros(len(state), bool)
    poses = car_poses(track, traffic, t)
    reach = _reach(vehicle) + np.hypot(traffic.half_length, traffic.half_width)                      # (M,)
    near = (np.hypot(poses.x[None] - state.x[:, None], poses.y[None] - state.y[:, None]) <= reach).any(axis=0)
    if not near.any():                      # the cars' centres are farther than both bodies reach
        return np.zeros(len(state), bool)
    return boxes_overlap(body_corners(state, vehicle), car_corners(poses, traffic)[near])


def start_indices(track: Track, starts: int, offset: int = 0, behind_car: Optional[int] = None) -> list[int]:
    """``starts`` centre-line samples evenly spaced along the lap (the first at ``offset``), each moved
    forward, if needed, to be clear of the track's other cars at t = 0 (``traffic.clear_start``). With
    ``behind_car`` = c on a track with other cars, start k is instead just behind its car c + k (mod M)
    (``traffic.start_behind``): a run that closes in on a slower car."""
    if behind_car is not None and track.traffic is not None and len(track.traffic):
        return [start_behind(track, track.traffic, behind_car + k) for k in range(starts)]
    n = len(track.centre)
    return [clear_start(track, track.traffic, int((offset + round(k * n / starts)) % n)) for k in range(starts)]


def _sensors(world: SimWorld, policy: Policy, state: VehicleState, cars: np.ndarray, t: float,
             runs: Sequence["_Car"], record: Optional[int], frames: dict[int, np.ndarray], keep_raw: bool = False
             ) -> tuple[dict, list[np.ndarray], list[np.ndarray]]:
    """Render what the policy needs for the cars ``cars`` at time ``t`` (s) (and the recorded car's camera
    into ``frames``) -> (the Observation's sensor fields, and with ``keep_raw`` every car's full-size camera
    frame (H, W, 3) uint8 and LiDAR frame (N, 4) float32, both rendered whatever the policy needs)."""
    cfg = world.config
    lidar, camera = policy.needs_lidar or keep_raw, policy.needs_camera or keep_raw
    points, images, raw = [], [], []
    for b, car in enumerate(cars.tolist()):
        x, y, yaw = float(state.x[b]), float(state.y[b]), float(state.yaw[b])
        if lidar:
            points.append(cast_lidar(world.track, x, y, yaw, runs[car].lidar_rng, cfg.lidar, t=t))
        if camera or car == record:
            img = render_camera(world.track, x, y, yaw, cfg.camera, t=t, speed=float(state.v[b]),
                                rng=runs[car].camera_rng)
            if car == record:
                frames[car] = img
            if keep_raw:
                raw.append(img)
            if policy.needs_camera:
                images.append(np.stack([prepare_image(img, policy.image_size)]))
    out: dict = {}
    if policy.needs_lidar:
        out["points"] = points
    if policy.needs_camera:
        W, H = policy.image_size
        out["images"] = np.stack(images)
        out["intrinsics"] = np.stack([scale_intrinsics(c.K, W / c.image_size[0], H / c.image_size[1])
                                      for c in world.cameras])
        out["cam2ego"] = np.stack([c.cam2ego for c in world.cameras])
    return out, (raw if keep_raw else []), (points if keep_raw else [])


@dataclass
class _Car:
    """One car's running record inside :func:`run_closed_loop`: its model-input history, what it did each step
    (pose, command, |lateral offset|, speed) and how its run ended."""
    start_index: int
    lidar_rng: np.random.Generator
    camera_rng: np.random.Generator
    seq_len: int
    speed_hist: deque = field(init=False)
    steer_hist: deque = field(init=False)
    prev_cmd: float = 0.0
    trajectory: list[tuple[float, float, float]] = field(default_factory=list)
    commands: list[tuple[float, float]] = field(default_factory=list)
    lateral: list[float] = field(default_factory=list)
    speeds: list[float] = field(default_factory=list)
    steps: int = 0
    done: bool = False
    collided: bool = False
    end: str = "time"
    collision_with: str = ""
    lap_time: float = float("nan")

    def __post_init__(self) -> None:
        self.speed_hist = deque(maxlen=self.seq_len)
        self.steer_hist = deque(maxlen=self.seq_len)

    def observe(self, x: float, y: float, yaw: float, v: float, abs_lateral: float) -> None:
        """The car's state at the start of a step: model inputs (measured speed, previous command) and log."""
        self.speed_hist.append(v)
        self.steer_hist.append(self.prev_cmd)
        self.trajectory.append((x, y, yaw))
        self.speeds.append(v)
        self.lateral.append(abs_lateral)

    def command(self, steer: float, speed: float) -> None:
        """The command issued this step (steering already clipped to the vehicle's limit)."""
        self.commands.append((steer, speed))
        self.prev_cmd = steer
        self.steps += 1

    def result(self, name: str, world: SimWorld, laps: int, progress: float, final_pose: Sequence[float],
               start_speed: float, dt: float, laps_needed: int, steps_per_s: float,
               camera_frames: list[np.ndarray]) -> RunResult:
        lat = np.asarray(self.lateral) if self.lateral else np.zeros(1)
        tr = np.asarray(self.trajectory).reshape(-1, 3)
        return RunResult(
            policy=name, split=world.split, segment=world.segment, start_index=self.start_index,
            success=bool(not self.collided and laps >= laps_needed), laps=laps, progress=progress,
            collisions=int(self.collided), lap_time=self.lap_time, mean_abs_lateral=float(lat.mean()),
            max_abs_lateral=float(lat.max()), mean_speed=float(np.mean(self.speeds)) if self.speeds else start_speed,
            sim_time=float(self.steps * dt), steps=self.steps, end=self.end, steps_per_s=steps_per_s,
            collision_with=self.collision_with, trajectory=np.vstack([tr, [list(final_pose)]]),
            commands=np.asarray(self.commands).reshape(-1, 2), camera_frames=camera_frames)


def run_closed_loop(policy: Policy, world: SimWorld, starts: Sequence[int], cfg: ClosedLoopConfig,
                    progress: Optional[Callable[[int], None]] = None,
                    recorder: Optional["DriveRecorder"] = None) -> list[RunResult]:
    """Drive ``len(starts)`` cars at once, car k from centre-line sample ``starts[k]`` (on the centre line,
    heading along it, wheels straight; moved forward if it is inside or just behind another car at t = 0,
    ``traffic.clear_start``, the sample used is ``RunResult.start_index``); ``progress(n)`` is called after
    each step with the cars stepped; ``recorder`` (``e2r.sim.record.DriveRecorder``): every car's run is
    also written as a dataset segment. Returns one :class:`RunResult` per start, in order."""
    track, vehicle = world.track, world.config.vehicle
    B, n = len(starts), len(track.centre)
    dt = 1.0 / world.rate_hz
    max_steps = max(1, int(round(cfg.time_limit * world.rate_hz)))
    idx = np.array([clear_start(track, track.traffic, int(s)) for s in starts], dtype=np.int64).reshape(-1)
    v0 = speed_profile(track, world.config.expert)[idx] if cfg.start_speed is None else np.full(B, cfg.start_speed)
    state = VehicleState.create(track.centre[idx, 0], track.centre[idx, 1],
                                np.arctan2(track.tangent[idx, 1], track.tangent[idx, 0]), v0)
    runs = [_Car(int(idx[k]), np.random.default_rng(np.random.SeedSequence([cfg.seed, k, int(idx[k])])),
                 np.random.default_rng(np.random.SeedSequence([cfg.seed, k, int(idx[k]), 1])), cfg.seq_len)
            for k in range(B)]
    laps = LapCounter(n, centre_position(track, state.x, state.y, idx))
    frames: dict[int, np.ndarray] = {}
    camera_frames: list[np.ndarray] = []
    policy.reset(track, world.config, B, cfg.seq_len)
    if recorder is not None:
        recorder.begin(idx.tolist(), cfg.seq_len)
    t_wall = time.perf_counter()
    for t in range(max_steps):
        cars = np.array([k for k, r in enumerate(runs) if not r.done], dtype=np.int64)
        if len(cars) == 0:
            break
        sub = state.take(cars)
        lat = np.abs(track.lateral_offset(sub.x, sub.y, idx[cars]))
        for b, car in enumerate(cars.tolist()):
            runs[car].observe(sub.x[b], sub.y[b], sub.yaw[b], sub.v[b], lat[b])
        sensors, raw_images, raw_points = _sensors(world, policy, sub, cars, t * dt, runs, cfg.record_camera, frames,
                                                   keep_raw=recorder is not None)
        obs = Observation(t=t, cars=cars, state=sub, index=idx[cars].copy(),
                          speed=np.array([list(runs[c].speed_hist) for c in cars], dtype=np.float32),
                          steering=np.array([list(runs[c].steer_hist) for c in cars], dtype=np.float32),
                          **sensors)
        if cfg.record_camera in frames:
            camera_frames.append(frames.pop(cfg.record_camera))
        steer_cmd, speed_cmd = (np.nan_to_num(np.asarray(a, dtype=np.float64)) for a in policy.act(obs))
        steer_cmd = np.clip(steer_cmd, -vehicle.steer_max_deg, vehicle.steer_max_deg)
        for b, car in enumerate(cars.tolist()):
            runs[car].command(steer_cmd[b], speed_cmd[b])
        if recorder is not None:
            recorder.step(obs, raw_images, raw_points, steer_cmd, speed_cmd, getattr(policy, "control", None),
                          getattr(policy, "proposals", None))
        sub = advance(sub, steer_cmd, speed_cmd, dt, vehicle)
        state.put(cars, sub)
        idx[cars] = nearest_index(track, sub.x, sub.y, idx[cars])
        active = np.zeros(B, bool)
        active[cars] = True
        laps.update(centre_position(track, state.x, state.y, idx), active)
        hit_wall = wall_contact(track, sub, vehicle)
        hit_car = car_contact(track, sub, vehicle, (t + 1) * dt)
        lap_count = laps.laps                       # (B,), computed once for the step
        for b, car in enumerate(cars.tolist()):
            run = runs[car]
            if np.isnan(run.lap_time) and lap_count[car] >= 1:
                run.lap_time = (t + 1) * dt
            if hit_wall[b] or hit_car[b]:
                run.end, run.collision_with = "collision", "wall" if hit_wall[b] else "car"
                run.collided = run.done = True
            elif lap_count[car] >= cfg.laps:
                run.end, run.done = "laps", True
        if progress is not None:
            progress(len(cars))
    rate = float(sum(r.steps for r in runs) / max(time.perf_counter() - t_wall, 1e-9))
    results = [run.result(policy.name, world, int(laps.laps[k]), float(laps.progress[k]),
                       (state.x[k], state.y[k], state.yaw[k]), float(v0[k]), dt, cfg.laps, rate,
                          camera_frames if k == cfg.record_camera else [])
               for k, run in enumerate(runs)]
    if recorder is not None:
        recorder.finish(results)
    return results
