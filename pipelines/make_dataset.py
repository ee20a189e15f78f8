"""Generate the synthetic racing dataset (LiDAR + camera + expert actions) in the SPEC layout.

    python -m pipelines.make_dataset --out data/synth [--tracks 6] [--frames 300] [--seed 0]
        [--image_size 256x128] [--workers N] [--preview preview.png] [--overwrite]

Each of the N tracks (N >= 3) gives one segment: tracks 0..N-3 -> train, N-2 -> valid, N-1 -> test, so the
valid and test tracks are never seen in train. Written per segment <out>/<split>/segment_NNNN/:
  meta/data.csv        timestamp (s), lidar_filepath, image_filepath, velocity (m/s), wheel_angle (deg, + = left),
                       speed_command (m/s), x, y (m), yaw (rad): the pose in the track frame
  meta/track.json      track index and fingerprint (the track is rebuilt from synthetic_dataset.json)
  lidar/NNNNNN.bin     float32 N x 4 (x fwd, y left, z up, intensity 0..1), ego frame, ground at z = -1.0
  camera/NNNNNN.png    front camera, RGB; camera/calib.json: K and cam2ego (OpenCV camera -> ego)
The expert (pure pursuit + curvature-limited speed, 20 Hz) drives; a 16-ring LiDAR and a pinhole camera
on the same car ray cast the same walls (red/white left, blue/white right), lane paint and barrels.
Same seed -> byte-identical files. See e2r/sim/world.py for details.
"""
from __future__ import annotations

import argparse
import sys

from e2r.sim.preview import write_preview
from e2r.sim.world import generate_dataset


def _image_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image_size must look like WxH, e.g. 256x128; got {text!r}") from None
    if w < 8 or h < 8:
        raise argparse.ArgumentTypeError(f"--image_size must be at least 8x8, got {text!r}")
    return w, h


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.make_dataset", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output dataset root (must be empty or absent unless --overwrite)")
    p.add_argument("--tracks", type=int, default=6, help="number of tracks = segments, >= 3 (default 6)")
    p.add_argument("--frames", type=int, default=300, help="frames per segment at 20 Hz (default 300)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed -> byte-identical files")
    p.add_argument("--image_size", type=_image_size, default=(256, 128), help="camera image WxH (default 256x128)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes over segments (default: min(CPU count, tracks); 1 = no pool)")
    p.add_argument("--preview", default=None, metavar="PNG",
                   help="also write a PNG with one frame's LiDAR BEV next to its camera image")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds a previous synthetic dataset")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = generate_dataset(args.out, tracks=args.tracks, frames=args.frames, seed=args.seed,
                                   image_size=args.image_size, workers=args.workers,
                                   overwrite=args.overwrite, progress=not args.quiet)
        preview = write_preview(args.out, args.preview) if args.preview else None
    except (ValueError, FileExistsError, NotADirectoryError, FileNotFoundError, RuntimeError) as e:
        print(f"make_dataset: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.tracks} segments x {args.frames} frames to {summary['out_dir']} in "
          f"{summary['seconds']:.1f} s with {summary['workers']} worker(s)")
    for seg in summary["segments"]:
        print(f"  {seg['split']:>5}/{seg['segment']}: track {seg['track_fingerprint']} "
              f"{seg['track_length_m']:.0f} m {'cw' if seg['clockwise'] else 'ccw'}, "
              f"v {seg['velocity_min']:.1f}..{seg['velocity_max']:.1f} m/s, "
              f"|wheel_angle| <= {seg['wheel_angle_absmax']:.1f} deg, {seg['lidar_points_mean']:.0f} pts/frame")
    if preview:
        print(f"preview: {preview}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
