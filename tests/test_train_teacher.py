"""Teacher training and evaluation pipelines on a tiny on-disk dataset: checkpoints, resume, init, eval."""
from __future__ import annotations

import csv
import math

import pytest
import torch

from e2r.checkpoints import load_checkpoint
from e2r.data.datasets import LidarSequenceDataset, collate_lidar as collate_lidar_items
from e2r.errors import ConfigError
from e2r.metrics import ActionErrorAccumulator, parse_overall_weights
from e2r.runtime import capture_rng_state, restore_rng_state
from e2r.workflow.train import train_teacher as run_train_teacher
from e2r.workflow.trainer import ActionNormalizer
from pipelines import eval_teacher, train_teacher
from tests.fixtures import write_tiny_dataset


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lidar")
    return write_tiny_dataset(root, splits={"train": 2, "valid": 1, "test": 1}, frames=8, camera=False,
                              points_per_frame=(100, 200))


def _args(root, tmp, *extra):
    return ["--data_root", str(root), "--preset", "tiny", "--batch_size", "4", "--seq_len", "3", "--stride", "2",
            "--device", "cpu", "--no_progress", "--lr", "3e-3", *extra]


def _train(root, tmp, *extra):
    return run_train_teacher(train_teacher.parse_config(_args(root, tmp, *extra)))


def test_train_saves_best_and_last_with_stats_and_config(data_root, tmp_path):
    best, last = tmp_path / "best.pt", tmp_path / "last.pt"
    rc = train_teacher.main(_args(data_root, tmp_path, "--epochs", "2", "--save_path", str(best),
                                  "--checkpoint_path", str(last), "--tensorboard_dir", str(tmp_path / "tb")))
    assert rc == 0
    ckpt = load_checkpoint(last, kind="teacher")
    assert ckpt["epoch"] == 1 and len(ckpt["history"]) == 2 and ckpt["config"]["preset"] == "tiny"
    assert ckpt["best_metric"] == min(h["valid_loss"] for h in ckpt["history"])
    stats = ActionNormalizer.from_dataset(LidarSequenceDataset(data_root, "train", 3, 2))
    torch.testing.assert_close(ckpt["model"]["action_mean"], stats.mean)
    torch.testing.assert_close(ckpt["model"]["action_std"], stats.std)
    assert load_checkpoint(best)["epoch"] in (0, 1)
    assert any((tmp_path / "tb").iterdir())


def test_resume_reproduces_the_uninterrupted_trajectory(data_root, tmp_path):
    full = _train(data_root, tmp_path, "--epochs", "3", "--save_path", str(tmp_path / "a_best.pt"),
                  "--checkpoint_path", str(tmp_path / "a_last.pt"))
    first = _train(data_root, tmp_path, "--epochs", "3", "--save_path", str(tmp_path / "b_best.pt"),
                   "--checkpoint_path", str(tmp_path / "b_last.pt"))
    assert [h["train_loss"] for h in first["history"]] == [h["train_loss"] for h in full["history"]]
    # interrupted after epoch 1 (same 3-epoch schedule), then resumed from its last-state checkpoint
    part = _train(data_root, tmp_path, "--epochs", "3", "--save_path", str(tmp_path / "c_best.pt"),
                  "--checkpoint_path", str(tmp_path / "c_last.pt"), "--stop_after_epoch", "1")
    assert len(part["history"]) == 1
    resumed = _train(data_root, tmp_path, "--epochs", "3", "--save_path", str(tmp_path / "c_best.pt"),
                     "--checkpoint_path", str(tmp_path / "c_last.pt"), "--resume_path", str(tmp_path / "c_last.pt"))
    got = [(h["train_loss"], h["valid_loss"]) for h in resumed["history"]]
    want = [(h["train_loss"], h["valid_loss"]) for h in full["history"]]
    assert len(got) == 3
    for (gt, gv), (wt, wv) in zip(got, want):
        assert math.isclose(gt, wt, rel_tol=1e-6) and math.isclose(gv, wv, rel_tol=1e-6)
    a, c = load_checkpoint(tmp_path / "a_last.pt"), load_checkpoint(tmp_path / "c_last.pt")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], c["model"][k], rtol=1e-5, atol=1e-6)


