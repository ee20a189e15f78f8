"""The synthetic racing world, written as a dataset in the SPEC layout (our embedded default data).

Each segment is one expert drive on its own random closed track (``e2r.sim.track``), recorded at 20 Hz
by a 3-D LiDAR and a front camera on the same car (``e2r.sim.sensors``), the expert giving the actions
(``e2r.sim.expert``). Layout written under ``out_dir`` (see docs/CONTRACTS.md)::

    <out>/<split>/segment_NNNN/meta/data.csv     timestamp, lidar_filepath, image_filepath, velocity, wheel_angle,
                                                 speed_command, x, y, yaw
    <out>/<split>/segment_NNNN/meta/track.json   track index + fingerprint (to rebuild the track, below)
    <out>/<split>/segment_NNNN/lidar/000123.bin  float32 (N, 4) x, y, z, intensity; ego frame, ground z = -1
    <out>/<split>/segment_NNNN/camera/000123.png RGB, image_size (W, H)
    <out>/<split>/segment_NNNN/camera/calib.json {"cameras": [{"name": "front", "image_size", "K", "cam2ego"}]}
    <out>/synthetic_dataset.json                 how it was made + per-segment summary

Split layout (:func:`split_for_track`): ``tracks`` paired (LiDAR + camera) tracks, of which the last
``test_tracks`` are ``test``, the ``valid_tracks`` before them ``valid`` and the rest ``train``; then
``lidar_only_tracks`` more ``train`` tracks recorded by the LiDAR only (data.csv without ``image_filepath``,
no ``camera/`` folder: the teacher learns from more tracks than the student sees). Track i -> segment
``segment_{i:04d}``. Defaults (valid 1, test 1, LiDAR-only 0) are the original layout: tracks 0..N-3 train,
N-2 valid, N-1 test. Every segment has its own track, so valid and test tracks are never seen in train. Odd
tracks are driven clockwise, even ones counter-clockwise: every block of consecutive tracks (a split) has
both directions as soon as it has two tracks, and left and right turns balance. Everything is a function of
``seed`` and the track index only: the same seed gives byte-identical files whatever the number of worker
processes.

Sensor gap (``appearance="gap"``, the default; ``"clean"`` is the original uniform look with no other
cars): each track gets a look (``e2r.sim.appearance``: light from noon to night, exposure, shadows,
materials, worn paint; the light condition cycles noon, dusk, night over each split's tracks, wall hues of
valid/test tracks come from colour sectors and a random stream no train track uses) and 2-4 other cars
(``e2r.sim.traffic``) that the LiDAR sees all around and the camera only ahead; the expert follows them.
Frame f is at time ``f / rate_hz``; the camera's noise comes from its own stream per frame.

data.csv columns: ``velocity`` (m/s, measured at t), ``wheel_angle`` (deg, the steering command issued at
t), ``speed_command`` (m/s, the speed the expert asked for at t), ``x, y, yaw`` (m, m, rad: the car's pose at
t in the track frame). The drive is executed by the shared vehicle model (``e2r.sim.vehicle``, configured by
``SyntheticConfig.vehicle``), the one the closed loop (``e2r.sim.closed_loop``) drives policies with.

Rebuilding a segment's track (closed loop): tracks are not stored; ``track_for_index(cfg, track_index)`` makes
it again from the world's config (``config_from_dict`` of the marker's ``"config"``) and the segment's
``track_index`` (in ``meta/track.json`` and the marker's ``"segments"``); the stored ``track_fingerprint``
checks that the rebuilt track is the recorded one (:func:`track_for_segment` does all three).
``config_dict`` carries ``generator_version`` (:data:`GENERATOR_VERSION`), so a dataset written by an older
generator never compares equal to the wanted config (the demo then regenerates it).

The camera recorded apart from the LiDAR (own data root, rate and clock offset; camera-only drives):
``e2r.sim.camera_world`` (``make_dataset --camera_root``), on top of :func:`generate_segment` (``with_camera``).

Crash safety: a segment is written into ``<out>/.tmp-<split>-<segment>`` and renamed into place when
complete; an existing non-empty ``out_dir`` is refused unless ``overwrite=True`` (and even then only if it
holds a previous synthetic dataset, recognised by ``synthetic_dataset.json``).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from e2r.atomic import make_dirs
from e2r.data.calib import MAX_IMAGE_SIDE
from e2r.data.readers import MAX_IMAGE_PIXELS
from e2r.sim.appearance import LIGHTS, AppearanceConfig, draw_appearance
from e2r.sim.expert import Drive, ExpertConfig, drive_expert, speed_profile
from e2r.sim.jobs import run_jobs
from e2r.sim.sensors import (CameraConfig, LidarConfig, camera_intrinsics, camera_to_ego, cast_lidar,
                             render_camera)
from e2r.sim.track import Track, TrackConfig, make_track
from e2r.sim.traffic import TrafficConfig, make_traffic
from e2r.sim.vehicle import VehicleConfig

__all__ = ["SyntheticConfig", "generate_dataset", "generate_segment", "split_for_track", "segment_name",
           "track_for_index", "calib_dict", "config_dict", "config_from_dict", "track_for_segment", "CSV_COLUMNS",
           "MARKER", "TRACK_JSON", "GENERATOR_VERSION", "LIDAR_ONLY_COLUMNS", "APPEARANCES", "has_camera",
           "light_for_index", "segment_lights", "read_marker", "camera_rng", "ensure_dataset", "prepare_out_dir",
           "begin_segment", "finish_segment", "segment_summary"]

CSV_COLUMNS = ("timestamp", "lidar_filepath", "image_filepath", "velocity", "wheel_angle", "speed_command",
               "x", "y", "yaw")
MARKER = "synthetic_dataset.json"
TRACK_JSON = Path("meta") / "track.json"
LIDAR_ONLY_COLUMNS = tuple(c for c in CSV_COLUMNS if c != "image_filepath")
#: 2: the shared vehicle model (steering-rate limit, P speed loop), speed_command and pose columns, track.json
#: 3: the sensor gap (per-track look, camera blur and noise, other cars), split layout, LiDAR-only tracks
GENERATOR_VERSION = 4     # 4: DART perturbations of the executed steering (e2r.sim.expert)
APPEARANCES = ("gap", "clean")
_STREAM_TRACK, _STREAM_EXPERT, _STREAM_LIDAR, _STREAM_LOOK, _STREAM_LOOK_HELDOUT, _STREAM_TRAFFIC, _STREAM_CAMERA = \
    1, 2, 3, 4, 5, 6, 7


@dataclass
class SyntheticConfig:
    """Everything that defines a synthetic dataset (with ``seed``). ``tracks``: paired (LiDAR + camera)
    tracks, the last ``test_tracks`` test, the ``valid_tracks`` before them valid, the rest train;
    ``lidar_only_tracks``: more train tracks without camera; ``appearance``: "gap" or "clean"."""
    tracks: int = 6
    frames: int = 300
    seed: int = 0
    image_size: tuple[int, int] = (256, 128)       # (W, H)
    valid_tracks: int = 1
    test_tracks: int = 1
    lidar_only_tracks: int = 0
    appearance: str = "gap"
    track: TrackConfig = field(default_factory=TrackConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    lidar: LidarConfig = field(default_factory=LidarConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    vehicle: VehicleConfig = field(default_factory=VehicleConfig)
    look: AppearanceConfig = field(default_factory=AppearanceConfig)
    traffic: TrafficConfig = field(default_factory=TrafficConfig)

    def __post_init__(self) -> None:
        for name in ("valid_tracks", "test_tracks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lidar_only_tracks < 0:
            raise ValueError(f"lidar_only_tracks must be >= 0, got {self.lidar_only_tracks}")
        need = self.valid_tracks + self.test_tracks + 1
        if self.tracks < need:
            raise ValueError(f"tracks must be >= {need} (train, valid, test each need one: {self.valid_tracks} "
                             f"valid + {self.test_tracks} test + 1 train), got {self.tracks}")
        if self.appearance not in APPEARANCES:
            raise ValueError(f"appearance must be one of {APPEARANCES}, got {self.appearance!r}")
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        w, h = (int(v) for v in self.image_size)
        if w < 8 or h < 8:
            raise ValueError(f"image_size must be at least 8x8, got {self.image_size}")
        if max(w, h) > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
            raise ValueError(f"--image_size {w}x{h}: at most {MAX_IMAGE_SIDE} pixels per side and {MAX_IMAGE_PIXELS} "
                             f"in all (the largest image the dataset readers accept)")
        self.image_size = (w, h)
        self.camera = replace(self.camera, image_size=(w, h))


def split_for_track(index: int, tracks: int, valid_tracks: int = 1, test_tracks: int = 1,
                    lidar_only_tracks: int = 0) -> str:
    """Split of track ``index`` (module docstring): of the ``tracks`` paired ones the last ``test_tracks``
    are ``test`` and the ``valid_tracks`` before them ``valid``; the rest and the ``lidar_only_tracks``
    after them are ``train``."""
    if not 0 <= index < tracks + lidar_only_tracks:
        raise ValueError(f"track index {index} out of range for {tracks} + {lidar_only_tracks} tracks")
    if index >= tracks:
        return "train"
    return "test" if index >= tracks - test_tracks else "valid" if index >= tracks - test_tracks - valid_tracks \
        else "train"


def _split(cfg: SyntheticConfig, index: int) -> str:
    return split_for_track(index, cfg.tracks, cfg.valid_tracks, cfg.test_tracks, cfg.lidar_only_tracks)


def has_camera(cfg: SyntheticConfig, index: int) -> bool:
    """Whether track ``index`` is recorded by the camera too (the LiDAR-only tracks come last)."""
    return index < cfg.tracks


def light_for_index(cfg: SyntheticConfig, index: int) -> str:
    """Light condition (``appearance.LIGHTS``) of track ``index``: cycling noon, dusk, night over the tracks of
    its split (offset by the seed), so every split of three or more tracks has all three."""
    split = _split(cfg, index)
    position = sum(1 for i in range(index) if _split(cfg, i) == split)
    return LIGHTS[(position + cfg.seed) % len(LIGHTS)]


def segment_name(index: int) -> str:
    return f"segment_{index:04d}"


def _rng(cfg: SyntheticConfig, index: int, stream: int, *more: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, index, stream, *more]))


def camera_rng(cfg: SyntheticConfig, index: int, frame: int) -> np.random.Generator:
    """The stream of the camera noise of frame ``frame`` of track ``index`` (as the dataset was written)."""
    return _rng(cfg, index, _STREAM_CAMERA, frame)


def track_for_index(cfg: SyntheticConfig, index: int) -> Track:
    """The (deterministic) Track of segment ``index``: a function of ``cfg.seed``, ``cfg.track`` and ``index``;
    in the gap world with its look (valid/test tracks from their own stream and hue sectors) and other cars."""
    track = make_track(_rng(cfg, index, _STREAM_TRACK), cfg.track, clockwise=bool(index % 2))
    if cfg.appearance == "gap":
        split = _split(cfg, index)
        stream = _STREAM_LOOK if split == "train" else _STREAM_LOOK_HELDOUT
        track.look = draw_appearance(_rng(cfg, index, stream), track, light_for_index(cfg, index), split, cfg.look)
        track.traffic = make_traffic(track, _rng(cfg, index, _STREAM_TRAFFIC), speed_profile(track, cfg.expert),
                                     cfg.traffic)
    return track


def calib_dict(cfg: SyntheticConfig) -> dict[str, Any]:
    """calib.json content in the contract format (one camera named ``front``)."""
    K = np.round(camera_intrinsics(cfg.camera), 6).tolist()
    c2e = np.round(camera_to_ego(cfg.camera), 9).tolist()
    return {"cameras": [{"name": "front", "image_size": list(cfg.image_size), "K": K, "cam2ego": c2e}]}


def generate_segment(cfg: SyntheticConfig, index: int, out_dir: str | Path, progress=None,
                     with_camera: bool | None = None) -> dict[str, Any]:
    """Drive, render and write segment ``index`` under ``out_dir``/<split>/<segment>; return its summary.

    ``progress`` (optional, a multiprocessing Value or None) is incremented once per frame written.
    ``with_camera``: None = as the layout says (:func:`has_camera`); False writes a LiDAR-only segment (the
    camera stream of a paired track then goes to its own root, ``e2r.sim.camera_world``).
    """
    out_dir = Path(out_dir)
    split, seg = _split(cfg, index), segment_name(index)
    camera = has_camera(cfg, index) if with_camera is None else bool(with_camera) and has_camera(cfg, index)
    final, tmp = begin_segment(out_dir, split, seg)
    (tmp / "lidar").mkdir()
    track = track_for_index(cfg, index)
    drive = drive_expert(track, cfg.frames, _rng(cfg, index, _STREAM_EXPERT), cfg.expert, vehicle=cfg.vehicle)
    if camera:
        (tmp / "camera").mkdir()
        (tmp / "camera" / "calib.json").write_text(json.dumps(calib_dict(cfg), indent=1) + "\n")
    look = track.look.summary() if track.look is not None else None
    cars = 0 if track.traffic is None else len(track.traffic)
    track_info = {"generator_version": GENERATOR_VERSION, "track_index": index,
                  "track_fingerprint": track.fingerprint(), "clockwise": track.clockwise,
                  "track_length_m": round(track.length, 2),
                  "camera": camera, "appearance": cfg.appearance, "look": look, "cars": cars,
                  "rebuild": f"e2r.sim.world.track_for_index(config_from_dict(<root>/{MARKER}['config']), {index})"}
    (tmp / TRACK_JSON).write_text(json.dumps(track_info, indent=1) + "\n")
    rows = [",".join(CSV_COLUMNS if camera else LIDAR_ONLY_COLUMNS)]
    n_points = np.zeros(cfg.frames, np.int64)
    for f in range(cfg.frames):
        x, y, yaw, t = drive.x[f], drive.y[f], drive.yaw[f], f / cfg.expert.rate_hz
        pts = cast_lidar(track, x, y, yaw, _rng(cfg, index, _STREAM_LIDAR, f), cfg.lidar, t=t)
        stamp = f"{f:06d}"
        pts.astype("<f4").tofile(tmp / "lidar" / f"{stamp}.bin")
        image_cell = ""
        if camera:
            img = render_camera(track, x, y, yaw, cfg.camera, t=t, speed=drive.velocity[f],
                                rng=camera_rng(cfg, index, f))
            Image.fromarray(img).save(tmp / "camera" / f"{stamp}.png", format="PNG", compress_level=1)
            image_cell = f"camera/{stamp}.png,"
        n_points[f] = len(pts)
        rows.append(f"{f / cfg.expert.rate_hz:.3f},lidar/{stamp}.bin,{image_cell}"
                    f"{drive.velocity[f]:.4f},{drive.wheel_angle[f]:.4f},{drive.speed_command[f]:.4f},"
                    f"{x:.4f},{y:.4f},{yaw:.6f}")
        if progress is not None:
            with progress.get_lock():
                progress.value += 1
    finish_segment(tmp, final, rows)
    return segment_summary(split, seg, index, track, drive, float(n_points.mean()), camera)


def begin_segment(out_dir: Path, split: str, seg: str) -> tuple[Path, Path]:
    """(final folder, temporary folder with ``meta/``) of a segment about to be written; FileExistsError if
    the final folder exists; a temporary folder left by a crashed run is removed first."""
    final = out_dir / split / seg
    if final.exists():
        raise FileExistsError(f"segment folder {final} already exists; refusing to overwrite it")
    tmp = out_dir / f".tmp-{split}-{seg}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from a crashed run
    (tmp / "meta").mkdir(parents=True)
    return final, tmp


def finish_segment(tmp: Path, final: Path, rows: list[str]) -> None:
    """Write the csv ``rows`` (header first) as ``meta/data.csv`` and rename the temporary folder into place."""
    (tmp / "meta" / "data.csv").write_text("\n".join(rows) + "\n")
    final.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, final)


def segment_summary(split: str, seg: str, index: int, track: Track, drive: Drive, lidar_points_mean: float,
                    camera: bool) -> dict[str, Any]:
    """A written segment's entry in the world marker (``drive``: the F recorded states)."""
    return {"split": split, "segment": seg, "track_index": index, "track_fingerprint": track.fingerprint(),
            "track_length_m": round(track.length, 2), "clockwise": track.clockwise, "frames": len(drive.velocity),
            "lidar_points_mean": lidar_points_mean, "velocity_mean": float(drive.velocity.mean()),
            "velocity_min": float(drive.velocity.min()), "velocity_max": float(drive.velocity.max()),
            "wheel_angle_absmax": float(np.abs(drive.wheel_angle).max()), "camera": camera,
            "look": track.look.summary() if track.look is not None else None,
            "cars": 0 if track.traffic is None else len(track.traffic)}


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Make ``out_dir`` empty (refusing a non-empty one unless ``overwrite`` and it holds a synthetic world)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output folder {out_dir} exists and is not empty; pass --overwrite "
                                  f"(overwrite=True) to replace it")
        if not (out_dir / MARKER).is_file():
            raise FileExistsError(f"refusing to overwrite {out_dir}: it is not empty and has no {MARKER}, "
                                  f"so it does not look like a synthetic dataset made by this tool")
        shutil.rmtree(out_dir)
    make_dirs(out_dir)


