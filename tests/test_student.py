import pytest
import torch

from e2r.models.config import TeacherConfig
from e2r.models.student import CameraBEVStudent, StudentConfig
from e2r.models.view_transform import IdentityViewTransform, LiftSplat


def _rig(B: int, W: int, H: int, n_cam: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    K = torch.tensor([[0.6 * W, 0.0, (W - 1) / 2], [0.0, 0.6 * W, (H - 1) / 2], [0.0, 0.0, 1.0]])
    T = torch.eye(4)
    T[:3, :3] = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    T[:3, 3] = torch.tensor([0.5, 0.0, 0.2])
    return K.expand(B, n_cam, 3, 3).clone(), T.expand(B, n_cam, 4, 4).clone()


def _inputs(B, T, W, H, n_cam=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    K, E = _rig(B, W, H, n_cam)
    return (torch.rand(B, T, n_cam, 3, H, W, generator=g), K, E, 5 + 10 * torch.rand(B, T, generator=g),
            20 * torch.randn(B, T, generator=g))


@pytest.mark.parametrize("preset,B,T,n_cam", [("tiny", 2, 3, 1), ("tiny", 1, 2, 2), ("full", 1, 2, 1)])
def test_shapes_match_teacher(preset, B, T, n_cam):
    tcfg = TeacherConfig.preset_named(preset)
    cfg = StudentConfig.preset_named(preset)
    cfg.check_matches_teacher(tcfg)
    m = CameraBEVStudent(cfg)
    W, H = cfg.image_size
    with torch.no_grad():
        actions, aux = m(*_inputs(B, T, W, H, n_cam), return_aux=True)
    C, Hb, Wb = tcfg.bev_feat_shape
    assert actions.shape == (B, T, 2)
    assert aux["bev_vec_seq"].shape == (B, T, tcfg.bev_dim)
    assert aux["bev_feat_seq"].shape == (B, T, C, Hb, Wb)
    assert aux["gru_out"].shape == (B, T, tcfg.gru_hidden)
    assert torch.isfinite(actions).all()


def test_config_roundtrip_and_mismatch_refused():
    cfg = StudentConfig.preset_named("tiny")
    assert StudentConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bev_H"):
        cfg.check_matches_teacher(TeacherConfig.preset_named("full"))
    with pytest.raises(ValueError, match="teacher"):
        StudentConfig.from_teacher(TeacherConfig.preset_named("tiny"), "tiny", bev_dim=3)
    with pytest.raises(ValueError, match="view_transform"):
        StudentConfig.from_teacher(TeacherConfig.preset_named("tiny"), "tiny", view_transform="bogus")
    with pytest.raises(ValueError, match="unknown"):
        StudentConfig.from_dict({**cfg.to_dict(), "nonsense": 1})


def test_view_transform_choice_and_bad_inputs():
    tiny = StudentConfig.preset_named("tiny")
    assert isinstance(CameraBEVStudent(tiny).view_transform, LiftSplat)
    ident = StudentConfig.from_teacher(TeacherConfig.preset_named("tiny"), "tiny", view_transform="identity")
    m = CameraBEVStudent(ident)
    assert isinstance(m.view_transform, IdentityViewTransform)
    imgs, K, E, s, st = _inputs(1, 2, 64, 32)
    assert m(imgs, K, E, s, st).shape == (1, 2, 2)
    with pytest.raises(ValueError, match="B, T, Ncam"):
        m(imgs[0], K, E, s, st)
    with pytest.raises(ValueError, match="intrinsics"):
        m(imgs, K[:, :, :2], E, s, st)


def test_gradient_reaches_image_cnn_through_liftsplat():
    m = CameraBEVStudent(StudentConfig.preset_named("tiny"))
    actions, aux = m(*_inputs(1, 2, 64, 32), return_aux=True)
    (actions.sum() + aux["bev_feat_seq"].mean()).backward()
    stem_grad = m.image_encoder.stem[0].weight.grad
    assert stem_grad is not None and stem_grad.abs().sum() > 0
    assert m.view_transform.depthnet.weight.grad.abs().sum() > 0


def test_normalisation_buffers_like_the_teacher():
    m = CameraBEVStudent(StudentConfig.preset_named("tiny")).eval()
    inp = _inputs(1, 2, 64, 32)
    with torch.no_grad():
        a0 = m(*inp)
        m.set_action_stats(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]))
        base = m(*inp)
        # with inputs scaled consistently, scaling the stats scales the physical outputs
        m.set_action_stats(torch.tensor([2.0, 10.0]), torch.tensor([3.0, 4.0]))
        imgs, K, E, s, st = inp
        scaled = m(imgs, K, E, s * 4 + 10, st * 3 + 2)
    assert torch.allclose(a0, base)
    assert torch.allclose(scaled, base * torch.tensor([3.0, 4.0]) + torch.tensor([2.0, 10.0]), atol=1e-4)
    assert torch.allclose(m.normalize_actions(scaled), base, atol=1e-4)
    assert "action_mean" in m.state_dict()
    with pytest.raises(ValueError, match="std > 0"):
        m.set_action_stats(torch.zeros(2), torch.zeros(2))


