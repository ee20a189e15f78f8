"""What a memorybank export computes, decided before any model runs: frames, windows and batch cells.

A split's windows (``LidarSequenceDataset.windows``, keys in the same order) reference frames of its
segments. The export encodes each *needed* frame (one used by at least one window) once and assembles the
windows from the per-frame ``bev_vec``. Frames are numbered ``u = 0 .. U-1`` in (segment, frame) order; a
window's frames are always ``u0, u0 + 1, ..., u0 + T - 1``.

Batch composition changes floating-point results in the last bits (oneDNN / cuDNN pick kernels by batch
size), so, to make a resumed or distributed export bit-identical to an uninterrupted single-process one,
every batch is a fixed *cell*: encoder batch ``c`` = needed frames ``[c * batch_size, (c + 1) * batch_size)``,
GRU batch ``c`` = split positions ``[c * window_batch, (c + 1) * window_batch)``. A task that needs one row
of a cell computes the whole cell. ``window_batch`` divides the store's shard rows, so GRU cells never
cross a writer task's boundary.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from e2r.data.calib import CameraCalib
from e2r.data.datasets import LidarFrameDataset, LidarSequenceDataset, window_controls
from e2r.data.layout import CALIB_RELPATH, discover_segments
from e2r.data.readers import read_calib
from e2r.depth import NO_DEPTH, rig_depth_targets
from e2r.models.config import TeacherConfig
from e2r.models.voxelize import voxelize

__all__ = ["SplitPlan", "build_split_plan", "VoxelizedFrames", "collate_voxels", "rows_to_frames", "DepthSpec",
           "split_rigs"]


@dataclass
class SplitPlan:
    """Per split: ``keys`` (Nw,) in store order; ``window_u0 (Nw,)`` the first needed-frame index of each
    window; ``frame_index (U,)`` maps needed frame u to the index in the LidarFrameDataset; ``speed``,
    ``steering`` (Nw, T) float32 inputs of the GRU."""

    split: str
    seq_len: int
    keys: list[str]
    window_u0: np.ndarray
    frame_index: np.ndarray
    speed: np.ndarray
    steering: np.ndarray

    @property
    def num_windows(self) -> int:
        return len(self.keys)

    @property
    def num_frames(self) -> int:
        return int(len(self.frame_index))

    def digest(self) -> str:
        """sha256 of the plan (keys, frames, GRU inputs): equal for plans of the same data and options."""
        h = hashlib.sha256(json.dumps([self.split, self.seq_len, self.keys]).encode())
        for a in (self.window_u0, self.frame_index, self.speed, self.steering):
            h.update(str(a.dtype).encode() + np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def build_split_plan(windows_ds: LidarSequenceDataset, frames_ds: LidarFrameDataset) -> SplitPlan:
    """Plan from the two datasets of one split (same root, split); reads no point cloud."""
    T = windows_ds.seq_len
    position = {sf: i for i, sf in enumerate(frames_ds.frames)}
    missing = [seg for seg in windows_ds.tables if seg not in frames_ds.tables]
    if missing:
        raise ValueError(f"split {windows_ds.split!r}: segments {missing[:3]} have windows but no frames")
    first = np.array([position[(seg, s)] for seg, s in windows_ds.windows], dtype=np.int64)
    needed = np.unique((first[:, None] + np.arange(T)[None, :]).ravel()) if len(first) else np.zeros(0, np.int64)
    speed = np.zeros((len(first), T), np.float32)
    steering = np.zeros((len(first), T), np.float32)
    for i, (seg, s) in enumerate(windows_ds.windows):
        c = window_controls(windows_ds.tables[seg], s, T)
        speed[i], steering[i] = c["speed"].numpy(), c["steering"].numpy()
    return SplitPlan(windows_ds.split, T, list(windows_ds.keys), np.searchsorted(needed, first), needed,
                     speed, steering)


def rows_to_frames(plan: SplitPlan, positions: np.ndarray) -> np.ndarray:
    """Sorted unique needed-frame indices u used by the windows at split ``positions``."""
    if len(positions) == 0:
        return np.zeros(0, np.int64)
    u0 = plan.window_u0[np.asarray(positions, np.int64)]
    return np.unique((u0[:, None] + np.arange(plan.seq_len)[None, :]).ravel())


def split_rigs(root: Union[str, Path], split: str) -> dict[str, list[CameraCalib]]:
    """``{segment: its cameras}`` of the segments of ``root/split`` that have ``camera/calib.json`` (a LiDAR-only
    segment has none); calibration errors raise DataError naming the file."""
    out = {}
    for seg in discover_segments(root, split):
        path = Path(root) / split / seg / CALIB_RELPATH
        if path.is_file():
            out[seg] = read_calib(path)
    return out


@dataclass
class DepthSpec:
    """The depth targets an export computes per frame (the store's ``depth_grid`` and ``depth_shape``, and the
    split's camera rigs): ``grid`` (``e2r.depth.depth_grid``), ``shape`` (Ncam, h, w), ``rigs`` (`split_rigs`).
    A segment without cameras gets ``NO_DEPTH`` everywhere (no image to supervise); one whose camera count is
    not ``Ncam`` is refused."""

    grid: dict[str, Any]
    shape: tuple[int, int, int]
    rigs: dict[str, list[CameraCalib]]

    def targets(self, segment: str, points_ego: torch.Tensor) -> torch.Tensor:
        """points_ego (N, >=3) of one frame of ``segment`` -> (Ncam, h, w) uint8 depth bins."""
        n_cam, h, w = self.shape
        cams = self.rigs.get(segment)
        if not cams:
            return torch.full((n_cam, h, w), NO_DEPTH, dtype=torch.uint8)
        if len(cams) != n_cam:
            raise ValueError(f"segment {segment!r} has {len(cams)} cameras, the store's depth targets are for {n_cam}")
        return rig_depth_targets(points_ego, cams, self.grid, (h, w))


class VoxelizedFrames(Dataset):
    """Frames of a split, read and hard-voxelised in the DataLoader worker (the teacher's grid, eval limit).

    Item ``u`` (a needed-frame index of ``plan``): ``{"u": int, "pillars" (P, M, 4), "coords" (P, 4) with
    batch column 0, "counts" (P,)}``, with ``depth`` (a `DepthSpec`) also ``"depth" (Ncam, h, w)`` uint8 (the
    frame's LiDAR depth targets). Bad files raise DataError naming the file and the data.csv row.
    """

    def __init__(self, root: Union[str, Path], split: str, plan: SplitPlan, cfg: TeacherConfig,
                 lidar_num_features: Any = "auto", frames_ds: Optional[LidarFrameDataset] = None,
                 depth: Optional[DepthSpec] = None) -> None:
        self.frames_ds = frames_ds or LidarFrameDataset(root, split, lidar_num_features=lidar_num_features)
        self.plan, self.cfg, self.depth = plan, cfg, depth

    def __len__(self) -> int:
        return self.plan.num_frames

    def __getitem__(self, u: int) -> dict[str, Any]:
        item = self.frames_ds[int(self.plan.frame_index[u])]
        if item is None:  # only with skip_bad; the export never sets it
            raise RuntimeError(f"frame {u} of split {self.plan.split!r} could not be read")
        cfg = self.cfg
        points = item["points"]
        if points.dim() != 2 or points.shape[1] != cfg.num_point_features:
            raise ValueError(f"{item['segment']} frame {item['frame']}: point cloud of shape "
                             f"{tuple(points.shape)}, the teacher expects (N, {cfg.num_point_features})")
        vox = voxelize([points.float()], cfg.point_cloud_range, cfg.voxel_size, cfg.max_points_per_pillar,
                       cfg.max_pillars_eval)
        out = {"u": int(u), "pillars": vox.pillars, "coords": vox.coords, "counts": vox.counts}
        if self.depth is not None:
            out["depth"] = self.depth.targets(item["segment"], points)
        return out


def collate_voxels(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Items of VoxelizedFrames -> ``{"u" (F,), "pillars" (P, M, 4), "coords" (P, 4) with batch column =
    position in the batch, "counts" (P,)[, "depth" (F, Ncam, h, w) uint8]}`` (the layout the teacher's encoder
    gets from ``voxelize``)."""
    coords = []
    for i, it in enumerate(items):
        c = it["coords"].clone()
        c[:, 0] = i
        coords.append(c)
    return {"u": torch.tensor([it["u"] for it in items], dtype=torch.int64),
            "pillars": torch.cat([it["pillars"] for it in items]), "coords": torch.cat(coords),
            "counts": torch.cat([it["counts"] for it in items]),
            **({"depth": torch.stack([it["depth"] for it in items])} if items and "depth" in items[0] else {})}