def generate_dataset(out_dir: str | Path, tracks: int = 6, frames: int = 300, seed: int = 0,
                     image_size: tuple[int, int] = (256, 128), workers: int | None = None,
                     overwrite: bool = False, progress: bool = True,
                     config: SyntheticConfig | None = None) -> dict[str, Any]:
    """Write a synthetic dataset (layout in the module docstring) and return its summary dict.

    ``config`` (if given) overrides tracks/frames/seed/image_size (and carries the split layout and the
    appearance). ``workers``: processes over segments (None = min(cpu count, tracks); 0 or 1 = in this
    process). The summary is also written to
    ``<out_dir>/synthetic_dataset.json``: {"splits": {split: [segment, ...]}, "segments": [...], ...}.
    """
    cfg = config or SyntheticConfig(tracks=tracks, frames=frames, seed=seed, image_size=tuple(image_size))
    out = Path(out_dir)
    prepare_out_dir(out, overwrite)
    # "generator" keeps the name of this module before it moved to e2r.sim: same seed, same bytes
    made_by = {"generator": "e2r.data.synthetic", "status": "incomplete", "config": config_dict(cfg)}
    (out / MARKER).write_text(json.dumps(made_by, indent=1) + "\n")
    n_tracks = cfg.tracks + cfg.lidar_only_tracks
    t0 = time.perf_counter()
    jobs = [(generate_segment, (cfg, i, str(out))) for i in range(n_tracks)]
    segments, n_workers = run_jobs(jobs, [cfg.frames] * n_tracks, workers, progress)
    summary = {**made_by, "status": "complete",
               "splits": {s: [g["segment"] for g in segments if g["split"] == s] for s in ("train", "valid", "test")},
               "segments": segments}
    (out / MARKER).write_text(json.dumps(summary, indent=1) + "\n")  # no timings: same seed, same bytes
    summary.update(out_dir=str(out), workers=n_workers, seconds=round(time.perf_counter() - t0, 2))
    return summary


