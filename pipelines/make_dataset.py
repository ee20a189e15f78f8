"""Generate the synthetic racing dataset (LiDAR + camera + expert actions) in the SPEC layout.

    python -m pipelines.make_dataset --out data/synth [--train_tracks 4] [--valid_tracks 2] [--test_tracks 4]
        [--lidar_only_tracks 0] [--frames 300] [--seed 0] [--appearance gap|clean] [--image_size 256x128]
        [--workers N] [--preview preview.png] [--overwrite]
    python -m pipelines.make_dataset --out data/synth --tracks 6     # the original layout: 4 train, 1 valid, 1 test

Each track gives one segment, on its own track: --train_tracks paired (LiDAR + camera) train tracks, then
--valid_tracks valid and --test_tracks test tracks (held out: never seen in train; every split of two or
more tracks has both driving directions), then --lidar_only_tracks more train tracks recorded by the LiDAR
only (data.csv without image_filepath, no camera/ folder: the teacher learns from more tracks than the
student sees, e.g. --train_tracks 2 --lidar_only_tracks 10). --tracks N (the original flag) means N paired
tracks in all, the last --test_tracks (default 1) test and the --valid_tracks (default 1) before them valid.
--appearance gap (default) gives the camera a per-track look (noon to night, exposure, shadows, materials,
worn paint), motion blur and noise, and puts 2-4 other cars on each track (LiDAR: all around; camera: in
its field of view); clean is the original uniform look without other cars. Written per segment
<out>/<split>/segment_NNNN/:
  meta/data.csv        timestamp (s), lidar_filepath, image_filepath, velocity (m/s), wheel_angle (deg, + = left),
                       speed_command (m/s), x, y (m), yaw (rad): the pose in the track frame
  meta/track.json      track index and fingerprint (the track is rebuilt from synthetic_dataset.json), its look
  lidar/NNNNNN.bin     float32 N x 4 (x fwd, y left, z up, intensity 0..1), ego frame, ground at z = -1.0
  camera/NNNNNN.png    front camera, RGB; camera/calib.json: K and cam2ego (OpenCV camera -> ego)
The expert (pure pursuit + curvature-limited speed, following the other cars, 20 Hz) drives; a 16-ring
LiDAR and a pinhole camera on the same car ray cast the same walls, lane paint, barrels and cars.
Same seed -> byte-identical files. See e2r/sim/world.py for details.

Weak and missing pairing (e2r/sim/camera_world.py): --camera_root CAM writes the camera streams to CAM as
camera-only segments (same split/segment names; data.csv with timestamp, image_filepath, velocity,
wheel_angle, speed_command, x, y, yaw, no lidar column) recorded at --camera_rate_hz R (default 20) with the
clock offset --camera_offset_ms O (default 0): camera frame f at f/R + O/1000 s on the drive's clock, its
state interpolated linearly between the expert's 20 Hz states; --out then holds LiDAR-only segments.
--camera_only_drives N adds, for every train track (paired and LiDAR-only), N camera-only drives
<split>/segment_NNNN_dK (K = 1..N: other start on the track, other traffic) to CAM (or to --out without
--camera_root), with the track's fingerprint in meta/track.json. Pair them at training time with
train_student --pair_lidar_root.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional

from e2r.cli_config import config_parser, image_size, option, parse_config
from e2r.sim.camera_world import CameraRecording, generate_recording
from e2r.sim.preview import write_preview
from e2r.sim.world import APPEARANCES, SyntheticConfig


@dataclass(kw_only=True)
class MakeDatasetArgs:
    """The flags of ``python -m pipelines.make_dataset`` (:func:`config_from_args` makes the world of them)."""

    out: str = option(help="output dataset root (must be empty or absent unless --overwrite)")
    train_tracks: Optional[int] = option(None, help="paired (LiDAR + camera) train tracks (default 4; not with "
                                                    "--tracks)")
    valid_tracks: Optional[int] = option(None, help="valid tracks (default 2; 1 with --tracks)")
    test_tracks: Optional[int] = option(None, help="test tracks (default 4; 1 with --tracks)")
    lidar_only_tracks: int = option(SyntheticConfig.lidar_only_tracks,
                                    help="extra train tracks recorded by the LiDAR only (default %(default)s)")
    tracks: Optional[int] = option(None, help="the original layout: N paired tracks in all (train = N - valid - "
                                              "test)")
    appearance: str = option(SyntheticConfig.appearance, choices=APPEARANCES,
                             help="gap: per-track camera look, blur, noise and other cars (default); clean: the "
                                  "original look")
    frames: int = option(SyntheticConfig.frames, help="frames per segment at 20 Hz (default %(default)s)")
    seed: int = option(SyntheticConfig.seed, help="random seed; same seed -> byte-identical files")
    image_size: tuple[int, int] = option(SyntheticConfig.image_size, type=lambda t: image_size(t, 8),
                                         help="camera image WxH (default 256x128)")
    workers: Optional[int] = option(None, help="processes over segments (default: min(CPU count, tracks); 1 = no "
                                               "pool)")
    preview: Optional[str] = option(None, metavar="PNG",
                                    help="also write a PNG with one frame's LiDAR BEV next to its camera image")
    overwrite: bool = option(False, help="replace --out if it holds a previous synthetic dataset")
    camera_root: Optional[str] = option(
        CameraRecording.root, metavar="PATH",
        help="write the camera streams here as camera-only segments (same split/segment names) and LiDAR-only "
             "segments to --out (default: paired segments in --out)")
    camera_rate_hz: float = option(CameraRecording.rate_hz,
                                   help="frame rate of the camera streams written apart from the LiDAR (default "
                                        "%(default)s; LiDAR: 20)")
    camera_offset_ms: float = option(
        CameraRecording.offset_ms,
        help="camera clock offset: camera frame f at f/rate + offset/1000 s on the drive's clock (default %(default)s)")
    camera_only_drives: int = option(
        CameraRecording.only_drives, metavar="N",
        help="N more camera-only drives per train track (paired and LiDAR-only tracks), segment_NNNN_dK, in "
             "--camera_root (or --out); default %(default)s")
    no_progress: bool = option(False, help="no progress bar")


#: the run config: one flag per field
CONFIG = MakeDatasetArgs


def build_parser() -> argparse.ArgumentParser:
    return config_parser(CONFIG, "python -m pipelines.make_dataset", __doc__)


def config_from_args(args: MakeDatasetArgs) -> SyntheticConfig:
    """The world the flags ask for (ValueError for a bad combination)."""
    if args.tracks is not None and args.train_tracks is not None:
        raise ValueError("--tracks (paired tracks in all) and --train_tracks are two ways to say the same; give one")
    if args.train_tracks is not None and args.train_tracks < 1:
        raise ValueError(f"--train_tracks must be >= 1, got {args.train_tracks}")
    valid = args.valid_tracks if args.valid_tracks is not None else 1 if args.tracks is not None else 2
    test = args.test_tracks if args.test_tracks is not None else 1 if args.tracks is not None else 4
    train = 4 if args.train_tracks is None else args.train_tracks
    tracks = args.tracks if args.tracks is not None else train + valid + test
    return SyntheticConfig(tracks=tracks, frames=args.frames, seed=args.seed, image_size=args.image_size,
                           valid_tracks=valid, test_tracks=test, lidar_only_tracks=args.lidar_only_tracks,
                           appearance=args.appearance)


def main(argv: list[str] | None = None) -> int:
    args = parse_config(CONFIG, build_parser(), argv)
    try:
        cfg = config_from_args(args)
        rec = CameraRecording(args.camera_root, args.camera_rate_hz, args.camera_offset_ms, args.camera_only_drives)
        summary = generate_recording(args.out, cfg, rec, workers=args.workers, overwrite=args.overwrite,
                                     progress=not args.no_progress)
        preview = write_preview(args.out, args.preview) if args.preview else None
    except (ValueError, FileExistsError, NotADirectoryError, FileNotFoundError, RuntimeError) as e:
        print(f"make_dataset: error: {e}", file=sys.stderr)
        return 2
    n = len(summary["segments"])
    frames_per_s = sum(g["frames"] for g in summary["segments"]) / max(summary["seconds"], 1e-9)
    print(f"wrote {n} segments x {cfg.frames} frames ({cfg.appearance} world) to {summary['out_dir']} in "
          f"{summary['seconds']:.1f} s ({frames_per_s:.1f} frames/s) with {summary['workers']} worker(s)")
    if rec.active:
        print(f"camera streams at {rec.rate_hz:g} Hz, offset {rec.offset_ms:g} ms, {rec.only_drives} camera-only "
              f"drive(s) per train track -> {summary.get('camera_root') or summary['out_dir']}")
    for seg in summary["segments"]:
        look = seg.get("look")
        extra = "" if not look or not seg["camera"] else f", {look['light']} {look['exposure_ev']:+.1f} EV"
        extra += f", {seg['cars']} cars" if look else ""
        points = "" if seg.get("lidar") is False else f", {seg['lidar_points_mean']:.0f} pts/frame"
        print(f"  {seg['split']:>5}/{seg['segment']}: track {seg['track_fingerprint']} "
              f"{seg['track_length_m']:.0f} m {'cw' if seg['clockwise'] else 'ccw'}"
              f"{'' if seg.get('camera', True) else ', LiDAR only'}"
              f"{', camera only' if seg.get('lidar') is False else ''}"
              f"{extra}, {seg['frames']} frames, "
              f"v {seg['velocity_min']:.1f}..{seg['velocity_max']:.1f} m/s, "
              f"|wheel_angle| <= {seg['wheel_angle_absmax']:.1f} deg{points}")
    if preview:
        print(f"preview: {preview}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
