"""Pairing camera windows with LiDAR windows recorded at other rates, by timestamp (weak pairing).

When the camera and the LiDAR are recorded apart (their own data roots, rates and clock offsets: the
synthetic world's ``make_dataset --camera_root``, docs/CONTRACTS.md), a camera window's key names no store
row. ``train_student`` / ``eval_student --pair_lidar_root DIR --pair_tolerance_ms MS`` pair instead:

* camera window ``(split, segment, start)`` of the camera root -> the LiDAR window of the same
  ``split/segment`` in ``DIR`` whose **last frame's** timestamp is nearest to the camera window's last frame's
  timestamp (the decision time: the action the window is trained on is the one of its last frame). The LiDAR
  windows are those a LiDAR dataset of ``DIR`` lists at stride ``lidar_stride`` (1: every window, as the export
  writes by default); the store key is that window's key.
* ``|dt| > tolerance`` -> no pair (BC only for that window, or retrieval where it is on); a camera segment with
  no LiDAR segment of the same name in ``DIR`` (or only a camera-only one) -> all its windows unpaired,
  counted in :attr:`TimestampPairing.missing_segments`.
* confidence = ``1 - |dt| / tolerance`` (1 at the same instant, falling linearly to 0 at the tolerance; with a
  tolerance of 0 only exact matches pair, with confidence 1). Linear rather than Gaussian because it is 0
  exactly where pairing stops (no jump at the tolerance) and its one parameter is the tolerance itself. The
  trainer multiplies each paired window's KD terms by it (``batch["kd_weight"]``, ``e2r.kd.kd_losses``).

Both roots' ``meta/data.csv`` need the ``timestamp`` column (s, strictly increasing; a missing one is a
DataError naming the csv). Built once in the main process from the csv files only (no image, no point cloud);
pickles small into DataLoader workers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from e2r.data.datasets import CameraSequenceDataset
from e2r.data.layout import CSV_RELPATH, SegmentTable, is_camera_only, read_segment_table, window_starts
from e2r.data.readers import DataError
from stores.keys import make_key, parse_key

__all__ = ["TimestampPairing", "pair_confidence"]


def pair_confidence(dt_s: np.ndarray, tolerance_ms: float) -> np.ndarray:
    """Confidence (K,) float32 of pairs whose decision times differ by ``dt_s`` (K,) seconds:
    ``1 - |dt| / tolerance`` in [0, 1], NaN beyond the tolerance (no pair). Tolerance 0: 1 for exact
    matches only."""
    adt = np.abs(np.asarray(dt_s, dtype=np.float64)) * 1000.0
    tol = float(tolerance_ms)
    inside = adt <= tol + 1e-6                       # timestamps are written to the microsecond
    conf = np.ones_like(adt) if tol == 0 else np.clip(1.0 - adt / tol, 0.0, 1.0)
    return np.where(inside, conf, np.nan).astype(np.float32)


def _timestamps(table: SegmentTable) -> np.ndarray:
    if table.timestamp is None:
        raise DataError(table.csv_path, "no 'timestamp' column: pairing camera and LiDAR windows by time "
                                        "(--pair_lidar_root) needs it in both roots' data.csv")
    return table.timestamp


@dataclass
class _LidarSegment:
    starts: np.ndarray      # (W,) int64 LiDAR window starts
    times: np.ndarray       # (W,) float64 s, the time of each window's last frame (increasing)


@dataclass
class TimestampPairing:
    """Camera keys -> (store key of the nearest LiDAR window, confidence); build with :meth:`build`.

    ``camera_times`` maps camera segment -> (F,) timestamps of its frames; ``lidar`` maps segment -> its LiDAR
    windows; ``missing_segments``: camera segments without a LiDAR segment in the LiDAR root."""
    split: str
    seq_len: int
    tolerance_ms: float
    camera_times: dict[str, np.ndarray]
    lidar: dict[str, _LidarSegment]
    missing_segments: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, camera: CameraSequenceDataset, lidar_root: Union[str, Path], tolerance_ms: float,
              lidar_stride: int = 1) -> "TimestampPairing":
        """From a camera dataset (its segment tables, already read) and the LiDAR data root ``lidar_root``
        (same split and segment names). DataError naming the csv when a timestamp column is missing."""
        if not tolerance_ms >= 0:
            raise ValueError(f"--pair_tolerance_ms must be >= 0, got {tolerance_ms}")
        root = Path(lidar_root)
        if not root.is_dir():
            raise DataError(root, "--pair_lidar_root is not a directory")
        camera_times = {seg: _timestamps(t) for seg, t in camera.tables.items()}
        lidar: dict[str, _LidarSegment] = {}
        missing: list[str] = []
        T = camera.seq_len
        for seg in camera.tables:
            if not (root / camera.split / seg / CSV_RELPATH).is_file() or is_camera_only(root, camera.split, seg):
                missing.append(seg)
                continue
            table = read_segment_table(root, camera.split, seg, lidar=True)
            times = _timestamps(table)
            starts = np.array(window_starts(table.target_frames, T, lidar_stride), dtype=np.int64)
            lidar[seg] = _LidarSegment(starts, times[starts + T - 1] if len(starts) else np.zeros(0))
        return cls(camera.split, T, float(tolerance_ms), camera_times, lidar, missing)

    def pair(self, keys: Sequence[str]) -> tuple[list[str | None], np.ndarray]:
        """``keys`` (B) camera window keys -> ``(store_keys, confidence)``: the paired LiDAR window's key or
        None (no pair), and (B,) float32 confidence in [0, 1] (0 where unpaired)."""
        out: list[str | None] = []
        conf = np.zeros(len(keys), dtype=np.float32)
        for i, key in enumerate(keys):
            k = parse_key(key)
            lid = self.lidar.get(k.segment)
            cam = self.camera_times.get(k.segment)
            if lid is None or cam is None or len(lid.times) == 0 or k.split != self.split:
                out.append(None)
                continue
            t = cam[k.start + self.seq_len - 1]
            j = int(np.searchsorted(lid.times, t))
            near = [c for c in (j - 1, j) if 0 <= c < len(lid.times)]
            best = min(near, key=lambda c: (abs(lid.times[c] - t), c))
            c = pair_confidence(np.array([lid.times[best] - t]), self.tolerance_ms)[0]
            if np.isnan(c):
                out.append(None)
                continue
            out.append(make_key(self.split, k.segment, int(lid.starts[best])))
            conf[i] = c
        return out, conf

    def summary(self, keys: Sequence[str]) -> dict[str, float]:
        """Over ``keys`` (e.g. the camera dataset's): ``{"paired", "unpaired", "mean_confidence" (of the
        paired; NaN if none), "missing_segments"}``."""
        store_keys, conf = self.pair(keys)
        paired = np.array([k is not None for k in store_keys], dtype=bool)
        return {"paired": int(paired.sum()), "unpaired": int((~paired).sum()),
                "mean_confidence": float(conf[paired].mean()) if paired.any() else float("nan"),
                "missing_segments": len(self.missing_segments)}

    def describe(self, keys: Sequence[str], lidar_root: Union[str, Path]) -> str:
        """One line for logs: how many of ``keys`` pair, their mean confidence, segments without LiDAR."""
        d = self.summary(keys)
        line = (f"pairing by timestamp with {lidar_root} (split {self.split}, tolerance {self.tolerance_ms:g} ms): "
                f"{d['paired']} of {d['paired'] + d['unpaired']} windows paired, mean confidence "
                f"{d['mean_confidence']:.3f}")
        if self.missing_segments:
            shown = ", ".join(self.missing_segments[:3]) + (", ..." if len(self.missing_segments) > 3 else "")
            line += (f"; {len(self.missing_segments)} camera segment(s) have no LiDAR segment of the same name "
                     f"there, all their windows unpaired ({shown})")
        return line
