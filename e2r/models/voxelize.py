"""Hard pillar (voxel) voxelization in pure PyTorch: vectorised, batched, deterministic, CPU and CUDA.

Semantics follow the usual "hard voxelization" of mmdet3d / OpenPCDet:

* a point's cell is ``floor((p - range_min) / voxel_size)`` per axis; points whose cell falls outside the
  grid (i.e. outside ``point_cloud_range``, the upper bound excluded) are dropped;
* cells (pillars) are numbered in order of first appearance of one of their points, cloud by cloud in
  batch order; each cloud keeps at most ``max_voxels`` of them, later ones are dropped with their points;
* each pillar keeps its first ``max_points`` points in input order, padded with zeros.

There is no Python loop over points or pillars: everything is sort / unique / scatter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["VoxelizationResult", "point_cells", "voxelize", "grid_shape"]


@dataclass
class VoxelizationResult:
    """Output of :func:`voxelize` for a batch of B clouds.

    pillars: (P, max_points, F) float points per pillar, zero padded.
    coords:  (P, 4) int64 ``(batch, z, y, x)`` cell index per pillar (mmdet3d / OpenPCDet order).
    counts:  (P,) int64 number of valid points in each pillar (1..max_points).
    """

    pillars: Tensor
    coords: Tensor
    counts: Tensor


def grid_shape(point_cloud_range: Sequence[float], voxel_size: Sequence[float]) -> tuple[int, int, int]:
    """(nx, ny, nz) cells of the grid; e.g. (432, 496, 1) for the SPEC's range and (0.16, 0.16, 4) voxels."""
    if len(point_cloud_range) != 6 or len(voxel_size) != 3:
        raise ValueError(f"point_cloud_range needs 6 values and voxel_size 3, got "
                         f"{list(point_cloud_range)} and {list(voxel_size)}")
    n = [round((point_cloud_range[i + 3] - point_cloud_range[i]) / voxel_size[i]) for i in range(3)]
    if min(n) < 1:
        raise ValueError(f"empty grid {n} for range {list(point_cloud_range)} and voxel {list(voxel_size)}")
    return n[0], n[1], n[2]


def point_cells(xyz: Tensor, point_cloud_range: Sequence[float], voxel_size: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Cell index of each point and whether it lies inside the grid.

    xyz: (N, 3) float. Returns ``cells`` (N, 3) int64 as (x, y, z) indices and ``inside`` (N,) bool.
    """
    lo = torch.tensor(point_cloud_range[:3], dtype=xyz.dtype, device=xyz.device)
    vs = torch.tensor(voxel_size, dtype=xyz.dtype, device=xyz.device)
    cells = torch.floor((xyz - lo) / vs).to(torch.int64)
    n = torch.tensor(grid_shape(point_cloud_range, voxel_size), dtype=torch.int64, device=xyz.device)
    inside = ((cells >= 0) & (cells < n)).all(dim=1) & torch.isfinite(xyz).all(dim=1)
    return cells, inside


def voxelize(clouds: Sequence[Tensor], point_cloud_range: Sequence[float], voxel_size: Sequence[float],
             max_points: int, max_voxels: int) -> VoxelizationResult:
    """Hard-voxelize B point clouds of different sizes in one vectorised pass.

    clouds: B tensors (N_b, F) with x, y, z in the first three columns (N_b may be 0).
    Returns pillars (P, max_points, F), coords (P, 4) as (batch, z, y, x), counts (P,); pillars are
    ordered by cloud, then by first appearance within the cloud.
    """
    if len(clouds) == 0:
        raise ValueError("voxelize needs at least one point cloud")
    if max_points < 1 or max_voxels < 1:
        raise ValueError(f"max_points and max_voxels must be >= 1, got {max_points}, {max_voxels}")
    feat = clouds[0].shape[1] if clouds[0].dim() == 2 else -1
    for i, c in enumerate(clouds):
        if c.dim() != 2 or c.shape[1] != feat or feat < 3:
            raise ValueError(f"cloud {i} has shape {tuple(c.shape)}; every cloud must be (N, F) with the same "
                             f"F >= 3 (cloud 0 has F = {feat})")
    device, dtype = clouds[0].device, clouds[0].dtype
    nx, ny, nz = grid_shape(point_cloud_range, voxel_size)
    sizes = torch.tensor([c.shape[0] for c in clouds], dtype=torch.int64, device=device)
    points = torch.cat([c.to(device=device, dtype=dtype) for c in clouds], dim=0)           # (N, F)
    batch = torch.repeat_interleave(torch.arange(len(clouds), device=device), sizes)       # (N,)

    cells, inside = point_cells(points[:, :3], point_cloud_range, voxel_size)
    points, batch, cells = points[inside], batch[inside], cells[inside]
    n_pts = points.shape[0]
    if n_pts == 0:
        return VoxelizationResult(points.new_zeros((0, max_points, feat)),
                                  torch.zeros((0, 4), dtype=torch.int64, device=device),
                                  torch.zeros((0,), dtype=torch.int64, device=device))

    # one linear id per (batch, z, y, x) cell
    lin = ((batch * nz + cells[:, 2]) * ny + cells[:, 1]) * nx + cells[:, 0]
    uniq, inverse = torch.unique(lin, return_inverse=True)                                  # (U,), (N,)
    order = torch.arange(n_pts, device=device)
    first = torch.full((uniq.shape[0],), n_pts, dtype=torch.int64, device=device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")                          # first point
    # rank the cells by first appearance; clouds are concatenated in batch order, so this is batch-major
    appearance = torch.argsort(first)                                                       # (U,) cell ids
    rank = torch.empty_like(appearance)
    rank[appearance] = torch.arange(appearance.shape[0], device=device)
    cell_batch = batch[first]                                                               # (U,)
    per_batch = torch.bincount(cell_batch, minlength=len(clouds))
    batch_start = torch.cumsum(per_batch, 0) - per_batch
    rank_in_cloud = rank - batch_start[cell_batch]
    kept_cell = rank_in_cloud < max_voxels                                                  # (U,)
    # new pillar index = rank among kept cells (keeps the appearance order)
    kept_sorted = kept_cell[appearance]
    new_index_sorted = torch.cumsum(kept_sorted.to(torch.int64), 0) - 1
    pillar_of_cell = torch.full_like(rank, -1)
    pillar_of_cell[appearance] = torch.where(kept_sorted, new_index_sorted, -1)
    n_pillars = int(kept_sorted.sum())

    # position of each point inside its cell: stable sort keeps the input order within a cell
    by_cell = torch.sort(inverse, stable=True).indices                                      # (N,)
    cell_sorted = inverse[by_cell]
    cell_sizes = torch.bincount(inverse, minlength=uniq.shape[0])
    cell_start = torch.cumsum(cell_sizes, 0) - cell_sizes
    slot = torch.empty_like(by_cell)
    slot[by_cell] = torch.arange(n_pts, device=device) - cell_start[cell_sorted]

    pillar = pillar_of_cell[inverse]                                                        # (N,)
    keep = (pillar >= 0) & (slot < max_points)
    pillars = points.new_zeros((n_pillars, max_points, feat))
    pillars[pillar[keep], slot[keep]] = points[keep]

    kept_cells = appearance[kept_sorted]                                                    # cell ids, in order
    first_pt = first[kept_cells]
    coords = torch.stack([batch[first_pt], cells[first_pt, 2], cells[first_pt, 1], cells[first_pt, 0]], dim=1)
    counts = torch.clamp(cell_sizes[kept_cells], max=max_points)
    return VoxelizationResult(pillars, coords, counts)