def ensure_dataset(data_root: str | Path, cfg: SyntheticConfig, progress: bool = True) -> dict[str, Any]:
    """Generate the world ``cfg`` into ``data_root`` unless an identical complete one is there (then reuse
    it); returns the marker's summary. Prints which of the two it did."""
    data_root = Path(data_root)
    marker = data_root / MARKER
    if marker.is_file():
        made = json.loads(marker.read_text())
        if made.get("status") == "complete" and made.get("config") == config_dict(cfg):
            print(f"reusing {data_root} (same world, seed {cfg.seed})", flush=True)
            return made
        print(f"{data_root} holds a different or incomplete world: regenerating", flush=True)
    t0 = time.perf_counter()
    summary = generate_dataset(data_root, config=cfg, overwrite=True, progress=progress)
    print(f"generated {cfg.tracks} + {cfg.lidar_only_tracks} LiDAR-only tracks x {cfg.frames} frames in "
          f"{time.perf_counter() - t0:.1f} s -> {data_root}", flush=True)
    return summary


def config_dict(cfg: SyntheticConfig) -> dict[str, Any]:
    """``cfg`` as the JSON-ready dict stored under ``"config"`` in ``synthetic_dataset.json`` (compare it
    with a stored one to decide whether a dataset on disk is the same world)."""
    return {"generator_version": GENERATOR_VERSION, **json.loads(json.dumps(asdict(cfg)))}  # tuples -> lists


