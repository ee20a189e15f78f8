import pytest
import torch

from e2r.kd import KDWeights, kd_bev_feat_per_sample, kd_losses, occupancy_weights, pool_to_grid
from e2r.losses import weighted_action_mse

B, T, A, D, HID, C, H, W = 3, 2, 2, 8, 6, 4, 8, 8
MEAN, STD = torch.tensor([1.0, 10.0]), torch.tensor([15.0, 2.0])
ALL = KDWeights(action=1.0, bev_vec=1.0, temporal=1.0, bev_feat=1.0)


def normalize(a: torch.Tensor) -> torch.Tensor:
    return (a - MEAN) / STD


def _teacher(seed=0):
    g = torch.Generator().manual_seed(seed)
    feat = torch.rand(B, T, C, H, W, generator=g) * 0.1
    feat[..., 2:4, 3:6] += 2.0                                  # "occupied" blob
    return {"actions": torch.randn(B, T, A, generator=g) * STD + MEAN, "bev_vec": torch.randn(B, T, D, generator=g),
            "gru_out": torch.tanh(torch.randn(B, T, HID, generator=g)), "bev_feat": feat}


def _student_equal(t):
    return t["actions"].clone(), {"bev_vec_seq": t["bev_vec"].clone(), "gru_out": t["gru_out"].clone(),
                                  "bev_feat_seq": t["bev_feat"].clone()}


def test_terms_vanish_when_student_equals_teacher_and_positive_otherwise():
    t = _teacher()
    a, aux = _student_equal(t)
    out = kd_losses(a, aux, t, torch.ones(B, dtype=torch.bool), normalize, ALL)
    for k in ("kd_action", "kd_bev_vec", "kd_temporal", "kd_bev_feat", "kd_total"):
        assert abs(out[k].item()) < 1e-6, (k, out[k])
    assert out["kd_samples"].item() == B
    # perturb each one separately: only its term becomes positive
    changes = {"kd_action": ("a", None), "kd_bev_vec": ("bev_vec_seq", None), "kd_temporal": ("gru_out", None),
               "kd_bev_feat": ("bev_feat_seq", None)}
    for term, (name, _) in changes.items():
        a2, aux2 = _student_equal(t)
        if name == "a":
            a2 = a2 + torch.tensor([3.0, 0.5])
        elif name in ("bev_vec_seq", "bev_feat_seq"):
            # a pure rescale keeps the cosine, and the dense term is scale-free too
            aux2[name] = aux2[name] + torch.randn_like(aux2[name])
        else:
            aux2[name] = aux2[name] * 0.5
        o = kd_losses(a2, aux2, t, torch.ones(B, dtype=torch.bool), normalize, ALL)
        for k in changes:
            if k == term:
                assert o[k] > 1e-3, (term, o[k])
            else:
                assert abs(o[k].item()) < 1e-6, (term, k, o[k])
        assert o["kd_total"] > 1e-3


def test_action_term_is_the_weighted_bc_loss_in_normalised_units():
    t = _teacher()
    s = t["actions"] + torch.randn(B, T, A)
    w = KDWeights(action=1.0, bev_vec=0.0, temporal=0.0)
    out = kd_losses(s, {}, {"actions": t["actions"]}, torch.ones(B, dtype=torch.bool), normalize, w)
    ref = weighted_action_mse(normalize(s), normalize(t["actions"]), [1.0, 0.05])
    assert torch.allclose(out["kd_action"], ref, atol=1e-6)
    assert out["kd_bev_vec"] == 0 and out["kd_total"] == out["kd_action"]


def test_has_kd_mask_excludes_samples_and_averages_over_kd_only():
    t = _teacher()
    a, aux = _student_equal(t)
    # corrupt sample 1 only on the student side, and make its teacher rows NaN (missing key)
    a[1] += 50.0
    for k in ("bev_vec_seq", "gru_out", "bev_feat_seq"):
        aux[k][1] = aux[k][1] + 3.0
    for k in t:
        t[k][1] = float("nan")
    has = torch.tensor([True, False, True])
    out = kd_losses(a, aux, t, has, normalize, ALL)
    assert out["kd_samples"].item() == 2
    assert all(abs(out[k].item()) < 1e-6 for k in ("kd_action", "kd_bev_vec", "kd_temporal", "kd_bev_feat",
                                                     "kd_total"))
    # a KD sample that differs counts with weight 1 / n_kd
    a3 = a.clone()
    a3[0] += torch.tensor([15.0, 0.0])                          # 1 std of steering on every step
    out3 = kd_losses(a3, aux, t, has, normalize, ALL)
    assert out3["kd_action"].item() == pytest.approx(0.5, rel=1e-4)
    # no KD sample at all: zero terms, finite, differentiable
    a4 = a.clone().requires_grad_(True)
    out4 = kd_losses(a4, aux, t, torch.zeros(B, dtype=torch.bool), normalize, ALL)
    out4["kd_total"].backward()
    assert out4["kd_total"].item() == 0 and torch.isfinite(a4.grad).all() and a4.grad.abs().sum() == 0


