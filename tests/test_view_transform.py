import math

import pytest
import torch

from e2r.models.config import TeacherConfig
from e2r.data.calib import scale_intrinsics
from e2r.models.view_transform import (IdentityViewTransform, LiftSplat, bev_cell_index, camera_fov_mask,
                                       depth_bin_centers)

GRID = TeacherConfig.preset_named("tiny").bev_grid   # x 0..51.2, y -25.6..25.6, 1.6 m cells, 32 x 32
IMG_HW = (32, 64)                                     # H, W of the network input
FEAT_HW = (8, 16)                                     # stride 4


def _K(W=64, H=32, f=40.0) -> torch.Tensor:
    return torch.tensor([[f, 0.0, (W - 1) / 2], [0.0, f, (H - 1) / 2], [0.0, 0.0, 1.0]])


def _cam2ego(yaw_deg: float = 0.0, t=(0.5, 0.0, 0.3)) -> torch.Tensor:
    """OpenCV camera looking along ego +x rotated by yaw (left positive) about ego z."""
    base = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # cam -> ego axes
    c, s = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
    Rz = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    T = torch.eye(4)
    T[:3, :3] = Rz @ base
    T[:3, 3] = torch.tensor(t)
    return T


def _expected_cell(K, T, px, py, depth, stride):
    """Independent hand computation of the ego point seen at feature pixel (px, py) at z-depth ``depth``."""
    u = (px + 0.5) * stride - 0.5
    v = (py + 0.5) * stride - 0.5
    xc = (u - K[0, 2].item()) / K[0, 0].item() * depth
    yc = (v - K[1, 2].item()) / K[1, 1].item() * depth
    p = T[:3, :3].double() @ torch.tensor([xc, yc, depth], dtype=torch.float64) + T[:3, 3].double()
    ix = math.floor((p[0].item() - GRID["x_min"]) / GRID["dx"])
    iy = math.floor((p[1].item() - GRID["y_min"]) / GRID["dy"])
    return p, iy, ix


@pytest.mark.parametrize("yaw,px,py,depth", [(0.0, 3, 5, 12.0), (0.0, 14, 4, 30.0), (35.0, 9, 4, 20.0),
                                             (-20.0, 1, 7, 7.0)])
def test_one_hot_depth_lands_in_the_right_cell(yaw, px, py, depth):
    ls = LiftSplat(8, 3, GRID, depth_bins=(2.0, 40.0, 1.0))
    K, T = _K(), _cam2ego(yaw)
    bins = depth_bin_centers((2.0, 40.0, 1.0))
    k = int(round((depth - 2.0) / 1.0))
    assert bins[k].item() == pytest.approx(depth)
    depth_probs = torch.zeros(1, ls.n_depth, *FEAT_HW)
    depth_probs[0, k, py, px] = 1.0
    ctx = torch.zeros(1, 3, *FEAT_HW)
    ctx[0, :, py, px] = torch.tensor([1.0, 2.0, 3.0])
    bev = ls.splat(depth_probs, ctx, K[None, None], T[None, None], IMG_HW)
    assert bev.shape == (1, 3, GRID["H"], GRID["W"])
    p, iy, ix = _expected_cell(K, T, px, py, depth, stride=4)
    assert GRID["z_min"] <= p[2] < GRID["z_max"] and 0 <= iy < GRID["H"] and 0 <= ix < GRID["W"]
    nz = torch.nonzero(bev[0, 0])
    assert nz.tolist() == [[iy, ix]], f"point {p.tolist()} expected at row {iy} col {ix}"
    assert torch.allclose(bev[0, :, iy, ix], torch.tensor([1.0, 2.0, 3.0]))
    # the teacher's convention: row indexes y from y_min, column indexes x from x_min (cell contains p)
    assert GRID["y_min"] + iy * GRID["dy"] <= p[1] < GRID["y_min"] + (iy + 1) * GRID["dy"]
    assert GRID["x_min"] + ix * GRID["dx"] <= p[0] < GRID["x_min"] + (ix + 1) * GRID["dx"]


def test_left_of_the_car_is_a_higher_row():
    # a camera looking left (yaw +90) sees points with y > 0, i.e. rows above the middle
    ls = LiftSplat(8, 1, GRID)
    depth_probs = torch.zeros(1, ls.n_depth, *FEAT_HW)
    depth_probs[0, 10, 4, 8] = 1.0  # 12 m
    bev = ls.splat(depth_probs, torch.ones(1, 1, *FEAT_HW), _K()[None, None], _cam2ego(90.0, (10.0, 0, 0.3))[None, None],
                   IMG_HW)
    (iy, ix), = torch.nonzero(bev[0, 0]).tolist()
    assert iy > GRID["H"] // 2 + 5 and abs((ix + 0.5) * GRID["dx"] - 10.0) < 2 * GRID["dx"]


