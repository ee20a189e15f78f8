"""The LiDAR teacher: PointPillars BEV encoder -> BEV vector + speed/steering embeddings -> GRU -> MLP head.

Encoding and the temporal part are separately callable (the memorybank export encodes each frame once):

* ``encode_frames(points) -> (bev_vec (F, D), bev_feat (F, C, H, W))`` for F frames in one call;
* ``temporal(bev_vec_seq (B,T,D), speed (B,T), steering (B,T), hidden=None) -> (actions (B,T,A), gru_out (B,T,H))``.

Actions are ``[wheel_angle (deg), velocity (m/s)]``. Internally the head predicts normalised actions; the
training split's mean/std live in the buffers ``action_mean``/``action_std`` (saved with the weights) and
the outputs are de-normalised, so callers always see physical units. Speed and steering inputs are
normalised with the same statistics (speed with velocity's, steering with wheel_angle's).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from e2r.models.config import TeacherConfig
from e2r.models.pointpillars import PointPillarsEncoder

__all__ = ["LiDARBEVTeacher", "load_teacher"]

STEER, SPEED = 0, 1  # action columns


class LiDARBEVTeacher(nn.Module):
    """LiDAR policy. ``forward(points (B*T clouds, b-major), speed (B,T), steering (B,T))`` -> actions (B,T,A)."""

    #: state-dict prefix of the output layer (skipped by ``--init_skip_output_layer``)
    output_layer_prefix = "head.2."

    def __init__(self, cfg: TeacherConfig) -> None:
        super().__init__()
        if cfg.action_dim != 2:
            raise ValueError(f"the teacher predicts [wheel_angle, velocity]; action_dim must be 2, got {cfg.action_dim}")
        self.cfg = cfg
        self.encoder = PointPillarsEncoder(cfg)
        self.speed_embed = nn.Sequential(nn.Linear(1, cfg.speed_emb), nn.ReLU())
        self.steer_embed = nn.Sequential(nn.Linear(1, cfg.steer_emb), nn.ReLU())
        self.gru = nn.GRU(cfg.bev_dim + cfg.speed_emb + cfg.steer_emb, cfg.gru_hidden, batch_first=True)
        self.head = nn.Sequential(nn.Linear(cfg.gru_hidden, cfg.head_hidden), nn.ReLU(),
                                  nn.Linear(cfg.head_hidden, cfg.action_dim))
        self.register_buffer("action_mean", torch.zeros(cfg.action_dim))
        self.register_buffer("action_std", torch.ones(cfg.action_dim))

    def set_action_stats(self, mean: Tensor, std: Tensor) -> None:
        """Store the training split's action mean/std (A,) used to (de-)normalise."""
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != self.action_mean.shape or std.shape != self.action_std.shape or not (std > 0).all():
            raise ValueError(f"action stats need shape {tuple(self.action_mean.shape)} and std > 0, "
                             f"got mean {mean.tolist()} std {std.tolist()}")
        self.action_mean.copy_(mean)
        self.action_std.copy_(std)

    def normalize_actions(self, actions: Tensor) -> Tensor:
        """Physical (..., A) -> normalised units (zero mean, unit std on the training split)."""
        return (actions - self.action_mean) / self.action_std

    def encode_frames(self, points: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """F point clouds (N_f, 4) -> ``bev_vec (F, D)``, ``bev_feat (F, C, H, W)``; all frames in one call."""
        if len(points) == 0:
            raise ValueError("encode_frames needs at least one point cloud")
        return self.encoder(points)

    def temporal(self, bev_vec_seq: Tensor, speed: Tensor, steering: Tensor,
                 hidden: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """bev_vec_seq (B,T,D), speed (B,T) m/s, steering (B,T) deg, hidden (1,B,H) or None
        -> ``actions (B,T,A)`` in physical units and ``gru_out (B,T,H)``."""
        B, T, _ = bev_vec_seq.shape
        if speed.shape != (B, T) or steering.shape != (B, T):
            raise ValueError(f"speed {tuple(speed.shape)} and steering {tuple(steering.shape)} must be (B, T) = "
                             f"{(B, T)} like bev_vec_seq {tuple(bev_vec_seq.shape)}")
        dev = bev_vec_seq.device
        s = (speed.to(dev, torch.float32) - self.action_mean[SPEED]) / self.action_std[SPEED]
        st = (steering.to(dev, torch.float32) - self.action_mean[STEER]) / self.action_std[STEER]
        x = torch.cat([bev_vec_seq, self.speed_embed(s.unsqueeze(-1)), self.steer_embed(st.unsqueeze(-1))], dim=-1)
        gru_out, _ = self.gru(x, hidden)
        actions = self.head(gru_out) * self.action_std + self.action_mean
        return actions, gru_out

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
        bev_vec_seq = bev_vec.view(B, T, -1)
        actions, gru_out = self.temporal(bev_vec_seq, speed, steering)
        if not return_aux:
            return actions
        return actions, {"bev_vec_seq": bev_vec_seq, "bev_feat_seq": bev_feat.view(B, T, *bev_feat.shape[1:]),
                         "gru_out": gru_out}


def load_teacher(path: str | Path, device: str | torch.device = "cpu") -> tuple[LiDARBEVTeacher, dict[str, Any]]:
    """Build a teacher from a checkpoint (architecture from its ``config``), in eval mode on ``device``.

    Returns ``(model, checkpoint_dict)``; raises CheckpointError naming the file when it is not a valid
    weights-only teacher checkpoint.
    """
    from e2r.checkpoints import CheckpointError, load_checkpoint

    ckpt = load_checkpoint(path)
    try:
        cfg = TeacherConfig.from_dict(dict(ckpt["config"]))
        model = LiDARBEVTeacher(cfg)
        model.load_state_dict(ckpt["model"])
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a teacher checkpoint matching its config: {e}") from e
    return model.to(device).eval(), ckpt
