"""Camera streams of the synthetic world recorded apart from the LiDAR: at the camera's own rate and clock
offset, in their own data root, and camera-only drives that no LiDAR recorded (weak and missing pairing).

``python -m pipelines.make_dataset --camera_root CAM [--camera_rate_hz R] [--camera_offset_ms O]
[--camera_only_drives N]`` (:class:`CameraRecording`):

* ``--out`` gets LiDAR-only segments of every track (as ``--lidar_only_tracks`` ones: no image column, no
  ``camera/``); ``CAM`` gets the camera streams of the paired tracks as camera-only segments of the same
  split/segment names (``meta/data.csv``: ``timestamp, image_filepath, velocity, wheel_angle, speed_command,
  x, y, yaw``, no lidar column; ``camera/calib.json``; ``meta/track.json``) and its own
  ``synthetic_dataset.json`` (same world config, so ``track_for_segment(CAM, ...)`` rebuilds the tracks).
* Camera frame f is taken at ``t_f = f / R + O / 1000`` s on the drive's clock (the LiDAR's frame j at
  ``j / 20`` s); frames whose time falls outside the drive ``[0, (frames - 1) / 20]`` are not recorded
  (a negative offset drops the first ones, the file names keep f). Timestamps are written with 6 decimals.
* The drive is simulated at the expert's 20 Hz, once (the same drive the LiDAR recorded); the camera's state
  at ``t_f`` is the linear interpolation between the two 20 Hz states around it (:func:`interpolate_drive`):
  position, heading (unwrapped), speed, and the two commands (steering, speed command) — the expert's command
  is a smooth function of the state, so its interpolation is what it would have issued at ``t_f`` to within
  the noise. Chosen over simulating at a finer step because that would change the drive (the expert's noise,
  DART perturbation and pursuit are per step), and the LiDAR and camera must record one and the same drive.
  At ``R = 20``, ``O = 0`` the camera frames are exactly the paired world's images.
* Camera-only drives (``--camera_only_drives N``): for every train track (paired and LiDAR-only ones alike)
  N more drives recorded by the camera only, ``<split>/segment_NNNN_dK`` (K = 1..N), written to ``CAM`` (or
  to ``--out`` without ``--camera_root``) at the camera's rate and offset. Drive K starts ``K / (N + 1)`` of a
  lap further along the track than the track's own drive (before the start is moved clear of other cars) and
  has its own traffic (another draw of the track's traffic stream), expert noise and camera noise. Their
  ``meta/track.json`` carries the track's ``track_index`` and ``track_fingerprint`` (the geometry; traffic
  is not part of it), so a pose query finds the LiDAR windows of the same place; their keys match no key
  of a store exported from ``--out``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from e2r.sim.expert import Drive, drive_expert, speed_profile
from e2r.sim.jobs import run_jobs
from e2r.sim.sensors import render_camera
from e2r.sim.track import Track
from e2r.sim.traffic import make_traffic
# the world's private per-(seed, track, stream) random streams: one scheme for the whole package
from e2r.sim.world import (_STREAM_CAMERA, _STREAM_EXPERT, _STREAM_TRAFFIC, GENERATOR_VERSION, MARKER, TRACK_JSON,
                           SyntheticConfig, _rng, _split, begin_segment, calib_dict, camera_rng, config_dict,
                           finish_segment, generate_dataset, generate_segment, has_camera, prepare_out_dir,
                           segment_name, segment_summary, track_for_index)

__all__ = ["CameraRecording", "CAMERA_ONLY_COLUMNS", "camera_frame_times", "interpolate_drive",
           "generate_camera_segment", "generate_recording", "drive_segment_name"]

CAMERA_ONLY_COLUMNS = ("timestamp", "image_filepath", "velocity", "wheel_angle", "speed_command", "x", "y", "yaw")


@dataclass
class CameraRecording:
    """How the camera is recorded apart from the LiDAR (module docstring). ``root``: the camera data root
    (None: the camera stays in the paired segments of ``--out``); ``rate_hz`` / ``offset_ms``: the camera's
    frame rate and clock offset; ``only_drives``: camera-only drives per train track."""
    root: str | None = None
    rate_hz: float = 20.0
    offset_ms: float = 0.0
    only_drives: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate_hz) and 0 < self.rate_hz <= 1000):
            raise ValueError(f"--camera_rate_hz must be in (0, 1000], got {self.rate_hz}")
        if not math.isfinite(self.offset_ms):
            raise ValueError(f"--camera_offset_ms must be finite, got {self.offset_ms}")
        if self.only_drives < 0:
            raise ValueError(f"--camera_only_drives must be >= 0, got {self.only_drives}")
        if self.root is None and self.only_drives == 0 and (self.rate_hz != 20.0 or self.offset_ms != 0.0):
            raise ValueError("--camera_rate_hz / --camera_offset_ms apply to camera streams recorded apart from the "
                             "LiDAR: give --camera_root (or --camera_only_drives)")

    @property
    def active(self) -> bool:
        """Whether anything differs from the plain paired world."""
        return self.root is not None or self.only_drives > 0

    def summary(self) -> dict[str, Any]:
        return {"camera_root": self.root, "camera_rate_hz": self.rate_hz, "camera_offset_ms": self.offset_ms,
                "camera_only_drives": self.only_drives}


def drive_segment_name(index: int, drive: int) -> str:
    """Segment name of camera-only drive ``drive`` (1..N) of track ``index``; 0 = the track's own drive."""
    return segment_name(index) + (f"_d{drive}" if drive else "")


