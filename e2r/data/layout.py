"""The on-disk layout: discover splits and segments, read and validate each segment's ``meta/data.csv``.

``<root>/<split>/<segment>/meta/data.csv`` (docs/CONTRACTS.md). Only the csv, calib.json for cameras and, for
the LiDAR, its extrinsic (:func:`read_segment_lidar2ego`, once per segment) are read here; point clouds and images
are read by the datasets on access. Every problem raises
:class:`~e2r.data.readers.DataError` naming the csv file and the row (0-based frame index; the file line is
the true file line, counting the header and any blank lines the csv module skips, is given in the message).
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from e2r.data.readers import CameraCalib, DataError, read_calib, read_lidar2ego
from stores.keys import InvalidKeyError, validate_part

__all__ = ["SegmentTable", "discover_splits", "discover_segments", "read_segment_table",
           "camera_columns", "window_starts", "split_modalities", "is_lidar_only", "is_camera_only",
           "read_segment_lidar2ego",
           "CSV_RELPATH", "CALIB_RELPATH", "LIDAR_CALIB_RELPATH", "RECORDED_RELPATH", "POSE_COLUMNS"]

CSV_RELPATH = Path("meta") / "data.csv"
CALIB_RELPATH = Path("camera") / "calib.json"
LIDAR_CALIB_RELPATH = Path("lidar") / "calib.json"     # the LiDAR's extrinsic of a segment without camera/calib.json
#: marks a recorded drive (``e2r.sim.record``): its wheel_angle / speed_command are executed commands, not labels
RECORDED_RELPATH = Path("meta") / "recorded.json"
REQUIRED_NUMERIC = ("velocity", "wheel_angle")
POSE_COLUMNS = ("x", "y", "yaw")                      # optional: position (m) and heading (rad) on the track
#: every column name the layout reads (plus ``image_filepath_<camera>``); names are case-sensitive
KNOWN_COLUMNS = ("timestamp", "lidar_filepath", "image_filepath", "speed_command") + REQUIRED_NUMERIC + POSE_COLUMNS


@dataclass
class SegmentTable:
    """One segment's data.csv, validated. Arrays are (F,) for F frames, in csv row order.

    ``image_paths`` maps camera name (calib.json order) to F absolute paths; ``lidar_paths`` has F paths;
    ``lidar2ego`` is the LiDAR's (4, 4) extrinsic (None = identity, the LiDAR frame is the ego frame), read with
    the lidar paths.
    """
    split: str
    segment: str
    directory: Path
    csv_path: Path
    velocity: np.ndarray
    wheel_angle: np.ndarray
    speed_command: Optional[np.ndarray] = None      # (F,) m/s, when data.csv has the column
    timestamp: Optional[np.ndarray] = None          # (F,) s, strictly increasing, when data.csv has the column
    pose: Optional[np.ndarray] = None               # (F, 3) x m, y m, yaw rad, when data.csv has x, y and yaw
    lidar_paths: Optional[list[Path]] = None
    image_paths: dict[str, list[Path]] = field(default_factory=dict)
    cameras: list[CameraCalib] = field(default_factory=list)
    lidar2ego: Optional[np.ndarray] = None
    expert_labels: bool = True       # False for a recorded drive of a policy (meta/recorded.json): commands, not labels
    label_wheel_angle: Optional[np.ndarray] = None     # (F,) the action labels when recorded.json names label columns
    label_speed_command: Optional[np.ndarray] = None   # (F,) (the oracle baseline: the expert's would-be commands)
    disagreement: Optional[np.ndarray] = None   # (F,) |student - teacher| wheel angle of a mixed drive (deg)

    @property
    def num_frames(self) -> int:
        return int(len(self.velocity))

    @property
    def speed_target(self) -> np.ndarray:
        """(F,) the speed action of each frame (docs/CONTRACTS.md): ``speed_command[t]`` when data.csv has the
        column, else the next frame's measured ``velocity[t + 1]`` (NaN for the last frame, which has none)."""
        if self.speed_command is not None:
            return self.speed_command
        return np.concatenate([self.velocity[1:], [np.nan]])

    def actions(self) -> np.ndarray:
        """(F, 2) the action labels ``[wheel_angle, speed]`` of each frame: the label columns that
        ``meta/recorded.json`` names (``label_columns``), else the commands in data.csv (``speed_target``)."""
        if self.label_wheel_angle is not None and self.label_speed_command is not None:
            return np.stack([self.label_wheel_angle, self.label_speed_command], 1)
        return np.stack([self.wheel_angle, self.speed_target], 1)

    @property
    def target_frames(self) -> int:
        """Frames whose actions are defined: all of them with ``speed_command``, else all but the last."""
        return self.num_frames if self.speed_command is not None else max(self.num_frames - 1, 0)


