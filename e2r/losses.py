"""Action losses in normalised units (zero mean, unit std on the training split), shared by teacher and student.

Actions are (B, T, A) with columns ``[wheel_angle, velocity]``; the default weights (steering 1.0,
speed 0.05) are the SPEC's.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["action_weights", "weighted_action_mse", "braking_weights", "smoothness_penalty", "action_loss"]


def action_weights(steer_weight: float, speed_weight: float, like: Tensor | None = None) -> Tensor:
    """(A,) = [steer_weight, speed_weight] on ``like``'s device."""
    if not (0 <= steer_weight < math.inf and 0 <= speed_weight < math.inf and steer_weight + speed_weight > 0):
        raise ValueError(f"loss weights must be >= 0 and not both 0, got steer {steer_weight}, speed {speed_weight}")
    w = torch.tensor([steer_weight, speed_weight], dtype=torch.float32)
    return w if like is None else w.to(like.device)


def weighted_action_mse(pred: Tensor, target: Tensor, weights: Tensor | Sequence[float],
                        sample_weights: Tensor | None = None) -> Tensor:
    """sum_a w_a * mean((pred[..., a] - target[..., a])^2); pred, target (..., A), weights (A,) -> scalar.
    ``sample_weights`` (..., A), each action's column >= 0: that column's mean becomes a weighted mean."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    w = torch.as_tensor(weights, dtype=pred.dtype, device=pred.device)
    err = ((pred - target) ** 2).reshape(-1, pred.shape[-1])                              # (N, A)
    if sample_weights is None:
        per_action = err.mean(dim=0)                                                        # (A,)
    else:
        sw = sample_weights.reshape(err.shape).to(err.dtype)
        per_action = (err * sw).sum(dim=0) / sw.sum(dim=0).clamp_min(1e-12)
    return (per_action * w).sum()


def braking_weights(speed: Tensor, speed_command: Tensor, per_mps: float) -> Tensor:
    """Sample weights of the speed command, (B, T): 1 + ``per_mps`` x the m/s the label asks the car to shed,
    ``max(0, speed - speed_command)`` (measured speed and command in m/s). Frames of braking behind a slower car
    are few; this makes each weigh as much as the speed it sheds."""
    return 1.0 + per_mps * (speed - speed_command).clamp_min(0.0)


def smoothness_penalty(pred: Tensor, weights: Tensor | Sequence[float]) -> Tensor:
    """Weighted mean squared change between consecutive steps; pred (B, T, A) -> scalar (0 when T == 1)."""
    if pred.shape[1] < 2:
        return pred.new_zeros(())
    return weighted_action_mse(pred[:, 1:], pred[:, :-1], weights)


def action_loss(pred_norm: Tensor, target_norm: Tensor, weights: Tensor | Sequence[float],
                smooth_weight: float = 0.0, sample_weights: Tensor | None = None) -> Tensor:
    """Weighted MSE (``sample_weights`` (B, T, A): see ``weighted_action_mse``) plus ``smooth_weight`` x
    smoothness, both on normalised (B, T, A) actions -> scalar."""
    loss = weighted_action_mse(pred_norm, target_norm, weights, sample_weights)
    if smooth_weight > 0:
        loss = loss + smooth_weight * smoothness_penalty(pred_norm, weights)
    return loss
