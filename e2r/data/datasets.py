"""Sequence datasets over the data layout (docs/CONTRACTS.md): LiDAR, camera, paired, and LiDAR frames.

Window i of a segment = frames [start, start + seq_len), key = ``make_key(split, segment, start)``. Per step
t: ``speed = velocity[t]``, ``steering = wheel_angle[t-1]`` (0.0 for the segment's first frame),
``actions[t] = [wheel_angle[t], speed command]`` (:data:`ACTION_SEMANTICS`: the ``speed_command`` column, else
the next frame's ``velocity[t+1]``, so without the column a window needs the frame after it). Construction
reads only the csv files (and calib.json); the camera and paired datasets leave out LiDAR-only segments
(``e2r.data.layout.is_lidar_only``: no image column, no camera folder; listed in ``.lidar_only_segments``)
and the LiDAR and paired datasets leave out camera-only segments (``is_camera_only``: no ``lidar_filepath``
column, no lidar folder; listed in ``.camera_only_segments``), so a split may mix paired, LiDAR-only and
camera-only segments (a split with no segment of the dataset's modality at all is a DataError);
``.windows``, ``.keys`` and ``.tables`` (per-segment velocity / wheel_angle arrays) need no point cloud or
image. Point clouds and images are read on access.

Bad input raises :class:`~e2r.data.readers.DataError` naming the file and the data.csv row. With
``skip_bad=True`` a bad segment is left out at construction, and a window with a bad frame is returned as
``None`` on access (the collate functions drop ``None`` items; a batch of only bad windows collates to
``None``); either way the problem is appended to ``.problems``. ``scan()`` reads every file up front and,
with ``skip_bad``, removes the affected windows. (In DataLoader worker processes ``.problems`` fills in the
worker's copy; call ``scan()`` in the main process to collect them.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate
from tqdm import tqdm

from e2r.data.calib import scale_intrinsics
from e2r.data.frame_cache import FrameCache
from e2r.data.layout import (SegmentTable, discover_segments, is_camera_only, is_lidar_only, read_segment_table,
                             window_starts)
from e2r.data.point_layout import MAX_POINT_FILE_BYTES, LayoutUndecidable, PointLayout, detect_bin_layout
from e2r.data.readers import (SUPPORTED_NUM_FEATURES, DataError, NumFeatures, Problem, read_image, read_points,
                              sample_paths)
from stores.keys import make_key

__all__ = ["ACTION_SEMANTICS", "LidarSequenceDataset", "CameraSequenceDataset", "PairedSequenceDataset", "LidarFrameDataset",
           "collate_lidar", "collate_camera", "collate_paired", "collate_frames", "window_controls"]


#: what the action targets mean; recorded in every memorybank, which refuses a mismatch (re-export)
ACTION_SEMANTICS = "steer=wheel_angle[t] deg; speed=speed_command[t] m/s, else velocity[t+1]"


def window_controls(table: SegmentTable, start: int, seq_len: int) -> dict[str, torch.Tensor]:
    """``speed (T,)`` measured, ``steering (T,)`` (previous wheel_angle, 0 at frame 0), ``actions (T, 2)``
    ``[wheel_angle, speed command]`` (``table.actions()``: the labels), float32."""
    stop = start + seq_len
    velocity = table.velocity[start:stop]
    actions = table.actions()[start:stop]
    previous = table.wheel_angle[max(start - 1, 0):stop - 1]
    if start == 0:
        previous = np.concatenate([[0.0], previous])
    return {"speed": torch.tensor(velocity, dtype=torch.float32),
            "steering": torch.tensor(previous, dtype=torch.float32),
            "actions": torch.tensor(actions, dtype=torch.float32)}


def select_segments(root: Path, split: str, found: list[str], wanted: Optional[Sequence[str]]) -> list[str]:
    """``found`` (the split's segments) restricted to ``wanted`` (all when None), in ``found``'s order;
    DataError naming the split folder for a wanted segment the split does not hold."""
    if wanted is None:
        return found
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise DataError(root / split, f"segment(s) {', '.join(missing)} not in split {split!r} "
                                      f"(it holds {', '.join(found) or 'none'})")
    return [s for s in found if s in set(wanted)]


class _SequenceDataset(Dataset):
    """Shared machinery: segment tables, windows, keys, problem records, per-frame loading and scanning."""

    uses_lidar = False
    uses_camera = False

    def __init__(self, root: Union[str, Path], split: str, seq_len: int = 5, stride: int = 1,
                 lidar_num_features: NumFeatures = "auto", image_size: tuple[int, int] = (256, 128),
                 skip_bad: bool = False, segments: Optional[Sequence[str]] = None, image_cache_mb: float = 512.0):
        if lidar_num_features != "auto" and lidar_num_features not in SUPPORTED_NUM_FEATURES:
            raise ValueError(f"lidar_num_features must be one of {SUPPORTED_NUM_FEATURES} or 'auto', "
                             f"got {lidar_num_features!r}")
        self.root, self.split = Path(root), split
        self.seq_len, self.stride, self.skip_bad = int(seq_len), int(stride), bool(skip_bad)
        self.lidar_num_features = lidar_num_features
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.frame_cache = FrameCache(image_cache_mb)   # decoded camera frames: an epoch decodes each once
        self.problems: list[Problem] = []
        self.tables: dict[str, SegmentTable] = {}
        self.windows: list[tuple[str, int]] = []
        self.layouts: dict[str, PointLayout] = {}       # per segment, the layout used (for reports)
        self._bin_layouts: dict[str, PointLayout] = {}  # per segment, the layout of its .bin files
        self.mean_points: dict[str, float] = {}
        self._bad_frames: set[tuple[str, int]] = set()
        self._bad_segments: set[str] = set()
        self._seen: set[Problem] = set()
        self.lidar_only_segments: list[str] = []        # left out by the camera datasets (no camera there)
        self.camera_only_segments: list[str] = []       # left out by the LiDAR datasets (no LiDAR there)
        camera_names: Optional[list[str]] = None
        segments = select_segments(self.root, split, discover_segments(self.root, split), segments)
        for segment in segments:
            if self.uses_camera and is_lidar_only(self.root, split, segment):
                self.lidar_only_segments.append(segment)
                continue
            if self.uses_lidar and is_camera_only(self.root, split, segment):
                self.camera_only_segments.append(segment)
                continue
            try:
                table = read_segment_table(self.root, split, segment, lidar=self.uses_lidar, camera=self.uses_camera)
                if table.num_frames < self.seq_len:
                    raise DataError(table.csv_path, f"segment has {table.num_frames} frames, fewer than "
                                                    f"seq_len={self.seq_len}")
                names = [c.name for c in table.cameras]
                if self.uses_camera and camera_names is not None and names != camera_names:
                    raise DataError(table.directory / "camera" / "calib.json",
                                    f"cameras {names} differ from {camera_names} of the split's other segments")
            except DataError as e:
                self._record(e)
                continue
            camera_names = camera_names if camera_names is not None else names
            self.tables[segment] = table
            starts = window_starts(self._window_frames(table), self.seq_len, self.stride)
            self.windows += [(segment, s) for s in starts]
        if self.lidar_only_segments and len(self.lidar_only_segments) == len(segments):
            self._record(DataError(self.root / split, f"no camera in split {split!r}: all its "
                                                     f"{len(segments)} segment(s) are LiDAR-only"))
        elif self.camera_only_segments and len(self.camera_only_segments) == len(segments):
            self._record(DataError(self.root / split, f"no LiDAR in split {split!r}: all its "
                                                     f"{len(segments)} segment(s) are camera-only"))
        elif segments and len(self.lidar_only_segments) + len(self.camera_only_segments) == len(segments):
            self._record(DataError(self.root / split, f"no paired segment in split {split!r}: its segments are "
                                                     f"LiDAR-only or camera-only"))
        self.keys: list[str] = [make_key(split, seg, s) for seg, s in self.windows]
        self.camera_names: list[str] = camera_names or []

    # ----- bookkeeping -------------------------------------------------------------------------------------
    def _record(self, error: DataError) -> None:
        if not self.skip_bad:
            raise error
        if error.problem not in self._seen:
            self._seen.add(error.problem)
            self.problems.append(error.problem)

    def __len__(self) -> int:
        return len(self.windows)

    def _window_frames(self, table: SegmentTable) -> int:
        """Frames windows may cover: those with defined actions (all but the last without speed_command)."""
        return table.target_frames

    def frame_actions(self) -> np.ndarray:
        """(F, 2) float64 ``[wheel_angle, speed command]`` of every frame with defined actions of every kept
        segment (for mean/std)."""
        if not self.tables:
            return np.zeros((0, 2))
        return np.concatenate([t.actions()[:t.target_frames] for t in self.tables.values()])

    # ----- per-frame loading -------------------------------------------------------------------------------
    def point_layout(self, segment: str) -> PointLayout:
        """The point layout of a segment's ``.bin`` files: given, or auto-detected once from up to 3 files."""
        if segment in self._bin_layouts:
            return self._bin_layouts[segment]
        table = self.tables[segment]
        if self.lidar_num_features != "auto":
            layout = PointLayout(int(self.lidar_num_features), "given")
        else:
            bins = [p for p in (table.lidar_paths or []) if p.suffix.lower() == ".bin"]
            usable = [p for p in dict.fromkeys(bins) if p.is_file() and 0 < p.stat().st_size <= MAX_POINT_FILE_BYTES
                      and p.stat().st_size % 4 == 0]
            picked = sample_paths(usable, 3)
            if not picked:
                raise DataError(table.csv_path, "no readable .bin point file to auto-detect the point layout from")
            try:
                layout = detect_bin_layout(picked)
            except LayoutUndecidable as e:
                raise DataError(table.csv_path, f"cannot auto-detect the point layout of this segment "
                                                f"(pass lidar_num_features=4|5|8): {e}") from None
        self._bin_layouts[segment] = self.layouts[segment] = layout
        return layout

    def _load_points(self, segment: str, frame: int) -> torch.Tensor:
        table = self.tables[segment]
        path = table.lidar_paths[frame]
        nf: NumFeatures = self.point_layout(segment).num_features if path.suffix.lower() == ".bin" else "auto"
        points, layout = read_points(path, nf, row=frame, lidar2ego=table.lidar2ego)   # ego frame
        if path.suffix.lower() != ".bin":
            self.layouts.setdefault(segment, layout)
        return torch.from_numpy(points)

    def _load_images(self, segment: str, frame: int) -> torch.Tensor:
        """(Ncam, 3, H, W) float32 in [0, 1] at ``image_size`` (from the frame cache when it holds them)."""
        cached = self.frame_cache.get((segment, frame))
        if cached is not None:
            return cached
        table = self.tables[segment]
        out = []
        for cam in table.cameras:
            path = table.image_paths[cam.name][frame]
            image, original = read_image(path, self.image_size, row=frame, expected_size=cam.image_size)
            if original != cam.image_size:
                raise DataError(path, f"image size {original[0]}x{original[1]} differs from the segment's "
                                      f"{cam.image_size[0]}x{cam.image_size[1]} (calib.json image_size of camera "
                                      f"{cam.name!r}, which K is for)", frame)
            out.append(torch.from_numpy(image))
        images = torch.stack(out)
        self.frame_cache.put((segment, frame), images)
        return images

    def _camera_geometry(self, segment: str) -> dict[str, torch.Tensor]:
        cams = self.tables[segment].cameras
        K = np.stack([scale_intrinsics(c.K, self.image_size[0] / c.image_size[0], self.image_size[1] / c.image_size[1])
                      for c in cams])
        return {"intrinsics": torch.tensor(K, dtype=torch.float32),
                "cam2ego": torch.tensor(np.stack([c.cam2ego for c in cams]), dtype=torch.float32)}

    def _frame_loaders(self) -> list[Callable[[str, int], Any]]:
        return ([self._load_points] if self.uses_lidar else []) + ([self._load_images] if self.uses_camera else [])

    def _build(self, segment: str, start: int) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Optional[dict[str, Any]]:
        segment, start = self.windows[index]
        if segment in self._bad_segments or any((segment, f) in self._bad_frames
                                                for f in range(start, start + self.seq_len)):
            return None
        try:
            return self._build(segment, start)
        except DataError as e:
            self._record(e)
            if e.row is None:
                self._bad_segments.add(segment)
            else:
                self._bad_frames.add((segment, e.row))
            return None

    def scan(self, progress: bool = True) -> list[Problem]:
        """Read every frame file of every kept segment once; return the problems found (also in ``.problems``).

        Never raises for bad files. Fills ``.layouts`` and ``.mean_points`` (per segment, LiDAR only). With
        ``skip_bad=True`` the windows touching a bad frame are then removed from ``.windows`` / ``.keys``.
        """
        found: list[Problem] = []
        total = sum(t.num_frames for t in self.tables.values())
        bar = tqdm(total=total, desc=f"scan {self.split}", unit="frame", disable=not progress)
        for segment, table in self.tables.items():
            n_points, n_ok, counts = 0, 0, {}
            for frame in range(table.num_frames):
                bar.update(1)
                if segment in self._bad_segments:
                    continue
                for load in self._frame_loaders():
                    try:
                        value = load(segment, frame)
                    except DataError as e:
                        found.append(e.problem)
                        (self._bad_segments.add(segment) if e.row is None else self._bad_frames.add((segment, e.row)))
                        break
                    if load == self._load_points:
                        n_points, n_ok, counts[frame] = n_points + len(value), n_ok + 1, len(value)
            if n_ok:
                self.mean_points[segment] = n_points / n_ok
            for p in sparse_frames(table, counts):
                found.append(p)
                self._bad_frames.add((segment, p.row))
        bar.close()
        for p in found:
            if p not in self._seen:
                self._seen.add(p)
                self.problems.append(p)
        if self.skip_bad:
            self.keep_windows([i for i, (seg, s) in enumerate(self.windows) if seg not in self._bad_segments
                               and not any((seg, f) in self._bad_frames for f in range(s, s + self.seq_len))])
        return found

    def keep_windows(self, indices: Sequence[int]) -> None:
        """Keep only the windows at ``indices`` (positions in ``.windows``, in the order given; a position given
        twice is kept twice; ``.keys`` follows)."""
        self.windows = [self.windows[i] for i in indices]
        self.keys = [self.keys[i] for i in indices]

    def window_braking(self, margin: float) -> np.ndarray:
        """(len(self),) bool: windows with a frame whose speed label is more than ``margin`` m/s below the measured
        speed (the labeller brakes). A recorded drive whose commands are not labels (``expert_labels`` False, as
        the trainers read it) has none."""
        braking = {segment: (table.actions()[:, 1] < table.velocity - margin) & table.expert_labels
                   for segment, table in self.tables.items()}
        return np.array([braking[segment][start:start + self.seq_len].any() for segment, start in self.windows],
                        dtype=bool)

    def window_disagreement(self) -> np.ndarray:
        """(len(self),) the mean |student - teacher| wheel angle (deg) over each window's frames, from a mixed
        drive's recorded proposals (``SegmentTable.disagreement``); DataError naming the segment without them."""
        out = np.empty(len(self.windows))
        for i, (segment, start) in enumerate(self.windows):
            table = self.tables[segment]
            if table.disagreement is None:
                raise DataError(table.csv_path, "no student_wheel_angle / teacher_wheel_angle columns: not a drive "
                                                "recorded under mixed control (pipelines.drive --mix_teacher)")
            out[i] = float(table.disagreement[start:start + self.seq_len].mean())
        return out


def sparse_frames(table: SegmentTable, counts: dict[int, int]) -> list[Problem]:
    """Problems for the frames of a segment holding under 1/20 of its median point count (at least 8 frames
    read, a median of at least 1000 points): a frame cut off at a whole point (truncated copy), not a scan."""
    if len(counts) < 8 or table.lidar_paths is None:
        return []
    median = float(np.median(list(counts.values())))
    return [DataError(table.lidar_paths[f], f"{n} points, under 1/20 of the segment's median {median:.0f}: a "
                      "truncated or partial frame; re-copy or re-record it", f).problem
            for f, n in counts.items() if median >= 1000 and n < median / 20]


class LidarSequenceDataset(_SequenceDataset):
    """Item: ``{"key", "points": list of T float32 (N_t, 4), "speed" (T,), "steering" (T,), "actions" (T, 2)}``."""

    uses_lidar = True

    def __init__(self, root: Union[str, Path], split: str, seq_len: int = 5, stride: int = 1,
                 lidar_num_features: NumFeatures = "auto", skip_bad: bool = False,
                 segments: Optional[Sequence[str]] = None):
        super().__init__(root, split, seq_len, stride, lidar_num_features=lidar_num_features, skip_bad=skip_bad,
                         segments=segments)

    def _build(self, segment: str, start: int) -> dict[str, Any]:
        points = [self._load_points(segment, f) for f in range(start, start + self.seq_len)]
        return {"key": make_key(self.split, segment, start), "points": points,
                **window_controls(self.tables[segment], start, self.seq_len)}


class CameraSequenceDataset(_SequenceDataset):
    """Item: ``{"key", "images" (T, Ncam, 3, H, W) in [0, 1], "intrinsics" (Ncam, 3, 3) for image_size=(W, H),
    "cam2ego" (Ncam, 4, 4), "speed" (T,), "steering" (T,), "actions" (T, 2), "expert_label" () bool}``;
    ``expert_label`` is False for a recorded drive (``layout.RECORDED_RELPATH``), whose actions are the
    commands it executed, not labels."""

    uses_camera = True

    def __init__(self, root: Union[str, Path], split: str, seq_len: int = 5, stride: int = 1,
                 image_size: tuple[int, int] = (256, 128), skip_bad: bool = False,
                 segments: Optional[Sequence[str]] = None, image_cache_mb: float = 512.0):
        super().__init__(root, split, seq_len, stride, image_size=image_size, skip_bad=skip_bad, segments=segments,
                         image_cache_mb=image_cache_mb)

    def _build(self, segment: str, start: int) -> dict[str, Any]:
        images = torch.stack([self._load_images(segment, f) for f in range(start, start + self.seq_len)])
        table = self.tables[segment]
        return {"key": make_key(self.split, segment, start), "images": images, **self._camera_geometry(segment),
                **window_controls(table, start, self.seq_len), "expert_label": torch.tensor(table.expert_labels)}


class PairedSequenceDataset(_SequenceDataset):
    """LiDAR and camera of the same windows: the union of both items' fields (one ``key``)."""

    uses_lidar = True
    uses_camera = True

    def _build(self, segment: str, start: int) -> dict[str, Any]:
        frames = range(start, start + self.seq_len)
        points = [self._load_points(segment, f) for f in frames]
        images = torch.stack([self._load_images(segment, f) for f in frames])
        return {"key": make_key(self.split, segment, start), "points": points, "images": images,
                **self._camera_geometry(segment), **window_controls(self.tables[segment], start, self.seq_len)}


class LidarFrameDataset(_SequenceDataset):
    """Every frame once. Item: ``{"segment": str, "frame": int, "points": (N, 4) float32}``; ``.frames`` lists
    ``(segment, frame)`` in index order."""

    uses_lidar = True

    def __init__(self, root: Union[str, Path], split: str, lidar_num_features: NumFeatures = "auto",
                 skip_bad: bool = False):
        super().__init__(root, split, 1, 1, lidar_num_features=lidar_num_features, skip_bad=skip_bad)

    def _window_frames(self, table: SegmentTable) -> int:
        return table.num_frames                # every frame, actions or not

    @property
    def frames(self) -> list[tuple[str, int]]:
        return self.windows

    def _build(self, segment: str, start: int) -> dict[str, Any]:
        return {"segment": segment, "frame": start, "points": self._load_points(segment, start)}


def _kept(items: Sequence[Optional[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [it for it in items if it is not None]


def _stack_controls(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in ("speed", "steering", "actions")}


def collate_lidar(items: Sequence[Optional[dict[str, Any]]]) -> Optional[dict[str, Any]]:
    """-> ``{"keys": [B], "points": B*T tensors (N, 4), b-major (frame b*T + t), "speed" (B, T),
    "steering" (B, T), "actions" (B, T, 2)}``; ``None`` items (skipped bad windows) are dropped."""
    items = _kept(items)
    if not items:
        return None
    return {"keys": [it["key"] for it in items], "points": [p for it in items for p in it["points"]],
            **_stack_controls(items)}


def collate_camera(items: Sequence[Optional[dict[str, Any]]]) -> Optional[dict[str, Any]]:
    """-> ``{"keys": [B], "images" (B, T, Ncam, 3, H, W), "intrinsics" (B, Ncam, 3, 3), "cam2ego" (B, Ncam, 4,
    4), "speed" (B, T), "steering" (B, T), "actions" (B, T, 2), "expert_label" (B,) bool}`` (torch's default
    collate of the other fields);
    ``None`` items (skipped bad windows) are dropped."""
    items = _kept(items)
    if not items:
        return None
    batch = default_collate([{k: v for k, v in it.items() if k != "key"} for it in items])
    return {"keys": [it["key"] for it in items], **batch}


def collate_paired(items: Sequence[Optional[dict[str, Any]]]) -> Optional[dict[str, Any]]:
    """collate_lidar's fields plus ``"images" (B, T, Ncam, 3, H, W)``, ``"intrinsics" (B, Ncam, 3, 3)``,
    ``"cam2ego" (B, Ncam, 4, 4)``."""
    items = _kept(items)
    if not items:
        return None
    out = collate_lidar(items)
    for k in ("images", "intrinsics", "cam2ego"):
        out[k] = torch.stack([it[k] for it in items])
    return out


def collate_frames(items: Sequence[Optional[dict[str, Any]]]) -> Optional[dict[str, Any]]:
    """LidarFrameDataset items -> ``{"segments": [B], "frames": [B], "points": B tensors (N, 4)}``."""
    items = _kept(items)
    if not items:
        return None
    return {"segments": [it["segment"] for it in items], "frames": [it["frame"] for it in items],
            "points": [it["points"] for it in items]}
