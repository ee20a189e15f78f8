"""The one vehicle model of the synthetic world, shared by the expert (who records the dataset) and the
closed loop (where a policy drives): a kinematic bicycle over B cars at once (numpy, no loops over cars).

- Reference point = ego origin (the LiDAR's ground projection), on the rear axle; wheelbase ``L``.
  ``yaw_rate = v / L * tan(steer)``; within one integration step the speed used for the distance is the mean
  of the old and new speed and the steering angle is constant, so the car moves along an exact circular arc
  (a constant steering angle traces the circle of radius ``L / tan(steer)``, whatever ``dt``).
- Steering: the wheel angle follows the command at most ``steer_rate_max_deg_s`` (deg/s), clipped to
  ``+-steer_max_deg``.
- Speed: a P controller tracks the commanded speed (as in f1tenth_gym):
  ``accel = clip(speed_gain * (v_cmd - v), -brake_max, accel_max)``; speed clipped to ``[0, v_max]``
  (no reversing). Commands are clipped to ``[0, v_max]``.
- Commands come at the policy rate (the dataset's 20 Hz); :func:`advance` holds them for one frame and
  integrates ``substeps`` fixed steps of :func:`step`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["VehicleConfig", "VehicleState", "step", "advance", "body_corners"]


@dataclass
class VehicleConfig:
    """Kinematics, actuator limits and body size (metres, seconds, degrees)."""
    wheelbase: float = 2.7
    steer_max_deg: float = 30.0
    steer_rate_max_deg_s: float = 120.0     # generous: the expert's pure pursuit never hits it on a valid track
    accel_max: float = 3.0                  # m/s^2
    brake_max: float = 6.0                  # m/s^2
    speed_gain: float = 2.0                 # 1/s, P gain of the speed loop
    v_max: float = 25.0                     # m/s
    substeps: int = 4                       # integration steps per command (frame)
    # body: a rectangle around the rear-axle reference point (collision checks)
    length_front: float = 3.6               # from the reference point to the front bumper
    length_rear: float = 0.9                # from the reference point to the rear bumper
    width: float = 1.8


@dataclass
class VehicleState:
    """B cars: x, y (m, track frame), yaw (rad), v (m/s), steer (deg, actual wheel angle, + = left); each (B,)."""
    x: np.ndarray
    y: np.ndarray
    yaw: np.ndarray
    v: np.ndarray
    steer: np.ndarray

    @classmethod
    def create(cls, x, y, yaw, v, steer=0.0) -> "VehicleState":
        """A state from scalars or (B,) arrays (broadcast to a common B, float64 copies)."""
        arrays = np.broadcast_arrays(*(np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in (x, y, yaw, v, steer)))
        return cls(*(a.copy() for a in arrays))

    def __len__(self) -> int:
        return len(self.x)

    def take(self, index: np.ndarray) -> "VehicleState":
        """The cars ``index`` (any numpy index) as a new state (copies)."""
        return VehicleState(*(a[index].copy() for a in (self.x, self.y, self.yaw, self.v, self.steer)))

    def put(self, index: np.ndarray, other: "VehicleState") -> None:
        """Write ``other``'s cars into positions ``index`` of this state, in place."""
        for name in ("x", "y", "yaw", "v", "steer"):
            getattr(self, name)[index] = getattr(other, name)


def step(state: VehicleState, steer_cmd_deg: np.ndarray, speed_cmd: np.ndarray, dt: float,
         cfg: VehicleConfig) -> VehicleState:
    """One integration step of ``dt`` seconds for B cars: commands (B,) (or scalars) -> the new state."""
    return _integrate(state, *_clipped_commands(steer_cmd_deg, speed_cmd, cfg), dt, cfg)


def _clipped_commands(steer_cmd_deg: np.ndarray, speed_cmd: np.ndarray, cfg: VehicleConfig
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The commands as float64, clipped to the vehicle's limits: steering (B,) deg, speed (B,) m/s."""
    return (np.clip(np.asarray(steer_cmd_deg, dtype=np.float64), -cfg.steer_max_deg, cfg.steer_max_deg),
            np.clip(np.asarray(speed_cmd, dtype=np.float64), 0.0, cfg.v_max))


def _integrate(state: VehicleState, steer_cmd: np.ndarray, v_cmd: np.ndarray, dt: float,
               cfg: VehicleConfig) -> VehicleState:
    """:func:`step` with commands already clipped (:func:`_clipped_commands`)."""
    max_change = cfg.steer_rate_max_deg_s * dt
    steer = np.clip(state.steer + np.clip(steer_cmd - state.steer, -max_change, max_change),
                    -cfg.steer_max_deg, cfg.steer_max_deg)
    accel = np.clip(cfg.speed_gain * (v_cmd - state.v), -cfg.brake_max, cfg.accel_max)
    v = np.clip(state.v + accel * dt, 0.0, cfg.v_max)
    dist = 0.5 * (state.v + v) * dt
    dyaw = dist * np.tan(np.radians(steer)) / cfg.wheelbase
    # exact arc: chord length dist * sinc(dyaw / 2) in the direction yaw + dyaw / 2 (np.sinc(x) = sin(pi x)/(pi x))
    chord = dist * np.sinc(dyaw / (2 * np.pi))
    heading = state.yaw + 0.5 * dyaw
    return VehicleState(x=state.x + chord * np.cos(heading), y=state.y + chord * np.sin(heading),
                        yaw=state.yaw + dyaw, v=v, steer=steer)


def advance(state: VehicleState, steer_cmd_deg: np.ndarray, speed_cmd: np.ndarray, frame_dt: float,
            cfg: VehicleConfig) -> VehicleState:
    """Hold the commands (B,) for one frame of ``frame_dt`` seconds: ``cfg.substeps`` steps of :func:`step`
    (the commands are clipped once: the same for every step)."""
    n = max(1, int(cfg.substeps))
    commands = _clipped_commands(steer_cmd_deg, speed_cmd, cfg)
    for _ in range(n):
        state = _integrate(state, *commands, frame_dt / n, cfg)
    return state


def body_corners(state: VehicleState, cfg: VehicleConfig) -> np.ndarray:
    """The body rectangle's corners (B, 4, 2) in the track frame (rear-right, front-right, front-left,
    rear-left)."""
    local = np.array([[-cfg.length_rear, -cfg.width / 2], [cfg.length_front, -cfg.width / 2],
                      [cfg.length_front, cfg.width / 2], [-cfg.length_rear, cfg.width / 2]])
    c, s = np.cos(state.yaw)[:, None], np.sin(state.yaw)[:, None]
    x = state.x[:, None] + c * local[None, :, 0] - s * local[None, :, 1]
    y = state.y[:, None] + s * local[None, :, 0] + c * local[None, :, 1]
    return np.stack([x, y], axis=-1)

