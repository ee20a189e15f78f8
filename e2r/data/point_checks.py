"""What every LiDAR frame read must satisfy, whatever its format (``e2r.data.readers`` calls these on the
``(N, F>=4)`` values of each frame it reads; docs/CONTRACTS.md, "Bad input"): x, y, z and intensity finite in
float32, intensity in [0, 65535], at most 1 % of the points beyond 500 m, a nuScenes ring column integer in
0..127, not zero-filled or torn, and at most :data:`~e2r.data.point_layout.MAX_POINTS_PER_FRAME` points.
Each failure is a :class:`~e2r.errors.DataError` naming the file (and the data.csv row).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from e2r.data.point_layout import MAX_POINTS_PER_FRAME
from e2r.errors import DataError

__all__ = ["MAX_INTENSITY", "MAX_FAR_FRACTION", "MAX_RANGE_M", "MAX_TORN_FRACTION", "MIN_TORN_POINTS", "xyzi",
           "check_point_count"]

MAX_INTENSITY = 65535.0      # the largest intensity any supported sensor writes (16-bit)
MAX_FAR_FRACTION = 0.01      # more than this fraction of a frame's points beyond MAX_RANGE_M: not a LiDAR scan
MAX_RANGE_M = 500.0
MAX_TORN_FRACTION = 0.25     # a trailing run of all-zero points this long (and >= 64 points): a torn write
MIN_TORN_POINTS = 64
MIN_STUCK_POINTS = 1024       # a frame of this many points or more, all one point: a stuck or repeated buffer


def check_filled(points: np.ndarray, path: Path, row: Optional[int]) -> None:
    """DataError for a frame whose values are all zero (a file preallocated or zero-filled, never written),
    whose last or first quarter or more (at least 64 points) is all zeros: a torn write, cut off or written in
    part and zero-filled, or whose points (at least 1024) are all one point (a stuck or repeated buffer). Zero
    points scattered through a frame (no-return points of organised clouds) are accepted."""
    if not points.any():
        raise DataError(path, f"all {len(points)} points are zero: a zero-filled file, not a LiDAR scan", row)
    if len(points) >= MIN_STUCK_POINTS and (points[0] == points[-1]).all() and (points == points[0]).all():
        raise DataError(path, f"all {len(points)} points are the same point {points[0].tolist()}: a stuck or "
                              "repeated buffer, not a LiDAR scan", row)
    if points[-1].any() and points[0].any():
        return                                      # the usual case: no zero tail or head, one pass over the values
    nonzero = np.flatnonzero(points.any(axis=1))
    for run, where in ((len(points) - 1 - int(nonzero[-1]), "last"), (int(nonzero[0]), "first")):
        if run >= max(MIN_TORN_POINTS, MAX_TORN_FRACTION * len(points)):
            raise DataError(path, f"the {where} {run} of {len(points)} points are all zeros: a torn write (the "
                                  f"file was cut off or written in part and zero-filled); re-copy or re-record it",
                            row)


def xyzi(points: np.ndarray, path: Path, row: Optional[int], ring: Optional[np.ndarray] = None) -> np.ndarray:
    """(N, >=4) -> (N, 4) float32 after checking, for *this* frame, what docs/CONTRACTS.md and the layout
    detection promise about every frame (not only the few sampled to decide the layout): x, y, z and intensity
    finite in float32, intensity in [0, 65535], at most 1 % of the points beyond 500 m, and for nuScenes-like
    5-feature files the ring column integer in 0..127. Vectorised: one pass over the frame's values."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(points[:, :4], dtype=np.float32)
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        raise DataError(path, f"{int(bad.sum())} of {len(out)} points have non-finite x/y/z/intensity "
                              f"(first at point {int(np.argmax(bad))})", row)
    if not len(out):
        return out
    check_filled(points, path, row)
    inten = out[:, 3]
    off = (inten < 0) | (inten > MAX_INTENSITY)
    if off.any():
        raise DataError(path, f"{int(off.sum())} of {len(out)} points have intensity outside [0, 65535] (first at "
                              f"point {int(np.argmax(off))}: {float(inten[np.argmax(off)]):.6g}); wrong point "
                              f"layout (lidar_num_features) or corrupt file", row)
    far = np.einsum("ij,ij->i", out[:, :3].astype(np.float64), out[:, :3].astype(np.float64)) > MAX_RANGE_M ** 2
    if far.sum() > MAX_FAR_FRACTION * len(out):
        raise DataError(path, f"{int(far.sum())} of {len(out)} points are farther than {MAX_RANGE_M:g} m (more "
                              f"than {MAX_FAR_FRACTION:.0%}); wrong point layout (lidar_num_features) or corrupt "
                              f"file", row)
    if ring is not None:
        bad_ring = ~np.isfinite(ring) | (ring < 0) | (ring > 127) | (ring != np.round(ring))
        if bad_ring.any():
            raise DataError(path, f"{int(bad_ring.sum())} of {len(out)} points have a ring (5th column) that is "
                                  f"not an integer in 0..127 (first at point {int(np.argmax(bad_ring))}); wrong "
                                  f"point layout (lidar_num_features) or corrupt file", row)
    return out


def check_point_count(n: int, path: Path, row: Optional[int]) -> None:
    """DataError when a frame holds (or its header claims) more than :data:`MAX_POINTS_PER_FRAME` points."""
    if n > MAX_POINTS_PER_FRAME:
        raise DataError(path, f"{n} points, more than a LiDAR frame may hold ({MAX_POINTS_PER_FRAME})", row)
