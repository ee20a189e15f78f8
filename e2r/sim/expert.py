"""The expert driver of the synthetic world: pure pursuit on the centre line + a curvature-limited speed.

The expert issues two commands per frame (fixed rate ``rate_hz``) and the shared vehicle model
(``e2r.sim.vehicle``: kinematic bicycle, reference point = ego origin, steering-rate and acceleration limits,
a P speed loop) executes them. It looks at the track geometry in front of the car only, the same geometry
both sensors see:
- steering: pure pursuit towards the point ``lookahead`` metres ahead on the centre line (plus a slowly
  smoothly wandering lateral offset (3 slow sinusoids), so states away from the centre are recorded),
  ``wheel_angle = atan(2 L sin(alpha) / Ld)`` in degrees, positive = left, with a little Gaussian noise;
- speed command: ``min(v_max, sqrt(a_lat / |curvature|))`` minimised over the next ``speed_horizon`` metres
  (< 25 m, inside the teacher's BEV range), at least ``v_min``; the vehicle's speed loop tracks it.
- other cars (gap world, ``track.traffic``): the speed command is also capped by
  ``e2r.sim.traffic.follow_limit`` (able to stop behind the next car ahead, keeping a gap that grows with
  speed): the expert never overtakes, it follows; a drive starts at a point clear of them
  (``traffic.clear_start``).
The recorded frame t holds the pose at t, ``velocity[t]`` (m/s, the car's speed at t), ``wheel_angle[t]``
(the steering command issued at t from what is visible at t) and ``speed_command[t]`` (the speed asked for
at t). The pursuit and speed-profile functions here are vectorised over B cars and are the ones the
closed-loop expert policy (``e2r.sim.policies.ExpertPolicy``) uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from e2r.sim.track import Track
from e2r.sim.traffic import clear_start, follow_limit
from e2r.sim.vehicle import VehicleConfig, VehicleState, advance

__all__ = ["ExpertConfig", "Drive", "drive_expert", "speed_profile", "nearest_index", "pursuit_steer_deg",
           "arc_position", "expert_speed_command"]


@dataclass
class ExpertConfig:
    rate_hz: float = 20.0
    lookahead_gain: float = 0.45        # Ld = clip(gain * v + base, min, max)
    lookahead_base: float = 3.0
    lookahead_min: float = 5.0
    lookahead_max: float = 14.0
    max_wheel_angle_deg: float = 30.0   # the steering command is clipped to +-this
    steer_noise_deg: float = 0.05       # white noise on the command (small: the policy's inputs can't predict it)
    lateral_wander_m: float = 0.6       # std of the smooth lateral offset of the followed line
    # DART (Laskey et al. 2017): the car executes the command plus a slow random perturbation while the recorded
    # label stays the expert's command from the perturbed state, so the data hold recoveries from the errors a
    # learned policy makes in closed loop (without them a cloned policy drifts off and never came back)
    dart_steer_deg: float = 2.0         # std of the perturbation of the executed steering (0 = off)
    dart_tau_s: float = 0.6             # its correlation time (Ornstein-Uhlenbeck)
    lateral_wander_period_s: tuple[float, float] = (4.0, 12.0)  # periods of its 3 sinusoids
    v_min: float = 6.0
    v_max: float = 20.0
    a_lat_max: float = 5.0              # m/s^2
    speed_horizon: float = 22.0         # m ahead considered by the speed profile


@dataclass
class Drive:
    """F frames of an expert drive: x, y, yaw (F,) world pose; velocity (F,) m/s; wheel_angle (F,) deg
    (steering command); speed_command (F,) m/s; index (F,) nearest centre-line sample; curvature (F,) of the
    track at the car (1/m)."""
    x: np.ndarray
    y: np.ndarray
    yaw: np.ndarray
    velocity: np.ndarray
    wheel_angle: np.ndarray
    speed_command: np.ndarray
    index: np.ndarray
    curvature: np.ndarray


def speed_profile(track: Track, cfg: ExpertConfig) -> np.ndarray:
    """The expert's speed command (K,) m/s at each centre-line sample: the curvature-limited speed
    ``min(v_max, sqrt(a_lat_max / |curvature|))`` minimised over the next ``speed_horizon`` metres, >= v_min."""
    n = len(track.centre)
    ds = track.length / n
    v_curve = np.minimum(cfg.v_max, np.sqrt(cfg.a_lat_max / np.maximum(np.abs(track.curvature), 1e-6)))
    h = max(1, int(cfg.speed_horizon / ds))
    ext = np.concatenate([v_curve, v_curve[:h]])
    v_ref = np.min(np.lib.stride_tricks.sliding_window_view(ext, h + 1), axis=1)[:n]
    return np.maximum(v_ref, cfg.v_min)


def nearest_index(track: Track, x: np.ndarray, y: np.ndarray, hint: np.ndarray | None = None,
                  window: int = 40) -> np.ndarray:
    """Nearest centre-line sample (B,) int64 of points (B,): searched within ``+-window`` samples of ``hint``
    (B,) (the previous index: no jumps to a nearby other part of the loop), or over the whole lap."""
    x, y = np.atleast_1d(x).astype(np.float64), np.atleast_1d(y).astype(np.float64)
    n = len(track.centre)
    if hint is None:
        cand = np.broadcast_to(np.arange(n), (len(x), n))
    else:
        cand = (np.atleast_1d(hint)[:, None] + np.arange(-window, window + 1)[None]) % n
    d = (track.centre[cand, 0] - x[:, None]) ** 2 + (track.centre[cand, 1] - y[:, None]) ** 2
    return cand[np.arange(len(x)), np.argmin(d, axis=1)].astype(np.int64)


def arc_position(track: Track, x: np.ndarray, y: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Arc length (B,) m of cars at (x, y) (B,) whose nearest centre sample is ``index`` (B,): the sample's
    arc length plus the projection onto the segment to the next sample."""
    n = len(track.centre)
    seg = track.centre[(index + 1) % n] - track.centre[index]
    rel = np.stack([np.atleast_1d(x), np.atleast_1d(y)], 1) - track.centre[index]
    frac = np.clip((rel * seg).sum(1) / np.maximum((seg * seg).sum(1), 1e-9), -0.5, 1.0)
    return ((index + frac) * (track.length / n)) % track.length


