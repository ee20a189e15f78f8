"""The control part shared by the teacher and the student: speed/steering embeddings -> GRU -> MLP head.

Both policies see the previous command (``steering`` = wheel_angle[t-1]) and the current speed. At 20 Hz
the command changes little from one frame to the next, so with ``residual_actions`` the head predicts the
*change* relative to those inputs: ``action_norm = head(gru_out) + [steering_norm, speed_norm]``. Repeating
the previous command is then the network's starting point, and the sensor (LiDAR or camera) has to
explain the correction; without it a small network spends most of its training re-learning the identity.

Normalisation: the training split's action mean/std (A,) live in the buffers ``action_mean``/``action_std``
(saved with the weights); the head works in normalised units, outputs are de-normalised (degrees, m/s);
speed and steering inputs are normalised with velocity's and wheel_angle's statistics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TemporalPolicy", "grid_pool", "STEER", "SPEED", "RESIDUAL_MODES", "DEFAULT_HEAD", "residual_mask"]

STEER, SPEED = 0, 1  # action columns: [wheel_angle (deg), velocity (m/s)]
STEER_RATE_GAIN = 20.0  # scales the per-step steering change (normalised units) to order 1


RESIDUAL_MODES = {"all": (1.0, 1.0), "steering": (1.0, 0.0), "none": (0.0, 0.0), "scene": (0.0, 0.0),
                  "scene_only": (0.0, 0.0)}
DEFAULT_HEAD = "scene"  # the head a new teacher (and so its students) gets: the one measured to drive (README)


def residual_mask(mode: bool | str) -> tuple[float, float]:
    """``residual_actions`` -> (steering, speed) residual factors: "all" (or True, the original), "steering"
    (the speed command is predicted outright: it depends on the road ahead, not on the current speed, and a
    residual over the current speed lets a small bias ramp the speed up in closed loop), "none" (or False),
    "scene" (none, and the previous-steering input is not used at all: the policy steers from what it sees
    and its speed, with no command of its own to copy), "scene_only" (as "scene", and the measured speed is
    not an input either: both commands come from the frames alone, so the speed command cannot copy the
    current speed; the GRU still sees the motion between the window's frames)."""
    key = {True: "all", False: "none"}.get(mode, mode) if isinstance(mode, bool) else mode
    if key not in RESIDUAL_MODES:
        raise ValueError(f"residual_actions must be one of {sorted(RESIDUAL_MODES)} (or true/false), got {mode!r}")
    return RESIDUAL_MODES[key]



def grid_pool(bev_feat: Tensor, k: int) -> Tensor:
    """bev_feat (F, C, H, W) -> (F, C * k * k): the average over each of k x k BEV regions (rows before columns
    of a channel), the global mean when k = 1: what ``bev_vec`` reads, keeping where things are when k > 1."""
    return bev_feat.mean(dim=(2, 3)) if k == 1 else F.adaptive_avg_pool2d(bev_feat, k).flatten(1)

class TemporalPolicy(nn.Module):
    """Base class: subclasses call :meth:`build_policy` in ``__init__`` and provide ``encode_frames``."""

    #: state-dict prefix of the output layer (skipped by ``--init_skip_output_layer``)
    output_layer_prefix = "head.2."

    def build_policy(self, bev_dim: int, speed_emb: int, steer_emb: int, gru_hidden: int, head_hidden: int,
                     action_dim: int, residual_actions: bool) -> None:
        if action_dim != 2:
            raise ValueError(f"the policy predicts [wheel_angle, velocity]; action_dim must be 2, got {action_dim}")
        self.residual = residual_mask(residual_actions)          # (steering, speed): 1 = residual
        self.residual_actions = bool(max(self.residual))
        self.uses_steering_input = residual_actions not in ("scene", "scene_only")
        self.uses_speed_input = residual_actions != "scene_only"
        self.speed_embed = nn.Sequential(nn.Linear(1, speed_emb), nn.ReLU())
        self.steer_embed = nn.Sequential(nn.Linear(2, steer_emb), nn.ReLU())   # [steering, its change]
        self.gru = nn.GRU(bev_dim + speed_emb + steer_emb, gru_hidden, batch_first=True)
        self.head = nn.Sequential(nn.Linear(gru_hidden, head_hidden), nn.ReLU(), nn.Linear(head_hidden, action_dim))
        if self.residual_actions:  # start exactly at "repeat the inputs"; the network learns the correction
            nn.init.zeros_(self.head[2].weight)
            nn.init.zeros_(self.head[2].bias)
        self.register_buffer("action_mean", torch.zeros(action_dim))
        self.register_buffer("action_std", torch.ones(action_dim))

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

    def temporal(self, bev_vec_seq: Tensor, speed: Tensor, steering: Tensor,
                 hidden: Tensor | None = None, prev_steering: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """bev_vec_seq (B,T,D), speed (B,T) m/s, steering (B,T) deg, hidden (1,B,H) or None
        -> ``actions (B,T,A)`` in physical units and ``gru_out (B,T,H)``.

        The steering embedding also sees the change of the steering input from the step before
        (``steering[t] - steering[t-1]``, x ``STEER_RATE_GAIN`` in normalised units): at 20 Hz the command
        moves by a fraction of a degree per frame, too small a signal for the GRU to difference by itself.
        The first step's change is 0 (a window starts cold, as in training) unless ``prev_steering`` (B,),
        the steering input of the step before, is given (stepping through a sequence with ``hidden``)."""
        B, T, _ = bev_vec_seq.shape
        if speed.shape != (B, T) or steering.shape != (B, T):
            raise ValueError(f"speed {tuple(speed.shape)} and steering {tuple(steering.shape)} must be (B, T) = "
                             f"{(B, T)} like bev_vec_seq {tuple(bev_vec_seq.shape)}")
        dev = bev_vec_seq.device
        s = (speed.to(dev, torch.float32) - self.action_mean[SPEED]) / self.action_std[SPEED]
        st = (steering.to(dev, torch.float32) - self.action_mean[STEER]) / self.action_std[STEER]
        if not self.uses_steering_input:
            st, prev_steering = torch.zeros_like(st), None
        if not self.uses_speed_input:
            s = torch.zeros_like(s)
        if prev_steering is None:
            first = st[:, :1]
        else:
            first = (prev_steering.to(dev, torch.float32).view(B, 1) - self.action_mean[STEER]) / self.action_std[STEER]
        rate = (st - torch.cat([first, st[:, :-1]], dim=1)) * STEER_RATE_GAIN
        x = torch.cat([bev_vec_seq, self.speed_embed(s.unsqueeze(-1)),
                       self.steer_embed(torch.stack([st, rate], dim=-1))], dim=-1)
        gru_out, _ = self.gru(x, hidden)
        out = self.head(gru_out)
        if self.residual_actions:
            out = out + torch.stack([st * self.residual[0], s * self.residual[1]], dim=-1)
        return out * self.action_std + self.action_mean, gru_out

    def sequence_outputs(self, bev_vec: Tensor, bev_feat: Tensor, B: int, T: int, speed: Tensor, steering: Tensor,
                         return_aux: bool) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """``forward``'s result from the per-frame encodings of B*T frames (b-major): actions (B,T,A), or with
        ``return_aux`` ``(actions, {"bev_vec_seq" (B,T,D), "bev_feat_seq" (B,T,C,H,W), "gru_out" (B,T,H)})``."""
        bev_vec_seq = bev_vec.view(B, T, -1)
        actions, gru_out = self.temporal(bev_vec_seq, speed, steering)
        if not return_aux:
            return actions
        return actions, {"bev_vec_seq": bev_vec_seq, "bev_feat_seq": bev_feat.view(B, T, *bev_feat.shape[1:]),
                         "gru_out": gru_out}
