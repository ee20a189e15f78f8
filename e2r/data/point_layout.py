"""Deciding how many float32 features per point a raw LiDAR ``.bin`` file holds (4, 5 or 8).

Size alone is ambiguous on real recordings: a KITTI velodyne file (N x 4) often also divides into N x 8, and
a nuScenes ``.pcd.bin`` (N x 5) into N x 4 and N x 8. So the decision also judges the *values* of each
candidate reading:

- x, y, z, intensity finite; 99 % of points within 500 m; the z spread (IQR) not larger than the horizontal
  spread (a driving scene is flat-ish);
- intensity (column 3) in [0, 65535];
- 5 features (nuScenes): the ring column (4) integer-valued in 0..127;
- 4 versus 8 (both plausible whenever N x 4 data has an even N): read as N/2 x 8, columns 4..7 of 4-feature
  data are simply the next point, so they follow the same distribution as columns 0..3; real 8-feature
  extras (ring, time, range, ...) do not. Same distribution -> 4, clearly different -> 8, in between ->
  refuse.

When no candidate, or more than one, survives, :func:`detect_bin_layout` raises rather than guesses; the user
then passes ``lidar_num_features`` explicitly. The decision is made once per segment from a few files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from e2r.errors import LayoutUndecidable

__all__ = ["SUPPORTED_NUM_FEATURES", "MAX_POINTS_PER_FRAME", "MAX_POINT_FILE_BYTES", "PointLayout",
           "LayoutUndecidable", "plausibility_failures", "detect_bin_layout", "detect_from_arrays",
           "frame_layout_mismatch"]

SUPPORTED_NUM_FEATURES = (4, 5, 8)
#: the most points one LiDAR frame may hold: 2^22 = 4.2 M, 8x the densest single sweeps of today's sensors
#: (a 128-beam spinning LiDAR with dual returns: about 0.5 M points per rotation) and 12x ten aggregated
#: nuScenes sweeps (about 0.35 M)
MAX_POINTS_PER_FRAME = 1 << 22
#: the largest point file read (checked from its size before a byte is read): 256 MiB, twice a frame of
#: MAX_POINTS_PER_FRAME points x 8 float32 features (128 MiB), leaving room for an ASCII .pcd of such a frame
MAX_POINT_FILE_BYTES = 256 << 20
LAYOUT_CHECK_ROWS = 4096           # rows of a frame (evenly spread) on which its own layout is re-checked
MIN_POINTS_FOR_STATISTICS = 64     # fewer pooled points than this: only an unambiguous size may decide
SAME_DISTRIBUTION_MAX = 0.25       # columns 4..7 vs 0..3 closer than this: they are the next point (4 features)
DIFFERENT_DISTRIBUTION_MIN = 0.6   # farther than this: real extra features (8 features)


@dataclass(frozen=True)
class PointLayout:
    """How a point file was read: ``num_features`` columns per point, of which readers keep x, y, z, intensity.

    ``source``: ``"given"`` (lidar_num_features set by the user), ``"detected"`` (auto, from values),
    ``"npy"`` / ``"pcd"`` (the file format states it).
    """
    num_features: int
    source: str
    detail: str = ""

    def describe(self) -> str:
        text = f"{self.num_features} features/point ({self.source})"
        return f"{text}: {self.detail}" if self.detail else text


def _iqr(v: np.ndarray) -> float:
    q25, q75 = np.percentile(v, [25, 75])
    return float(q75 - q25)


def plausibility_failures(points: np.ndarray) -> list[str]:
    """Reasons why ``points`` (N, F>=4 float32, candidate reading) do not look like a LiDAR scan; [] if they do."""
    n, f = points.shape
    reasons: list[str] = []
    xyzi = points[:, :4].astype(np.float64)
    if not np.isfinite(points).all():
        return ["non-finite values"]
    if n == 0:
        return []
    rng = np.sqrt((xyzi[:, :3] ** 2).sum(1))
    if np.percentile(rng, 99) > 500.0:
        reasons.append(f"99th percentile of point range {np.percentile(rng, 99):.3g} m > 500 m")
    iz, ix, iy = _iqr(xyzi[:, 2]), _iqr(xyzi[:, 0]), _iqr(xyzi[:, 1])
    if iz > max(ix, iy) + 1e-6:
        reasons.append(f"z spread (IQR {iz:.3g}) larger than x/y spread ({ix:.3g}/{iy:.3g})")
    inten = xyzi[:, 3]
    if inten.min() < 0 or inten.max() > 65535:
        reasons.append(f"intensity outside [0, 65535] (min {inten.min():.3g}, max {inten.max():.3g})")
    if f == 5:
        ring = points[:, 4].astype(np.float64)
        if np.abs(ring - np.round(ring)).max() > 1e-3 or ring.min() < 0 or ring.max() > 127:
            reasons.append("ring column (5th) is not integer-valued in 0..127")
    return reasons


def _distribution_distance(a: np.ndarray, b: np.ndarray) -> float:
    """How different two columns' distributions are: quantile shifts relative to spread, and spread ratio."""
    qa = np.percentile(a, [10, 50, 90])
    qb = np.percentile(b, [10, 50, 90])
    sa, sb = qa[2] - qa[0], qb[2] - qb[0]
    spread = 0.5 * (sa + sb) + 1e-6 * (1.0 + np.abs(qa).max() + np.abs(qb).max())
    shift = float(np.abs(qa - qb).max() / spread)
    ratio = float(abs(np.log((sa + 1e-9 + 1e-6 * spread) / (sb + 1e-9 + 1e-6 * spread))))
    return max(shift, ratio)