def expert_speed_command(track: Track, v_ref: np.ndarray, t: float, x: np.ndarray, y: np.ndarray,
                         v: np.ndarray, index: np.ndarray, front: float) -> np.ndarray:
    """The expert's speed command (B,) at time ``t`` (s): the speed profile ``v_ref`` (K,) at ``index`` (B,),
    capped behind the other cars of the track (``follow_limit``; ``front``: reference point to bumper, m)."""
    v_cmd = v_ref[index]
    if track.traffic is None or len(track.traffic) == 0:
        return v_cmd
    limit = follow_limit(track, track.traffic, t, arc_position(track, x, y, index), v, front)
    return np.minimum(v_cmd, limit)


def pursuit_steer_deg(track: Track, x: np.ndarray, y: np.ndarray, yaw: np.ndarray, v: np.ndarray,
                      index: np.ndarray, offset: np.ndarray | float, cfg: ExpertConfig,
                      wheelbase: float) -> np.ndarray:
    """Pure-pursuit wheel angle (B,) deg (unclipped, no noise) of cars at (x, y, yaw, v) (B,) whose nearest
    centre sample is ``index`` (B,), following the centre line shifted left by ``offset`` (B,) metres."""
    n = len(track.centre)
    ds = track.length / n
    ld = np.clip(cfg.lookahead_gain * v + cfg.lookahead_base, cfg.lookahead_min, cfg.lookahead_max)
    # continuous look-ahead point: the car's fractional position along the centre line + ld, linearly
    # interpolated between samples (snapping to 1 m samples would make the command jump frame to frame)
    p = np.stack([x, y], axis=1)
    seg = track.centre[(index + 1) % n] - track.centre[index]
    frac = ((p - track.centre[index]) * seg).sum(1) / np.maximum((seg * seg).sum(1), 1e-9)
    pos = index + frac + ld / ds
    j0 = np.floor(pos).astype(np.int64) % n
    j1, w1 = (j0 + 1) % n, (pos - np.floor(pos))[:, None]
    centre_j = (1 - w1) * track.centre[j0] + w1 * track.centre[j1]
    normal_j = (1 - w1) * track.normal[j0] + w1 * track.normal[j1]
    max_off = np.maximum(0.0, ((1 - w1[:, 0]) * track.width[j0] + w1[:, 0] * track.width[j1]) / 2 - 2.0)
    target = centre_j + normal_j * np.clip(offset, -max_off, max_off)[:, None]
    d = target - p
    alpha = (np.arctan2(d[:, 1], d[:, 0]) - yaw + np.pi) % (2 * np.pi) - np.pi
    dist = np.maximum(np.hypot(d[:, 0], d[:, 1]), 1.0)
    return np.degrees(np.arctan2(2 * wheelbase * np.sin(alpha), dist))


