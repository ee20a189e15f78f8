"""Photometric augmentation of camera windows: the look changes, the geometry and every target stay valid.

    images = photometric_jitter(batch["images"], strength=0.5)      # (B, T, Ncam, 3, H, W) in [0, 1]

One draw per window and camera, shared by the window's T frames (the same camera, a second apart, keeps
its exposure), from the global torch RNG (part of a training run's checkpointed RNG state). At
``strength`` s in [0, 1]:

* brightness: x * b, b ~ U(1 - 0.4 s, 1 + 0.4 s)
* contrast: (x - mean) * c + mean, c ~ U(1 - 0.4 s, 1 + 0.4 s), mean over the image's pixels and channels
* gamma: x ** g, g = exp(U(-0.4 s, 0.4 s))
* colour: per-channel gain ~ U(1 - 0.1 s, 1 + 0.1 s)
* noise: Gaussian, sigma ~ U(0, 0.03 s), per pixel and frame

then clamped to [0, 1]. ``strength`` 0 returns the images unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["photometric_jitter"]


def photometric_jitter(images: Tensor, strength: float) -> Tensor:
    """images (B, T, Ncam, 3, H, W) in [0, 1] -> a jittered copy of the same shape (module docstring)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"photometric strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return images
    if images.dim() != 6 or images.shape[3] != 3:
        raise ValueError(f"images must be (B, T, Ncam, 3, H, W), got {tuple(images.shape)}")
    B, T, n_cam = images.shape[:3]
    dev, s = images.device, float(strength)

    def draw(*shape: int) -> Tensor:                 # U(-1, 1), one per window and camera, on the CPU RNG
        return (torch.rand(B, 1, n_cam, *shape) * 2 - 1).to(dev)

    bright = 1 + 0.4 * s * draw(1, 1, 1)
    contrast = 1 + 0.4 * s * draw(1, 1, 1)
    gamma = torch.exp(0.4 * s * draw(1, 1, 1))
    colour = 1 + 0.1 * s * draw(3, 1, 1)
    sigma = 0.03 * s * (draw(1, 1, 1) + 1) / 2
    x = images.float().clamp(0, 1) ** gamma
    mean = x.mean(dim=(3, 4, 5), keepdim=True)
    x = ((x - mean) * contrast + mean) * bright * colour
    x = x + torch.randn(images.shape).to(dev) * sigma
    return x.clamp(0, 1).to(images.dtype)
