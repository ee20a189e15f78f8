"""The camera student: image CNN -> view transform (Lift-Splat) -> BEV CNN -> bev_feat aligned to the
teacher's grid + bev_vec -> speed/steering embeddings -> GRU -> MLP head -> actions.

bev_vec is a linear map of a ``bev_pool_grid`` x ``bev_pool_grid`` average pool of bev_feat (the presets: 4 x 4),
not of its global mean: the mean keeps what is in the scene but not where, and steering is a matter of
where (docs/STUDENT.md: with the global mean the tiny student often never leaves the label mean).

Same API shape as ``e2r.models.teacher.LiDARBEVTeacher`` (``encode_frames``, ``temporal``, ``forward`` with
``return_aux``); the control part (embeddings, GRU, head, normalisation, residual actions) is the same
class, ``e2r.models.policy.TemporalPolicy``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from e2r.checkpoints import load_model
from e2r.models.policy import TemporalPolicy, grid_pool
from e2r.models.student_config import StudentConfig
from e2r.models.view_transform import LiftSplat, build_view_transform

__all__ = ["StudentConfig", "CameraBEVStudent", "ImageEncoder", "BEVEncoder", "load_student", "norm_layer",
           "normalize_images"]


def norm_layer(kind: str, channels: int) -> nn.Module:
    """The encoders' normalisation: ``"batch"`` = BatchNorm2d (statistics over every frame of the batch, B x T x
    Ncam of them, which within a window are nearly the same image) or ``"group"`` = GroupNorm per frame (up to 8
    groups; no batch statistics, so training and evaluation normalise alike)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


def normalize_images(images: Tensor, kind: str) -> Tensor:
    """images (N, 3, H, W) in [0, 1] -> the encoder's input: ``"fixed"`` = (x - 0.45) / 0.225 for every image,
    ``"per_image"`` = each image and channel standardised by its own mean and std (a darker or lower-contrast
    look gives the same input)."""
    if kind == "fixed":
        return (images - 0.45) / 0.225
    if kind == "per_image":
        mean = images.mean(dim=(2, 3), keepdim=True)
        std = images.std(dim=(2, 3), keepdim=True)
        return (images - mean) / (std + 1e-3)
    raise ValueError(f"input_norm must be 'fixed' or 'per_image', got {kind!r}")


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+norm, identity (or 1x1 strided) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(norm, cout)
        self.short = (nn.Identity() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(norm, cout)))

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn1(self.conv1(x)).relu_()      # in place on fresh outputs (BatchNorm's backward keeps its input)
        return self.bn2(self.conv2(y)).add_(self.short(x)).relu_()


def _stage(cin: int, cout: int, blocks: int, stride: int, norm: str) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, stride, norm), *[BasicBlock(cout, cout, 1, norm)
                                                                for _ in range(blocks - 1)])