def drive_expert(track: Track, frames: int, rng: np.random.Generator, cfg: ExpertConfig | None = None,
                 start_index: int | None = None, vehicle: VehicleConfig | None = None) -> Drive:
    """Simulate ``frames`` frames of the expert on ``track`` starting at a random (or given) centre sample
    (moved forward clear of other cars), on the centre line, heading along it, at the speed profile's speed,
    wheels straight."""
    cfg = cfg or ExpertConfig()
    vehicle = vehicle or VehicleConfig()
    n = len(track.centre)
    dt = 1.0 / cfg.rate_hz
    v_ref_track = speed_profile(track, cfg)
    i = clear_start(track, track.traffic, int(rng.integers(n)) if start_index is None else int(start_index))
    state = VehicleState.create(track.centre[i, 0], track.centre[i, 1],
                                np.arctan2(track.tangent[i, 1], track.tangent[i, 0]), v_ref_track[i])
    # the followed line wanders smoothly (sum of 3 sinusoids, random periods and phases): a driver's line
    # changes over seconds, not from one frame to the next, so the command stays predictable from the scene
    periods = rng.uniform(*cfg.lateral_wander_period_s, size=3)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    amp = cfg.lateral_wander_m * np.sqrt(2.0 / 3.0)   # std of the sum = lateral_wander_m
    out = {k: np.zeros(frames) for k in ("x", "y", "yaw", "velocity", "wheel_angle", "speed_command", "curvature")}
    index = np.zeros(frames, dtype=np.int64)
    idx = np.array([i])
    decay = float(np.exp(-dt / cfg.dart_tau_s))
    perturb = 0.0
    for t in range(frames):
        idx = nearest_index(track, state.x, state.y, idx)
        offset = np.array([amp * np.sin(2 * np.pi * t * dt / periods + phases).sum()])
        delta = pursuit_steer_deg(track, state.x, state.y, state.yaw, state.v, idx, offset, cfg,
                                  vehicle.wheelbase)[0] + rng.normal(0, cfg.steer_noise_deg)
        delta = float(np.clip(delta, -cfg.max_wheel_angle_deg, cfg.max_wheel_angle_deg))
        v_cmd = float(expert_speed_command(track, v_ref_track, t * dt, state.x, state.y, state.v, idx,
                                           vehicle.length_front)[0])
        for k, val in (("x", state.x[0]), ("y", state.y[0]), ("yaw", state.yaw[0]), ("velocity", state.v[0]),
                       ("wheel_angle", delta), ("speed_command", v_cmd), ("curvature", track.curvature[idx[0]])):
            out[k][t] = val
        index[t] = idx[0]
        if cfg.dart_steer_deg > 0:
            perturb = decay * perturb + np.sqrt(1 - decay ** 2) * cfg.dart_steer_deg * rng.normal()
        executed = float(np.clip(delta + perturb, -cfg.max_wheel_angle_deg, cfg.max_wheel_angle_deg))
        state = advance(state, np.array([executed]), np.array([v_cmd]), dt, vehicle)
    return Drive(index=index, **out)