def discover_splits(root: Union[str, Path]) -> list[str]:
    """Names of the folders under ``root`` holding at least one ``<segment>/meta/data.csv``, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "data root is not a directory")
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and any((s / CSV_RELPATH).is_file() for s in p.iterdir() if s.is_dir()))


def discover_segments(root: Union[str, Path], split: str) -> list[str]:
    """Segment folder names of ``root/split`` that contain ``meta/data.csv``, sorted; names must be key-safe."""
    split_dir = Path(root) / split
    try:
        validate_part(split, "split")
    except InvalidKeyError as e:
        raise DataError(split_dir, f"split name cannot be used in a sample key: {e}") from None
    if not split_dir.is_dir():
        raise DataError(split_dir, f"split {split!r} not found under {root}")
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and (p / CSV_RELPATH).is_file())
    if not names:
        raise DataError(split_dir, f"no segments (<segment>/{CSV_RELPATH.as_posix()}) in split {split!r}")
    for name in names:
        try:
            validate_part(name, "segment")
        except InvalidKeyError as e:
            raise DataError(split_dir / name, f"segment folder name cannot be used in a sample key: {e}") from None
    return names


def camera_columns(header: list[str], cameras: list[CameraCalib], csv_path: Path) -> dict[str, str]:
    """Map each calib camera to its csv column: ``image_filepath_<name>``, or ``image_filepath`` for the first."""
    out: dict[str, str] = {}
    for i, cam in enumerate(cameras):
        col = f"image_filepath_{cam.name}"
        if col in header:
            out[cam.name] = col
        elif i == 0 and "image_filepath" in header:
            out[cam.name] = "image_filepath"
        else:
            wanted = f"'{col}'" + (" or 'image_filepath'" if i == 0 else "")
            raise DataError(csv_path, f"missing column {wanted} for camera {cam.name!r} of calib.json "
                                      f"(columns: {header})")
    return out


# |value| beyond these is no car's (m/s: 540 km/h; degrees: ten turns of a steering wheel; a track frame 10 000 km
# wide; a heading unwrapped over 16 000 turns; float32 keeps ~0.01 rad there): a unit or column mix-up
PHYSICAL_LIMITS = {"velocity": (150.0, "m/s"), "speed_command": (150.0, "m/s"), "wheel_angle": (3600.0, "degrees"),
                   "x": (1e7, "m"), "y": (1e7, "m"), "yaw": (1e5, "rad")}


def _parse_number(text: str, column: str, row: int, csv_path: Path, line: int, kind: Optional[str] = None) -> float:
    """The number of one cell; DataError when it is not one, not finite, or (``kind``: a `PHYSICAL_LIMITS` key)
    beyond what a car can do."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise DataError(csv_path, f"column {column!r} (line {line}): {text!r} is not a number", row) from None
    if not math.isfinite(value):
        raise DataError(csv_path, f"column {column!r} (line {line}): value {text!r} is not finite", row)
    limit, unit = PHYSICAL_LIMITS.get(kind or "", (math.inf, ""))
    if abs(value) > limit:
        raise DataError(csv_path, f"column {column!r} (line {line}): {text} {unit} is beyond any car's "
                                  f"(|{kind}| <= {limit:g} {unit}); a unit or column mix-up?", row)
    return value


def _miscased_columns(header: list[str]) -> list[str]:
    """Header names that differ from a column the layout reads only by letter case (``Speed_command``): such
    a column would be silently ignored (or training would miss it), so it is refused."""
    def known(name: str) -> bool:
        return name in KNOWN_COLUMNS or name.startswith("image_filepath_")
    return [h for h in header if not known(h) and known(h.lower())]


def _inside(real: str, bases: tuple[str, ...]) -> bool:
    return any(real == b or real.startswith(b.rstrip(os.sep) + os.sep) for b in bases)


def _parse_path(text: Optional[str], column: str, row: int, csv_path: Path, directory: Path, line: int,
                bases: tuple[str, ...]) -> Path:
    """The data file of one cell: relative to the segment folder, no ``..``, and once symlinks are resolved
    inside one of ``bases`` (the real data root or the real segment folder: a segment folder may itself be a
    link); a file linked to somewhere else is refused like ``..``."""
    if text is None or not text.strip():
        raise DataError(csv_path, f"column {column!r} (line {line}) is empty", row)
    if "\0" in text:
        raise DataError(csv_path, f"column {column!r} (line {line}): path {text!r} contains a NUL byte", row)
    rel = Path(text.strip())
    if rel.is_absolute() or ".." in rel.parts:
        raise DataError(csv_path, f"column {column!r} (line {line}): path {text!r} must be relative to the "
                                  f"segment folder and stay inside it", row)
    real = os.path.realpath(directory / rel)
    if not _inside(real, bases):
        raise DataError(csv_path, f"column {column!r} (line {line}): path {text!r} is a symlink (or lies under "
                                  f"one) leading outside the data root, to {real}; copy the file into the "
                                  f"segment instead", row)
    return directory / rel