def test_outside_points_dropped_and_multicam_sum():
    ls = LiftSplat(8, 1, GRID)
    K = _K()
    # backward camera: everything behind the car (x < 0) is outside the grid
    back = ls.splat(torch.full((1, ls.n_depth, *FEAT_HW), 1.0 / ls.n_depth), torch.ones(1, 1, *FEAT_HW),
                    K[None, None], _cam2ego(180.0)[None, None], IMG_HW)
    assert back.abs().sum() == 0
    # high above the z range is dropped too
    up = ls.splat(torch.full((1, ls.n_depth, *FEAT_HW), 1.0 / ls.n_depth), torch.ones(1, 1, *FEAT_HW),
                  K[None, None], _cam2ego(0.0, (0.5, 0.0, 20.0))[None, None], IMG_HW)
    assert up.abs().sum() == 0
    # two cameras of a rig sum into one grid: front + back == front alone
    dp = torch.rand(2, ls.n_depth, *FEAT_HW).softmax(1)
    ctx = torch.rand(2, 1, *FEAT_HW)
    Ks = torch.stack([K, K])[None]
    rig = ls.splat(dp, ctx, Ks, torch.stack([_cam2ego(0.0), _cam2ego(180.0)])[None], IMG_HW)
    front = ls.splat(dp[:1], ctx[:1], K[None, None], _cam2ego(0.0)[None, None], IMG_HW)
    assert torch.allclose(rig, front, atol=1e-6) and front.sum() > 0
    left = ls.splat(dp[1:], ctx[1:], K[None, None], _cam2ego(60.0)[None, None], IMG_HW)
    rig2 = ls.splat(dp, ctx, Ks, torch.stack([_cam2ego(0.0), _cam2ego(60.0)])[None], IMG_HW)
    assert torch.allclose(rig2, front + left, atol=1e-5)


def test_geometry_cached_per_calibration_and_batched_frames():
    ls = LiftSplat(8, 2, GRID)
    feats = torch.randn(6, 8, *FEAT_HW)
    Ka, Ta = _K()[None], _cam2ego(0.0)[None]
    Tb = _cam2ego(25.0)[None]
    intr = torch.stack([Ka, Ka, Ka, Ka, Ka, Ka])
    ext = torch.stack([Ta, Tb, Ta, Tb, Ta, Ta])
    out = ls(feats, intr, ext, IMG_HW)
    assert out.shape == (6, 2, GRID["H"], GRID["W"])
    assert ls.geometry_computations == 2          # two distinct rigs in the batch
    out2 = ls(feats, intr, ext, IMG_HW)
    assert ls.geometry_computations == 2 and torch.allclose(out, out2)
    # frames are independent: frame 2 alone gives the same map
    single = ls(feats[1:2], intr[1:2], ext[1:2], IMG_HW)
    assert torch.allclose(single[0], out[1], atol=1e-5)
    assert not torch.allclose(out[0], out[1])
    # mass conservation: total = sum of context weighted by in-grid depth probability
    dp, ctx = ls.lift(feats[:1])
    cells = ls.geometry(intr[:1], ext[:1], IMG_HW, FEAT_HW)[0, 0]
    expect = (dp[0] * (cells >= 0)).sum(0)[None] * ctx[0]
    assert torch.allclose(ls.splat(dp, ctx, intr[:1], ext[:1], IMG_HW)[0].sum((1, 2)), expect.sum((1, 2)), rtol=1e-4)


def test_gradients_reach_image_features():
    ls = LiftSplat(8, 4, GRID)
    feats = torch.randn(1, 8, *FEAT_HW, requires_grad=True)
    ls(feats, _K()[None, None], _cam2ego()[None, None], IMG_HW).pow(2).sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert ls.depthnet.weight.grad.abs().sum() > 0


def test_scale_intrinsics_maps_pixel_centres():
    K = _K()
    Kf = scale_intrinsics(K, 0.25, 0.25)
    # feature pixel 3 centre = image pixel 3.5*4-0.5 = 13.5: both project the same ray
    ray_img = torch.linalg.inv(K) @ torch.tensor([13.5, 9.5, 1.0])
    ray_feat = torch.linalg.inv(Kf) @ torch.tensor([3.0, 2.0, 1.0])
    assert torch.allclose(ray_img, ray_feat, atol=1e-6)


def test_bev_cell_index_convention():
    pts = torch.tensor([[0.1, -25.5, 0.0], [51.1, 25.5, 0.0], [10.0, 3.3, -1.0], [-0.1, 0.0, 0.0],
                        [10.0, 0.0, 1.0], [10.0, 0.0, -3.0]])
    idx = bev_cell_index(pts, GRID)
    W = GRID["W"]
    assert idx[0] == 0 and idx[1] == (GRID["H"] - 1) * W + W - 1
    assert idx[2] == math.floor((3.3 + 25.6) / 1.6) * W + math.floor(10.0 / 1.6)
    assert idx[3] == -1 and idx[4] == -1 and idx[5] >= 0  # z in [z_min, z_max)


