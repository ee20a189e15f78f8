"""Augmentation: photometric (shapes, range, one draw per window shared by its frames, reproducible by seed) and
zoom-crop (the adjusted intrinsics project the scene onto the same content)."""
import pytest
import torch

from e2r.data.augment import crop_intrinsics, photometric_jitter, zoom_crop


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


def _at(img: torch.Tensor, x: float, y: float) -> float:
    """Bilinear value of ``img`` (H, W) at pixel coordinates (x, y), pixel centres at integers."""
    x0, y0 = int(x), int(y)
    fx, fy = x - x0, y - y0
    return float((1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x0 + 1])
                 + fy * ((1 - fx) * img[y0 + 1, x0] + fx * img[y0 + 1, x0 + 1]))


def test_zoom_crop_moves_the_content_where_the_new_intrinsics_project_the_scene():
    """Every scene point projects, through the adjusted K, onto the content that was where it projected through
    the original K (images whose pixels hold their own coordinates: bilinear resampling keeps them exact), for
    every window and camera; the T frames of a window share the crop; max_zoom 0 is the identity."""
    H, W = 48, 80
    K = torch.tensor([[60.0, 0.0, 39.5], [0.0, 60.0, 23.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    B, T, n_cam = 4, 2, 2
    images = torch.stack([u, v, u + v]).expand(B, T, n_cam, 3, H, W).clone()
    Ks = K.float().expand(B, n_cam, 3, 3).clone()
    assert zoom_crop(images, Ks, 0.0) == (images, Ks)
    torch.manual_seed(0)
    out, K2 = zoom_crop(images, Ks, 0.5)
    assert out.shape == images.shape and K2.shape == Ks.shape
    assert torch.equal(out[:, 0], out[:, 1])                          # one crop per window and camera
    assert not torch.allclose(K2[0, 0], K2[1, 0])                      # a different crop per window
    assert bool((K2[..., 0, 0] > 60.0).all()) and bool((K2[..., 0, 0] <= 60.0 / 0.5 + 1e-3).all())
    points = torch.tensor([[x, y, z] for x in (-1.5, -0.4, 0.3, 1.1) for y in (-0.5, 0.2, 0.6) for z in (6.0, 11.0)],
                          dtype=torch.float64)
    before = (K @ points.T).T
    before = before[:, :2] / before[:, 2:]
    checked = 0
    for b in range(B):
        for c in range(n_cam):
            after = (K2[b, c].double() @ points.T).T
            after = after[:, :2] / after[:, 2:]
            for (x, y), (x1, y1) in zip(after.tolist(), before.tolist()):
                if 0 <= x < W - 1 and 0 <= y < H - 1:
                    got = (_at(out[b, 0, c, 0], x, y), _at(out[b, 0, c, 1], x, y))
                    assert abs(got[0] - x1) < 2e-3 and abs(got[1] - y1) < 2e-3, (b, c, x, y, got, x1, y1)
                    checked += 1
    assert checked >= 20


def test_crop_intrinsics_of_the_whole_image_is_the_identity():
    K = torch.tensor([[[50.0, 0.0, 31.5], [0.0, 50.0, 15.5], [0.0, 0.0, 1.0]]])
    one, zero = torch.ones(1), torch.zeros(1)
    torch.testing.assert_close(crop_intrinsics(K, one, zero, zero), K)
    half = crop_intrinsics(K, 0.5 * one, 16 * one, 8 * one)     # the centre half, doubled
    torch.testing.assert_close(half[0, 0], torch.tensor([100.0, 0.0, 31.5]))
    with pytest.raises(ValueError, match="max_zoom"):
        zoom_crop(torch.rand(1, 1, 1, 3, 8, 8), torch.eye(3)[None, None], 1.0)
