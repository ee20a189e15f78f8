"""The vectorised voxelizer against a plain-Python hard-voxelization loop (exact equality)."""
from __future__ import annotations

import math

import pytest
import torch

from e2r.models.voxelize import _stable_argsort, grid_shape, point_cells, voxelize

RANGE = (0.0, -4.0, -3.0, 8.0, 4.0, 1.0)
VOXEL = (1.0, 1.0, 4.0)          # 8 x 8 x 1 grid


def reference_voxelize(clouds, pc_range, voxel, max_points, max_voxels):
    """Point by point, the textbook hard voxelization (one cloud at a time)."""
    nx, ny, nz = grid_shape(pc_range, voxel)
    pillars, coords, counts = [], [], []
    for b, cloud in enumerate(clouds):
        index_of_cell: dict[tuple[int, int, int], int] = {}
        start = len(pillars)
        for p in cloud.tolist():
            if any(math.isnan(v) or math.isinf(v) for v in p[:3]):
                continue
            c = [math.floor((p[i] - pc_range[i]) / voxel[i]) for i in range(3)]
            if not all(0 <= c[i] < n for i, n in enumerate((nx, ny, nz))):
                continue
            cell = (c[2], c[1], c[0])
            if cell not in index_of_cell:
                if len(index_of_cell) >= max_voxels:
                    continue
                index_of_cell[cell] = len(pillars)
                pillars.append([[0.0] * len(p) for _ in range(max_points)])
                coords.append([b, *cell])
                counts.append(0)
            j = index_of_cell[cell]
            if counts[j] < max_points:
                pillars[j][counts[j]] = p
                counts[j] += 1
        assert len(pillars) - start <= max_voxels
    feat = clouds[0].shape[1]
    return (torch.tensor(pillars, dtype=torch.float32).reshape(-1, max_points, feat),
            torch.tensor(coords, dtype=torch.int64).reshape(-1, 4),
            torch.tensor(counts, dtype=torch.int64))


def random_cloud(n: int, gen: torch.Generator) -> torch.Tensor:
    """Points on a coarse lattice (so cells are shared and cell boundaries are exact in float32),
    a third of them outside the range."""
    xyz = torch.randint(-4, 40, (n, 3), generator=gen).float() * 0.25
    xyz[:, 1] -= 5.0
    xyz[:, 2] = xyz[:, 2] * 0.5 - 3.5
    intensity = torch.rand(n, 1, generator=gen)
    return torch.cat([xyz, intensity], dim=1)


def check_equal(clouds, max_points, max_voxels):
    got = voxelize(clouds, RANGE, VOXEL, max_points, max_voxels)
    ref_p, ref_c, ref_n = reference_voxelize(clouds, RANGE, VOXEL, max_points, max_voxels)
    assert torch.equal(got.coords, ref_c)
    assert torch.equal(got.counts, ref_n)
    assert torch.equal(got.pillars, ref_p)
    return got


@pytest.mark.parametrize("seed", range(6))
def test_random_batches_match_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 300, (4,), generator=gen).tolist()
    clouds = [random_cloud(n, gen) for n in sizes]
    got = check_equal(clouds, max_points=int(torch.randint(1, 6, (1,), generator=gen)),
                      max_voxels=int(torch.randint(3, 70, (1,), generator=gen)))
    assert got.pillars.shape[0] > 0


def test_truncation_of_points_and_pillars_happens():
    gen = torch.Generator().manual_seed(11)
    clouds = [random_cloud(500, gen), random_cloud(400, gen)]
    got = check_equal(clouds, max_points=2, max_voxels=10)
    assert (got.counts == 2).any()
    assert int((got.coords[:, 0] == 0).sum()) == 10 and int((got.coords[:, 0] == 1).sum()) == 10


