"""PointPillars BEV encoder: pillar feature net -> scatter to the BEV canvas -> 2-D backbone + FPN neck.

All F frames of a batch (B x T point clouds) are encoded in one call; nothing loops over frames, points or
pillars. The canvas is indexed ``[frame, channel, y, x]`` (H indexes y, W indexes x), like OpenPCDet.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from e2r.models.config import TeacherConfig
from e2r.models.policy import grid_pool
from e2r.models.voxelize import VoxelizationResult, voxelize

__all__ = ["PillarFeatureNet", "scatter_to_canvas", "BEVBackbone", "PointPillarsEncoder"]


class PillarFeatureNet(nn.Module):
    """Per-point features -> one vector per pillar (PointNet-style: Linear + BN + ReLU, max over points).

    Point features: the F raw columns, offsets to the pillar's point mean (x, y, z) and to the pillar
    centre (x, y): F + 5 in all (9 for x, y, z, intensity).
    """

    def __init__(self, num_point_features: int, out_channels: int, voxel_size: Sequence[float],
                 point_cloud_range: Sequence[float]) -> None:
        super().__init__()
        self.linear = nn.Linear(num_point_features + 5, out_channels, bias=False)
        self.norm = nn.BatchNorm1d(out_channels, eps=1e-3, momentum=0.01)
        self.register_buffer("voxel_xy", torch.tensor(voxel_size[:2], dtype=torch.float32), persistent=False)
        self.register_buffer("offset_xy", torch.tensor(
            [point_cloud_range[0] + voxel_size[0] / 2, point_cloud_range[1] + voxel_size[1] / 2],
            dtype=torch.float32), persistent=False)

    def forward(self, pillars: Tensor, counts: Tensor, coords: Tensor) -> Tensor:
        """pillars (P, M, F), counts (P,), coords (P, 4) as (b, z, y, x) -> (P, C)."""
        P, M, _ = pillars.shape
        if P == 0:
            return pillars.new_zeros((0, self.linear.out_features))
        mask = (torch.arange(M, device=pillars.device)[None, :] < counts[:, None]).unsqueeze(-1)  # (P, M, 1)
        mask = mask.to(pillars.dtype)          # 1 / 0: the products below equal those with the bool mask
        xyz = pillars[..., :3]
        mean = (xyz * mask).sum(1, keepdim=True) / counts.clamp(min=1).view(P, 1, 1).to(pillars.dtype)
        centre = coords[:, [3, 2]].to(pillars.dtype) * self.voxel_xy + self.offset_xy           # (P, 2) x, y
        # [points, offsets to the mean, offsets to the centre] * mask, each part written into its slice of the
        # (P, M, F + 5) features (a cat along the last dim of widths 4, 3, 2 is a slow strided copy)
        F_ = pillars.shape[2]
        feats = pillars.new_empty((P, M, F_ + 5))
        feats[..., :F_] = pillars
        torch.sub(xyz, mean, out=feats[..., F_:F_ + 3])
        torch.sub(xyz[..., :2], centre[:, None, :], out=feats[..., F_ + 3:])
        feats *= mask
        x = self.linear(feats)                                                                  # (P, M, C)
        x = self.norm(x.reshape(P * M, -1)).relu_().reshape(P, M, -1)     # in place on BatchNorm's fresh output
        # the max over each pillar's points: relu's outputs are >= 0 and every pillar has >= 1 point, so zeroing
        # the empty slots leaves it unchanged; taken over the leading dim of (M, P, C), as a reduction over the
        # middle dim is several times slower on the CPU (the values are the same; a gradient is shared between
        # points tied for the max instead of going to the first of them)
        return (x * mask).transpose(0, 1).contiguous().amax(0)


def scatter_to_canvas(features: Tensor, coords: Tensor, num_frames: int, nx: int, ny: int) -> Tensor:
    """Place pillar vectors on the BEV grid. features (P, C), coords (P, 4) (b, z, y, x) -> (F, C, ny, nx).
    Written straight into the (F, C, ny * nx) memory through a (F, ny * nx, C) view: no transposing copy."""
    C = features.shape[1]
    canvas = features.new_zeros((num_frames, C, ny * nx))
    canvas.permute(0, 2, 1).index_put_((coords[:, 0], coords[:, 2] * nx + coords[:, 3]), features)
    return canvas.view(num_frames, C, ny, nx)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01), nn.ReLU(inplace=True)]


class BEVBackbone(nn.Module):
    """SECOND-style 2-D backbone with an FPN-style neck: every block's output is up-sampled to the first
    block's stride and the results are concatenated. (F, C_in, ny, nx) -> (F, sum(upsample_channels), H, W)."""

    def __init__(self, cfg: TeacherConfig) -> None:
        super().__init__()
        n = len(cfg.backbone_channels)
        if not (len(cfg.backbone_layers) == len(cfg.backbone_strides) == len(cfg.upsample_strides)
                == len(cfg.upsample_channels) == n):
            raise ValueError("backbone_channels/layers/strides and upsample_strides/channels need equal lengths, "
                             f"got {cfg.backbone_channels}, {cfg.backbone_layers}, {cfg.backbone_strides}, "
                             f"{cfg.upsample_strides}, {cfg.upsample_channels}")
        self.blocks = nn.ModuleList()
        self.deblocks = nn.ModuleList()
        cin = cfg.pfn_channels
        for i in range(n):
            layers = _conv_bn_relu(cin, cfg.backbone_channels[i], cfg.backbone_strides[i])
            for _ in range(cfg.backbone_layers[i]):
                layers += _conv_bn_relu(cfg.backbone_channels[i], cfg.backbone_channels[i], 1)
            self.blocks.append(nn.Sequential(*layers))
            up = cfg.upsample_strides[i]
            self.deblocks.append(nn.Sequential(
                nn.ConvTranspose2d(cfg.backbone_channels[i], cfg.upsample_channels[i], up, stride=up, bias=False),
                nn.BatchNorm2d(cfg.upsample_channels[i], eps=1e-3, momentum=0.01), nn.ReLU(inplace=True)))
            cin = cfg.backbone_channels[i]

    def forward(self, canvas: Tensor) -> Tensor:
        x, ups = canvas, []
        for block, deblock in zip(self.blocks, self.deblocks):
            x = block(x)
            ups.append(deblock(x))
        return torch.cat(ups, dim=1)