def detect_from_arrays(floats: Sequence[np.ndarray], names: Sequence[str] = ()) -> PointLayout:
    """Decide 4/5/8 features per point from the flat float32 contents of a few files of one segment.

    Raises LayoutUndecidable (message lists every candidate and why it was ruled out) when it cannot tell.
    """
    where = ", ".join(names) if names else f"{len(floats)} file(s)"
    if not floats:
        raise LayoutUndecidable("no point files to detect the layout from")
    total = sum(int(a.size) for a in floats)
    if total == 0:
        raise LayoutUndecidable(f"{where}: all sampled point files are empty")
    why: dict[int, str] = {}
    survivors: list[int] = []
    for f in SUPPORTED_NUM_FEATURES:
        bad = [f"{names[i] if i < len(names) else i}: {a.size} floats" for i, a in enumerate(floats)
               if a.size % f]
        if bad:
            why[f] = f"size not a multiple of {f} floats ({bad[0]})"
            continue
        pooled = np.concatenate([a.reshape(-1, f) for a in floats])
        fails = plausibility_failures(pooled)
        if fails:
            why[f] = "; ".join(fails)
        else:
            survivors.append(f)
    pooled_points = total // 4
    if len(survivors) == 1:
        only = survivors[0]
        if len(why) == 2 and all("size not a multiple" in w for w in why.values()):
            return PointLayout(only, "detected", "only size that divides the files")
        if pooled_points < MIN_POINTS_FOR_STATISTICS:
            raise LayoutUndecidable(f"{where}: only {pooled_points} points, too few to judge the values "
                                    f"(candidates ruled out: {why})")
        return PointLayout(only, "detected", "values: " + "; ".join(f"{k}: {v}" for k, v in why.items()))
    if survivors == [4, 8]:
        pooled = np.concatenate([a.reshape(-1, 8) for a in floats]).astype(np.float64)
        if len(pooled) < MIN_POINTS_FOR_STATISTICS:
            raise LayoutUndecidable(f"{where}: only {len(pooled)} rows of 8, too few to tell 4 from 8 features")
        dist = max(_distribution_distance(pooled[:, j], pooled[:, j + 4]) for j in range(4))
        if dist <= SAME_DISTRIBUTION_MAX:
            return PointLayout(4, "detected", f"columns 4..7 of an 8-wide reading repeat 0..3 (distance "
                                              f"{dist:.2f}); 5: {why.get(5, '?')}")
        if dist >= DIFFERENT_DISTRIBUTION_MIN:
            return PointLayout(8, "detected", f"columns 4..7 differ from x,y,z,intensity (distance "
                                              f"{dist:.2f}); 5: {why.get(5, '?')}")
        raise LayoutUndecidable(f"{where}: cannot tell 4 from 8 features per point (columns 4..7 vs 0..3 "
                                f"distance {dist:.2f} between {SAME_DISTRIBUTION_MAX} and "
                                f"{DIFFERENT_DISTRIBUTION_MIN}); set lidar_num_features explicitly")
    if not survivors:
        detail = "; ".join(f"{k}: {v}" for k, v in why.items())
        raise LayoutUndecidable(f"{where}: values are not plausible for 4, 5 or 8 features per point ({detail}); "
                                f"set lidar_num_features explicitly or check the files")
    raise LayoutUndecidable(f"{where}: values are plausible for {survivors} features per point; cannot tell "
                            f"them apart, set lidar_num_features explicitly")


