"""Other cars on the track (the sensor-gap world): M boxes driving the lap at their own speed.

Each car follows the centre line, a little off it (a smooth lateral offset of at most ``lateral_max``
metres), at one fraction ``factor`` of the expert's speed profile (``e2r.sim.expert.speed_profile``; one
factor per track, drawn in ``TrafficConfig.speed_factor``), so they never catch one another, and the ego
expert, who drives the full profile, catches up with them and follows (:func:`follow_limit`). They do not
react to the ego car: their motion is a pure function of the time ``t`` (seconds since the start of a
recording or of a closed-loop run), read from one table of the time each needs to reach every centre sample
(``cum_time``). They are spread round the lap in *time* (at least ``min_time_gap`` seconds apart, so the
number drawn is capped on short laps): wherever they are, the gap between two of them leaves room for the
ego car following the first one, and they never close up in slow corners. Deterministic per seed:
everything is drawn once per track from the world's traffic stream.

Geometry: a box, footprint ``2 half_length x 2 half_width`` around the car's position, from the ground to
``height``. The LiDAR (all around) and the camera (in its field of view only) ray cast it
(``e2r.sim.sensors``, :func:`ray_boxes`); touching it is a collision in the closed loop (:func:`car_contact`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from e2r.sim.track import Track

__all__ = ["TrafficConfig", "Traffic", "CarPoses", "make_traffic", "car_poses", "car_corners", "ray_boxes",
           "boxes_overlap", "follow_limit", "clear_start", "start_behind", "FACE_REAR", "FACE_FRONT", "FACE_SIDE"]

FACE_REAR, FACE_FRONT, FACE_SIDE = 0, 1, 2


@dataclass
class TrafficConfig:
    """Other cars of a gap-world track (metres, seconds) and how the expert follows them."""
    cars: tuple[int, int] = (2, 5)                   # inclusive range of the number of cars per track
    min_time_gap: float = 5.0                        # s between two cars at least (fewer cars on short laps)
    speed_factor: tuple[float, float] = (0.65, 0.85) # their speed / the expert's speed profile (one per track)
    length: tuple[float, float] = (4.2, 4.8)
    width: tuple[float, float] = (1.75, 1.9)
    height: tuple[float, float] = (1.35, 1.5)
    lateral_max: float = 0.5                         # largest lateral offset from the centre line
    follow_decel: float = 2.5                        # m/s^2 the expert plans to brake with behind a car
    follow_gap: float = 3.0                          # m bumper to bumper kept at standstill
    follow_time_gap: float = 0.5                     # s of extra gap per m/s of own speed
    start_clear_behind: float = 20.0                 # no start point this far behind a car's rear (at t=0)
    start_clear_ahead: float = 6.0                   # ... or this close in front of its front


@dataclass
class Traffic:
    """M cars: ``s0`` (M,) arc length at t = 0; lateral offset ``lat_amp * sin(2 pi lat_cycles s / L +
    lat_phase)`` (M,) each; box ``half_length``, ``half_width``, ``height`` (M,); ``colour`` (M, 3) body RGB;
    ``factor`` of the expert's profile; ``speed`` (K,) their speed at each centre sample; ``cum_time``
    (K + 1,) time from sample 0 to sample k at that speed, ``lap_time`` = cum_time[-1]."""
    s0: np.ndarray
    lat_amp: np.ndarray
    lat_cycles: np.ndarray
    lat_phase: np.ndarray
    half_length: np.ndarray
    half_width: np.ndarray
    height: np.ndarray
    colour: np.ndarray
    factor: float
    speed: np.ndarray
    cum_time: np.ndarray
    lap_time: float
    cfg: TrafficConfig
    _last: tuple = field(default=(), init=False, repr=False, compare=False)   # (track, t, poses) of car_poses

    def __len__(self) -> int:
        return len(self.s0)


@dataclass
class CarPoses:
    """Poses of the M cars at one time: x, y (m), yaw (rad), s (arc length in [0, L)), v (m/s), each (M,)."""
    x: np.ndarray
    y: np.ndarray
    yaw: np.ndarray
    s: np.ndarray
    v: np.ndarray


def _body_colours(rng: np.random.Generator, m: int) -> np.ndarray:
    """Car paint as on real roads: mostly white, black, grey and silver, some saturated colours."""
    palette = np.array([[0.92, 0.92, 0.90], [0.08, 0.08, 0.09], [0.45, 0.46, 0.48], [0.70, 0.71, 0.73],
                        [0.70, 0.08, 0.07], [0.08, 0.18, 0.55], [0.10, 0.40, 0.18], [0.85, 0.65, 0.10]])
    pick = rng.choice(len(palette), size=m, p=[0.22, 0.2, 0.16, 0.14, 0.09, 0.09, 0.05, 0.05])
    return np.clip(palette[pick] * rng.uniform(0.9, 1.1, size=(m, 1)), 0.0, 1.0)


def make_traffic(track: Track, rng: np.random.Generator, v_ref: np.ndarray, cfg: TrafficConfig) -> Traffic:
    """Draw the cars of ``track``; ``v_ref`` (K,) is the expert's speed profile on it (m/s)."""
    m = int(rng.integers(cfg.cars[0], cfg.cars[1] + 1))
    n = len(track.centre)
    ds = track.length / n
    factor = float(rng.uniform(*cfg.speed_factor))
    speed = factor * np.asarray(v_ref, dtype=np.float64)
    cum_time = np.concatenate([[0.0], np.cumsum(ds / speed)])
    lap_time = float(cum_time[-1])
    m = max(0, min(m, int(0.6 * lap_time / cfg.min_time_gap)))   # equal time shares, jitter <= 0.2 share
    tau = ((np.arange(m) + rng.uniform(-0.2, 0.2, size=m)) * lap_time / max(m, 1) + rng.uniform(0, lap_time))
    s0 = np.interp(tau % lap_time, cum_time, np.arange(n + 1) * ds) % track.length
    return Traffic(s0=s0, lat_amp=rng.uniform(0.0, cfg.lateral_max, size=m),
                   lat_cycles=rng.integers(1, 5, size=m).astype(np.float64),
                   lat_phase=rng.uniform(0, 2 * np.pi, size=m), half_length=rng.uniform(*cfg.length, size=m) / 2,
                   half_width=rng.uniform(*cfg.width, size=m) / 2, height=rng.uniform(*cfg.height, size=m),
                   colour=_body_colours(rng, m), factor=factor, speed=speed, cum_time=cum_time,
                   lap_time=lap_time, cfg=cfg)


