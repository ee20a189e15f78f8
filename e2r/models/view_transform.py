"""Camera -> BEV view transforms: ``LiftSplat`` (Lift-Splat-Shoot) and the ``IdentityViewTransform`` baseline.

BEV grid convention (the teacher's, ``TeacherConfig.bev_grid``; PointPillars as in mmdet3d/OpenPCDet, whose
scatter writes ``canvas[:, y, x]`` for voxel coords (batch, z, y, x)): a BEV map is ``(C, H, W)`` where
row ``iy`` (0..H-1) covers ego ``y`` in ``[y_min + iy*dy, y_min + (iy+1)*dy)`` and column ``ix`` (0..W-1)
covers ego ``x`` in ``[x_min + ix*dx, x_min + (ix+1)*dx)``. Points with ``z`` outside ``[z_min, z_max)`` or
outside the x/y range are dropped. Ego frame: x forward, y left, z up (docs/CONTRACTS.md).

Camera frame: OpenCV (x right, y down, z forward); ``cam2ego`` (4x4) maps camera points to ego. Intrinsics
are for the network input image (``image_size``); pixel ``u`` has its centre at ``u`` (OpenCV). Depth bins
are z-depths along the optical axis (as in LSS).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from e2r.data.calib import scale_intrinsics

__all__ = ["depth_bin_centers", "frustum_points", "bev_cell_index", "camera_fov_mask", "RigPoints",
           "LiftSplat", "IdentityViewTransform", "build_view_transform"]


def depth_bin_centers(depth_bins: tuple[float, float, float]) -> torch.Tensor:
    """(d_min, d_max, step) -> (Dbins,) float64 depths ``d_min, d_min+step, ... < d_max``; bin k is the depth
    ``d_min + k*step`` (a point at depth d belongs to bin ``round((d - d_min)/step)``)."""
    d_min, d_max, step = (float(v) for v in depth_bins)
    if not (0 < d_min < d_max and step > 0):
        raise ValueError(f"depth_bins must be (d_min > 0, d_max > d_min, step > 0), got {depth_bins}")
    return torch.arange(d_min, d_max - 1e-9, step, dtype=torch.float64)


def frustum_points(K_feat: torch.Tensor, cam2ego: torch.Tensor, depths: torch.Tensor,
                   feat_hw: tuple[int, int]) -> torch.Tensor:
    """Ego-frame xyz of every (depth bin, feature pixel): K_feat (N,3,3) for the feature map, cam2ego (N,4,4),
    depths (Dbins,) -> (N, Dbins, h, w, 3), computed in float64."""
    h, w = feat_hw
    dev = K_feat.device
    K = K_feat.to(torch.float64)
    T = cam2ego.to(device=dev, dtype=torch.float64)
    d = depths.to(device=dev, dtype=torch.float64)
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=dev),
                          torch.arange(w, dtype=torch.float64, device=dev), indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], -1)                      # (h, w, 3)
    rays = torch.einsum("nij,hwj->nhwi", torch.linalg.inv(K), pix)          # (N, h, w, 3), z = 1
    pts_cam = rays[:, None] * d[None, :, None, None, None]                  # (N, D, h, w, 3)
    return torch.einsum("nij,ndhwj->ndhwi", T[:, :3, :3], pts_cam) + T[:, None, None, None, :3, 3]


def bev_cell_index(points: torch.Tensor, bev_grid: dict[str, Any]) -> torch.Tensor:
    """points (..., 3) ego xyz -> (...) int64 flat cell ``iy*W + ix``, or -1 where outside the grid/z range."""
    g = bev_grid
    ix = torch.floor((points[..., 0] - g["x_min"]) / g["dx"]).long()
    iy = torch.floor((points[..., 1] - g["y_min"]) / g["dy"]).long()
    z = points[..., 2]
    ok = (ix >= 0) & (ix < g["W"]) & (iy >= 0) & (iy < g["H"]) & (z >= g["z_min"]) & (z < g["z_max"])
    return torch.where(ok, iy * g["W"] + ix, torch.full_like(ix, -1))


def camera_fov_mask(intrinsics: torch.Tensor, cam2ego: torch.Tensor, image_size: tuple[int, int],
                    bev_grid: dict[str, Any], max_depth: float, min_depth: float = 0.1,
                    n_heights: int = 8) -> torch.Tensor:
    """Which BEV cells any camera can see: a cell is visible when a point of its centre column (``n_heights``
    heights spanning [z_min, z_max]) projects inside the image with depth in (min_depth, max_depth].

    intrinsics (Ncam,3,3) or (B,Ncam,3,3) for ``image_size`` = (W, H) pixels; cam2ego (...,4,4) likewise
    -> bool (H, W) or (B, H, W) on the grid of ``bev_grid``."""
    batched = intrinsics.dim() == 4
    Kb = intrinsics if batched else intrinsics[None]
    Tb = cam2ego if batched else cam2ego[None]
    g, dev = bev_grid, intrinsics.device
    W_img, H_img = image_size
    xs = g["x_min"] + (torch.arange(g["W"], dtype=torch.float64, device=dev) + 0.5) * g["dx"]
    ys = g["y_min"] + (torch.arange(g["H"], dtype=torch.float64, device=dev) + 0.5) * g["dy"]
    zs = torch.linspace(g["z_min"], g["z_max"], n_heights, dtype=torch.float64, device=dev)
    Z, Y, X = torch.meshgrid(zs, ys, xs, indexing="ij")                     # (nz, H, W)
    pts = torch.stack([X, Y, Z, torch.ones_like(X)], -1)                    # (nz, H, W, 4)
    ego2cam = torch.linalg.inv(Tb.to(torch.float64))                        # (B, N, 4, 4)
    pc = torch.einsum("bnij,zhwj->bnzhwi", ego2cam, pts)[..., :3]           # (B, N, nz, H, W, 3)
    uvw = torch.einsum("bnij,bnzhwj->bnzhwi", Kb.to(torch.float64), pc)
    depth = uvw[..., 2]
    safe = depth.clamp_min(1e-6)
    u, v = uvw[..., 0] / safe, uvw[..., 1] / safe
    vis = ((depth > min_depth) & (depth <= max_depth) & (u >= -0.5) & (u < W_img - 0.5)
           & (v >= -0.5) & (v < H_img - 0.5))
    out = vis.flatten(1, 2).any(1)                                          # (B, H, W)
    return out if batched else out[0]


class RigPoints(NamedTuple):
    """One rig's frustum geometry on the feature grid (h, w), computed once and cached by ``LiftSplat``:
    ``cells`` (Ncam, Dbins, h, w) int64 flat BEV cell of every frustum point (-1 = dropped), and for the K
    kept points, in (camera, depth, pixel) order: ``depth_index`` (K,) into one frame's depth distribution
    laid out (Ncam, h, w, Dbins), ``pixel`` (K,) into its (Ncam, h, w) context pixels, ``cell`` (K,)."""
    cells: torch.Tensor
    depth_index: torch.Tensor
    pixel: torch.Tensor
    cell: torch.Tensor


class LiftSplat(nn.Module):
    """Lift-Splat: per-pixel categorical depth x context features, lifted into the camera frustum and pooled
    onto the teacher's BEV grid (vectorised with ``index_add_``): summed (``pool="sum"``, as in LSS) or
    averaged over the frustum points that fall in each cell (``pool="mean"``: a cell next to the camera
    takes ~100x the points of a far one, and summed, that fixed geometry outweighs the image in every BEV
    map). Cameras of a rig are pooled into the same grid. Frustum -> cell indices are cached per
    calibration (keyed on the K/cam2ego values, the image size and the feature size), so the geometry is
    computed once per rig.

    Args: in_channels (image feature channels), out_channels (C of the BEV map), bev_grid (teacher's
    ``bev_grid`` dict), depth_bins (d_min, d_max, step) in metres, cache_size (rigs kept), pool ("sum" |
    "mean")."""

    def __init__(self, in_channels: int, out_channels: int, bev_grid: dict[str, Any],
                 depth_bins: tuple[float, float, float] = (2.0, 40.0, 1.0), cache_size: int = 64,
                 pool: str = "sum") -> None:
        super().__init__()
        if pool not in ("sum", "mean"):
            raise ValueError(f"LiftSplat pool must be 'sum' or 'mean', got {pool!r}")
        self.pool = pool
        self.bev_grid = dict(bev_grid)
        self.out_channels = out_channels
        self.register_buffer("depths", depth_bin_centers(depth_bins).float(), persistent=False)
        self.n_depth = int(self.depths.numel())
        self.depthnet = nn.Conv2d(in_channels, self.n_depth + out_channels, 1)
        self._cache: OrderedDict[tuple, RigPoints] = OrderedDict()
        self._cache_size = cache_size
        self.geometry_computations = 0  # how many rigs were computed (not served from the cache)

    def lift(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (F*Ncam, C_in, h, w) -> depth_probs (F*Ncam, Dbins, h, w) (softmax), context (F*Ncam, C, h, w)."""
        x = self.depthnet(feats)
        return x[:, :self.n_depth].softmax(1), x[:, self.n_depth:]

    def _rig(self, calib_row: torch.Tensor, n_cam: int, image_hw: tuple[int, int],
             feat_hw: tuple[int, int]) -> RigPoints:
        """The cached :class:`RigPoints` of one rig (``calib_row``: its K (Ncam,3,3) and cam2ego (Ncam,4,4)
        flattened, float64)."""
        key = (calib_row.detach().to("cpu", torch.float64).numpy().tobytes(), n_cam, tuple(image_hw),
               tuple(feat_hw), str(calib_row.device))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        K = calib_row[: n_cam * 9].reshape(n_cam, 3, 3)
        T = calib_row[n_cam * 9:].reshape(n_cam, 4, 4)
        (H_img, W_img), (h, w) = image_hw, feat_hw
        K_feat = scale_intrinsics(K.to(torch.float64), w / W_img, h / H_img)
        cells = bev_cell_index(frustum_points(K_feat, T, self.depths, feat_hw), self.bev_grid)  # (N,D,h,w)
        kept = torch.nonzero(cells.reshape(-1) >= 0).squeeze(1)       # flat index into (Ncam, D, h, w)
        D = self.n_depth
        cam, d, pix = kept // (D * h * w), (kept // (h * w)) % D, kept % (h * w)
        rig = RigPoints(cells, ((cam * h * w + pix) * D + d), cam * h * w + pix, cells.reshape(-1)[kept])
        self.geometry_computations += 1
        self._cache[key] = rig
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return rig

    def _rigs(self, intrinsics: torch.Tensor, cam2ego: torch.Tensor, image_hw: tuple[int, int],
              feat_hw: tuple[int, int]) -> tuple[list[RigPoints], torch.Tensor]:
        """The distinct rigs of a batch and which one each frame has: ``(rigs, inverse (F,))``."""
        if intrinsics.dim() != 4 or intrinsics.shape[-2:] != (3, 3) or cam2ego.shape[-2:] != (4, 4) \
                or cam2ego.shape[:2] != intrinsics.shape[:2]:
            raise ValueError(f"LiftSplat: intrinsics must be (F,Ncam,3,3) and cam2ego (F,Ncam,4,4), got "
                             f"{tuple(intrinsics.shape)} and {tuple(cam2ego.shape)}")
        Fr, n_cam = intrinsics.shape[:2]
        calib = torch.cat([intrinsics.reshape(Fr, -1), cam2ego.reshape(Fr, -1)], 1).detach().to(torch.float64)
        uniq, inv = torch.unique(calib, dim=0, return_inverse=True)
        return [self._rig(uniq[i], n_cam, image_hw, feat_hw) for i in range(uniq.shape[0])], inv

    def geometry(self, intrinsics: torch.Tensor, cam2ego: torch.Tensor, image_hw: tuple[int, int],
                 feat_hw: tuple[int, int]) -> torch.Tensor:
        """intrinsics (F,Ncam,3,3) for images of ``image_hw`` = (H, W), cam2ego (F,Ncam,4,4)
        -> flat BEV cell per frustum point (F, Ncam, Dbins, h, w) int64, -1 = dropped."""
        rigs, inv = self._rigs(intrinsics, cam2ego, image_hw, feat_hw)
        return torch.stack([r.cells for r in rigs])[inv]

    def splat(self, depth_probs: torch.Tensor, context: torch.Tensor, intrinsics: torch.Tensor,
              cam2ego: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """depth_probs (F*Ncam, Dbins, h, w), context (F*Ncam, C, h, w) (frame-major, camera-minor),
        intrinsics (F,Ncam,3,3), cam2ego (F,Ncam,4,4), image_hw (H, W) of the images K is for
        -> BEV (F, C, H_bev, W_bev): sum (or mean) over cameras, depth bins and pixels falling in each cell.
        The kept frustum points of each rig come from the cache (:class:`RigPoints`); a frame's points are
        its rig's, offset to the frame, summed into each cell in the same order as frame by frame."""
        FN, D, h, w = depth_probs.shape
        C = context.shape[1]
        Fr, n_cam = intrinsics.shape[:2]
        if FN != Fr * n_cam or D != self.n_depth:
            raise ValueError(f"LiftSplat.splat: depth_probs {tuple(depth_probs.shape)} does not match "
                             f"{Fr} frames x {n_cam} cameras x {self.n_depth} depth bins")
        HW = self.bev_grid["H"] * self.bev_grid["W"]
        rigs, inv = self._rigs(intrinsics, cam2ego, image_hw, (h, w))
        dev, per_frame = depth_probs.device, n_cam * h * w
        src, pixel, target = [], [], []
        for i, rig in enumerate(rigs):
            frames = torch.nonzero(inv == i).squeeze(1).to(dev)[:, None]            # (F_i, 1)
            src.append((frames * (per_frame * D) + rig.depth_index.to(dev)).reshape(-1))
            pixel.append((frames * per_frame + rig.pixel.to(dev)).reshape(-1))
            target.append((frames * HW + rig.cell.to(dev)).reshape(-1))
        src, pixel, target = torch.cat(src), torch.cat(pixel), torch.cat(target)
        # (F*Ncam, h, w, Dbins) and (F*Ncam*h*w, C): the channels_last memory of the lift's output, no copy
        probs, ctx = depth_probs.permute(0, 2, 3, 1).reshape(-1), context.permute(0, 2, 3, 1).reshape(-1, C)
        vals = probs.index_select(0, src)[:, None] * ctx.index_select(0, pixel)   # (K_all, C); index_select:
        # the same gathers as probs[src] and ctx[pixel], several times faster on the CPU
        out = torch.zeros(Fr * HW, C, dtype=vals.dtype, device=vals.device)
        out.index_add_(0, target, vals)
        if self.pool == "mean":
            out = out / torch.bincount(target, minlength=Fr * HW).clamp_min(1).to(out.dtype)[:, None]
        # (F, H, W, C) in memory: the BEV map comes out channels_last, the BEV CNN's layout, without a copy
        return out.reshape(Fr, self.bev_grid["H"], self.bev_grid["W"], C).permute(0, 3, 1, 2)

    def forward(self, feats: torch.Tensor, intrinsics: torch.Tensor, cam2ego: torch.Tensor,
                image_hw: tuple[int, int], return_depth: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """feats (F*Ncam, C_in, h, w), intrinsics (F,Ncam,3,3), cam2ego (F,Ncam,4,4), image_hw (H, W)
        -> BEV (F, out_channels, H_bev, W_bev); with ``return_depth`` also the depth distribution
        (F*Ncam, Dbins, h, w) (what LiDAR depth supervision trains, ``e2r.depth``)."""
        depth, ctx = self.lift(feats)
        bev = self.splat(depth, ctx, intrinsics, cam2ego, image_hw)
        return (bev, depth) if return_depth else bev


class IdentityViewTransform(nn.Module):
    """The original's placeholder (ablation baseline): 1x1 conv + bilinear resize of the image features to
    the BEV grid, cameras summed; ignores the calibration. Same call signature as ``LiftSplat``."""

    def __init__(self, in_channels: int, out_channels: int, bev_grid: dict[str, Any]) -> None:
        super().__init__()
        self.bev_grid = dict(bev_grid)
        self.out_channels = out_channels
        self.proj = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, feats: torch.Tensor, intrinsics: torch.Tensor, cam2ego: torch.Tensor,
                image_hw: tuple[int, int]) -> torch.Tensor:
        """feats (F*Ncam, C_in, h, w) -> (F, out_channels, H_bev, W_bev)."""
        Fr, n_cam = intrinsics.shape[:2]
        x = F.interpolate(self.proj(feats), size=(self.bev_grid["H"], self.bev_grid["W"]), mode="bilinear",
                          align_corners=False)
        return x.reshape(Fr, n_cam, *x.shape[1:]).sum(1)


def build_view_transform(kind: str, in_channels: int, out_channels: int, bev_grid: dict[str, Any],
                         depth_bins: tuple[float, float, float] = (2.0, 40.0, 1.0), pool: str = "sum") -> nn.Module:
    """``kind`` = "lss" (LiftSplat, pooling ``pool``) or "identity" (IdentityViewTransform)."""
    if kind == "lss":
        return LiftSplat(in_channels, out_channels, bev_grid, depth_bins, pool=pool)
    if kind == "identity":
        return IdentityViewTransform(in_channels, out_channels, bev_grid)
    raise ValueError(f"unknown view_transform {kind!r}; choose 'lss' or 'identity'")