def test_init_with_and_without_head_and_bad_checkpoints(data_root, tmp_path):
    src = tmp_path / "src.pt"
    _train(data_root, tmp_path, "--epochs", "1", "--save_path", str(src))
    out = _train(data_root, tmp_path, "--epochs", "1", "--save_path", str(tmp_path / "d.pt"),
                 "--init_path", str(src), "--init_skip_output_layer", "--valid_split", "")
    assert len(out["history"]) == 1 and math.isnan(out["history"][0]["valid_loss"])
    _train(data_root, tmp_path, "--epochs", "1", "--save_path", str(tmp_path / "e.pt"), "--init_path", str(src))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage")
    assert train_teacher.main(_args(data_root, tmp_path, "--epochs", "1", "--init_path", str(bad),
                                    "--save_path", str(tmp_path / "f.pt"))) == 1
    assert eval_teacher.main(["--data_root", str(data_root), "--teacher_ckpt", str(bad), "--device", "cpu"]) == 1


def test_eval_reports_metrics_baselines_csv_and_plot(data_root, tmp_path, capsys):
    ckpt = tmp_path / "t.pt"
    _train(data_root, tmp_path, "--epochs", "1", "--save_path", str(ckpt))
    csv_path, png = tmp_path / "m.csv", tmp_path / "p.png"
    rc = eval_teacher.main(["--data_root", str(data_root), "--split", "valid", "--teacher_ckpt", str(ckpt),
                            "--seq_len", "3", "--device", "cpu", "--csv_path", str(csv_path),
                            "--plot_path", str(png), "--no_progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "teacher" in printed and "baseline_train_mean" in printed and "baseline_prev_steering" in printed
    rows = list(csv.DictReader(open(csv_path)))
    assert {r["predictor"] for r in rows} == {"teacher", "baseline_train_mean", "baseline_prev_steering"}
    for r in rows:
        assert math.isclose(float(r["overall_weighted_mse"]),
                            float(r["steering_mse"]) + 0.05 * float(r["speed_mse"]), rel_tol=1e-9)
        assert math.isclose(float(r["steering_rmse"]) ** 2, float(r["steering_mse"]), rel_tol=1e-9)
    prev = next(r for r in rows if r["predictor"] == "baseline_prev_steering")
    # keep-the-speed baseline: its speed error is that of the measured speed against the commanded one
    ds = LidarSequenceDataset(data_root, "valid", 3, 1)
    want = float(torch.stack([(ds[i]["speed"] - ds[i]["actions"][:, 1]) ** 2 for i in range(len(ds))]).double().mean())
    assert want > 0 and math.isclose(float(prev["speed_mse"]), want, rel_tol=1e-5)
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_metrics_by_hand_and_rng_roundtrip():
    acc = ActionErrorAccumulator(parse_overall_weights("1.0,0.5"))
    acc.update(torch.tensor([[1.0, 2.0], [3.0, 2.0]]), torch.tensor([[0.0, 2.0], [0.0, 0.0]]))
    m = acc.compute()
    assert m["steering_mse"] == 5.0 and m["steering_mae"] == 2.0 and m["speed_mse"] == 2.0
    assert m["overall_weighted_mse"] == 6.0
    with pytest.raises(ValueError, match="overall_weights"):
        parse_overall_weights("1.0;x")
    state = capture_rng_state()
    a = torch.rand(3)
    restore_rng_state(state)
    assert torch.equal(a, torch.rand(3))


def test_steering_input_dropout_hides_whole_windows():
    """Past-command dropout: p=0 leaves the input alone, p=1 hides it, otherwise whole windows are zeroed."""
    from e2r.workflow.train import drop_steering_input

    steering = torch.arange(1, 41, dtype=torch.float32).view(20, 2)
    assert torch.equal(drop_steering_input(steering, 0.0), steering)
    assert not drop_steering_input(steering, 1.0).any()
    torch.manual_seed(0)
    out = drop_steering_input(steering, 0.5)
    hidden = (out == 0).all(dim=1)
    assert 0 < int(hidden.sum()) < 20 and torch.equal(out[~hidden], steering[~hidden])


def test_same_seed_same_weights_in_fresh_processes(data_root, tmp_path):
    """The seed determines the result on a given machine and thread count: two fresh processes (their own
    interpreter, allocator and thread pool) train bit-identical weights; another seed does not."""
    import subprocess
    import sys

    flags = ("--epochs", "1", "--num_workers", "1")

    def run(name):
        path = tmp_path / f"{name}.pt"
        subprocess.run([sys.executable, "-m", "pipelines.train_teacher", *_args(data_root, tmp_path, *flags,
                        "--save_path", str(path))], check=True, capture_output=True)
        return load_checkpoint(path)["model"]

    a, b = run("a"), run("b")
    _train(data_root, tmp_path, *flags, "--seed", "1", "--save_path", str(tmp_path / "c.pt"))
    c = load_checkpoint(tmp_path / "c.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_sigkill_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(data_root, tmp_path):
    """A run killed mid-epoch (SIGKILL, no clean-up) and resumed from its --checkpoint_path sees the rest of
    that epoch in the same order and ends with exactly the weights and history of an uninterrupted run."""
    flags = ("--epochs", "2", "--batch_size", "1", "--checkpoint_every_steps", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # bit-identity needs equal threads: one everywhere (this process, the child)
    try:
        _sigkill_and_resume(data_root, tmp_path, flags)
    finally:
        torch.set_num_threads(threads)


def _sigkill_and_resume(data_root, tmp_path, flags):
    import os
    import signal
    import subprocess
    import sys
    import time

    full = _train(data_root, tmp_path, *flags, "--checkpoint_path", str(tmp_path / "full.pt"),
                  "--save_path", str(tmp_path / "full_best.pt"))
    last = tmp_path / "killed.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.train_teacher", *_args(data_root, tmp_path, *flags,
                             "--checkpoint_path", str(last), "--save_path", str(tmp_path / "k_best.pt"))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    position = None
    try:
        deadline = time.time() + 120
        while position is None and proc.poll() is None and time.time() < deadline:
            if last.is_file():
                proc.send_signal(signal.SIGSTOP)     # frozen: the file read is the one the kill leaves
                position = load_checkpoint(last).get("position")
                if position is not None and position["batches"] < 2:
                    position = None                  # wait for a state a few batches into an epoch
                if position is None:
                    proc.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert position is not None, "the run ended before a mid-epoch checkpoint was seen"
    killed = load_checkpoint(last)
    assert killed["position"]["batches"] >= 2 and killed["epoch"] == killed["position"]["epoch"] - 1
    resumed = _train(data_root, tmp_path, *flags, "--checkpoint_path", str(last), "--resume_path", str(last),
                     "--save_path", str(tmp_path / "k_best.pt"))
    a, b = load_checkpoint(tmp_path / "full.pt"), load_checkpoint(last)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in full["history"]]
    assert "position" not in b


def test_residual_actions_steering_predicts_the_speed_command_outright(data_root, tmp_path):
    from e2r.models.policy import residual_mask
    from e2r.models.teacher import load_teacher

    _train(data_root, tmp_path, "--epochs", "1", "--residual_actions", "steering", "--save_path", str(tmp_path / "r.pt"))
    model, ckpt = load_teacher(tmp_path / "r.pt")
    assert ckpt["config"]["residual_actions"] == "steering" and model.residual == (1.0, 0.0)
    assert residual_mask(True) == (1.0, 1.0) and residual_mask(False) == residual_mask("none") == (0.0, 0.0)
    with pytest.raises(ValueError, match="residual_actions"):
        residual_mask("speed")
    _train(data_root, tmp_path, "--epochs", "1", "--residual_actions", "scene", "--save_path", str(tmp_path / "s.pt"))
    blind, _ = load_teacher(tmp_path / "s.pt")
    ds0 = LidarSequenceDataset(data_root, "valid", 3, 2)
    b0 = collate_lidar_items([ds0[0]])
    with torch.no_grad():       # "scene": the previous-steering input changes nothing
        assert torch.equal(blind(b0["points"], b0["speed"], b0["steering"]),
                           blind(b0["points"], b0["speed"], b0["steering"] + 9.0))
    # the speed command does not move with the speed input one-for-one any more (it does with "all" at init)
    ds = LidarSequenceDataset(data_root, "valid", 3, 2)
    b = collate_lidar_items([ds[0]])
    with torch.no_grad():
        a = model(b["points"], b["speed"], b["steering"])[..., 1]
        c = model(b["points"], b["speed"] + 5.0, b["steering"])[..., 1]
    assert not torch.allclose(c - a, torch.full_like(a, 5.0), atol=0.5)


def test_scene_only_head_reads_neither_the_previous_steering_nor_the_measured_speed(data_root, tmp_path):
    """``--residual_actions scene_only``: both commands come from the frames; changing the speed or the steering
    input changes nothing, where the ``scene`` head's speed command does move with the speed input. A student
    made for this teacher gets the same head."""
    from e2r.models.student import CameraBEVStudent
    from e2r.models.student_config import StudentConfig
    from e2r.models.teacher import TeacherConfig, load_teacher

    _train(data_root, tmp_path, "--epochs", "1", "--residual_actions", "scene_only", "--save_path", str(tmp_path / "o.pt"))
    model, ckpt = load_teacher(tmp_path / "o.pt")
    assert ckpt["config"]["residual_actions"] == "scene_only" and not model.uses_speed_input
    b = collate_lidar_items([LidarSequenceDataset(data_root, "valid", 3, 2)[0]])
    with torch.no_grad():
        a = model(b["points"], b["speed"], b["steering"])
        assert torch.equal(a, model(b["points"], b["speed"] + 5.0, b["steering"] - 9.0))
    _train(data_root, tmp_path, "--epochs", "1", "--residual_actions", "scene", "--save_path", str(tmp_path / "s.pt"))
    scene, _ = load_teacher(tmp_path / "s.pt")
    assert scene.uses_speed_input
    with torch.no_grad():
        assert not torch.equal(scene(b["points"], b["speed"], b["steering"])[..., 1],
                               scene(b["points"], b["speed"] + 5.0, b["steering"])[..., 1])
    student = CameraBEVStudent(StudentConfig.from_teacher(TeacherConfig.from_dict(ckpt["config"]), preset="tiny"))
    assert not student.uses_speed_input and not student.uses_steering_input


def test_head_flags_are_honoured_or_refused_with_init_and_resume_never_dropped(data_root, tmp_path):
    """--init_path: the checkpoint's head unless --residual_actions names another (the weights fit every head);
    --bev_pool_grid sizes the GRU's input, so one that differs from the checkpoint's is refused, as is any head
    change on --resume_path."""
    from e2r.models.teacher import load_teacher

    last = tmp_path / "last.pt"
    _train(data_root, tmp_path, "--epochs", "1", "--save_path", str(tmp_path / "s.pt"), "--checkpoint_path", str(last))
    assert load_teacher(tmp_path / "s.pt")[1]["config"]["residual_actions"] == "scene"          # DEFAULT_HEAD
    _train(data_root, tmp_path, "--steps", "2", "--init_path", str(tmp_path / "s.pt"), "--residual_actions",
           "scene_only", "--save_path", str(tmp_path / "o.pt"))
    model, ckpt = load_teacher(tmp_path / "o.pt")
    assert ckpt["config"]["residual_actions"] == "scene_only" and not model.uses_speed_input
    _train(data_root, tmp_path, "--steps", "2", "--init_path", str(tmp_path / "o.pt"), "--save_path", str(tmp_path / "k.pt"))
    assert load_teacher(tmp_path / "k.pt")[1]["config"]["residual_actions"] == "scene_only"     # kept
    with pytest.raises(ConfigError, match="--bev_pool_grid 2: --init_path"):
        _train(data_root, tmp_path, "--steps", "2", "--init_path", str(tmp_path / "s.pt"), "--bev_pool_grid", "2")
    with pytest.raises(ConfigError, match="--residual_actions all: --resume_path"):
        _train(data_root, tmp_path, "--epochs", "2", "--resume_path", str(last), "--residual_actions", "all")


def test_hflip_mirrors_chosen_windows_and_the_teacher_trains_on_them(data_root, tmp_path):
    """hflip_lidar: flipped windows get y and steering negated (speed kept), the others and the inputs are
    untouched, twice is the identity; the teacher's training step with --hflip_prob 1 is the loss of the
    mirrored batch."""
    from e2r.kd import hflip_lidar
    from e2r.models.config import TeacherConfig
    from e2r.models.teacher import LiDARBEVTeacher
    from e2r.workflow.train import TeacherTask

    ds = LidarSequenceDataset(data_root, "train", 3, 2)
    batch = collate_lidar_items([ds[0], ds[1]])
    flip = torch.tensor([True, False])
    before = [p.clone() for p in batch["points"]]
    pts, steer, act = hflip_lidar(batch["points"], batch["steering"], batch["actions"], flip, 3)
    assert all(torch.equal(p, q) for p, q in zip(batch["points"], before))
    for i, (p, q) in enumerate(zip(pts, before)):
        sign = -1.0 if i < 3 else 1.0
        assert torch.equal(p[:, 1], sign * q[:, 1]) and torch.equal(p[:, [0, 2, 3]], q[:, [0, 2, 3]])
    assert torch.equal(steer[0], -batch["steering"][0]) and torch.equal(steer[1], batch["steering"][1])
    assert torch.equal(act[0, :, 0], -batch["actions"][0, :, 0]) and torch.equal(act[:, :, 1], batch["actions"][:, :, 1])
    again = hflip_lidar(pts, steer, act, flip, 3)
    assert all(torch.equal(p, q) for p, q in zip(again[0], before)) and torch.equal(again[1], batch["steering"])
    with pytest.raises(ValueError, match="point clouds"):
        hflip_lidar(batch["points"][:-1], batch["steering"], batch["actions"], flip, 3)

    torch.manual_seed(0)
    model = LiDARBEVTeacher(TeacherConfig.preset_named("tiny")).eval()
    torch.nn.init.normal_(model.head[2].weight)   # the residual head starts at zero: a mirror-symmetric output
    cfg = train_teacher.parse_config(_args(data_root, tmp_path, "--hflip_prob", "1", "--steer_input_dropout", "0"))
    task = TeacherTask(model, model, cfg, torch.device("cpu"))
    all_flipped = torch.ones(2, dtype=torch.bool)
    pts, steer, act = hflip_lidar(batch["points"], batch["steering"], batch["actions"], all_flipped, 3)
    with torch.no_grad():
        mirrored = task._loss({**batch, "points": pts, "steering": steer, "actions": act}, 0.0)[0]
        plain = task._loss(batch, 0.0)[0]
        trained = task.train_step(batch)[0]
    assert torch.allclose(trained, mirrored) and not torch.allclose(trained, plain)


def test_bev_pool_grid_keeps_where_a_feature_is_and_reaches_the_checkpoint(data_root, tmp_path):
    """``--bev_pool_grid k``: bev_vec reads a k x k average pool, so two BEV maps with the same global mean but a
    car-sized blob at different places give different bev_vec (k = 1, the default, cannot tell them apart);
    older checkpoints without the field load as k = 1."""
    from e2r.models.config import TeacherConfig
    from e2r.models.policy import grid_pool
    from e2r.models.teacher import load_teacher

    near, far = torch.zeros(1, 2, 32, 32), torch.zeros(1, 2, 32, 32)
    near[0, 0, 15:17, 2:4], far[0, 0, 15:17, 28:30] = 1.0, 1.0       # a blob 2 m vs 22 m ahead
    assert torch.equal(grid_pool(near, 1), grid_pool(far, 1))
    assert not torch.equal(grid_pool(near, 4), grid_pool(far, 4)) and grid_pool(near, 4).shape == (1, 2 * 16)
    torch.testing.assert_close(grid_pool(near, 4).view(1, 2, 16).mean(-1), grid_pool(near, 1))
    _train(data_root, tmp_path, "--epochs", "1", "--bev_pool_grid", "4", "--save_path", str(tmp_path / "g.pt"))
    model, ckpt = load_teacher(tmp_path / "g.pt")
    assert ckpt["config"]["bev_pool_grid"] == 4 and model.encoder.to_vec.in_features == 16 * model.cfg.bev_channels
    old = {k: v for k, v in TeacherConfig.preset_named("tiny").to_dict().items() if k != "bev_pool_grid"}
    assert TeacherConfig.from_dict(old).bev_pool_grid == 1
    with pytest.raises(ConfigError, match="bev_pool_grid 0"):
        _train(data_root, tmp_path, "--epochs", "1", "--bev_pool_grid", "0", "--save_path", str(tmp_path / "x.pt"))


def test_brake_weight_weighs_each_frames_speed_loss_by_the_speed_it_sheds(data_root):
    """--brake_weight a: the speed column's squared errors become a mean weighted by 1 + a * max(0, measured
    speed - speed label) per frame; steering keeps its plain mean; a = 0 is the plain loss."""
    from e2r.losses import action_loss, braking_weights, weighted_action_mse
    from e2r.models.config import TeacherConfig
    from e2r.models.teacher import LiDARBEVTeacher
    from e2r.workflow.train import TeacherTask

    assert braking_weights(torch.tensor([10.0, 5.0]), torch.tensor([4.0, 6.0]), 0.5).tolist() == [4.0, 1.0]
    pred, target = torch.randn(2, 3, 2), torch.randn(2, 3, 2)
    ones = torch.ones(2, 3, 2)
    assert torch.allclose(weighted_action_mse(pred, target, [1.0, 0.5], ones),
                          weighted_action_mse(pred, target, [1.0, 0.5]))
    sw = torch.stack([ones[..., 0], torch.arange(1.0, 7.0).reshape(2, 3)], dim=-1)
    err = (pred - target) ** 2
    by_hand = err[..., 0].mean() + 0.5 * (err[..., 1] * sw[..., 1]).sum() / sw[..., 1].sum()
    assert torch.allclose(weighted_action_mse(pred, target, [1.0, 0.5], sw), by_hand)

    torch.manual_seed(0)
    model = LiDARBEVTeacher(TeacherConfig.preset_named("tiny")).eval()
    batch = collate_lidar_items([LidarSequenceDataset(data_root, "train", 3, 2)[i] for i in range(2)])
    batch["speed"] = batch["actions"][..., 1] + torch.tensor([[0.0, 2.0, 6.0], [0.0, -1.0, 0.0]])   # sheds 2, 6 m/s
    losses = {}
    for a in (0.0, 1.0):
        cfg = train_teacher.parse_config(["--data_root", str(data_root), "--brake_weight", str(a),
                                          "--speed_loss_weight", "1", "--steer_input_dropout", "0"])
        losses[a] = TeacherTask(model, model, cfg, torch.device("cpu")).valid_step(batch)[0]
    with torch.no_grad():
        pred = model([p for p in batch["points"]], batch["speed"], batch["steering"])
    norm_pred, norm_target = model.normalize_actions(pred), model.normalize_actions(batch["actions"])
    want = torch.tensor([[1.0, 3.0, 7.0], [1.0, 1.0, 1.0]])
    for a, speed_w in ((0.0, None), (1.0, want)):
        sample = None if speed_w is None else torch.stack([torch.ones_like(speed_w), speed_w], dim=-1)
        assert torch.allclose(losses[a], action_loss(norm_pred, norm_target, [1.0, 1.0], 0.0, sample), rtol=1e-5)
    assert not torch.allclose(losses[0.0], losses[1.0])
