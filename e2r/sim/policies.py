"""Policies that drive cars in the closed loop (``e2r.sim.closed_loop``): each step they get an
:class:`Observation` of B cars and return ``(steering command (B,) deg, speed command (B,) m/s)``.

- :class:`ExpertPolicy`: the expert's pure pursuit on the centre line and its speed profile, capped behind
  the track's other cars (gap world), from the car's true pose and the cars' true positions
  (``e2r.sim.expert``'s functions; no noise, no wander): the reference.
- :class:`TeacherPolicy` / :class:`StudentPolicy`: a LiDAR teacher / camera student checkpoint, batched over
  the cars. Inputs are built as the datasets build them (docs/CONTRACTS.md): per step the frame's points
  (N, 4) float32 or image (Ncam, 3, H, W) at the model's ``image_size``, ``speed`` = measured speed,
  ``steering`` = the policy's own previous steering command (0 at the start). Each frame is encoded once and
  its ``bev_vec`` kept for the last ``seq_len`` frames; the temporal part runs on that window, which is
  exactly ``model.forward`` on the window (frames are encoded independently in eval mode). The command is
  the window's last step: ``actions[:, -1, 0]`` steering (deg), ``actions[:, -1, 1]`` speed command (m/s).
- :class:`MixedPolicy`: on-policy data collection (DAgger-style): each car executes the student's command
  with probability ``p_student`` (drawn every ``switch_every`` steps), otherwise the teacher's; the teacher
  takes over whenever the car leaves a safety envelope (lateral offset, heading error) and keeps control
  for ``recover_steps`` steps.
- Baselines: :class:`ConstantPolicy` (repeat the previous steering command, keep the current speed) and
  :class:`TrainMeanPolicy` (steer the training split's mean wheel angle, from a checkpoint's
  ``action_mean``; keep the current speed).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from e2r.checkpoints import load_checkpoint
from e2r.models.policy import STEER, TemporalPolicy
from e2r.models.student import load_student
from e2r.models.teacher import load_teacher
from e2r.sim.expert import expert_speed_command, pursuit_steer_deg, speed_profile
from e2r.sim.track import Track
from e2r.sim.vehicle import VehicleState
from e2r.sim.world import SyntheticConfig

__all__ = ["Observation", "Policy", "ExpertPolicy", "ConstantPolicy", "TrainMeanPolicy", "TeacherPolicy",
           "StudentPolicy", "ModelPolicy", "MixedPolicy", "CONTROL_STUDENT", "CONTROL_TEACHER", "CONTROL_TAKEOVER"]

#: who executed a step's command under :class:`MixedPolicy` (the ``control`` column of a recorded drive)
CONTROL_STUDENT, CONTROL_TEACHER, CONTROL_TAKEOVER = "student", "teacher", "takeover"


@dataclass
class Observation:
    """What B active cars give their policy at one step (frame ``t``).

    cars (B,) ids of the cars (stable over the run); state: their true VehicleState (B cars; privileged, only
    the expert and the baselines read it); index (B,) nearest centre-line sample; speed (B, T) float32 measured
    speeds of the window's frames; steering (B, T) float32 the policy's previous steering commands (steering[:,
    t] = command of the frame before); points: B clouds (N_b, 4) float32 of this frame or None; images
    (B, Ncam, 3, H, W) float32 in [0, 1] of this frame or None; intrinsics (Ncam, 3, 3) for (W, H), cam2ego
    (Ncam, 4, 4) or None.
    """
    t: int
    cars: np.ndarray
    state: VehicleState
    index: np.ndarray
    speed: np.ndarray
    steering: np.ndarray
    points: Optional[list[np.ndarray]] = None
    images: Optional[np.ndarray] = None
    intrinsics: Optional[np.ndarray] = None
    cam2ego: Optional[np.ndarray] = None


class Policy:
    """Base class. ``needs_lidar`` / ``needs_camera``: which sensors the loop must render for it;
    ``image_size`` (W, H): the camera input size it wants."""

    needs_lidar = False
    needs_camera = False
    image_size: Optional[tuple[int, int]] = None

    def __init__(self, name: str) -> None:
        self.name = name

    def reset(self, track: Track, world: SyntheticConfig, cars: int, seq_len: int) -> None:
        """Start a run of ``cars`` cars on ``track`` (the world's configs) with windows of ``seq_len`` frames."""

    def act(self, obs: Observation) -> tuple[np.ndarray, np.ndarray]:
        """(steering command (B,) deg, speed command (B,) m/s) for the observed cars."""
        raise NotImplementedError


class ExpertPolicy(Policy):
    """The expert's pure pursuit (on the centre line, no wander, no noise) and speed profile (following the
    other cars of a gap-world track)."""

    def __init__(self, name: str = "expert") -> None:
        super().__init__(name)
        self._track: Optional[Track] = None

    def reset(self, track: Track, world: SyntheticConfig, cars: int, seq_len: int) -> None:
        self._track, self._cfg, self._vehicle = track, world.expert, world.vehicle
        self._v_ref = speed_profile(track, world.expert)

    def act(self, obs: Observation) -> tuple[np.ndarray, np.ndarray]:
        s = obs.state
        steer = pursuit_steer_deg(self._track, s.x, s.y, s.yaw, s.v, obs.index, np.zeros(len(s)), self._cfg,
                                  self._vehicle.wheelbase)
        speed = expert_speed_command(self._track, self._v_ref, obs.t / self._cfg.rate_hz, s.x, s.y, s.v, obs.index,
                                     self._vehicle.length_front)
        return np.clip(steer, -self._cfg.max_wheel_angle_deg, self._cfg.max_wheel_angle_deg), speed


class ConstantPolicy(Policy):
    """Baseline: repeat the previous steering command (0 at the start), keep the current speed."""

    def __init__(self, name: str = "constant") -> None:
        super().__init__(name)

    def act(self, obs: Observation) -> tuple[np.ndarray, np.ndarray]:
        return obs.steering[:, -1].astype(np.float64), obs.speed[:, -1].astype(np.float64)


class TrainMeanPolicy(Policy):
    """Baseline: steer the training split's mean wheel angle (a checkpoint's ``action_mean``), keep the
    current speed."""

    def __init__(self, name: str, ckpt_path: str | Path) -> None:
        super().__init__(name)
        ckpt = load_checkpoint(ckpt_path)
        mean = ckpt["model"].get("action_mean")
        if mean is None or mean.numel() < 1:
            raise ValueError(f"checkpoint {ckpt_path} has no action_mean buffer (not a teacher/student checkpoint)")
        self.steer_mean = float(mean[STEER])

    def act(self, obs: Observation) -> tuple[np.ndarray, np.ndarray]:
        return np.full(len(obs.cars), self.steer_mean), obs.speed[:, -1].astype(np.float64)


class ModelPolicy(Policy):
    """A TemporalPolicy checkpoint; subclasses encode one frame per car (:meth:`encode`)."""

    def __init__(self, name: str, model: TemporalPolicy, ckpt: dict[str, Any], device: torch.device) -> None:
        super().__init__(name)
        self.model, self.ckpt, self.device = model, ckpt, device
        self._bev: dict[int, deque] = {}
        self._seq_len = 1

    def reset(self, track: Track, world: SyntheticConfig, cars: int, seq_len: int) -> None:
        self._bev = {}
        self._seq_len = int(seq_len)

    def encode(self, obs: Observation) -> torch.Tensor:
        """bev_vec (B, D) of this frame of each observed car."""
        raise NotImplementedError

    @torch.inference_mode()     # no autograd bookkeeping at all (the drive never trains the model it drives)
    def act(self, obs: Observation) -> tuple[np.ndarray, np.ndarray]:
        bev = self.encode(obs)
        T = obs.speed.shape[1]
        windows = []
        for b, car in enumerate(obs.cars.tolist()):
            hist = self._bev.setdefault(car, deque(maxlen=self._seq_len))
            hist.append(bev[b])
            if len(hist) != T:
                raise ValueError(f"{self.name}: car {car} has {len(hist)} encoded frames for a window of {T}")
            windows.append(torch.stack(list(hist)))
        speed = torch.as_tensor(obs.speed, dtype=torch.float32, device=self.device)
        steering = torch.as_tensor(obs.steering, dtype=torch.float32, device=self.device)
        actions, _ = self.model.temporal(torch.stack(windows), speed, steering)     # (B, T, 2)
        last = actions[:, -1].double().cpu().numpy()
        return last[:, 0], last[:, 1]


class TeacherPolicy(ModelPolicy):
    """A LiDAR teacher checkpoint (``e2r.models.teacher.load_teacher``, weights only)."""

    needs_lidar = True

    def __init__(self, name: str, ckpt_path: str | Path, device: torch.device) -> None:
        model, ckpt = load_teacher(ckpt_path, device)
        super().__init__(name, model, ckpt, device)

    def encode(self, obs: Observation) -> torch.Tensor:
        points = [torch.from_numpy(p).to(self.device) for p in obs.points]
        return self.model.encode_frames(points)[0]


class StudentPolicy(ModelPolicy):
    """A camera student checkpoint (``e2r.models.student.load_student``, weights only)."""

    needs_camera = True

    def __init__(self, name: str, ckpt_path: str | Path, device: torch.device) -> None:
        model, ckpt = load_student(ckpt_path, device)
        super().__init__(name, model, ckpt, device)
        self.image_size = (int(model.cfg.image_size[0]), int(model.cfg.image_size[1]))

    def encode(self, obs: Observation) -> torch.Tensor:
        B, n_cam = obs.images.shape[:2]
        images = torch.from_numpy(obs.images).to(self.device)
        K = torch.as_tensor(obs.intrinsics, dtype=torch.float32).expand(B, n_cam, 3, 3).to(self.device)
        T = torch.as_tensor(obs.cam2ego, dtype=torch.float32).expand(B, n_cam, 4, 4).to(self.device)
        return self.model.encode_frames(images, K, T)[0]


class MixedPolicy(Policy):
    """Student and teacher sharing each car (both run every step, so both keep their frame histories).

    Every ``switch_every`` steps each car draws who drives next: the student with probability ``p_student``,
    else the teacher (``seed``: the draws of a run; the same seed, cars and track give the same draws). When a
    car's |lateral offset| exceeds ``max_lateral`` m or its |heading error| to the centre line exceeds
    ``max_heading_deg``, the teacher takes over for ``recover_steps`` steps. ``control`` (B,) of the last
    :meth:`act`: who drove each observed car (``CONTROL_STUDENT`` / ``CONTROL_TEACHER`` /
    ``CONTROL_TAKEOVER``); ``proposals`` of the last :meth:`act`: ``(student, teacher)``, each (B, 2) ``[wheel
    angle, speed command]``, what each would have commanded (their disagreement, recorded beside the executed
    commands)."""

    def __init__(self, name: str, student: Policy, teacher: Policy, p_student: float, *, switch_every: int = 10,
                 max_lateral: float = 1.5, max_heading_deg: float = 30.0, recover_steps: int = 20,
                 seed: int = 0) -> None:
        super().__init__(name)
        if not 0.0 <= p_student <= 1.0:
            raise ValueError(f"p_student must be in [0, 1], got {p_student}")
        if switch_every < 1 or recover_steps < 0 or not (max_lateral > 0 and max_heading_deg > 0):
            raise ValueError("switch_every >= 1, recover_steps >= 0, max_lateral > 0 and max_heading_deg > 0 needed")
        self.student, self.teacher, self.p_student = student, teacher, float(p_student)
        self.switch_every, self.recover_steps, self.seed = int(switch_every), int(recover_steps), int(seed)
        self.max_lateral, self.max_heading = float(max_lateral), float(np.radians(max_heading_deg))
        self.needs_lidar = student.needs_lidar or teacher.needs_lidar
        self.needs_camera = student.needs_camera or teacher.needs_camera
        self.image_size = student.image_size or teacher.image_size
        self.control = np.zeros(0, dtype=object)
        self.proposals: Optional[tuple[np.ndarray, np.ndarray]] = None

    def reset(self, track: Track, world: SyntheticConfig, cars: int, seq_len: int) -> None:
        self.student.reset(track, world, cars, seq_len)
        self.teacher.reset(track, world, cars, seq_len)
        self._track = track
        self._rng = np.random.default_rng(np.random.SeedSequence([self.seed, cars, len(track.centre)]))
        self._by_student = np.zeros(cars, bool)
        self._takeover_left = np.zeros(cars, np.int64)

    def act(self, obs: Observation) -> tuple[np.ndarray, np.ndarray]:
        s_steer, s_speed = self.student.act(obs)
        t_steer, t_speed = self.teacher.act(obs)
        if obs.t % self.switch_every == 0:       # one draw per car and period, for every car (reproducible)
            self._by_student = self._rng.random(len(self._by_student)) < self.p_student
        cars, s, idx = obs.cars, obs.state, obs.index
        outside = ((np.abs(self._track.lateral_offset(s.x, s.y, idx)) > self.max_lateral)
                   | (np.abs(self._track.heading_error(s.yaw, idx)) > self.max_heading))
        self._takeover_left[cars] = np.where(outside, self.recover_steps + 1, self._takeover_left[cars])
        takeover = self._takeover_left[cars] > 0
        self._takeover_left[cars] = np.maximum(self._takeover_left[cars] - 1, 0)
        student = self._by_student[cars] & ~takeover
        self.control = np.where(takeover, CONTROL_TAKEOVER, np.where(student, CONTROL_STUDENT, CONTROL_TEACHER))
        self.proposals = (np.stack([s_steer, s_speed], 1), np.stack([t_steer, t_speed], 1))
        return np.where(student, s_steer, t_steer), np.where(student, s_speed, t_speed)
