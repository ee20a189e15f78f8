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

from e2r.data.datasets import LidarFrameDataset, LidarSequenceDataset, window_controls
from e2r.models.config import TeacherConfig
from e2r.models.voxelize import voxelize

__all__ = ["SplitPlan", "build_split_plan", "VoxelizedFrames", "collate_voxels", "rows_to_frames"]


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


class VoxelizedFrames(Dataset):
    """Frames of a split, read and hard-voxelised in the DataLoader worker (the teacher's grid, eval limit).

    Item ``u`` (a needed-frame index of ``plan``): ``{"u": int, "pillars" (P, M, 4), "coords" (P, 4) with
    batch column 0, "counts" (P,)}``. Bad files raise DataError naming the file and the data.csv row.
    """

    def __init__(self, root: Union[str, Path], split: str, plan: SplitPlan, cfg: TeacherConfig,
                 lidar_num_features: Any = "auto", frames_ds: Optional[LidarFrameDataset] = None) -> None:
        self.frames_ds = frames_ds or LidarFrameDataset(root, split, lidar_num_features=lidar_num_features)
        self.plan, self.cfg = plan, cfg

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
        return {"u": int(u), "pillars": vox.pillars, "coords": vox.coords, "counts": vox.counts}


def collate_voxels(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Items of VoxelizedFrames -> ``{"u" (F,), "pillars" (P, M, 4), "coords" (P, 4) with batch column =
    position in the batch, "counts" (P,)}`` (the layout the teacher's encoder gets from ``voxelize``)."""
    coords = []
    for i, it in enumerate(items):
        c = it["coords"].clone()
        c[:, 0] = i
        coords.append(c)
    return {"u": torch.tensor([it["u"] for it in items], dtype=torch.int64),
            "pillars": torch.cat([it["pillars"] for it in items]), "coords": torch.cat(coords),
            "counts": torch.cat([it["counts"] for it in items])}