def read_segment_table(root: Union[str, Path], split: str, segment: str, lidar: bool = False,
                       camera: bool = False) -> SegmentTable:
    """Read and validate ``root/split/segment/meta/data.csv`` (and calib.json when ``camera``).

    ``lidar`` / ``camera`` require the ``lidar_filepath`` / image columns; ``lidar`` also reads the LiDAR's
    extrinsic (:func:`read_segment_lidar2ego`). Raises DataError naming the csv (or calibration file) and the
    row for: missing columns, empty cells, non-numeric / NaN / inf values, no rows, bad calibration.
    """
    directory = Path(root) / split / segment
    csv_path = directory / CSV_RELPATH
    if not csv_path.is_file():
        raise DataError(csv_path, "data.csv is missing")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows, lines = [], []
            for r in reader:          # the csv module skips blank lines: keep each row's true file line
                rows.append(r)
                lines.append(reader.line_num)
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(csv_path, f"cannot parse csv: {e}") from None
    if not header:
        raise DataError(csv_path, "data.csv is empty (no header)")
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice:
        raise DataError(csv_path, f"column(s) {twice} appear more than once in the header (which one holds?)")
    miscased = _miscased_columns(header)
    if miscased:
        raise DataError(csv_path, f"column(s) {miscased} differ from the column names the layout reads only by "
                                  f"letter case (column names are case-sensitive: {', '.join(KNOWN_COLUMNS)}, "
                                  f"image_filepath_<camera>); rename them")
    need = list(REQUIRED_NUMERIC) + (["lidar_filepath"] if lidar else [])
    missing = [c for c in need if c not in header]
    if missing:
        raise DataError(csv_path, f"missing column(s) {missing} (columns: {header})")
    if not rows:
        raise DataError(csv_path, "data.csv has a header but no rows")
    for i, r in enumerate(rows):
        if None in r:
            raise DataError(csv_path, f"line {lines[i]} has more cells than the header", i)
        if any(v is None for v in r.values()):
            raise DataError(csv_path, f"line {lines[i]} has fewer cells than the header ({len(header)})", i)

    def numbers(column: str, kind: Optional[str] = None) -> np.ndarray:
        return np.array([_parse_number(r[column], column, i, csv_path, lines[i], kind) for i, r in enumerate(rows)])

    bases = (os.path.realpath(root), os.path.realpath(directory))

    def paths(column: str) -> list[Path]:
        return [_parse_path(r[column], column, i, csv_path, directory, lines[i], bases) for i, r in enumerate(rows)]

    velocity, wheel = numbers("velocity", "velocity"), numbers("wheel_angle", "wheel_angle")
    command = numbers("speed_command", "speed_command") if "speed_command" in header else None
    expert_labels, label_columns = _recording(directory)
    table = SegmentTable(split, segment, directory, csv_path, velocity, wheel, command, expert_labels=expert_labels)
    if label_columns is not None:
        absent = [c for c in label_columns.values() if c not in header]
        if absent:
            raise DataError(directory / RECORDED_RELPATH, f"label_columns name {absent}, which {csv_path} lacks")
        table.label_wheel_angle = numbers(label_columns["wheel_angle"], "wheel_angle")
        table.label_speed_command = numbers(label_columns["speed_command"], "speed_command")
    if "student_wheel_angle" in header and "teacher_wheel_angle" in header:
        table.disagreement = np.abs(numbers("student_wheel_angle", "wheel_angle")
                                    - numbers("teacher_wheel_angle", "wheel_angle"))
    if "timestamp" in header:
        table.timestamp = numbers("timestamp")
        bad = np.flatnonzero(np.diff(table.timestamp) <= 0)
        if len(bad):
            i = int(bad[0]) + 1
            raise DataError(csv_path, f"line {lines[i]}: timestamp {table.timestamp[i]} is not after the previous "
                            f"row's {table.timestamp[i - 1]} (timestamps must increase strictly)", i)
    have = [c for c in POSE_COLUMNS if c in header]
    if have and len(have) < len(POSE_COLUMNS):
        raise DataError(csv_path, f"pose columns {have} without {[c for c in POSE_COLUMNS if c not in have]} "
                        f"(a pose needs all of {list(POSE_COLUMNS)})")
    if have:
        table.pose = np.stack([numbers(c, c) for c in POSE_COLUMNS], axis=1)
    if lidar:
        table.lidar_paths = paths("lidar_filepath")
        table.lidar2ego = read_segment_lidar2ego(directory)
    if camera:
        table.cameras = read_calib(directory / CALIB_RELPATH)
        for name, col in camera_columns(header, table.cameras, csv_path).items():
            table.image_paths[name] = paths(col)
    return table