def test_gradients_flow_to_student_outputs():
    t = _teacher()
    a, aux = _student_equal(t)
    aux = {k: (v + 0.3 * torch.randn_like(v)).requires_grad_(True) for k, v in aux.items()}
    a = (a + 1.0).requires_grad_(True)
    kd_losses(a, aux, t, torch.ones(B, dtype=torch.bool), normalize, ALL)["kd_total"].backward()
    assert a.grad.abs().sum() > 0 and all(v.grad.abs().sum() > 0 for v in aux.values())


def test_bev_feat_pooled_float16_teacher_and_fov_mask():
    t = _teacher()
    s = t["bev_feat"].clone()
    pooled16 = pool_to_grid(t["bev_feat"].flatten(0, 1), (H // 2, W // 2)).view(B, T, C, H // 2, W // 2).half()
    assert kd_bev_feat_per_sample(s, pooled16, None).abs().max() < 1e-5
    fov = torch.zeros(H, W, dtype=torch.bool)
    fov[:, :4] = True                                           # camera sees columns 0..3 only
    s2 = s.clone()
    s2[..., 4:] = 0.0                                           # wrong outside the FOV: not penalised
    assert kd_bev_feat_per_sample(s2, t["bev_feat"], fov).abs().max() < 1e-6
    assert kd_bev_feat_per_sample(s2, t["bev_feat"], None).min() > 1e-3
    s3 = s.clone()
    s3[..., :4] = 0.0                                           # wrong inside: penalised (relative error 1)
    assert torch.allclose(kd_bev_feat_per_sample(s3, t["bev_feat"], fov), torch.ones(B), atol=1e-5)
    with pytest.raises(ValueError, match="integer factor"):
        kd_bev_feat_per_sample(s, t["bev_feat"][..., :3, :5], None)


def test_occupancy_weights_favour_the_teacher_blob():
    t = _teacher()["bev_feat"].flatten(0, 1)
    wts = occupancy_weights(t, torch.ones(t.shape[0], H, W), background=0.05, k=3.0)
    assert torch.allclose(wts[:, 2:4, 3:6], torch.ones(1))
    bg = torch.ones(H, W, dtype=torch.bool)
    bg[2:4, 3:6] = False
    assert torch.allclose(wts[:, bg], torch.tensor(0.05))  # noise is not "occupied"
    # an error on the blob costs far more than the same error on background
    s_blob, s_bg = t.clone(), t.clone()
    s_blob[:, :, 2, 3] += 1.0
    s_bg[:, :, 6, 6] += 1.0
    lb = kd_bev_feat_per_sample(s_blob.view(B, T, C, H, W), t.view(B, T, C, H, W), None)
    lg = kd_bev_feat_per_sample(s_bg.view(B, T, C, H, W), t.view(B, T, C, H, W), None)
    assert (lb > 10 * lg).all()
    # a constant teacher map has no occupied cell: all background
    w_const = occupancy_weights(torch.ones(1, C, H, W), torch.ones(1, H, W), 0.05, 3.0)
    assert torch.allclose(w_const, torch.full_like(w_const, 0.05))


def test_bad_inputs_are_named():
    t = _teacher()
    a, aux = _student_equal(t)
    with pytest.raises(ValueError, match="bev_feat"):
        kd_losses(a, aux, {k: v for k, v in t.items() if k != "bev_feat"}, torch.ones(B, dtype=torch.bool),
                  normalize, ALL)
    with pytest.raises(ValueError, match="gru_out"):
        kd_losses(a, {**aux, "gru_out": aux["gru_out"][..., :2]}, t, torch.ones(B, dtype=torch.bool), normalize, ALL)
    with pytest.raises(ValueError, match="has_kd"):
        kd_losses(a, aux, t, torch.ones(B + 1, dtype=torch.bool), normalize, ALL)
    with pytest.raises(ValueError, match=">= 0"):
        KDWeights(action=-1.0)


def test_hflip_keeps_liftsplat_and_targets_consistent():
    import math
    from e2r.kd import hflip_sample
    from e2r.models.config import TeacherConfig
    from e2r.models.view_transform import LiftSplat
    grid = TeacherConfig.preset_named("tiny").bev_grid
    ls = LiftSplat(4, 3, grid, depth_bins=(2.0, 40.0, 2.0))
    Wi, Hi = 64, 32
    K = torch.tensor([[40.0, 0.0, 30.0], [0.0, 40.0, 15.5], [0.0, 0.0, 1.0]])  # off-centre cx
    yaw = math.radians(20.0)
    T = torch.eye(4)
    base = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    Rz = torch.tensor([[math.cos(yaw), -math.sin(yaw), 0.0], [math.sin(yaw), math.cos(yaw), 0.0], [0, 0, 1.0]])
    T[:3, :3] = Rz @ base
    T[:3, 3] = torch.tensor([0.5, 1.3, 0.2])                                     # off the centreline
    dp = torch.rand(1, ls.n_depth, 8, 16).softmax(1)
    ctx = torch.rand(1, 3, 8, 16)
    bev = ls.splat(dp, ctx, K[None, None], T[None, None], (Hi, Wi))
    img = torch.rand(1, 3, Hi, Wi)
    steer, acts = torch.tensor([4.0, -2.0]), torch.tensor([[4.0, 10.0], [-2.0, 11.0]])
    fimg, fK, fT, fsteer, facts, fbev = hflip_sample(img, K[None], T[None], steer, acts, grid, bev[0])
    # image features of a flipped image are the flipped features (stride 4 divides W): splat must mirror
    fb = ls.splat(dp.flip(-1), ctx.flip(-1), fK[None], fT[None], (Hi, Wi))
    assert torch.allclose(fb[0], fbev, atol=1e-5) and bev.abs().sum() > 0
    assert torch.equal(fimg, img.flip(-1)) and torch.equal(fsteer, -steer)
    assert torch.equal(facts[:, 0], -acts[:, 0]) and torch.equal(facts[:, 1], acts[:, 1])
    with pytest.raises(ValueError, match="symmetric"):
        hflip_sample(img, K[None], T[None], steer, acts, {**grid, "y_min": 0.0})


def test_dense_term_is_scale_free():
    """The student's features may live on any scale: a rescaled copy of the teacher map costs nothing."""
    t = _teacher()
    a, aux = _student_equal(t)
    aux["bev_feat_seq"] = aux["bev_feat_seq"] * 1000.0
    out = kd_losses(a, aux, t, torch.ones(B, dtype=torch.bool), normalize, ALL)
    assert abs(out["kd_bev_feat"].item()) < 1e-5
    aux["bev_feat_seq"] = torch.zeros_like(aux["bev_feat_seq"])
    out = kd_losses(a, aux, t, torch.ones(B, dtype=torch.bool), normalize, ALL)
    assert abs(out["kd_bev_feat"].item() - 1.0) < 1e-3


def test_depth_term_is_the_cross_entropy_of_the_kd_samples():
    from e2r.depth import NO_DEPTH, depth_cross_entropy
    g = torch.Generator().manual_seed(3)
    n_cam, bins, h, w = 2, 5, 3, 4
    probs = torch.randn(B, T, n_cam, bins, h, w, generator=g).softmax(3).requires_grad_()
    target = torch.randint(0, bins, (B, T, n_cam, h, w), generator=g).to(torch.uint8)
    target[0, 0, 0, 0] = NO_DEPTH                                   # some pixels without a LiDAR point
    t, s = _teacher(), _student_equal(_teacher())
    t["depth"], s[1]["depth_seq"] = target, probs
    has_kd = torch.tensor([True, False, True])
    target[1] = 200                                                 # a non-KD sample's row: garbage, ignored
    out = kd_losses(s[0], s[1], t, has_kd, normalize, KDWeights(action=0, bev_vec=0, temporal=0, depth=2.0))
    per = depth_cross_entropy(probs.flatten(1, 2), target.flatten(1, 2))
    assert torch.allclose(out["kd_depth"], per[[0, 2]].mean()) and torch.allclose(out["kd_total"], 2 * per[[0, 2]].mean())
    out["kd_total"].backward()
    assert probs.grad[0].abs().sum() > 0 and probs.grad[1].abs().sum() == 0
    assert float(kd_losses(s[0], s[1], t, has_kd, normalize, ALL)["kd_depth"]) == 0.0      # weight 0: not computed
    with pytest.raises(ValueError, match="Lift-Splat"):
        kd_losses(s[0], {k: v for k, v in s[1].items() if k != "depth_seq"}, t, has_kd, normalize,
                  KDWeights(depth=1.0))
    with pytest.raises(ValueError, match="'depth'"):
        kd_losses(s[0], s[1], {k: v for k, v in t.items() if k != "depth"}, has_kd, normalize, KDWeights(depth=1.0))


def test_mirrored_depth_targets_are_the_targets_of_the_mirrored_rig():
    """hflip_batch flips the depth targets along the feature map's width: the same LiDAR scene mirrored
    (y -> -y), seen by the mirrored rig hflip_sample makes, gives exactly those targets."""
    import math
    from e2r.data.calib import scale_intrinsics
    from e2r.depth import lidar_depth_bins
    from e2r.kd import hflip_sample
    from e2r.models.config import TeacherConfig
    grid = TeacherConfig.preset_named("tiny").bev_grid
    Wi, Hi, w, h = 64, 32, 16, 8
    K = torch.tensor([[40.0, 0.0, 30.0], [0.0, 40.0, 15.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    yaw = math.radians(15.0)
    Tc = torch.eye(4, dtype=torch.float64)
    base = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    Rz = torch.tensor([[math.cos(yaw), -math.sin(yaw), 0.0], [math.sin(yaw), math.cos(yaw), 0.0], [0, 0, 1.0]],
                      dtype=torch.float64)
    Tc[:3, :3], Tc[:3, 3] = Rz @ base, torch.tensor([0.5, 1.3, 1.2], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    pts = torch.stack([torch.rand(3000, generator=g, dtype=torch.float64) * 40 + 3,
                       torch.rand(3000, generator=g, dtype=torch.float64) * 30 - 15,
                       torch.rand(3000, generator=g, dtype=torch.float64) * 2.5 - 1], 1)
    bins = (2.0, 40.0, 2.0)
    target = lidar_depth_bins(pts, scale_intrinsics(K, w / Wi, h / Hi)[None], Tc[None], (h, w), bins)
    _, fK, fT, *_ = hflip_sample(torch.rand(1, 3, Hi, Wi), K[None], Tc[None], torch.zeros(1), torch.zeros(1, 2), grid)
    mirrored = pts * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    flipped = lidar_depth_bins(mirrored, scale_intrinsics(fK, w / Wi, h / Hi), fT, (h, w), bins)
    assert int((target != 255).sum()) > 30 and torch.equal(flipped, target.flip(-1))


def test_a_liftsplat_student_returns_its_depth_distribution():
    from e2r.models.student import CameraBEVStudent
    from e2r.models.student_config import StudentConfig
    from e2r.models.config import TeacherConfig
    cfg = StudentConfig.from_teacher(TeacherConfig.preset_named("tiny"), "tiny", image_size=(32, 16))
    model = CameraBEVStudent(cfg).eval()
    images = torch.rand(2, 3, 1, 3, 16, 32)
    K = torch.tensor([[16.0, 0, 15.5], [0, 16.0, 7.5], [0, 0, 1]]).expand(2, 1, 3, 3)
    Tc = torch.tensor([[0.0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 1.5], [0, 0, 0, 1]]).expand(2, 1, 4, 4)
    actions, aux = model(images, K, Tc, torch.zeros(2, 3), torch.zeros(2, 3), return_aux=True)
    depth = aux["depth_seq"]
    assert depth.shape[:4] == (2, 3, 1, model.view_transform.n_depth)
    torch.testing.assert_close(depth.sum(3), torch.ones(2, 3, 1, *depth.shape[4:]))
    torch.testing.assert_close(model(images, K, Tc, torch.zeros(2, 3), torch.zeros(2, 3)), actions)