def _dataclass_from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    """``cls(**values)`` with nested config dataclasses rebuilt and lists turned back into tuples."""
    template = cls()
    unknown = set(values) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)} for {cls.__name__}")
    out: dict[str, Any] = {}
    for name, value in values.items():
        default = getattr(template, name)
        if name in _NESTED and cls is SyntheticConfig:
            out[name] = _dataclass_from_dict(_NESTED[name], value, f"{where}.{name}")
        elif isinstance(value, list) or isinstance(default, tuple):
            out[name] = tuple(value)
        else:
            out[name] = value
    return cls(**out)


_NESTED = {"track": TrackConfig, "expert": ExpertConfig, "lidar": LidarConfig, "camera": CameraConfig,
           "vehicle": VehicleConfig, "look": AppearanceConfig, "traffic": TrafficConfig}


def config_from_dict(d: dict[str, Any]) -> SyntheticConfig:
    """The inverse of :func:`config_dict`: a SyntheticConfig from the marker's ``"config"`` (fields it lacks
    keep their defaults, except that a world from before generator version 3 had the clean look;
    ``generator_version`` is dropped). Raises ValueError for unknown fields."""
    values = {k: v for k, v in d.items() if k != "generator_version"}
    if int(d.get("generator_version", 0)) < 3:
        values.setdefault("appearance", "clean")
    if int(d.get("generator_version", 0)) < 4 and isinstance(values.get("expert"), dict):
        values["expert"] = {"dart_steer_deg": 0.0, **values["expert"]}
    return _dataclass_from_dict(SyntheticConfig, values, "config")