def _recording(directory: Path) -> tuple[bool, Optional[dict[str, str]]]:
    """(whether a segment's action labels are expert labels, the data.csv columns holding them or None for
    wheel_angle / speed_command). Expert labels unless it is a recorded drive (``meta/recorded.json``) of anyone
    but the expert (``"expert_labels": true`` in that file); ``"label_columns": {"wheel_angle": COLUMN,
    "speed_command": COLUMN}`` there names other columns as the labels (the oracle baseline's)."""
    path = directory / RECORDED_RELPATH
    if not path.is_file():
        return True, None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(path, f"unreadable recording description ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("expert_labels", False), bool):
        raise DataError(path, "expected a JSON object whose 'expert_labels' (if given) is true or false")
    columns = doc.get("label_columns")
    if columns is not None and (not isinstance(columns, dict) or set(columns) != {"wheel_angle", "speed_command"}
                                or not all(isinstance(c, str) and c for c in columns.values())):
        raise DataError(path, "'label_columns' must map wheel_angle and speed_command to data.csv column names")
    return bool(doc.get("expert_labels", False)), columns


def read_segment_lidar2ego(directory: Union[str, Path]) -> Optional[np.ndarray]:
    """A segment's LiDAR -> ego extrinsic (docs/CONTRACTS.md), (4, 4) float64, or None for identity: the
    optional ``"lidar2ego"`` of ``camera/calib.json`` when the segment has that file, else the required one of
    ``lidar/calib.json`` when it has that, else None. Both files at once is a DataError (which would hold?)."""
    directory = Path(directory)
    camera, lidar = directory / CALIB_RELPATH, directory / LIDAR_CALIB_RELPATH
    if camera.exists() and lidar.exists():
        raise DataError(lidar, f"the segment also has {CALIB_RELPATH.as_posix()}: its \"lidar2ego\" belongs "
                               f"there (one place per segment); remove this file")
    if camera.exists():
        return read_lidar2ego(camera)
    if lidar.exists():
        return read_lidar2ego(lidar, required=True)
    return None


def window_starts(num_frames: int, seq_len: int, stride: int) -> list[int]:
    """Start frames of the windows [start, start + seq_len) of a segment with ``num_frames`` frames."""
    if seq_len < 1 or stride < 1:
        raise ValueError(f"seq_len and stride must be >= 1, got seq_len={seq_len}, stride={stride}")
    return list(range(0, num_frames - seq_len + 1, stride))


def _header(csv_path: Path) -> Optional[list[str]]:
    """The csv's column names, or None when it cannot be read (the datasets report that)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            return [h.strip() for h in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def _has_image_column(header: list[str]) -> bool:
    return any(h == "image_filepath" or h.startswith("image_filepath_") for h in header)


def is_lidar_only(root: Union[str, Path], split: str, segment: str) -> bool:
    """A LiDAR-only segment (recorded without camera, e.g. the synthetic world's ``--lidar_only_tracks``):
    its csv has ``lidar_filepath`` but no image column, and it has no ``camera/`` folder. A segment with a
    camera folder but no image column is not one: that is a broken camera segment (DataError on reading)."""
    directory = Path(root) / split / segment
    header = _header(directory / CSV_RELPATH)
    return (header is not None and "lidar_filepath" in header and not _has_image_column(header)
            and not (directory / "camera").exists())


def is_camera_only(root: Union[str, Path], split: str, segment: str) -> bool:
    """A camera-only segment (recorded without LiDAR, e.g. the synthetic world's ``--camera_root`` streams and
    ``--camera_only_drives``): its csv has an image column but no ``lidar_filepath``, and it has no ``lidar/``
    folder. The LiDAR datasets leave it out (``.camera_only_segments``), as the camera ones leave out
    LiDAR-only segments."""
    directory = Path(root) / split / segment
    header = _header(directory / CSV_RELPATH)
    return (header is not None and "lidar_filepath" not in header and _has_image_column(header)
            and not (directory / "lidar").exists())


def split_modalities(root: Union[str, Path], split: str) -> tuple[bool, bool]:
    """(has_lidar, has_camera): whether any segment csv of the split has ``lidar_filepath`` / an image column."""
    lidar = camera = False
    for segment in discover_segments(root, split):
        header = _header(Path(root) / split / segment / CSV_RELPATH)
        if header is None:
            continue  # the dataset reports the unreadable csv
        lidar |= "lidar_filepath" in header
        camera |= _has_image_column(header)
    return lidar, camera
