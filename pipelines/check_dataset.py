"""Validate a whole dataset: read every csv, calib.json, point cloud and image, and report what is wrong.

    python -m pipelines.check_dataset DIR [--seq_len 5] [--stride 1] [--lidar_num_features auto]
                                          [--image_size 256x128] [--splits train valid]

Prints, per split, the segments, frames and windows (samples of seq_len frames) and, per segment, the point
layout used (features per point, detected or given) and the mean number of points per frame; then every
problem (file, data.csv row, reason) and a one-line summary. Exit code 0 when no problem was found, 1 when
problems were found, 2 when the dataset root itself cannot be used.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from e2r.data.datasets import CameraSequenceDataset, LidarSequenceDataset, PairedSequenceDataset
from e2r.data.layout import discover_segments, discover_splits, split_modalities
from e2r.data.readers import DataError, Problem

MAX_PROBLEMS_SHOWN = 50


def parse_image_size(text: str) -> tuple[int, int]:
    """``"256x128"`` -> (256, 128) = (W, H)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if w <= 0 or h <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image_size must be WxH with positive integers, got {text!r}") from None
    return w, h


def parse_num_features(text: str) -> "int | str":
    if text == "auto":
        return text
    if text in ("4", "5", "8"):
        return int(text)
    raise argparse.ArgumentTypeError(f"--lidar_num_features must be 4, 5, 8 or auto, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.check_dataset", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Validate a dataset in the e2r layout (<root>/<split>/<segment>/meta/data.csv, lidar/, "
                    "camera/): reads every file and reports every problem with its file and data.csv row.",
        epilog="Exit status: 0 = no problems, 1 = problems found (listed above the summary), "
               "2 = the dataset root or a split cannot be used at all.")
    p.add_argument("data_root", metavar="DIR", help="dataset root holding one folder per split")
    p.add_argument("--seq_len", type=int, default=5, help="frames per sample window (default 5)")
    p.add_argument("--stride", type=int, default=1, help="frames between window starts (default 1)")
    p.add_argument("--lidar_num_features", type=parse_num_features, default="auto",
                   help="float32 features per point in .bin files: 4, 5, 8 or auto (decided per segment from "
                        "file sizes and values; default auto)")
    p.add_argument("--image_size", type=parse_image_size, default=(256, 128),
                   help="WxH images are resized to (default 256x128); checks that every image decodes")
    p.add_argument("--splits", nargs="+", default=None, help="splits to check (default: every split found)")
    p.add_argument("--no_progress", action="store_true", help="no tqdm progress bars")
    return p


def check_split(args: argparse.Namespace, split: str) -> tuple[dict, list[Problem]]:
    """Scan one split; return its summary numbers and its problems."""
    lidar, camera = split_modalities(args.data_root, split)
    if not lidar and not camera:
        raise DataError(f"{args.data_root}/{split}", "no segment csv has a lidar_filepath or image_filepath column")
    if lidar and camera:
        ds = PairedSequenceDataset(args.data_root, split, args.seq_len, args.stride, args.lidar_num_features,
                                   args.image_size, skip_bad=True)
    elif lidar:
        ds = LidarSequenceDataset(args.data_root, split, args.seq_len, args.stride, args.lidar_num_features,
                                  skip_bad=True)
    else:
        ds = CameraSequenceDataset(args.data_root, split, args.seq_len, args.stride, args.image_size, skip_bad=True)
    windows_before = len(ds.windows)
    ds.scan(progress=not args.no_progress)
    kind = "+".join(k for k, on in (("lidar", lidar), ("camera", camera)) if on)
    segments_total = len(discover_segments(args.data_root, split))
    print(f"split {split} ({kind}): {len(ds.tables)} usable segment(s) of {segments_total}, "
          f"{sum(t.num_frames for t in ds.tables.values())} frames, {len(ds.windows)} windows "
          f"(seq_len={args.seq_len}, stride={args.stride}; {windows_before - len(ds.windows)} dropped for bad files)")
    for name, table in ds.tables.items():
        n_windows = sum(1 for seg, _ in ds.windows if seg == name)
        line = f"  {name}: {table.num_frames} frames, {n_windows} windows"
        if lidar:
            layout = ds.layouts.get(name)
            used = f"{layout.num_features} features/point ({layout.source})" if layout else "layout unknown"
            mean = ds.mean_points.get(name)
            line += f", points: {used}, mean {mean:.1f} points/frame" if mean is not None else f", points: {used}"
        if camera:
            line += f", cameras: {','.join(c.name for c in table.cameras)}"
        print(line)
    stats = {"segments": len(ds.tables), "frames": sum(t.num_frames for t in ds.tables.values()),
             "windows": len(ds.windows)}
    return stats, list(ds.problems)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seq_len < 1 or args.stride < 1:
        print("error: --seq_len and --stride must be >= 1", file=sys.stderr)
        return 2
    try:
        splits = args.splits or discover_splits(args.data_root)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not splits:
        print(f"error: no split with <segment>/meta/data.csv under {args.data_root}", file=sys.stderr)
        return 2
    print(f"checking {args.data_root}: split(s) {', '.join(splits)}")
    totals = {"segments": 0, "frames": 0, "windows": 0}
    problems: list[Problem] = []
    fatal = False
    for split in splits:
        try:
            stats, found = check_split(args, split)
        except DataError as e:
            print(f"split {split}: cannot be used: {e}")
            problems.append(e.problem)
            fatal = True
            continue
        for k in totals:
            totals[k] += stats[k]
        problems += found
    if problems:
        print(f"\nproblems found: {len(problems)}")
        for p in problems[:MAX_PROBLEMS_SHOWN]:
            print(f"  {p}")
        if len(problems) > MAX_PROBLEMS_SHOWN:
            print(f"  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more")
    verdict = "FAILED" if problems else "OK"
    print(f"\nsummary: {len(splits)} split(s), {totals['segments']} segment(s), {totals['frames']} frames, "
          f"{totals['windows']} windows, {len(problems)} problem(s) -> {verdict}")
    return 2 if fatal and not totals["segments"] else (1 if problems else 0)


if __name__ == "__main__":
    sys.exit(main())
