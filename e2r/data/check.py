"""Validate a whole dataset: read every csv, calib.json, point cloud and image, and report what is wrong.

    status = check_dataset(DatasetCheck("data/synth"))      # prints the report; 0 ok, 1 problems, 2 unusable

Prints, per split, the segments, frames and windows (samples of seq_len frames) and, per segment, the point
layout used (features per point, detected or given) and the mean number of points per frame; then every
problem (file, data.csv row, reason) and a one-line summary. ``python -m pipelines.check_dataset`` is its CLI.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from e2r.cli_config import image_size, lidar_num_features_option, option
from e2r.data.datasets import CameraSequenceDataset, LidarSequenceDataset, PairedSequenceDataset
from e2r.data.layout import discover_segments, discover_splits, split_modalities
from e2r.errors import DataError, Problem

__all__ = ["DatasetCheck", "check_dataset", "check_split", "MAX_PROBLEMS_SHOWN"]

MAX_PROBLEMS_SHOWN = 50


@dataclass(kw_only=True)
class DatasetCheck:
    """What to check (fields = the flags of ``python -m pipelines.check_dataset``)."""

    data_root: str = option(positional=True, metavar="DIR", help="dataset root holding one folder per split")
    seq_len: int = option(5, help="frames per sample window (default %(default)s)")
    stride: int = option(1, help="frames between window starts (default %(default)s)")
    lidar_num_features: Union[int, str] = lidar_num_features_option()
    image_size: tuple[int, int] = option((256, 128), type=image_size,
                                         help="WxH images are resized to (default 256x128); checks that every image "
                                              "decodes")
    splits: Optional[Sequence[str]] = option(None, help="splits to check (default: every split found)")
    no_progress: bool = option(False, help="no tqdm progress bars")


def _scanned(args: DatasetCheck, split: str, lidar: bool, camera: bool) -> tuple[list, set[str]]:
    """The split's datasets, scanned later, and the segments whose camera part is unusable. One dataset over
    every segment of the split's modality; when the split has LiDAR and cameras, a LiDAR dataset as well over
    the segments the paired one left out: the LiDAR-only ones, and those whose camera part is unusable (e.g. no
    camera/calib.json: that is reported, and their csv and LiDAR files are still checked), and a camera dataset
    over its camera-only segments."""
    if not camera:
        return [LidarSequenceDataset(args.data_root, split, args.seq_len, args.stride, args.lidar_num_features,
                                     skip_bad=True)], set()
    if not lidar:
        return [CameraSequenceDataset(args.data_root, split, args.seq_len, args.stride, args.image_size,
                                      skip_bad=True, image_cache_mb=0)], set()
    paired = PairedSequenceDataset(args.data_root, split, args.seq_len, args.stride, args.lidar_num_features,
                                   args.image_size, skip_bad=True, image_cache_mb=0)
    cams = list(paired.camera_only_segments)
    rest = [s for s in discover_segments(args.data_root, split) if s not in paired.tables and s not in cams]
    out = [paired]
    if rest:
        out.append(LidarSequenceDataset(args.data_root, split, args.seq_len, args.stride, args.lidar_num_features,
                                        skip_bad=True, segments=rest))
    if cams:             # camera-only drives beside the paired ones (make_dataset --camera_only_drives)
        out.append(CameraSequenceDataset(args.data_root, split, args.seq_len, args.stride, args.image_size,
                                         skip_bad=True, segments=cams, image_cache_mb=0))
    return out, set(rest) - set(paired.lidar_only_segments)


def check_split(args: DatasetCheck, split: str) -> tuple[dict, list[Problem]]:
    """Scan one split; return its summary numbers and its problems."""
    lidar, camera = split_modalities(args.data_root, split)
    if not lidar and not camera:
        raise DataError(f"{args.data_root}/{split}", "no segment csv has a lidar_filepath or image_filepath column")
    datasets, camera_unusable = _scanned(args, split, lidar, camera)
    before = [len(ds.windows) for ds in datasets]
    for ds in datasets:
        ds.scan(progress=not args.no_progress)
    kind = "+".join(k for k, on in (("lidar", lidar), ("camera", camera)) if on)
    segments_total = len(discover_segments(args.data_root, split))
    tables = {k: v for ds in datasets for k, v in ds.tables.items()}
    windows = sum(len(ds.windows) for ds in datasets)
    print(f"split {split} ({kind}): {len(tables)} usable segment(s) of {segments_total}, "
          f"{sum(t.num_frames for t in tables.values())} frames, {windows} windows "
          f"(seq_len={args.seq_len}, stride={args.stride}; {sum(before) - windows} dropped for bad files)")
    for ds in datasets:
        for name, table in ds.tables.items():
            n_windows = sum(1 for seg, _ in ds.windows if seg == name)
            line = f"  {name}: {table.num_frames} frames, {n_windows} windows"
            if lidar:
                layout = ds.layouts.get(name)
                used = f"{layout.num_features} features/point ({layout.source})" if layout else "layout unknown"
                mean = ds.mean_points.get(name)
                line += f", points: {used}, mean {mean:.1f} points/frame" if mean is not None else f", points: {used}"
                if table.lidar2ego is not None:
                    line += ", lidar2ego applied"
            if camera:
                cams = ",".join(c.name for c in table.cameras)
                line += f", cameras: {cams}" if cams else (", camera part unusable (see problems)"
                                                           if name in camera_unusable else ", LiDAR only")
            print(line)
    stats = {"segments": len(tables), "frames": sum(t.num_frames for t in tables.values()), "windows": windows}
    return stats, list(dict.fromkeys(p for ds in datasets for p in ds.problems))   # one problem, listed once


def check_dataset(args: DatasetCheck) -> int:
    """Check every split of ``args`` and print the report -> exit status: 0 no problem, 1 problems found,
    2 the dataset root (or every split) cannot be used."""
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