class ImageEncoder(nn.Module):
    """Compact ResNet-style CNN: stem (3x3 /2) + stage 0 at /2, each further stage /2; the last stage is
    up-sampled x2 and merged with the one before. images (N, 3, H, W) in [0, 1] -> (N, C_out, H/s, W/s)
    with s = 2^(len(channels)-1); ``norm`` and ``input_norm`` as :func:`norm_layer` and
    :func:`normalize_images`."""

    def __init__(self, channels: tuple[int, ...], blocks: tuple[int, ...], out_channels: int,
                 norm: str = "batch", input_norm: str = "fixed") -> None:
        super().__init__()
        self.input_norm = input_norm
        self.stem = nn.Sequential(nn.Conv2d(3, channels[0], 3, 2, 1, bias=False), norm_layer(norm, channels[0]),
                                  nn.ReLU(inplace=True))
        self.stages = nn.ModuleList([_stage(channels[0], channels[0], blocks[0], 1, norm)] + [
            _stage(channels[i - 1], channels[i], blocks[i], 2, norm) for i in range(1, len(channels))])
        self.merge = nn.Sequential(nn.Conv2d(channels[-1] + channels[-2], out_channels, 3, 1, 1, bias=False),
                                   norm_layer(norm, out_channels), nn.ReLU(inplace=True))
        self.stride = 2 ** (len(channels) - 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(normalize_images(x.contiguous(memory_format=torch.channels_last), self.input_norm))
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        up = F.interpolate(outs[-1], size=outs[-2].shape[-2:], mode="bilinear", align_corners=False)
        return self.merge(torch.cat([up, outs[-2]], 1))


class BEVEncoder(nn.Module):
    """BEV CNN keeping the grid size: stages (first at stride 1, then /2 each), every stage's output resized
    back to the input grid and concatenated, then 3x3 conv. (F, C_in, H, W) -> (F, out_channels, H, W)."""

    def __init__(self, cin: int, channels: tuple[int, ...], blocks: tuple[int, ...], out_channels: int,
                 norm: str = "batch") -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        for i, (c, n) in enumerate(zip(channels, blocks)):
            self.stages.append(_stage(cin, c, n, 1 if i == 0 else 2, norm))
            cin = c
        self.fuse = nn.Sequential(nn.Conv2d(sum(channels), out_channels, 3, 1, 1, bias=False),
                                  norm_layer(norm, out_channels), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        size, outs = x.shape[-2:], []
        x = x.contiguous(memory_format=torch.channels_last)
        for stage in self.stages:
            x = stage(x)
            outs.append(x if x.shape[-2:] == size else
                        F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        return self.fuse(torch.cat(outs, 1))


class CameraBEVStudent(TemporalPolicy):
    """Camera policy. ``forward(images (B,T,Ncam,3,H,W), intrinsics (B,Ncam,3,3), cam2ego (B,Ncam,4,4),
    speed (B,T), steering (B,T))`` -> actions (B,T,A) in physical units."""

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg.image_channels, cfg.image_blocks, cfg.image_feat_channels, cfg.norm,
                                          cfg.input_norm)
        self.view_transform = build_view_transform(cfg.view_transform, cfg.image_feat_channels, cfg.lift_channels,
                                                   cfg.bev_grid, tuple(cfg.depth_bins), cfg.splat_pool)
        self.bev_encoder = BEVEncoder(cfg.lift_channels, cfg.bev_channels, cfg.bev_blocks, cfg.bev_out_channels,
                                      cfg.norm)
        self.adapter = (nn.Identity() if cfg.bev_out_channels == cfg.teacher_bev_channels
                        else nn.Conv2d(cfg.bev_out_channels, cfg.teacher_bev_channels, 1))
        self.to_vec = nn.Linear(cfg.teacher_bev_channels * cfg.bev_pool_grid ** 2, cfg.bev_dim)
        self.build_policy(cfg.bev_dim, cfg.speed_emb, cfg.steer_emb, cfg.gru_hidden, cfg.head_hidden,
                          cfg.action_dim, cfg.residual_actions)
        self.to(memory_format=torch.channels_last)   # conv weights, like the encoders' activations

    # ---- model ----
    @property
    def lifts_depth(self) -> bool:
        """Whether the view transform has a depth distribution (Lift-Splat) that LiDAR depth can supervise."""
        return isinstance(self.view_transform, LiftSplat)

    def encode_frames(self, images: Tensor, intrinsics: Tensor, cam2ego: Tensor, return_depth: bool = False
                      ) -> tuple[Tensor, ...]:
        """images (F, Ncam, 3, H, W) in [0, 1], intrinsics (F, Ncam, 3, 3) for (W, H), cam2ego (F, Ncam, 4, 4)
        -> ``bev_vec (F, D)``, ``bev_feat (F, C_teacher, H_bev, W_bev)``, with ``return_depth`` (Lift-Splat
        only) also the depth distribution ``(F, Ncam, Dbins, h, w)``; all frames and cameras in one call."""
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be (F, Ncam, 3, H, W), got {tuple(images.shape)}")
        Fr, n_cam, _, H, W = images.shape
        if intrinsics.shape != (Fr, n_cam, 3, 3) or cam2ego.shape != (Fr, n_cam, 4, 4):
            raise ValueError(f"intrinsics {tuple(intrinsics.shape)} / cam2ego {tuple(cam2ego.shape)} must be "
                             f"({Fr}, {n_cam}, 3, 3) / ({Fr}, {n_cam}, 4, 4) for images {tuple(images.shape)}")
        feats = self.image_encoder(images.reshape(Fr * n_cam, 3, H, W))
        calib = (intrinsics.to(feats.device, torch.float32), cam2ego.to(feats.device, torch.float32), (H, W))
        if return_depth:
            if not self.lifts_depth:
                raise ValueError(f"view_transform {self.cfg.view_transform!r} has no depth distribution to supervise")
            bev, depth = self.view_transform(feats, *calib, return_depth=True)
        else:
            bev = self.view_transform(feats, *calib)
        bev_feat = self.adapter(self.bev_encoder(bev))
        bev_vec = self.to_vec(self.pool(bev_feat))
        if return_depth:
            return bev_vec, bev_feat, depth.reshape(Fr, n_cam, *depth.shape[1:])
        return bev_vec, bev_feat

    def pool(self, bev_feat: Tensor) -> Tensor:
        """bev_feat (F, C, H, W) -> (F, C * k * k), k = ``bev_pool_grid`` (`e2r.models.policy.grid_pool`)."""
        return grid_pool(bev_feat, self.cfg.bev_pool_grid)

    def forward(self, images: Tensor, intrinsics: Tensor, cam2ego: Tensor, speed: Tensor, steering: Tensor,
                return_aux: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """images (B,T,Ncam,3,H,W); intrinsics (B,Ncam,3,3) or per frame (B,T,Ncam,3,3); cam2ego likewise
        (4,4); speed, steering (B,T). Returns actions (B,T,A), or with ``return_aux`` ``(actions,
        {"bev_vec_seq" (B,T,D), "bev_feat_seq" (B,T,C,H_bev,W_bev), "gru_out" (B,T,H)})``, plus with Lift-Splat
        ``"depth_seq" (B,T,Ncam,Dbins,h,w)``, the depth distribution."""
        if images.dim() != 6:
            raise ValueError(f"images must be (B, T, Ncam, 3, H, W), got {tuple(images.shape)}")
        B, T, n_cam = images.shape[:3]
        dev = images.device
        if intrinsics.dim() == 4:
            intrinsics = intrinsics[:, None].expand(B, T, *intrinsics.shape[1:])
        if cam2ego.dim() == 4:
            cam2ego = cam2ego[:, None].expand(B, T, *cam2ego.shape[1:])
        if intrinsics.shape != (B, T, n_cam, 3, 3) or cam2ego.shape != (B, T, n_cam, 4, 4):
            raise ValueError(f"intrinsics {tuple(intrinsics.shape)} / cam2ego {tuple(cam2ego.shape)} do not match "
                             f"images (B, T, Ncam) = {(B, T, n_cam)}")
        depth = return_aux and self.lifts_depth
        encoded = self.encode_frames(images.flatten(0, 1), intrinsics.reshape(B * T, n_cam, 3, 3).to(dev),
                                     cam2ego.reshape(B * T, n_cam, 4, 4).to(dev), return_depth=depth)
        out = self.sequence_outputs(encoded[0], encoded[1], B, T, speed, steering, return_aux)
        if depth:
            out[1]["depth_seq"] = encoded[2].reshape(B, T, *encoded[2].shape[1:])
        return out


def load_student(path: str | Path, device: str | torch.device = "cpu") -> tuple[CameraBEVStudent, dict[str, Any]]:
    """Build a student from a checkpoint (architecture from its ``config``), in eval mode on ``device``.
    Returns ``(model, checkpoint_dict)``; raises CheckpointError naming the file when it does not fit."""
    return load_model(path, lambda cfg: CameraBEVStudent(StudentConfig.from_dict(cfg)), "student", device)