def read_marker(root: str | Path, complete: bool = True) -> dict[str, Any] | None:
    """The marker ``<root>/synthetic_dataset.json`` of a synthetic world, or None when ``root`` has none (not
    made by the synthetic world, e.g. real data); ValueError naming the file when it is not JSON or (with
    ``complete``) the world is incomplete (an incomplete world's marker lists no segments)."""
    marker = Path(root) / MARKER
    if not marker.is_file():
        return None
    try:
        made = json.loads(marker.read_text())
    except ValueError as e:
        raise ValueError(f"{marker}: not readable JSON ({e})") from None
    if complete and not _is_complete(made):
        raise ValueError(f"{marker}: the synthetic world is incomplete (status {made.get('status')!r}); regenerate it")
    return made


def _is_complete(made: dict[str, Any]) -> bool:
    """Whether a marker's world finished writing (an incomplete world's marker lists no segments)."""
    return made.get("status") == "complete" and "config" in made


def segment_lights(root: str | Path, split: str) -> dict[str, str]:
    """``{segment: light}`` (``appearance.LIGHTS``) of every segment of ``split`` in the synthetic world at
    ``root``, by the world's own rule (:func:`light_for_index` of the segment's ``track_index``); ``{}`` when
    ``root`` is not a synthetic world (real data), is an incomplete one, or its appearance is ``"clean"`` (no
    look)."""
    made = read_marker(root, complete=False)
    if made is None or not _is_complete(made):
        return {}
    cfg = config_from_dict(made["config"])
    if cfg.appearance != "gap":
        return {}
    return {g["segment"]: light_for_index(cfg, int(g["track_index"])) for g in made.get("segments", [])
            if g.get("split") == split}


