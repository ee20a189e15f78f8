"""The optimised student training step (channels_last encoders, in-place ReLU, per-rig cached splat indices)
computes what the plain step computed: same loss and same gradients on a fixed batch, within float
tolerance. The reference below is the step as it was written before those changes, in contiguous memory,
re-implemented here from the model's own layers (docs/PERFORMANCE.md, "student training step")."""
import pytest
import torch
import torch.nn.functional as F

from e2r.kd import kd_bev_vec_per_sample, kd_temporal_per_sample
from e2r.losses import action_loss, action_weights
from e2r.models.config import TeacherConfig
from e2r.models.student import CameraBEVStudent, StudentConfig


def _conv(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight.contiguous(), conv.bias, conv.stride, conv.padding)


def _seq(mods: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """conv -> BatchNorm [-> ReLU], contiguous."""
    x = mods[1](_conv(mods[0], x))
    return torch.relu(x) if len(mods) > 2 else x


def _block(b, x: torch.Tensor) -> torch.Tensor:
    y = torch.relu(b.bn1(_conv(b.conv1, x)))
    short = x if isinstance(b.short, torch.nn.Identity) else _seq(b.short, x)
    return torch.relu(b.bn2(_conv(b.conv2, y)) + short)


def _splat(ls, depth: torch.Tensor, ctx: torch.Tensor, K: torch.Tensor, E: torch.Tensor, image_hw) -> torch.Tensor:
    """Lift-Splat's pooling as first written: every frustum point of every frame from ``geometry``."""
    FN, D, h, w = depth.shape
    C, (Fr, n_cam), HW = ctx.shape[1], K.shape[:2], ls.bev_grid["H"] * ls.bev_grid["W"]
    cells = ls.geometry(K, E, image_hw, (h, w)).reshape(-1)
    kept = torch.nonzero(cells >= 0).squeeze(1)
    frame = kept // (n_cam * D * h * w)
    pixel = (kept // (D * h * w)) * (h * w) + kept % (h * w)
    vals = depth.contiguous().reshape(-1)[kept, None] * ctx.permute(0, 2, 3, 1).reshape(-1, C)[pixel]
    target = frame * HW + cells[kept]
    out = torch.zeros(Fr * HW, C, dtype=vals.dtype).index_add_(0, target, vals)
    if ls.pool == "mean":
        out = out / torch.bincount(target, minlength=Fr * HW).clamp_min(1).to(out.dtype)[:, None]
    return out.reshape(Fr, ls.bev_grid["H"], ls.bev_grid["W"], C).permute(0, 3, 1, 2).contiguous()


def _reference_encode(m: CameraBEVStudent, images, K, E):
    """``m.encode_frames(images (F,Ncam,3,H,W), K (F,Ncam,3,3), E (F,Ncam,4,4))`` computed the plain way:
    contiguous tensors, out-of-place ops -> bev_vec, bev_feat."""
    H, W = images.shape[-2:]
    Kf, Ef = K, E
    enc = m.image_encoder
    x = _seq(enc.stem, (images.reshape(-1, 3, H, W) - 0.45) / 0.225)
    outs = []
    for stage in enc.stages:
        for b in stage:
            x = _block(b, x)
        outs.append(x)
    up = F.interpolate(outs[-1], size=outs[-2].shape[-2:], mode="bilinear", align_corners=False)
    feats = _seq(enc.merge, torch.cat([up, outs[-2]], 1))
    lift = _conv(m.view_transform.depthnet, feats)
    n_depth = m.view_transform.n_depth
    bev = _splat(m.view_transform, lift[:, :n_depth].softmax(1), lift[:, n_depth:], Kf, Ef, (H, W))
    size, outs = bev.shape[-2:], []
    for stage in m.bev_encoder.stages:
        for b in stage:
            bev = _block(b, bev)
        outs.append(bev if bev.shape[-2:] == size else
                    F.interpolate(bev, size=size, mode="bilinear", align_corners=False))
    bev_feat = _seq(m.bev_encoder.fuse, torch.cat(outs, 1))
    return m.to_vec(F.adaptive_avg_pool2d(bev_feat, m.cfg.bev_pool_grid).flatten(1)), bev_feat


def _reference_forward(m: CameraBEVStudent, images, K, E, speed, steering):
    """``m(..., return_aux=True)`` with the frames encoded by :func:`_reference_encode`."""
    B, T, n_cam = images.shape[:3]
    Kf = K[:, None].expand(B, T, n_cam, 3, 3).reshape(B * T, n_cam, 3, 3)
    Ef = E[:, None].expand(B, T, n_cam, 4, 4).reshape(B * T, n_cam, 4, 4)
    return m.sequence_outputs(*_reference_encode(m, images.flatten(0, 1), Kf, Ef), B, T, speed, steering, True)


def _loss(m: CameraBEVStudent, pred, aux, actions, teacher_vec, teacher_gru) -> torch.Tensor:
    """BC plus the bev_vec / temporal KD terms, so every output of the step carries gradient."""
    bc = action_loss(m.normalize_actions(pred), m.normalize_actions(actions), action_weights(1.0, 0.05), 0.1)
    return (bc + kd_bev_vec_per_sample(aux["bev_vec_seq"], teacher_vec).mean()
            + kd_temporal_per_sample(aux["gru_out"], teacher_gru).mean() + aux["bev_feat_seq"].square().mean())


def _fixed_batch(cfg: StudentConfig, B: int = 3, T: int = 2):
    """images (B,T,1,3,H,W), K (B,1,3,3), cam2ego (B,1,4,4) (window 1 on a second rig, as a mirrored
    window would be), speed, steering (B,T), actions (B,T,2), teacher bev_vec (B,T,D), gru_out (B,T,H)."""
    (W, H), g = cfg.image_size, torch.Generator().manual_seed(1)
    K = torch.tensor([[0.6 * W, 0.0, (W - 1) / 2], [0.0, 0.6 * W, (H - 1) / 2], [0.0, 0.0, 1.0]]).repeat(B, 1, 1, 1)
    E = torch.eye(4).repeat(B, 1, 1, 1)
    E[:, 0, :3, :3] = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    E[:, 0, :3, 3] = torch.tensor([0.5, 0.0, 0.3])
    E[1, 0, 1, 3] = 0.4
    return (torch.rand(B, T, 1, 3, H, W, generator=g), K, E, 5 + 10 * torch.rand(B, T, generator=g),
            20 * torch.randn(B, T, generator=g),
            torch.stack([20 * torch.randn(B, T, generator=g), 5 + 10 * torch.rand(B, T, generator=g)], -1),
            torch.randn(B, T, cfg.bev_dim, generator=g), torch.randn(B, T, cfg.gru_hidden, generator=g))


def _student(pool: str, dtype: torch.dtype = torch.float32) -> CameraBEVStudent:
    torch.manual_seed(0)
    cfg = StudentConfig.from_teacher(TeacherConfig.preset_named("tiny"), "tiny", splat_pool=pool)
    m = CameraBEVStudent(cfg).train().to(dtype)
    m.set_action_stats(torch.tensor([0.5, 12.0]), torch.tensor([8.0, 3.0]))
    return m


def _grads_agree(m: torch.nn.Module, losses, tol: float) -> None:
    """Run each loss closure (fresh gradients), then compare the losses and every parameter's gradient
    (relative to the largest entry of the reference's)."""
    results = []
    for loss_of in losses:
        m.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (loss, grads), (ref_loss, ref_grads) = results
    assert torch.allclose(loss, ref_loss, rtol=tol, atol=0.0), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().clamp_min(1e-12)
        diff = (grad - ref_grads[name]).abs().max() / scale
        assert diff <= tol, f"{name}: gradients differ by {diff} of their largest entry"


@pytest.mark.parametrize("pool", ["sum", "mean"])
def test_optimised_encoder_is_the_plain_one_in_float64(pool):
    """Image CNN -> Lift-Splat -> BEV CNN -> bev_vec in float64: equal to 1e-9 (the same arithmetic, in
    another memory layout and summation order)."""
    m = _student(pool, torch.float64)
    images, K, E = (t.double() for t in _fixed_batch(m.cfg)[:3])
    frames, Kf, Ef = images.flatten(0, 1), K.repeat_interleave(2, 0), E.repeat_interleave(2, 0)
    g = torch.Generator().manual_seed(2)
    w_vec, w_feat = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in
                     ((frames.shape[0], m.cfg.bev_dim), (frames.shape[0], *m.cfg.bev_feat_shape)))

    def loss(bev_vec, bev_feat):
        return (bev_vec * w_vec).sum() + (bev_feat * w_feat).sum()

    _grads_agree(m, (lambda: loss(*m.encode_frames(frames, Kf, Ef)),
                     lambda: loss(*_reference_encode(m, frames, Kf, Ef))), 1e-9)


def test_optimised_step_gives_the_plain_steps_loss_and_gradients():
    """The whole float32 step (BC + bev_vec / temporal KD terms): equal to float rounding through ~20 layers
    of BatchNorm (the largest difference, ~1e-3 of the largest entry, is the stem's weight gradient)."""
    m = _student("sum")
    images, K, E, speed, steering, actions, t_vec, t_gru = _fixed_batch(m.cfg)
    _grads_agree(m, (lambda: _loss(m, *m(images, K, E, speed, steering, return_aux=True), actions, t_vec, t_gru),
                     lambda: _loss(m, *_reference_forward(m, images, K, E, speed, steering), actions, t_vec, t_gru)),
                 5e-3)