def camera_frame_times(frames: int, sim_rate_hz: float, rate_hz: float, offset_ms: float
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Camera frames inside a drive of ``frames`` frames at ``sim_rate_hz``: ``(f (K,) int64, t_f (K,) s)``
    with ``t_f = f / rate_hz + offset_ms / 1000`` in ``[0, (frames - 1) / sim_rate_hz]``. ValueError if none."""
    duration, offset = (frames - 1) / sim_rate_hz, offset_ms / 1000.0
    first = max(0, math.ceil((-offset) * rate_hz - 1e-9))
    last = math.floor((duration - offset) * rate_hz + 1e-9)
    f = np.arange(first, last + 1, dtype=np.int64)
    if len(f) == 0:
        raise ValueError(f"no camera frame at {rate_hz} Hz with offset {offset_ms} ms falls inside a drive of "
                         f"{frames} frames ({duration:.3f} s)")
    return f, np.clip(f / rate_hz + offset, 0.0, duration)


def interpolate_drive(drive: Drive, sim_rate_hz: float, times: np.ndarray) -> Drive:
    """The drive's state at ``times`` (K,) s: linear interpolation between the 20 Hz states around each time
    (heading unwrapped, then brought back to the branch of the state before it); ``index`` is the earlier
    state's centre sample. Exact at the simulation's own times."""
    grid = np.arange(len(drive.x)) / sim_rate_hz
    lower = np.clip(np.searchsorted(grid, times, side="right") - 1, 0, len(grid) - 1)
    yaw_u = np.unwrap(drive.yaw)
    yaw = np.interp(times, grid, yaw_u) + (drive.yaw - yaw_u)[lower]

    def lerp(a: np.ndarray) -> np.ndarray:
        return np.interp(times, grid, a)

    return Drive(x=lerp(drive.x), y=lerp(drive.y), yaw=yaw, velocity=lerp(drive.velocity),
                 wheel_angle=lerp(drive.wheel_angle), speed_command=lerp(drive.speed_command),
                 index=drive.index[lower], curvature=lerp(drive.curvature))


def _drive(cfg: SyntheticConfig, index: int, drive_no: int, n_drives: int) -> tuple[Track, Drive]:
    """(track, drive at 20 Hz) of drive ``drive_no`` of track ``index``: 0 = the track's own drive (exactly
    the LiDAR's), K >= 1 = camera-only drive K of ``n_drives`` (other start, traffic and noise)."""
    track = track_for_index(cfg, index)
    if drive_no == 0:
        return track, drive_expert(track, cfg.frames, _rng(cfg, index, _STREAM_EXPERT), cfg.expert,
                                   vehicle=cfg.vehicle)
    if track.traffic is not None:
        track.traffic = make_traffic(track, _rng(cfg, index, _STREAM_TRAFFIC, drive_no),
                                     speed_profile(track, cfg.expert), cfg.traffic)
    n = len(track.centre)
    own_start = int(_rng(cfg, index, _STREAM_EXPERT).integers(n))       # the own drive's first draw
    start = (own_start + round(drive_no * n / (max(n_drives, drive_no) + 1))) % n
    return track, drive_expert(track, cfg.frames, _rng(cfg, index, _STREAM_EXPERT, drive_no), cfg.expert,
                               start_index=start, vehicle=cfg.vehicle)


def generate_camera_segment(cfg: SyntheticConfig, index: int, root: str | Path, rec: CameraRecording,
                            drive_no: int = 0, progress=None) -> dict[str, Any]:
    """Write the camera-only segment of drive ``drive_no`` of track ``index`` under ``root`` (crash-safe as the
    world's: a temporary folder renamed into place) and return its summary (the world's keys, ``camera``
    True, ``lidar`` False, ``drive``). ``progress``: a shared counter incremented once per frame written."""
    root = Path(root)
    split, seg = _split(cfg, index), drive_segment_name(index, drive_no)
    final, tmp = begin_segment(root, split, seg)
    (tmp / "camera").mkdir()
    (tmp / "camera" / "calib.json").write_text(json.dumps(calib_dict(cfg), indent=1) + "\n")
    track, drive20 = _drive(cfg, index, drive_no, rec.only_drives)
    frames, times = camera_frame_times(cfg.frames, cfg.expert.rate_hz, rec.rate_hz, rec.offset_ms)
    drive = interpolate_drive(drive20, cfg.expert.rate_hz, times)
    look = track.look.summary() if track.look is not None else None
    cars = 0 if track.traffic is None else len(track.traffic)
    info = {"generator_version": GENERATOR_VERSION, "track_index": index, "track_fingerprint": track.fingerprint(),
            "clockwise": track.clockwise, "track_length_m": round(track.length, 2), "camera": True, "lidar": False,
            "drive": drive_no, "camera_rate_hz": rec.rate_hz, "camera_offset_ms": rec.offset_ms,
            "appearance": cfg.appearance, "look": look, "cars": cars,
            "rebuild": f"e2r.sim.world.track_for_index(config_from_dict(<root>/{MARKER}['config']), {index})"}
    (tmp / TRACK_JSON).write_text(json.dumps(info, indent=1) + "\n")
    rows = [",".join(CAMERA_ONLY_COLUMNS)]
    for k, (f, t) in enumerate(zip(frames.tolist(), times.tolist())):
        rng = camera_rng(cfg, index, f) if drive_no == 0 else _rng(cfg, index, _STREAM_CAMERA, f, drive_no)
        img = render_camera(track, drive.x[k], drive.y[k], drive.yaw[k], cfg.camera, t=t, speed=drive.velocity[k],
                            rng=rng)
        Image.fromarray(img).save(tmp / "camera" / f"{f:06d}.png", format="PNG", compress_level=1)
        rows.append(f"{t:.6f},camera/{f:06d}.png,{drive.velocity[k]:.4f},{drive.wheel_angle[k]:.4f},"
                    f"{drive.speed_command[k]:.4f},{drive.x[k]:.4f},{drive.y[k]:.4f},{drive.yaw[k]:.6f}")
        if progress is not None:
            with progress.get_lock():
                progress.value += 1
    finish_segment(tmp, final, rows)
    return {**segment_summary(split, seg, index, track, drive, 0.0, True), "lidar": False, "drive": drive_no}


def _marker(made_by: dict[str, Any], segments: list[dict[str, Any]]) -> dict[str, Any]:
    splits = sorted({g["split"] for g in segments})
    return {**made_by, "status": "complete",
            "splits": {s: [g["segment"] for g in segments if g["split"] == s] for s in splits}, "segments": segments}


def generate_recording(out_dir: str | Path, cfg: SyntheticConfig, rec: CameraRecording, workers: int | None = None,
                       overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write the world ``cfg`` with the camera recorded as ``rec`` says (module docstring); without anything
    asked of ``rec`` this is ``generate_dataset`` (same bytes). Returns the summary of ``--out`` (its
    ``segments`` list every segment written, both roots; ``camera_root`` names the camera root)."""
    if not rec.active:
        return generate_dataset(out_dir, config=cfg, workers=workers, overwrite=overwrite, progress=progress)
    out = Path(out_dir)
    cam = Path(rec.root) if rec.root is not None else out
    if rec.root is not None and cam.resolve() == out.resolve():
        raise ValueError(f"--camera_root {cam} is --out: give the camera streams their own folder")
    prepare_out_dir(out, overwrite)
    if cam != out:
        prepare_out_dir(cam, overwrite)
    made_by = {"generator": "e2r.data.synthetic", "status": "incomplete", "config": config_dict(cfg),
               "camera_recording": rec.summary()}
    (out / MARKER).write_text(json.dumps(made_by, indent=1) + "\n")
    if cam != out:
        (cam / MARKER).write_text(json.dumps({**made_by, "role": "camera"}, indent=1) + "\n")
    n_tracks = cfg.tracks + cfg.lidar_only_tracks
    n_cam = len(camera_frame_times(cfg.frames, cfg.expert.rate_hz, rec.rate_hz, rec.offset_ms)[0])
    split_camera = rec.root is not None
    jobs: list[tuple[Any, tuple]] = []
    frames: list[int] = []
    for i in range(n_tracks):
        jobs.append((generate_segment, (cfg, i, str(out))) if not split_camera
                    else (_lidar_only_segment, (cfg, i, str(out))))
        frames.append(cfg.frames)
        if split_camera and has_camera(cfg, i):
            jobs.append((generate_camera_segment, (cfg, i, str(cam), rec, 0)))
            frames.append(n_cam)
        if _split(cfg, i) == "train":
            for k in range(1, rec.only_drives + 1):
                jobs.append((generate_camera_segment, (cfg, i, str(cam), rec, k)))
                frames.append(n_cam)
    t0 = time.perf_counter()
    segments, n_workers = run_jobs(jobs, frames, workers, progress)
    in_cam = [g for g in segments if not g.get("lidar", True)]
    in_out = [g for g in segments if g.get("lidar", True)] if cam != out else segments
    summary = _marker(made_by, in_out)
    (out / MARKER).write_text(json.dumps(summary, indent=1) + "\n")
    if cam != out:
        (cam / MARKER).write_text(json.dumps(_marker({**made_by, "role": "camera"}, in_cam), indent=1) + "\n")
    return {**summary, "segments": segments, "out_dir": str(out), "camera_root": str(cam) if cam != out else None,
            "workers": n_workers, "seconds": round(time.perf_counter() - t0, 2)}


def _lidar_only_segment(cfg: SyntheticConfig, index: int, out_dir: str, progress=None) -> dict[str, Any]:
    """The LiDAR part of track ``index`` (its camera goes to the camera root)."""
    return {**generate_segment(cfg, index, out_dir, progress, with_camera=False), "lidar": True}