def frame_layout_mismatch(flat: np.ndarray, num_features: int) -> str:
    """Why one ``.bin`` frame (its flat float32 values) does not have the segment's ``num_features`` (4 or 8)
    features per point, or "" when nothing says so. Checked on every frame read, not only on the few that
    decided the segment's layout, on up to :data:`LAYOUT_CHECK_ROWS` rows of its 8-wide reading (the same
    statistics as the detection): in a 4-feature segment, an 8-feature frame whose columns 4..7 are all zero
    (read as 4 it puts every other point at the origin) or clearly differ from x, y, z, intensity (read as 4
    it doubles the points); in an 8-feature segment, a frame whose columns 4..7 repeat columns 0..3 (a
    4-feature frame: read as 8 it halves the points)."""
    if num_features not in (4, 8) or flat.size % 8 or flat.size // 8 < MIN_POINTS_FOR_STATISTICS:
        return ""
    wide = flat.reshape(-1, 8)
    rows = np.unique(np.linspace(0, len(wide) - 1, min(len(wide), LAYOUT_CHECK_ROWS)).astype(np.int64))
    sample = wide[rows].astype(np.float64)
    if not np.isfinite(sample).all():
        return ""                                   # the readers' value checks name that
    extras_zero = not sample[:, 4:].any()
    if num_features == 4 and extras_zero and sample[:, :4].any():
        return ("every other point is at the origin with intensity 0: an 8-feature frame whose columns 4..7 "
                "are zero, in a segment of 4 features per point")
    # the 8-wide reading must be plausible (4 in 8), or its columns 4..7 plausible as points (8 in 4)
    if extras_zero or plausibility_failures(sample if num_features == 4 else sample[:, 4:]):
        return ""
    dist = max(_distribution_distance(sample[:, j], sample[:, j + 4]) for j in range(4))
    if num_features == 4 and dist >= DIFFERENT_DISTRIBUTION_MIN:
        return (f"its values look like 8 features per point (columns 4..7 of an 8-wide reading differ from x, y, "
                f"z, intensity: distance {dist:.2f}), in a segment of 4 features per point")
    if num_features == 8 and dist <= SAME_DISTRIBUTION_MAX:
        return (f"its values look like 4 features per point (columns 4..7 repeat x, y, z, intensity: distance "
                f"{dist:.2f}), in a segment of 8 features per point")
    return ""


def detect_bin_layout(paths: Sequence[Path]) -> PointLayout:
    """Decide the layout of raw float32 ``.bin`` point files (a few files of one segment) from size and values.
    A file larger than :data:`MAX_POINT_FILE_BYTES` is refused from its size, before it is read."""
    arrays, names = [], []
    for p in paths:
        p = Path(p)
        if p.stat().st_size > MAX_POINT_FILE_BYTES:
            raise LayoutUndecidable(f"{p}: {p.stat().st_size} bytes, more than a point file may hold "
                                    f"({MAX_POINT_FILE_BYTES} bytes)")
        raw = p.read_bytes()
        if len(raw) % 4:
            raise LayoutUndecidable(f"{p}: {len(raw)} bytes is not a whole number of float32 values")
        arrays.append(np.frombuffer(raw, dtype="<f4"))
        names.append(str(p))
    return detect_from_arrays(arrays, names)
