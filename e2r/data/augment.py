"""Augmentation of camera windows: the look (photometric) or the framing (zoom-crop) changes, the geometry
and every target stay valid.

    images = photometric_jitter(batch["images"], strength=0.5)      # (B, T, Ncam, 3, H, W) in [0, 1]
    images, K = zoom_crop(batch["images"], batch["intrinsics"], max_zoom=0.2)     # K (B, Ncam, 3, 3)

One draw per window and camera, shared by the window's T frames (the same camera, a second apart, keeps
its exposure), from the global torch RNG (part of a training run's checkpointed RNG state). At
``strength`` s in [0, 1]:

* brightness: x * b, b ~ U(1 - 0.4 s, 1 + 0.4 s)
* contrast: (x - mean) * c + mean, c ~ U(1 - 0.4 s, 1 + 0.4 s), mean over the image's pixels and channels
* gamma: x ** g, g = exp(U(-0.4 s, 0.4 s))
* colour: per-channel gain ~ U(1 - 0.1 s, 1 + 0.1 s)
* noise: Gaussian, sigma ~ U(0, 0.03 s), per pixel and frame

then clamped to [0, 1]. ``strength`` 0 returns the images unchanged.

Zoom-crop: one crop per window and camera (shared by the T frames), a box of ``s`` times the image size
(s ~ U(1 - max_zoom, 1), the same aspect) at a uniform offset, resampled back to the full size (bilinear);
the intrinsics follow, so a point of the scene projects onto the same content (Lift-Splat's geometry stays
right): ``fx' = fx / s``, ``cx' = (cx + 0.5 - x0) / s - 0.5`` (pixel centres at integer coordinates, as
`e2r.data.calib.scale_intrinsics`), likewise for y.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from e2r.data.calib import scale_intrinsics

__all__ = ["photometric_jitter", "zoom_crop", "crop_intrinsics"]


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


def crop_intrinsics(K: Tensor, scale: Tensor, x0: Tensor, y0: Tensor) -> Tensor:
    """K (..., 3, 3) of an image -> K of its crop box (left/top edges at ``x0``, ``y0`` pixels, size ``scale``
    times the image's; each (...)) resampled back to the image's size."""
    K2 = K.clone()
    K2[..., 0, 2] = K[..., 0, 2] - x0
    K2[..., 1, 2] = K[..., 1, 2] - y0
    inv = 1.0 / scale                       # per-entry factors broadcast over K's leading dims
    return scale_intrinsics(K2, inv, inv)


def zoom_crop(images: Tensor, intrinsics: Tensor, max_zoom: float) -> tuple[Tensor, Tensor]:
    """images (B, T, Ncam, 3, H, W), intrinsics (B, Ncam, 3, 3) for (W, H) -> zoom-cropped images of the same
    shape and their intrinsics (module docstring); ``max_zoom`` 0 returns both unchanged."""
    if not 0.0 <= max_zoom < 1.0:
        raise ValueError(f"zoom-crop max_zoom must be in [0, 1), got {max_zoom}")
    if max_zoom == 0.0:
        return images, intrinsics
    if images.dim() != 6 or intrinsics.shape != (*images.shape[:1], images.shape[2], 3, 3):
        raise ValueError(f"images (B, T, Ncam, 3, H, W) and intrinsics (B, Ncam, 3, 3) expected, got "
                         f"{tuple(images.shape)} and {tuple(intrinsics.shape)}")
    B, T, n_cam, C, H, W = images.shape
    dev = images.device
    scale = 1.0 - max_zoom * torch.rand(B, n_cam)                     # CPU RNG: part of the run's RNG state
    x0, y0 = torch.rand(B, n_cam) * (1 - scale) * W, torch.rand(B, n_cam) * (1 - scale) * H
    theta = torch.zeros(B, n_cam, 2, 3)
    theta[..., 0, 0], theta[..., 1, 1] = scale, scale
    theta[..., 0, 2], theta[..., 1, 2] = scale - 1 + 2 * x0 / W, scale - 1 + 2 * y0 / H
    grid = F.affine_grid(theta.flatten(0, 1).to(dev, torch.float32), [B * n_cam, C, H, W], align_corners=False)
    frames = images.float().permute(0, 2, 1, 3, 4, 5).reshape(B * n_cam, T * C, H, W)
    out = F.grid_sample(frames, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out.reshape(B, n_cam, T, C, H, W).permute(0, 2, 1, 3, 4, 5).to(images.dtype)
    return out, crop_intrinsics(intrinsics, scale.to(intrinsics), x0.to(intrinsics), y0.to(intrinsics))