def track_for_segment(root: str | Path, split: str, segment: str) -> tuple[Track, SyntheticConfig, dict[str, Any]]:
    """Rebuild the track of ``<root>/<split>/<segment>`` from the world's marker: ``(track, config, the
    marker's summary entry of the segment)``. Raises ValueError when ``root`` is not a complete synthetic
    world, the segment is not one of its ``split``'s, or the rebuilt track's fingerprint differs."""
    made = read_marker(root)
    marker = Path(root) / MARKER
    if made is None:
        raise ValueError(f"{root} has no {MARKER}: it was not made by the synthetic world "
                         f"(python -m pipelines.make_dataset), so its tracks cannot be rebuilt")
    entry = next((g for g in made.get("segments", []) if g.get("split") == split and g.get("segment") == segment),
                 None)
    if entry is None:
        raise ValueError(f"{marker} lists no segment {split}/{segment}: that split/segment was not made by the "
                         f"synthetic world")
    cfg = config_from_dict(made["config"])
    track = track_for_index(cfg, int(entry["track_index"]))
    if track.fingerprint() != entry.get("track_fingerprint"):
        raise ValueError(f"{split}/{segment}: the rebuilt track's fingerprint {track.fingerprint()} differs from "
                         f"the recorded {entry.get('track_fingerprint')} (made by another generator version?)")
    return track, cfg, entry