class PointPillarsEncoder(nn.Module):
    """Point clouds of F frames -> ``bev_vec (F, D)`` and ``bev_feat (F, C, H, W)``.

    bev_vec = Linear(k x k average pool of bev_feat), k = ``bev_pool_grid`` (1: the global mean). The pillar limit is ``max_pillars_train`` in
    training mode and ``max_pillars_eval`` in eval mode (per frame).
    """

    def __init__(self, cfg: TeacherConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.nx, self.ny = cfg.grid_size
        self.pfn = PillarFeatureNet(cfg.num_point_features, cfg.pfn_channels, cfg.voxel_size,
                                    cfg.point_cloud_range)
        self.backbone = BEVBackbone(cfg)
        self.to_vec = nn.Linear(cfg.bev_channels * cfg.bev_pool_grid ** 2, cfg.bev_dim)

    def voxelize(self, points: Sequence[Tensor]) -> VoxelizationResult:
        """Hard-voxelize F clouds (N_f, num_point_features) with this model's grid and limits."""
        nf = self.cfg.num_point_features
        for i, p in enumerate(points):
            if p.dim() != 2 or p.shape[1] != nf:
                raise ValueError(f"point cloud {i} has shape {tuple(p.shape)}; the teacher expects "
                                 f"(N, {nf}) float32 (x, y, z, intensity)")
        limit = self.cfg.max_pillars_train if self.training else self.cfg.max_pillars_eval
        return voxelize(points, self.cfg.point_cloud_range, self.cfg.voxel_size,
                        self.cfg.max_points_per_pillar, limit)

    def forward(self, points: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """points: F tensors (N_f, 4) -> (bev_vec (F, D), bev_feat (F, C, H, W))."""
        device = self.to_vec.weight.device
        vox = self.voxelize([p.to(device=device, dtype=torch.float32) for p in points])
        return self.encode_voxels(vox.pillars, vox.counts, vox.coords, len(points))

    def encode_voxels(self, pillars: Tensor, counts: Tensor, coords: Tensor, num_frames: int
                      ) -> tuple[Tensor, Tensor]:
        """Already voxelised frames (e.g. by DataLoader workers): pillars (P, M, F), counts (P,), coords (P, 4)
        as (frame, z, y, x) -> (bev_vec (F, D), bev_feat (F, C, H, W))."""
        pillar_feats = self.pfn(pillars, counts, coords)
        canvas = scatter_to_canvas(pillar_feats, coords, num_frames, self.nx, self.ny)
        bev_feat = self.backbone(canvas)
        bev_vec = self.to_vec(grid_pool(bev_feat, self.cfg.bev_pool_grid))
        return bev_vec, bev_feat