def test_camera_fov_mask():
    K, T = _K(), _cam2ego(0.0)
    m = camera_fov_mask(K[None], T[None], (64, 32), GRID, max_depth=40.0)
    assert m.shape == (GRID["H"], GRID["W"]) and m.dtype == torch.bool
    mid = GRID["H"] // 2
    assert m[mid, 10] and m[mid, 20]                  # straight ahead, 16 m and 32 m
    assert not m[mid, 0]                               # under/behind the lens (x < 0.5 + min depth)
    assert not m[mid, 30]                              # beyond max_depth (48 m)
    assert not m[0, 3] and not m[-1, 3]                # far left/right near the car: outside the HFOV
    assert m.float().mean() < 0.5
    # fov cone half-angle = atan((W/2)/f) = 38.7 deg: the cell at 20 m ahead, 20 m left is outside
    iy = math.floor((20.0 + 25.6) / 1.6)
    assert not m[iy, math.floor(20.0 / 1.6)]
    # two cameras see more; batched input gives one mask per sample
    m2 = camera_fov_mask(torch.stack([K, K])[None].repeat(2, 1, 1, 1),
                         torch.stack([T, _cam2ego(90.0)])[None].repeat(2, 1, 1, 1), (64, 32), GRID, 40.0)
    assert m2.shape == (2, GRID["H"], GRID["W"]) and (m2[0] >= m).all() and m2[0].sum() > m.sum()
    left_cell = (math.floor((15.0 + 25.6) / 1.6), math.floor(2.0 / 1.6))   # 2 m ahead, 15 m to the left
    assert m2[0][left_cell] and not m[left_cell]


def test_identity_view_transform_shape():
    vt = IdentityViewTransform(8, 5, GRID)
    out = vt(torch.randn(4, 8, *FEAT_HW), _K()[None, None].repeat(2, 2, 1, 1), _cam2ego()[None, None].repeat(2, 2, 1, 1),
             IMG_HW)
    assert out.shape == (2, 5, GRID["H"], GRID["W"])


def test_cell_convention_matches_teacher_pillar_scatter():
    """The teacher's voxelize + scatter_to_canvas put a point at the same (row, col) as our splat, once its
    pillar canvas is reduced to the bev_feat stride."""
    from e2r.models.pointpillars import scatter_to_canvas
    from e2r.models.voxelize import voxelize
    cfg = TeacherConfig.preset_named("tiny")
    pts = torch.tensor([[13.7, 9.1, -1.0, 0.5], [40.2, -20.3, 0.2, 0.5], [3.3, 24.0, -2.5, 0.5]])
    nx, ny = cfg.grid_size
    s = cfg.bev_stride
    for p in pts:
        vox = voxelize([p[None]], cfg.point_cloud_range, cfg.voxel_size, cfg.max_points_per_pillar, 16)
        canvas = scatter_to_canvas(torch.ones(1, 1), vox.coords, 1, nx, ny)[0, 0]      # (ny, nx)
        pooled = torch.nn.functional.max_pool2d(canvas[None, None], s)[0, 0]           # bev_feat grid
        (row, col), = torch.nonzero(pooled).tolist()
        assert bev_cell_index(p[None, :3], GRID).item() == row * GRID["W"] + col


def test_mean_splat_averages_the_frustum_points_of_a_cell():
    """pool="mean": each cell holds the average of the depth-weighted features that fall in it (sum / count of
    frustum points, cameras of a rig together), so the cells near the camera, which collect many more points,
    are on the same scale as the far ones; empty cells stay 0."""
    summed, meaned = LiftSplat(8, 2, GRID), LiftSplat(8, 2, GRID, pool="mean")
    K, T = _K()[None, None], _cam2ego(0.0)[None, None]
    ones = torch.ones(1, summed.n_depth, *FEAT_HW)
    counts = summed.splat(ones, torch.ones(1, 1, *FEAT_HW), K, T, IMG_HW)[0, 0]      # frustum points per cell
    assert counts.max() >= 20 * counts[counts > 0].min()                              # the density the mean removes
    dp = torch.rand(1, summed.n_depth, *FEAT_HW).softmax(1)
    ctx = torch.rand(1, 2, *FEAT_HW)
    torch.testing.assert_close(meaned.splat(dp, ctx, K, T, IMG_HW),
                               summed.splat(dp, ctx, K, T, IMG_HW) / counts.clamp_min(1))
    assert meaned.splat(ones, torch.ones(1, 1, *FEAT_HW), K, T, IMG_HW)[0, 0].unique().tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="pool"):
        LiftSplat(8, 2, GRID, pool="max")
