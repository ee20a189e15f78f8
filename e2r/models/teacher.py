"""The LiDAR teacher: PointPillars BEV encoder -> BEV vector + speed/steering embeddings -> GRU -> MLP head.

Encoding and the temporal part are separately callable (the memorybank export encodes each frame once):

* ``encode_frames(points) -> (bev_vec (F, D), bev_feat (F, C, H, W))`` for F frames in one call;
* ``temporal(bev_vec_seq (B,T,D), speed (B,T), steering (B,T), hidden=None) -> (actions (B,T,A), gru_out (B,T,H))``.

Actions are ``[wheel_angle (deg), velocity (m/s)]``; the control part (embeddings, GRU, head, action
normalisation, residual actions) is shared with the student: see ``e2r.models.policy``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from e2r.checkpoints import load_model
from e2r.models.config import TeacherConfig
from e2r.models.pointpillars import PointPillarsEncoder
from e2r.models.policy import TemporalPolicy

__all__ = ["LiDARBEVTeacher", "load_teacher"]


class LiDARBEVTeacher(TemporalPolicy):
    """LiDAR policy. ``forward(points (B*T clouds, b-major), speed (B,T), steering (B,T))`` -> actions (B,T,A).
    ``temporal``, ``set_action_stats`` and ``normalize_actions`` come from :class:`TemporalPolicy`."""

    def __init__(self, cfg: TeacherConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = PointPillarsEncoder(cfg)
        self.build_policy(cfg.bev_dim, cfg.speed_emb, cfg.steer_emb, cfg.gru_hidden, cfg.head_hidden,
                          cfg.action_dim, cfg.residual_actions)

    def encode_frames(self, points: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """F point clouds (N_f, 4) -> ``bev_vec (F, D)``, ``bev_feat (F, C, H, W)``; all frames in one call."""
        if len(points) == 0:
            raise ValueError("encode_frames needs at least one point cloud")
        return self.encoder(points)

    def forward(self, points: Sequence[Tensor], speed: Tensor, steering: Tensor, return_aux: bool = False
                ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """points: B*T clouds in b-major order (frame b*T + t); speed, steering (B, T).

        Returns actions (B,T,A), or with ``return_aux`` ``(actions, {"bev_vec_seq" (B,T,D),
        "bev_feat_seq" (B,T,C,H,W), "gru_out" (B,T,H)})``.
        """
        B, T = speed.shape
        if len(points) != B * T:
            raise ValueError(f"got {len(points)} point clouds for speed of shape (B, T) = {(B, T)}; need B*T")
        bev_vec, bev_feat = self.encode_frames(points)
        return self.sequence_outputs(bev_vec, bev_feat, B, T, speed, steering, return_aux)


def load_teacher(path: str | Path, device: str | torch.device = "cpu") -> tuple[LiDARBEVTeacher, dict[str, Any]]:
    """Build a teacher from a checkpoint (architecture from its ``config``), in eval mode on ``device``.

    Returns ``(model, checkpoint_dict)``; raises CheckpointError naming the file when it is not a valid
    weights-only teacher checkpoint.
    """
    return load_model(path, lambda cfg: LiDARBEVTeacher(TeacherConfig.from_dict(cfg)), "teacher", device)
