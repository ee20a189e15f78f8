"""Photometric augmentation: shapes, range, one draw per window shared by its frames, reproducible by seed."""
import pytest
import torch

from e2r.data.augment import photometric_jitter


def _images(B=4, T=3, n_cam=2, H=8, W=12):
    torch.manual_seed(1)
    base = torch.rand(B, 1, n_cam, 3, H, W)
    return base.expand(B, T, n_cam, 3, H, W).clone()          # a static scene: every frame of a window alike


def test_jitter_changes_the_look_within_range_and_keeps_frames_of_a_window_alike():
    images = _images()
    assert photometric_jitter(images, 0.0) is images
    torch.manual_seed(0)
    out = photometric_jitter(images, 1.0)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert (out - images).abs().mean() > 0.02                                      # it does change the look
    # brightness/contrast/gamma/colour are drawn once per window and camera: frames differ by noise only
    frame_gap = (out[:, 1:] - out[:, :1]).abs().mean()
    window_gap = (out[1:, 0] - out[:-1, 0]).abs().mean()
    assert frame_gap < 0.04 and window_gap > frame_gap
    torch.manual_seed(0)
    assert torch.equal(photometric_jitter(images, 1.0), out)                        # the global RNG decides
    weak = photometric_jitter(images, 0.1)
    assert (weak - images).abs().mean() < (out - images).abs().mean()


def test_jitter_refuses_bad_input():
    with pytest.raises(ValueError, match="strength"):
        photometric_jitter(_images(), 1.5)
    with pytest.raises(ValueError, match="B, T, Ncam"):
        photometric_jitter(torch.rand(2, 3, 8, 8), 0.5)
