"""LiDAR supervision of the Lift-Splat depth distribution (BEVDepth): where a LiDAR point lands on a camera's
feature map, the depth bin of the nearest such point is that pixel's target, and the student's depth
distribution is trained towards it by cross-entropy.

    target = lidar_depth_bins(points_ego, K_feat, cam2ego, (h, w), cfg.depth_bins)   # (Ncam, h, w) uint8
    per_sample = depth_cross_entropy(depth_probs, targets)        # (B, N, D, h, w), (B, N, h, w) -> (B,)

Geometry as ``e2r.models.view_transform``: ego frame x forward, y left, z up; camera frame OpenCV; ``K_feat``
the intrinsics of the feature map (``scale_intrinsics`` of the image's), pixel ``u`` centred at ``u`` (pixel
u covers [u - 0.5, u + 0.5)); depth bins are z-depths along the optical axis, bin k the depth
``d_min + k * step`` (a depth d belongs to bin ``round((d - d_min) / step)``, `depth_bin_centers`).
``NO_DEPTH`` (255) marks a pixel no point lands on: it has no target. One byte per pixel.

The export stores them per window in the memorybank's ``depth`` group (``pipelines.export --store_depth``,
docs/STORE.md): `rig_depth_targets` gives one frame's targets on a segment's camera rig for the student grid
`depth_grid` names, with the intrinsics scaled as the camera dataset and the Lift-Splat geometry scale them;
`grid_problems` says where a store's targets do not fit a student.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from e2r.data.calib import CameraCalib, scale_intrinsics
from e2r.models.student_config import StudentConfig
from e2r.models.view_transform import depth_bin_centers

__all__ = ["NO_DEPTH", "lidar_depth_bins", "depth_cross_entropy", "depth_grid", "grid_problems", "rig_depth_targets"]

#: the target of a feature pixel that no LiDAR point lands on
NO_DEPTH = 255


def lidar_depth_bins(points_ego: Tensor, K_feat: Tensor, cam2ego: Tensor, feat_hw: tuple[int, int],
                     depth_bins: tuple[float, float, float]) -> Tensor:
    """points_ego (N, >=3) ego-frame x, y, z (further columns ignored), K_feat (Ncam, 3, 3) for the feature
    map, cam2ego (Ncam, 4, 4), feat_hw (h, w) -> (Ncam, h, w) uint8: the depth bin of the nearest point in
    front of the camera whose bin is within the lift's range, ``NO_DEPTH`` where none lands. Computed in
    float64."""
    n_bins = len(depth_bin_centers(depth_bins))
    if n_bins >= NO_DEPTH:
        raise ValueError(f"{n_bins} depth bins do not fit one byte beside NO_DEPTH ({NO_DEPTH})")
    if points_ego.dim() != 2 or points_ego.shape[1] < 3 or K_feat.shape[-2:] != (3, 3) \
            or cam2ego.shape != (K_feat.shape[0], 4, 4):
        raise ValueError(f"points (N, >=3), K_feat (Ncam, 3, 3) and cam2ego (Ncam, 4, 4) expected, got "
                         f"{tuple(points_ego.shape)}, {tuple(K_feat.shape)}, {tuple(cam2ego.shape)}")
    h, w = (int(v) for v in feat_hw)
    d_min, _, step = (float(v) for v in depth_bins)
    n_cam = K_feat.shape[0]
    p = points_ego[:, :3].to(torch.float64)
    ego2cam = torch.linalg.inv(cam2ego.to(torch.float64))
    cam = torch.einsum("cij,nj->cni", ego2cam[:, :3, :3], p) + ego2cam[:, None, :3, 3]        # (Ncam, N, 3)
    z = cam[..., 2]
    pix = torch.einsum("cij,cnj->cni", K_feat.to(torch.float64), cam)
    front = z > 1e-6
    u = torch.round(pix[..., 0] / torch.where(front, z, 1.0)).long()
    v = torch.round(pix[..., 1] / torch.where(front, z, 1.0)).long()
    b = torch.round((z - d_min) / step).long()
    ok = front & (u >= 0) & (u < w) & (v >= 0) & (v < h) & (b >= 0) & (b < n_bins)
    flat = (torch.arange(n_cam)[:, None] * (h * w) + v * w + u)[ok]
    nearest = torch.full((n_cam * h * w,), float("inf"), dtype=torch.float64)
    nearest.scatter_reduce_(0, flat, z[ok], reduce="amin")
    out = torch.full((n_cam * h * w,), NO_DEPTH, dtype=torch.uint8)
    hit = torch.isfinite(nearest)
    out[hit] = torch.round((nearest[hit] - d_min) / step).to(torch.uint8)
    return out.reshape(n_cam, h, w)


def depth_cross_entropy(depth_probs: Tensor, target: Tensor) -> Tensor:
    """depth_probs (B, N, D, h, w) (a softmax over D; N = frames x cameras), target (B, N, h, w) uint8 bins
    (``NO_DEPTH`` = none) -> (B,): each sample's mean ``-log p[target]`` over its pixels that have a target
    (0 for a sample with none)."""
    if depth_probs.dim() != 5 or target.shape != (*depth_probs.shape[:2], *depth_probs.shape[3:]):
        raise ValueError(f"depth_probs (B, N, D, h, w) and target (B, N, h, w) expected, got "
                         f"{tuple(depth_probs.shape)} and {tuple(target.shape)}")
    labelled = (target != NO_DEPTH).to(target.device)
    bins = target.long().clamp_max(depth_probs.shape[2] - 1)
    picked = depth_probs.gather(2, bins[:, :, None]).squeeze(2)                 # (B, N, h, w)
    nll = -torch.log(picked.clamp_min(1e-8)) * labelled
    count = labelled.flatten(1).sum(1)
    return nll.flatten(1).sum(1) / count.clamp_min(1).to(nll.dtype)


def depth_grid(cfg: StudentConfig) -> dict[str, Any]:
    """What a student's depth targets are for (the store's ``depth_grid`` attribute): ``{"image_size": [W, H] of
    the network input, "depth_bins": [d_min, d_max, step], "n_bins": D}``; its feature map is ``cfg.feat_hw``."""
    return {"image_size": [int(v) for v in cfg.image_size], "depth_bins": [float(v) for v in cfg.depth_bins],
            "n_bins": len(depth_bin_centers(tuple(cfg.depth_bins)))}


def grid_problems(store_grid: dict[str, Any] | None, store_shape: Sequence[int] | None, cfg: StudentConfig,
                  n_cam: int | None = None) -> list[str]:
    """Where stored depth targets (``depth_grid``, ``depth_shape`` (Ncam, h, w)) do not fit the student ``cfg``
    (and a dataset of ``n_cam`` cameras): [] when they fit."""
    want, have = depth_grid(cfg), dict(store_grid or {})
    out = [f"depth {k}: store {have.get(k)!r}, student {v!r}" for k, v in want.items() if have.get(k) != v]
    if store_shape is None or tuple(store_shape)[1:] != cfg.feat_hw:
        out.append(f"depth feature map (h, w): store {tuple(store_shape or ())[1:]}, student {cfg.feat_hw}")
    if n_cam is not None and store_shape is not None and int(store_shape[0]) != n_cam:
        out.append(f"depth cameras: store {int(store_shape[0])}, dataset {n_cam}")
    return out


def rig_depth_targets(points_ego: Tensor, cameras: Sequence[CameraCalib], grid: dict[str, Any],
                      feat_hw: tuple[int, int]) -> Tensor:
    """One frame's depth targets on a camera rig: points_ego (N, >=3) ego frame, ``cameras`` (calib.json's,
    K for each camera's own image size), ``grid`` (`depth_grid`), feat_hw (h, w) -> (Ncam, h, w) uint8.

    The intrinsics go the student's way: scaled to the network input in float32 (``CameraSequenceDataset``),
    then to the feature map in float64 (``LiftSplat.geometry``), and cam2ego rounded to float32 likewise, so a
    target lands on the pixel whose frustum the student lifts."""
    W, H = (int(v) for v in grid["image_size"])
    K_img = torch.tensor(np.stack([scale_intrinsics(c.K, W / c.image_size[0], H / c.image_size[1]) for c in cameras]),
                         dtype=torch.float32).to(torch.float64)
    cam2ego = torch.tensor(np.stack([c.cam2ego for c in cameras]), dtype=torch.float32).to(torch.float64)
    h, w = feat_hw
    K_feat = scale_intrinsics(K_img, w / W, h / H)
    return lidar_depth_bins(points_ego, K_feat, cam2ego, (h, w), tuple(grid["depth_bins"]))
