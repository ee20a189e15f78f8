"""Teacher shapes (tiny and full), split encode/temporal API, normalisation, overfitting, checkpoint safety."""
from __future__ import annotations

import pickle

import pytest
import torch

from e2r.checkpoints import CheckpointError, file_sha256, load_checkpoint, load_init_weights, save_checkpoint
from e2r.models.config import TeacherConfig
from e2r.models.pointpillars import PillarFeatureNet, scatter_to_canvas
from e2r.models.teacher import LiDARBEVTeacher, load_teacher


def clouds(n_frames: int, n_points: int, cfg: TeacherConfig, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = cfg.point_cloud_range
    lo, span = torch.tensor(r[:3]), torch.tensor(r[3:]) - torch.tensor(r[:3])
    return [torch.cat([torch.rand(n_points, 3, generator=g) * span * 1.1 + lo - 0.05 * span,
                       torch.rand(n_points, 1, generator=g)], dim=1) for _ in range(n_frames)]


def test_tiny_shapes_and_split_api_agree_with_forward():
    cfg = TeacherConfig.preset_named("tiny")
    torch.manual_seed(0)
    model = LiDARBEVTeacher(cfg).eval()
    model.set_action_stats(torch.tensor([2.0, 10.0]), torch.tensor([5.0, 3.0]))
    B, T = 2, 3
    pts = clouds(B * T, 500, cfg)
    pts[4] = torch.zeros((0, 4))                       # an empty frame is fine
    speed, steer = torch.rand(B, T) * 20, torch.randn(B, T) * 5
    with torch.no_grad():
        actions, aux = model(pts, speed, steer, return_aux=True)
        C, H, W = cfg.bev_feat_shape
        assert actions.shape == (B, T, 2)
        assert aux["bev_vec_seq"].shape == (B, T, cfg.bev_dim)
        assert aux["bev_feat_seq"].shape == (B, T, C, H, W) == (B, T, 48, 32, 32)
        assert aux["gru_out"].shape == (B, T, cfg.gru_hidden)
        bev_vec, bev_feat = model.encode_frames(pts)
        torch.testing.assert_close(bev_vec.view(B, T, -1), aux["bev_vec_seq"])
        a2, g2 = model.temporal(bev_vec.view(B, T, -1), speed, steer)
        torch.testing.assert_close(a2, actions)
        # frame-by-frame encoding gives the same features as one batched call (no cross-frame leakage)
        v0, f0 = model.encode_frames(pts[1:2])
        torch.testing.assert_close(v0[0], bev_vec[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(f0[0], bev_feat[1], rtol=1e-4, atol=1e-5)
        # temporal step by step with the carried hidden state equals the full sequence
        h, outs = None, []
        for t in range(T):
            a_t, g_t = model.temporal(bev_vec.view(B, T, -1)[:, t:t + 1], speed[:, t:t + 1], steer[:, t:t + 1],
                                      None if h is None else h, None if t == 0 else steer[:, t - 1])
            h = g_t[:, -1].unsqueeze(0).contiguous()
            outs.append(a_t)
        torch.testing.assert_close(torch.cat(outs, 1), actions, rtol=1e-4, atol=1e-5)
    # outputs are de-normalised: (raw head output + the normalised [steering, speed] inputs) * std + mean
    inputs_norm = model.normalize_actions(torch.stack([steer, speed], dim=-1))
    raw = model.head(aux["gru_out"]) + inputs_norm
    torch.testing.assert_close(raw * model.action_std + model.action_mean, actions)
    torch.testing.assert_close(model.normalize_actions(actions), raw)


def test_full_preset_shapes_on_one_small_batch():
    cfg = TeacherConfig.preset_named("full")
    model = LiDARBEVTeacher(cfg).eval()
    with torch.no_grad():
        actions, aux = model(clouds(1, 2000, cfg), torch.ones(1, 1), torch.zeros(1, 1), return_aux=True)
    assert cfg.grid_size == (432, 496)
    assert aux["bev_feat_seq"].shape == (1, 1, 384, 248, 216)
    assert aux["bev_vec_seq"].shape == (1, 1, 256) and aux["gru_out"].shape == (1, 1, 640)
    assert actions.shape == (1, 1, 2)
    assert model.gru.input_size == 320 and model.head[0].in_features == 640 and model.head[0].out_features == 320


def test_scatter_places_each_pillar_in_its_cell():
    feats = torch.arange(6.0).view(3, 2)
    coords = torch.tensor([[0, 0, 1, 2], [1, 0, 0, 0], [1, 0, 3, 4]])
    canvas = scatter_to_canvas(feats, coords, num_frames=2, nx=5, ny=4)
    assert canvas.shape == (2, 2, 4, 5)
    assert canvas[0, :, 1, 2].tolist() == [0.0, 1.0]
    assert canvas[1, :, 0, 0].tolist() == [2.0, 3.0] and canvas[1, :, 3, 4].tolist() == [4.0, 5.0]
    assert float(canvas.abs().sum()) == float(feats.sum())


def test_pillar_net_equals_the_masked_max_in_values_and_gradients():
    """The pillar max taken over zeroed empty slots (``amax`` on (M, P, C)) = the textbook max with empty slots
    at -inf: the same pillar vectors and the same parameter gradients, in training and in eval mode."""
    cfg = TeacherConfig.preset_named("tiny")
    model = LiDARBEVTeacher(cfg).encoder
    vox = model.voxelize(clouds(3, 900, cfg))
    assert (vox.counts < cfg.max_points_per_pillar).any()        # some slots are empty
    torch.manual_seed(0)
    net = PillarFeatureNet(4, 16, cfg.voxel_size, cfg.point_cloud_range)

    def plain(m: PillarFeatureNet) -> torch.Tensor:
        P, M, _ = vox.pillars.shape
        mask = (torch.arange(M)[None, :] < vox.counts[:, None]).unsqueeze(-1)
        xyz = vox.pillars[..., :3]
        mean = (xyz * mask).sum(1, keepdim=True) / vox.counts.clamp(min=1).view(P, 1, 1).float()
        centre = vox.coords[:, [3, 2]].float() * m.voxel_xy + m.offset_xy
        feats = torch.cat([vox.pillars, xyz - mean, xyz[..., :2] - centre[:, None, :]], dim=-1) * mask
        x = torch.relu(m.norm(m.linear(feats).reshape(P * M, -1)).reshape(P, M, -1))
        return x.masked_fill(~mask, float("-inf")).max(dim=1).values

    for train in (True, False):
        mine, ref = pickle.loads(pickle.dumps(net)).train(train), pickle.loads(pickle.dumps(net)).train(train)
        a, b = mine(vox.pillars, vox.counts, vox.coords), plain(ref)
        assert torch.equal(a, b)
        weights = torch.linspace(-1.0, 1.0, a.numel()).view_as(a)
        (a * weights).sum().backward()
        (b * weights).sum().backward()
        for p, q in zip(mine.parameters(), ref.parameters()):
            assert torch.equal(p.grad, q.grad)


def test_wrong_point_columns_are_refused():
    model = LiDARBEVTeacher(TeacherConfig.preset_named("tiny"))
    with pytest.raises(ValueError, match=r"point cloud 1 .*\(N, 4\)"):
        model.encode_frames([torch.zeros(3, 4), torch.zeros(3, 5)])


def test_tiny_teacher_overfits_a_handful_of_windows():
    cfg = TeacherConfig.preset_named("tiny")
    torch.manual_seed(0)
    model = LiDARBEVTeacher(cfg)
    B, T = 4, 3
    pts = clouds(B * T, 300, cfg, seed=1)
    # targets depend on the cloud (mean lateral position) so the BEV path must be used
    lateral = torch.stack([p[:, 1].mean() for p in pts]).view(B, T)
    actions = torch.stack([lateral * 10.0, 8.0 + lateral], dim=-1)
    speed, steer = actions[..., 1], torch.zeros(B, T)
    model.set_action_stats(actions.reshape(-1, 2).mean(0), actions.reshape(-1, 2).std(0))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    first = None
    for _ in range(150):
        loss = ((model.normalize_actions(model(pts, speed, steer)) - model.normalize_actions(actions)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    last = float(loss.detach())
    assert last < 0.02 * first and last < 0.02


class Payload:
    """An arbitrary Python object: weights-only loading must refuse to unpickle it."""


def _saved_teacher(tmp_path, cfg, seed=0):
    torch.manual_seed(seed)
    model = LiDARBEVTeacher(cfg)
    path = save_checkpoint(tmp_path / f"t{seed}.pt", {"model": model.state_dict(), "config": cfg.to_dict()},
                           kind="teacher")
    return model, path


def test_checkpoint_roundtrip_carries_config(tmp_path):
    cfg = TeacherConfig.preset_named("tiny")
    model, path = _saved_teacher(tmp_path, cfg)
    model.set_action_stats(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict()}, kind="teacher")
    loaded, ckpt = load_teacher(path)
    assert loaded.cfg == cfg and not loaded.training
    assert ckpt["kind"] == "teacher" and ckpt["config"]["preset"] == "tiny"
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert len(file_sha256(path)) == 64 and file_sha256(path) == file_sha256(path)


def test_malformed_and_pickled_checkpoints_are_refused(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt is malformed"):
        load_checkpoint(garbage)

    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "e2r-checkpoint", "model": {}, "config": {}, "obj": Payload()}, pickled,
               pickle_module=pickle)
    with pytest.raises(CheckpointError, match="pickled.pt contains pickled Python objects"):
        load_checkpoint(pickled)

    no_config = tmp_path / "noconfig.pt"
    torch.save({"format": "e2r-checkpoint", "model": {}}, no_config)
    with pytest.raises(CheckpointError, match="noconfig.pt lacks"):
        load_checkpoint(no_config)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_init_with_and_without_head(tmp_path):
    cfg = TeacherConfig.preset_named("tiny")
    src, path = _saved_teacher(tmp_path, cfg, seed=1)
    torch.manual_seed(2)
    dst = LiDARBEVTeacher(cfg)
    head_before = dst.head[2].weight.detach().clone()
    report = load_init_weights(dst, path, skip_output_layer=True, output_layer_prefix=dst.output_layer_prefix)
    assert torch.equal(dst.head[2].weight, head_before)
    assert torch.equal(dst.gru.weight_hh_l0, src.gru.weight_hh_l0)
    assert "head.2.weight" in report["skipped"] and "encoder.to_vec.weight" in report["loaded"]

    dst2 = LiDARBEVTeacher(cfg)
    load_init_weights(dst2, path, skip_output_layer=False, output_layer_prefix=dst2.output_layer_prefix)
    assert torch.equal(dst2.head[2].weight, src.head[2].weight)

    # a head of another shape: refused without the flag (with a hint), accepted with it
    other = LiDARBEVTeacher(TeacherConfig.preset_named("tiny"))
    other.head[2] = torch.nn.Linear(cfg.head_hidden, 3)
    p3 = save_checkpoint(tmp_path / "head3.pt", {"model": other.state_dict(), "config": cfg.to_dict()}, "teacher")
    dst3 = LiDARBEVTeacher(cfg)
    with pytest.raises(CheckpointError, match="init_skip_output_layer"):
        load_init_weights(dst3, p3, skip_output_layer=False, output_layer_prefix=dst3.output_layer_prefix)
    load_init_weights(dst3, p3, skip_output_layer=True, output_layer_prefix=dst3.output_layer_prefix)
    assert torch.equal(dst3.gru.weight_ih_l0, other.gru.weight_ih_l0)


def test_residual_policy_starts_at_repeating_its_inputs():
    """With residual_actions the untrained policy outputs exactly [previous steering, current speed]."""
    cfg = TeacherConfig.preset_named("tiny")
    model = LiDARBEVTeacher(cfg).eval()
    model.set_action_stats(torch.tensor([1.5, 12.0]), torch.tensor([4.0, 3.0]))
    B, T = 2, 3
    speed, steer = torch.rand(B, T) * 20, torch.randn(B, T) * 5
    with torch.no_grad():
        actions, _ = model.temporal(torch.randn(B, T, cfg.bev_dim), speed, steer)
    torch.testing.assert_close(actions, torch.stack([steer, speed], dim=-1))
    plain = LiDARBEVTeacher(TeacherConfig.preset_named("tiny")).eval()
    plain.residual_actions = False
    with torch.no_grad():
        assert not torch.allclose(plain.temporal(torch.randn(B, T, cfg.bev_dim), speed, steer)[0],
                                  torch.stack([steer, speed], dim=-1))