def _along(track: Track, s: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Linear interpolation of per-sample ``values`` (K, ...) at arc lengths ``s`` (M,) on the closed loop."""
    n = len(track.centre)
    pos = (np.asarray(s, dtype=np.float64) % track.length) / (track.length / n)
    i0 = np.floor(pos).astype(np.int64) % n
    w = pos - np.floor(pos)
    w = w.reshape(w.shape + (1,) * (values.ndim - 1))
    return (1 - w) * values[i0] + w * values[(i0 + 1) % n]


def car_poses(track: Track, traffic: Traffic, t: float) -> CarPoses:
    """Where the cars are at time ``t`` (s). The last answer is kept on ``traffic`` (every sensor of every
    car of a closed-loop step asks for the same time); its arrays are read-only."""
    if traffic._last and traffic._last[0] is track and traffic._last[1] == float(t):
        return traffic._last[2]
    poses = _car_poses(track, traffic, float(t))
    for a in (poses.x, poses.y, poses.yaw, poses.s, poses.v):
        a.flags.writeable = False
    traffic._last = (track, float(t), poses)
    return poses


def _car_poses(track: Track, traffic: Traffic, t: float) -> CarPoses:
    n = len(track.centre)
    s_grid = np.arange(n + 1) * (track.length / n)
    tau0 = np.interp(traffic.s0, s_grid, traffic.cum_time)
    tau = (tau0 + float(t)) % traffic.lap_time
    s = np.interp(tau, traffic.cum_time, s_grid) % track.length
    centre = _along(track, s, track.centre)
    tangent = _along(track, s, track.tangent)
    tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-9)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    lat = traffic.lat_amp * np.sin(2 * np.pi * traffic.lat_cycles * s / track.length + traffic.lat_phase)
    xy = centre + normal * lat[:, None]
    return CarPoses(x=xy[:, 0], y=xy[:, 1], yaw=np.arctan2(tangent[:, 1], tangent[:, 0]), s=s,
                    v=_along(track, s, traffic.speed))


def car_corners(poses: CarPoses, traffic: Traffic) -> np.ndarray:
    """Footprint corners (M, 4, 2): rear-right, front-right, front-left, rear-left (as vehicle.body_corners)."""
    hl, hw = traffic.half_length[:, None], traffic.half_width[:, None]
    lx = np.concatenate([-hl, hl, hl, -hl], axis=1)
    ly = np.concatenate([-hw, -hw, hw, hw], axis=1)
    c, s = np.cos(poses.yaw)[:, None], np.sin(poses.yaw)[:, None]
    return np.stack([poses.x[:, None] + c * lx - s * ly, poses.y[:, None] + s * lx + c * ly], axis=-1)


def ray_boxes(origin: np.ndarray, dirs: np.ndarray, poses: CarPoses,
              traffic: Traffic) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal rays from ``origin`` (2,) along unit ``dirs`` (A, 2) against the M footprints (slab test).

    Returns the horizontal distance to the entry point (A, M) (inf where missed or when the origin is inside),
    the face entered (A, M) (FACE_REAR, FACE_FRONT, FACE_SIDE) and the entry point's coordinate along that
    face (A, M): the car-frame y (left +) on the rear/front face, the car-frame x (forward +) on a side."""
    if len(traffic) == 0:
        empty = np.zeros((len(dirs), 0))
        return empty, empty.astype(np.int64), empty
    u = np.stack([np.cos(poses.yaw), np.sin(poses.yaw)], axis=1)            # (M, 2) car forward
    v = np.stack([-u[:, 1], u[:, 0]], axis=1)                               # (M, 2) car left
    rel = origin[None] - np.stack([poses.x, poses.y], axis=1)
    ox, oy = (rel * u).sum(1)[None], (rel * v).sum(1)[None]                 # (1, M)
    dx, dy = dirs @ u.T, dirs @ v.T                                         # (A, M)
    dx = np.where(np.abs(dx) < 1e-12, 1e-12, dx)
    dy = np.where(np.abs(dy) < 1e-12, 1e-12, dy)
    hl, hw = traffic.half_length[None], traffic.half_width[None]
    tx1, tx2 = (-hl - ox) / dx, (hl - ox) / dx
    ty1, ty2 = (-hw - oy) / dy, (hw - oy) / dy
    near_x, near_y = np.minimum(tx1, tx2), np.minimum(ty1, ty2)
    t_near = np.maximum(near_x, near_y)
    t_far = np.minimum(np.maximum(tx1, tx2), np.maximum(ty1, ty2))
    hit = (t_far >= t_near) & (t_near > 1e-6)
    dist = np.where(hit, t_near, np.inf)
    px, py = ox + t_near * dx, oy + t_near * dy
    via_x = near_x >= near_y
    face = np.where(via_x, np.where(px < 0, FACE_REAR, FACE_FRONT), FACE_SIDE)
    return dist, face, np.where(via_x, py, px)


def boxes_overlap(ego_corners: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """(B,) bool: each ego footprint (B, 4, 2) overlaps (touches) any car footprint (M, 4, 2) (separating
    axis test over the 4 edge directions of each pair of rectangles)."""
    b, m = len(ego_corners), len(corners)
    if m == 0 or b == 0:
        return np.zeros(b, bool)

    def axes(c: np.ndarray) -> np.ndarray:
        return np.stack([c[:, 1] - c[:, 0], c[:, 3] - c[:, 0]], axis=1)     # (N, 2, 2)

    ax = np.concatenate([np.broadcast_to(axes(ego_corners)[:, None], (b, m, 2, 2)),
                         np.broadcast_to(axes(corners)[None], (b, m, 2, 2))], axis=2)      # (B, M, 4, 2)
    pa = np.einsum("bmkd,bcd->bmkc", ax, ego_corners)
    pb = np.einsum("bmkd,mcd->bmkc", ax, corners)
    separated = (pa.max(-1) < pb.min(-1)) | (pb.max(-1) < pa.min(-1))
    return (~separated.any(-1)).any(-1)


def follow_limit(track: Track, traffic: Traffic, t: float, s_ego: np.ndarray, v_ego: np.ndarray,
                 front: float) -> np.ndarray:
    """The highest speed command (B,) m/s that keeps ego cars at arc length ``s_ego`` (B,) (their reference
    point), speed ``v_ego`` (B,) and ``front`` metres from reference to bumper able to stop behind the next car
    ahead: ``sqrt(v_lead^2 + 2 a (gap - d_min))`` with the bumper-to-bumper ``gap`` along the lap,
    ``d_min = follow_gap + follow_time_gap * v_ego``, ``a = follow_decel``; inf without a car ahead."""
    s_ego = np.atleast_1d(np.asarray(s_ego, dtype=np.float64))
    if len(traffic) == 0:
        return np.full(len(s_ego), np.inf)
    cfg = traffic.cfg
    poses = car_poses(track, traffic, t)
    ahead = (poses.s[None] - s_ego[:, None]) % track.length                  # (B, M) along the lap
    gap = ahead - traffic.half_length[None] - front
    d_min = cfg.follow_gap + cfg.follow_time_gap * np.atleast_1d(v_ego)[:, None]
    limit = np.sqrt(np.maximum(poses.v[None] ** 2 + 2 * cfg.follow_decel * (gap - d_min), 0.0))
    limit = np.where(ahead < track.length / 2, limit, np.inf)                # cars behind do not limit
    return limit.min(axis=1)


def clear_start(track: Track, traffic: Traffic | None, index: int) -> int:
    """``index`` (a centre sample), moved forward to the first sample whose point is neither within
    ``start_clear_behind`` metres behind a car's rear nor ``start_clear_ahead`` in front of its front at t = 0."""
    n = len(track.centre)
    if traffic is None or len(traffic) == 0:
        return int(index) % n
    poses = car_poses(track, traffic, 0.0)
    ds = track.length / n
    for k in range(n):
        i = (int(index) + k) % n
        rel = (i * ds - poses.s + track.length / 2) % track.length - track.length / 2   # >0: ahead of the car
        blocked = (rel > -traffic.half_length - traffic.cfg.start_clear_behind) & \
                  (rel < traffic.half_length + traffic.cfg.start_clear_ahead)
        if not blocked.any():
            return i
    return int(index) % n


def start_behind(track: Track, traffic: Traffic, car: int) -> int:
    """The centre sample just behind other car ``car`` (mod M, M >= 1) at t = 0: the closest one that
    :func:`clear_start` allows (``start_clear_behind`` metres behind its rear, moved forward past any other car
    in the way), so a run from it closes in on that car."""
    n = len(track.centre)
    ds = track.length / n
    c = int(car) % len(traffic)
    behind = car_poses(track, traffic, 0.0).s[c] - traffic.half_length[c] - traffic.cfg.start_clear_behind - ds
    return clear_start(track, traffic, int(np.floor(behind / ds)) % n)