def test_tiny_student_overfits_two_samples():
    torch.manual_seed(0)
    m = CameraBEVStudent(StudentConfig.preset_named("tiny"))
    imgs, K, E, s, st = _inputs(2, 3, 64, 32, seed=1)
    target = torch.stack([torch.randn(2, 3) * 20, 5 + 10 * torch.rand(2, 3)], -1)
    m.set_action_stats(target.flatten(0, 1).mean(0), target.flatten(0, 1).std(0))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = (m.normalize_actions(m(imgs, K, E, s, st)) - m.normalize_actions(target)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], losses[::10]


def test_bev_vec_reads_where_features_are():
    """The presets' bev_vec sees a k x k pool of bev_feat: a scene and its mirror image (same global mean)
    give different vectors; a config without the field (an older checkpoint) keeps the global mean."""
    cfg = StudentConfig.preset_named("tiny")
    assert cfg.bev_pool_grid == 4 and StudentConfig.preset_named("full").bev_pool_grid == 4
    model = CameraBEVStudent(cfg)
    feat = torch.zeros(2, cfg.teacher_bev_channels, cfg.bev_H, cfg.bev_W)
    feat[0, :, :4, 8:12] = 1.0                       # something on the right (low rows: negative y)
    feat[1, :, -4:, 8:12] = 1.0                      # the same on the left
    pooled = model.pool(feat)
    assert pooled.shape == (2, cfg.teacher_bev_channels * 16)
    torch.testing.assert_close(pooled.reshape(2, cfg.teacher_bev_channels, 16).mean(-1), feat.mean(dim=(2, 3)))
    assert not torch.allclose(pooled[0], pooled[1])
    old = {k: v for k, v in cfg.to_dict().items() if k != "bev_pool_grid"}
    legacy = CameraBEVStudent(StudentConfig.from_dict(old))
    assert legacy.cfg.bev_pool_grid == 1 and legacy.to_vec.in_features == cfg.teacher_bev_channels
    torch.testing.assert_close(legacy.pool(feat)[0], legacy.pool(feat)[1])
    with pytest.raises(ValueError, match="bev_pool_grid"):
        StudentConfig.from_teacher(TeacherConfig.preset_named("tiny"), "tiny", bev_pool_grid=0)


def test_norm_and_input_norm_levers():
    """``norm="group"`` has no batch statistics: a frame's output does not depend on the other frames of its
    batch, as it does with BatchNorm in training mode; ``input_norm="per_image"`` makes the encoder blind to a
    change of brightness and contrast (x -> a x + b), which the fixed normalisation sees."""
    teacher = TeacherConfig.preset_named("tiny")
    imgs = torch.rand(4, 3, 64, 128, generator=torch.Generator().manual_seed(3))
    for norm, alone_equal in (("batch", False), ("group", True)):
        cfg = StudentConfig.from_teacher(teacher, "tiny", norm=norm)
        enc = CameraBEVStudent(cfg).image_encoder.train()
        torch.manual_seed(0)
        both, alone = enc(imgs), enc(imgs[:1])
        assert torch.allclose(both[:1], alone, atol=1e-5) == alone_equal, norm
    assert not any(isinstance(m, torch.nn.BatchNorm2d)
                   for m in CameraBEVStudent(StudentConfig.from_teacher(teacher, "tiny", norm="group")).modules())
    for input_norm, blind in (("fixed", False), ("per_image", True)):
        torch.manual_seed(0)
        enc = CameraBEVStudent(StudentConfig.from_teacher(teacher, "tiny", input_norm=input_norm)).image_encoder.eval()
        with torch.no_grad():
            out, darker = enc(imgs), enc(0.4 * imgs + 0.1)
        change = float((out - darker).abs().max() / out.abs().max())
        assert (change < 0.02) if blind else (change > 0.2), (input_norm, change)
    cfg = StudentConfig.from_teacher(teacher, "tiny", norm="group", input_norm="per_image")
    assert StudentConfig.from_dict(cfg.to_dict()) == cfg
    legacy = {k: v for k, v in cfg.to_dict().items() if k not in ("norm", "input_norm")}
    assert (StudentConfig.from_dict(legacy).norm, StudentConfig.from_dict(legacy).input_norm) == ("batch", "fixed")
    for field, bad in (("norm", "layer"), ("input_norm", "imagenet")):
        with pytest.raises(ValueError, match=field):
            StudentConfig.from_teacher(teacher, "tiny", **{field: bad})
