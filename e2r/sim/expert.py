"""The expert driver of the synthetic world: pure pursuit on the centre line + a curvature-limited speed.

The car is a kinematic bicycle (reference point = ego origin = the LiDAR's ground projection, wheelbase
``wheelbase``). At every frame (fixed rate ``rate_hz``) the expert looks at the track geometry in front of
the car only, the same geometry both sensors see:
- steering: pure pursuit towards the point ``lookahead`` metres ahead on the centre line (plus a slowly
  smoothly wandering lateral offset (3 slow sinusoids), so states away from the centre are recorded),
  ``wheel_angle = atan(2 L sin(alpha) / Ld)`` in degrees, positive = left, with a little Gaussian noise;
- speed: the target is ``min(v_max, sqrt(a_lat / |curvature|))`` over the next ``speed_horizon`` metres
  (< 25 m, inside the teacher's BEV range), tracked with bounded acceleration/braking.
The recorded frame t holds the pose at t, ``velocity[t]`` (m/s, the car's speed at t) and
``wheel_angle[t]`` (the command issued at t from what is visible at t).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from e2r.sim.track import Track

__all__ = ["ExpertConfig", "Drive", "drive_expert"]


@dataclass
class ExpertConfig:
    rate_hz: float = 20.0
    wheelbase: float = 2.7
    lookahead_gain: float = 0.45        # Ld = clip(gain * v + base, min, max)
    lookahead_base: float = 3.0
    lookahead_min: float = 5.0
    lookahead_max: float = 14.0
    max_wheel_angle_deg: float = 30.0
    steer_noise_deg: float = 0.05       # white noise on the command (small: the policy's inputs can't predict it)
    lateral_wander_m: float = 0.6       # std of the smooth lateral offset of the followed line
    lateral_wander_period_s: tuple[float, float] = (4.0, 12.0)  # periods of its 3 sinusoids
    v_min: float = 6.0
    v_max: float = 20.0
    a_lat_max: float = 5.0              # m/s^2
    accel_max: float = 3.0
    brake_max: float = 6.0
    speed_horizon: float = 22.0         # m ahead considered by the speed profile
    speed_noise: float = 0.15           # m/s^2 std added to the longitudinal command


@dataclass
class Drive:
    """F frames of an expert drive: x, y, yaw (F,) world pose; velocity (F,) m/s; wheel_angle (F,) deg;
    index (F,) nearest centre-line sample; curvature (F,) of the track at the car (1/m)."""
    x: np.ndarray
    y: np.ndarray
    yaw: np.ndarray
    velocity: np.ndarray
    wheel_angle: np.ndarray
    index: np.ndarray
    curvature: np.ndarray


def _nearest_index(track: Track, x: float, y: float, hint: int, window: int = 40) -> int:
    n = len(track.centre)
    cand = (hint + np.arange(-window, window + 1)) % n
    d = (track.centre[cand, 0] - x) ** 2 + (track.centre[cand, 1] - y) ** 2
    return int(cand[np.argmin(d)])


def drive_expert(track: Track, frames: int, rng: np.random.Generator,
                 cfg: ExpertConfig | None = None, start_index: int | None = None) -> Drive:
    """Simulate ``frames`` frames of the expert on ``track`` starting at a random (or given) centre sample."""
    cfg = cfg or ExpertConfig()
    n = len(track.centre)
    ds = track.length / n
    dt = 1.0 / cfg.rate_hz
    L = cfg.wheelbase
    # speed cap from curvature, then the minimum over the horizon ahead (periodic)
    v_curve = np.minimum(cfg.v_max, np.sqrt(cfg.a_lat_max / np.maximum(np.abs(track.curvature), 1e-6)))
    h = max(1, int(cfg.speed_horizon / ds))
    ext = np.concatenate([v_curve, v_curve[:h]])
    v_ref_track = np.min(np.lib.stride_tricks.sliding_window_view(ext, h + 1), axis=1)[:n]
    v_ref_track = np.maximum(v_ref_track, cfg.v_min)

    i = int(rng.integers(n)) if start_index is None else int(start_index) % n
    x, y = track.centre[i]
    yaw = float(np.arctan2(track.tangent[i, 1], track.tangent[i, 0]))
    v = float(v_ref_track[i])
    # the followed line wanders smoothly (sum of 3 sinusoids, random periods and phases): a driver's line
    # changes over seconds, not from one frame to the next, so the command stays predictable from the scene
    periods = rng.uniform(*cfg.lateral_wander_period_s, size=3)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    amp = cfg.lateral_wander_m * np.sqrt(2.0 / 3.0)   # std of the sum = lateral_wander_m
    out = {k: np.zeros(frames) for k in ("x", "y", "yaw", "velocity", "wheel_angle", "curvature")}
    index = np.zeros(frames, dtype=np.int64)
    for t in range(frames):
        i = _nearest_index(track, x, y, i)
        offset = float(amp * np.sin(2 * np.pi * t * dt / periods + phases).sum())
        ld = float(np.clip(cfg.lookahead_gain * v + cfg.lookahead_base, cfg.lookahead_min, cfg.lookahead_max))
        # continuous look-ahead point: the car's fractional position along the centre line + ld, linearly
        # interpolated between samples (snapping to 1 m samples would make the command jump frame to frame)
        seg = track.centre[(i + 1) % n] - track.centre[i]
        frac = float(np.dot([x, y] - track.centre[i], seg) / max(np.dot(seg, seg), 1e-9))
        pos = i + frac + ld / ds
        j0 = int(np.floor(pos)) % n
        j1, w1 = (j0 + 1) % n, pos - np.floor(pos)
        centre_j = (1 - w1) * track.centre[j0] + w1 * track.centre[j1]
        normal_j = (1 - w1) * track.normal[j0] + w1 * track.normal[j1]
        max_off = max(0.0, ((1 - w1) * track.width[j0] + w1 * track.width[j1]) / 2 - 2.0)
        tx, ty = centre_j + normal_j * np.clip(offset, -max_off, max_off)
        dx, dy = tx - x, ty - y
        alpha = np.arctan2(dy, dx) - yaw
        alpha = (alpha + np.pi) % (2 * np.pi) - np.pi
        dist = max(np.hypot(dx, dy), 1.0)
        delta = np.degrees(np.arctan2(2 * L * np.sin(alpha), dist)) + rng.normal(0, cfg.steer_noise_deg)
        delta = float(np.clip(delta, -cfg.max_wheel_angle_deg, cfg.max_wheel_angle_deg))
        for k, val in (("x", x), ("y", y), ("yaw", yaw), ("velocity", v), ("wheel_angle", delta),
                       ("curvature", track.curvature[i])):
            out[k][t] = val
        index[t] = i
        # longitudinal command and state update (kinematic bicycle)
        acc = np.clip((v_ref_track[i] - v) / 0.5, -cfg.brake_max, cfg.accel_max) + rng.normal(0, cfg.speed_noise)
        x += v * np.cos(yaw) * dt
        y += v * np.sin(yaw) * dt
        yaw += v / L * np.tan(np.radians(delta)) * dt
        v = max(0.5, v + acc * dt)
    return Drive(index=index, **out)