def test_empty_and_out_of_range_clouds():
    gen = torch.Generator().manual_seed(3)
    far = torch.tensor([[100.0, 0.0, 0.0, 1.0], [-1.0, 0.0, 0.0, 1.0], [1.0, 4.0, 0.0, 1.0],
                        [1.0, 0.0, 1.0, 1.0], [float("nan"), 0.0, 0.0, 1.0]])
    empty = torch.zeros((0, 4))
    got = voxelize([empty, far], RANGE, VOXEL, 4, 16)
    assert got.pillars.shape == (0, 4, 4) and got.coords.shape == (0, 4) and got.counts.shape == (0,)
    got = check_equal([empty, random_cloud(50, gen), far, empty], max_points=3, max_voxels=20)
    assert set(got.coords[:, 0].tolist()) == {1}


def test_deterministic_and_upper_bound_excluded():
    gen = torch.Generator().manual_seed(5)
    clouds = [random_cloud(200, gen) for _ in range(3)]
    a, b = voxelize(clouds, RANGE, VOXEL, 4, 30), voxelize(clouds, RANGE, VOXEL, 4, 30)
    assert torch.equal(a.pillars, b.pillars) and torch.equal(a.coords, b.coords)
    cells, inside = point_cells(torch.tensor([[8.0, 0.0, 0.0], [7.99, 3.99, 0.99], [0.0, -4.0, -3.0]]),
                                RANGE, VOXEL)
    assert inside.tolist() == [False, True, True]
    assert cells[1].tolist() == [7, 7, 0]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="cloud 1"):
        voxelize([torch.zeros(3, 4), torch.zeros(3, 5)], RANGE, VOXEL, 4, 4)
    with pytest.raises(ValueError, match="at least one"):
        voxelize([], RANGE, VOXEL, 4, 4)


def test_large_grid_sorts_with_torch_and_matches_reference():
    """Cell ids beyond 2**16 (here 5 x 128 x 128) take torch's sort, not numpy's uint16 radix sort."""
    gen = torch.Generator().manual_seed(7)
    pc_range, voxel = (0.0, -4.0, -3.0, 8.0, 4.0, 1.0), (1 / 16, 1 / 16, 4.0)
    clouds = [random_cloud(n, gen) for n in (300, 0, 250, 280, 120)]
    got = voxelize(clouds, pc_range, voxel, 3, 200)
    ref_p, ref_c, ref_n = reference_voxelize(clouds, pc_range, voxel, 3, 200)
    assert len(clouds) * 128 * 128 > 2 ** 16
    assert torch.equal(got.coords, ref_c) and torch.equal(got.counts, ref_n) and torch.equal(got.pillars, ref_p)


@pytest.mark.parametrize("bound", [2, 300, 2 ** 16, 2 ** 16 + 1, 2 ** 20])
def test_stable_argsort_is_torch_stable_sort(bound):
    """Both backends (numpy's radix sort of uint16 keys, torch.sort) give torch's stable order, ties included."""
    gen = torch.Generator().manual_seed(bound)
    for dtype in (torch.int32, torch.int64):
        keys = torch.randint(0, bound, (5000,), generator=gen).to(dtype)
        keys[:3] = bound - 1
        got = _stable_argsort(keys, bound)
        assert got.dtype == torch.int64
        assert torch.equal(got, torch.sort(keys, stable=True)[1])


def test_inside_bounds_exactly():
    """inside is 0 <= (p - lo) / voxel < cells on every axis: the lower bound kept, the upper one and the
    float just below it as computed, NaN and infinities out."""
    below = torch.nextafter(torch.tensor(8.0), torch.tensor(0.0)).item()
    xyz = torch.tensor([[0.0, -4.0, -3.0], [8.0, 0.0, 0.0], [below, 0.0, 0.0], [0.0, 4.0, 0.0],
                        [0.0, 0.0, 1.0], [-1e-7, 0.0, 0.0], [float("nan"), 0.0, 0.0], [float("inf"), 0.0, 0.0],
                        [0.0, float("-inf"), 0.0], [1.0, 2.0, float("nan")]])
    cells, inside = point_cells(xyz, RANGE, VOXEL)
    expect = [all(0 <= math.floor((p[i] - RANGE[i]) / VOXEL[i]) < n for i, n in enumerate((8, 8, 1)))
              if all(math.isfinite(v) for v in p) else False for p in xyz.tolist()]
    assert inside.tolist() == expect == [True, False, True, False, False, False, False, False, False, False]
    assert cells[2].tolist() == [7, 4, 0]
