"""Student training and evaluation pipelines end to end on a tiny dataset: tiny teacher checkpoint -> memorybank
of its outputs -> train_student with KD (counts of KD / BC-only samples, per-epoch valid losses, resume) ->
eval_student with the KD gap; mismatched stores refused through main()."""
from __future__ import annotations

import csv
import math

import pytest
import torch

from e2r.checkpoints import load_checkpoint
from e2r.models.student import load_student
from e2r.sim.world import generate_dataset
from e2r.workflow.trainer import ActionNormalizer, LRSchedule
from e2r.workflow.train import train_student as run_train_student
from pipelines import eval_student, train_student
from tests.kd_fixtures import SEQ, STRIDE, camera_ds, fake_rows, make_kd_world, write_bank
from tests.kd_fixtures import student_args as _args


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_kd_world(tmp_path_factory.mktemp("student"))


def _train(setup, tmp, *extra):
    return run_train_student(train_student.parse_config(_args(setup, tmp, *extra)))


def test_kd_training_end_to_end_then_eval_with_kd_gap(setup, tmp_path, capsys):
    best, last = tmp_path / "best.pt", tmp_path / "last.pt"
    rc = train_student.main(_args(setup, tmp_path, "--epochs", "2", "--memorybank", setup["bank"],
                                  "--kd_bevfeat_w", "0.5", "--save_path", str(best), "--checkpoint_path", str(last),
                                  "--tensorboard_dir", str(tmp_path / "tb")))
    assert rc == 0
    n_train = len(camera_ds(setup["root"]))
    ckpt = load_checkpoint(last, kind="student")
    assert ckpt["epoch"] == 1 and ckpt["config"]["preset"] == "tiny" and ckpt["config"]["view_transform"] == "lss"
    assert len(ckpt["valid_losses"]) == 2 and ckpt["valid_losses"] == [h["valid_loss"] for h in ckpt["history"]]
    assert ckpt["best_metric"] == min(ckpt["valid_losses"])
    for h in ckpt["history"]:
        assert h["kd_samples"] == n_train - 1 and h["bc_only_samples"] == 1        # one key left out
        assert h["train_kd_bev_feat"] > 0 and h["train_kd_bev_vec"] > 0 and h["train_bc"] > 0
    stats = ActionNormalizer.from_dataset(camera_ds(setup["root"]))
    torch.testing.assert_close(ckpt["model"]["action_mean"], stats.mean)
    assert any((tmp_path / "tb").iterdir())
    assert "samples kd 5 bc-only 1" in capsys.readouterr().out

    csv_path, png = tmp_path / "m.csv", tmp_path / "p.png"
    argv = ["--data_root", str(setup["root"]), "--split", "valid", "--student_ckpt", str(best),
            "--seq_len", str(SEQ), "--stride", str(STRIDE), "--device", "cpu", "--no_progress",
            "--memorybank", setup["bank"], "--csv_path", str(csv_path), "--plot_path", str(png)]
    assert eval_student.main(argv) == 0
    printed = capsys.readouterr().out
    assert "student" in printed and "baseline_prev_steering" in printed and "KD gap" in printed
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["predictor"] for r in rows] == ["student", "baseline_train_mean", "baseline_prev_steering"]
    gap = {k: float(v) for k, v in rows[0].items() if k.startswith("kd_")}
    assert gap["kd_n"] == len(camera_ds(setup["root"], "valid"))
    assert -1.0 <= gap["kd_bev_vec_cosine"] <= 1.0 and gap["kd_gru_out_mse"] > 0
    # the gap's action MSE equals the MSE between the student's predictions and the stored teacher actions
    model, _ = load_student(best)
    ds = camera_ds(setup["root"], "valid")
    with torch.no_grad():
        items = [ds[i] for i in range(len(ds))]
        pred = model(torch.stack([it["images"] for it in items]), torch.stack([it["intrinsics"] for it in items]),
                     torch.stack([it["cam2ego"] for it in items]), torch.stack([it["speed"] for it in items]),
                     torch.stack([it["steering"] for it in items]))
    teach = torch.stack([torch.from_numpy(setup["rows"][k]["actions"]) for k in ds.keys])
    assert math.isclose(gap["kd_steering_mse"], float(((pred - teach)[..., 0] ** 2).mean()), rel_tol=1e-4)
    assert rows[1]["kd_n"] == ""                                    # gap columns on the student row only
    for r in rows:
        assert math.isclose(float(r["overall_weighted_mse"]),
                            float(r["steering_mse"]) + 0.05 * float(r["speed_mse"]), rel_tol=1e-9)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_resume_reproduces_the_uninterrupted_trajectory(setup, tmp_path):
    kd = ("--memorybank", setup["bank"], "--hflip_prob", "0.5", "--photometric", "0.5", "--crop_zoom", "0.2",
          "--epochs", "2")
    full = _train(setup, tmp_path, *kd, "--save_path", str(tmp_path / "a.pt"), "--checkpoint_path",
                  str(tmp_path / "a_last.pt"))
    part = _train(setup, tmp_path, *kd, "--save_path", str(tmp_path / "c.pt"), "--checkpoint_path",
                  str(tmp_path / "c_last.pt"), "--stop_after_epoch", "1")
    assert len(part["history"]) == 1
    resumed = _train(setup, tmp_path, *kd, "--save_path", str(tmp_path / "c.pt"), "--checkpoint_path",
                     str(tmp_path / "c_last.pt"), "--resume_path", str(tmp_path / "c_last.pt"))
    assert len(resumed["valid_losses"]) == 2
    for got, want in zip(resumed["history"], full["history"]):
        for k in ("train_loss", "valid_loss", "train_kd_total"):
            assert math.isclose(got[k], want[k], rel_tol=1e-6), k
        assert got["flipped_samples"] == want["flipped_samples"]
    assert sum(h["flipped_samples"] for h in full["history"]) > 0
    a, c = load_checkpoint(tmp_path / "a_last.pt"), load_checkpoint(tmp_path / "c_last.pt")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], c["model"][k], rtol=1e-5, atol=1e-6)


def test_bc_only_identity_transform_init_and_refusals(setup, tmp_path, capsys):
    src = tmp_path / "bc.pt"
    out = _train(setup, tmp_path, "--epochs", "1", "--view_transform", "identity", "--save_path", str(src))
    h = out["history"][0]
    assert h["kd_samples"] == 0 and h["bc_only_samples"] == len(camera_ds(setup["root"]))
    assert load_checkpoint(src)["config"]["view_transform"] == "identity"
    one = _train(setup, tmp_path, "--epochs", "1", "--view_transform", "identity", "--train_segments",
                 "segment_0001", "--save_path", str(tmp_path / "one.pt"))
    assert one["history"][0]["bc_only_samples"] == len(camera_ds(setup["root"]).windows) // 2
    assert load_checkpoint(tmp_path / "one.pt")["train_args"]["train_segments"] == ["segment_0001"]
    assert train_student.main(_args(setup, tmp_path, "--epochs", "1", "--train_segments", "segment_0009",
                                    "--save_path", str(tmp_path / "z.pt"))) == 1
    assert "segment_0009" in capsys.readouterr().err
    out = _train(setup, tmp_path, "--epochs", "1", "--view_transform", "identity", "--init_path", str(src),
                 "--init_skip_output_layer", "--valid_split", "", "--save_path", str(tmp_path / "d.pt"))
    assert math.isnan(out["valid_losses"][0])
    keys = camera_ds(setup["root"]).keys
    for name, bank_kw, want in (("t4", dict(seq_len=4), "seq_len: store 4, dataset --seq_len 3"),
                                ("a3", dict(action_dim=3), "action size: store 3, dataset 2")):
        rows = fake_rows(keys, T=bank_kw.get("seq_len", SEQ), A=bank_kw.get("action_dim", 2))
        bank = write_bank(tmp_path / f"{name}.zarr", rows, **bank_kw)
        rc = train_student.main(_args(setup, tmp_path, "--epochs", "1", "--memorybank", bank,
                                      "--save_path", str(tmp_path / "x.pt")))
        assert rc == 1 and want in capsys.readouterr().err
        rc = eval_student.main(["--data_root", str(setup["root"]), "--student_ckpt", str(src), "--seq_len", "3",
                                "--device", "cpu", "--memorybank", bank, "--no_progress"])
        assert rc == 1 and want in capsys.readouterr().err
    # dense KD against a store without a recorded teacher config needs --teacher_ckpt
    bank = write_bank(tmp_path / "noconf.zarr", fake_rows(keys), model_config={})
    base = ("--epochs", "1", "--memorybank", bank, "--kd_bevfeat_w", "1", "--save_path", str(tmp_path / "y.pt"))
    assert train_student.main(_args(setup, tmp_path, *base)) == 1
    assert "--teacher_ckpt" in capsys.readouterr().err
    assert train_student.main(_args(setup, tmp_path, *base, "--teacher_ckpt", str(setup["ckpt"]),
                                    "--valid_split", "")) == 0
    assert not (tmp_path / "x.pt").exists()
    assert train_student.main(_args(setup, tmp_path, "--memorybank", str(tmp_path / "absent.zarr"))) == 1
    assert "absent.zarr: cannot open it read-only" in capsys.readouterr().err


def test_damaged_store_stops_training_unless_skip_damaged(setup, tmp_path, capsys):
    import shutil
    from pathlib import Path

    from e2r.workflow.configs import StudentEvalConfig
    from e2r.workflow.evaluate import evaluate_student

    bank = tmp_path / "damaged.zarr"
    shutil.copytree(setup["bank"], bank)
    shard = Path(bank) / "light" / "c" / "0" / "0" / "0"       # the first shard: the first train rows
    raw = bytearray(shard.read_bytes())
    raw[3] ^= 0x5A
    shard.write_bytes(bytes(raw))
    base = ("--epochs", "1", "--memorybank", str(bank), "--save_path", str(tmp_path / "s.pt"), "--valid_split", "")
    assert train_student.main(_args(setup, tmp_path, *base)) == 1
    err = capsys.readouterr().err
    assert "crc32c" in err and "--skip_damaged" in err and str(bank) in err
    out = _train(setup, tmp_path, *base, "--skip_damaged")
    h = out["history"][0]
    n = len(camera_ds(setup["root"]))
    assert 1 <= h["damaged_samples"] < n and h["kd_samples"] + h["bc_only_samples"] == n
    assert h["kd_samples"] == n - 1 - h["damaged_samples"]          # one key was never exported (setup)
    ev = evaluate_student(StudentEvalConfig(data_root=str(setup["root"]), split="train", seq_len=SEQ, stride=STRIDE,
                                            student_ckpt=str(tmp_path / "s.pt"), memorybank=str(bank),
                                            device="cpu", no_progress=True, skip_damaged=True))
    assert len(ev["damaged_keys"]) == h["damaged_samples"]
    assert ev["kd_gap"]["kd_n"] == n - 1 - h["damaged_samples"]


def test_steps_budget_with_warmup_and_resume_mid_run(setup, tmp_path):
    """--steps N trains exactly N optimizer steps (the last epoch cut short), the warm-up and the per-step
    cosine set each step's rate, and a run stopped after its first epoch resumes to the same weights."""
    n_train = len(camera_ds(setup["root"]))
    per_epoch = math.ceil(n_train / 4)
    steps = per_epoch + 1                         # one whole epoch and one step of the next
    common = ("--steps", str(steps), "--warmup_steps", "2", "--hflip_prob", "0.5")
    full = _train(setup, tmp_path, *common, "--save_path", str(tmp_path / "a.pt"),
                  "--checkpoint_path", str(tmp_path / "a_last.pt"))
    assert [h["steps"] for h in full["history"]] == [per_epoch, steps]
    state = load_checkpoint(tmp_path / "a_last.pt", kind="student")
    assert state["scheduler"]["steps_done"] == steps and state["scheduler"]["total_steps"] == steps
    assert full["history"][-1]["lr"] == pytest.approx(3e-3 * LRSchedule(2, 2, steps).factor(steps - 1, 1))
    _train(setup, tmp_path, *common, "--save_path", str(tmp_path / "c.pt"),
           "--checkpoint_path", str(tmp_path / "c_last.pt"), "--stop_after_epoch", "1")
    resumed = _train(setup, tmp_path, *common, "--save_path", str(tmp_path / "c.pt"),
                     "--checkpoint_path", str(tmp_path / "c_last.pt"), "--resume_path", str(tmp_path / "c_last.pt"))
    assert [h["steps"] for h in resumed["history"]] == [per_epoch, steps]
    a, c = load_checkpoint(tmp_path / "a_last.pt"), load_checkpoint(tmp_path / "c_last.pt")
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], c["model"][k], rtol=1e-5, atol=1e-6)
    assert train_student.main(_args(setup, tmp_path, "--steps", "3", "--epochs", "2")) != 0


def test_lr_schedule_warmup_then_cosine():
    per_epoch = LRSchedule(epochs=4)
    assert [per_epoch.factor(s, e) for s, e in ((0, 0), (7, 0))] == [1.0, 1.0]     # constant within an epoch
    assert per_epoch.factor(9, 2) == pytest.approx(0.05 + 0.95 * 0.5)               # half-way down at epoch 2/4
    warm = LRSchedule(epochs=1, warmup_steps=4, total_steps=100)
    cosine = [0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / 100)) for s in range(101)]
    assert [warm.factor(s, 0) for s in range(6)] == pytest.approx([(s + 1) / 4 * cosine[s] for s in range(4)]
                                                                  + cosine[4:6])
    assert warm.factor(100, 0) == pytest.approx(0.05) and warm.factor(500, 9) == pytest.approx(0.05)


def test_select_by_drive_keeps_the_epoch_that_drives_the_valid_tracks_best(tmp_path, capsys):
    """--select_by drive: after each epoch the weights drive the valid tracks in closed loop; the checkpoint
    kept at --save_path is the epoch with the most success + progress, recorded in the history."""
    root = tmp_path / "world"
    generate_dataset(root, tracks=3, frames=8, seed=3, image_size=(64, 32), workers=1, progress=False)
    best = tmp_path / "best.pt"
    argv = ["--data_root", str(root), "--preset", "tiny", "--batch_size", "2", "--epochs", "2", "--device", "cpu",
            "--no_progress", "--select_by", "drive", "--select_starts", "1", "--select_time_limit", "0.3",
            "--save_path", str(best), "--checkpoint_path", str(tmp_path / "last.pt")]
    assert train_student.main(argv) == 0
    assert "valid tracks driven: success" in capsys.readouterr().out
    state = load_checkpoint(tmp_path / "last.pt", kind="student")
    scores = [-(h["drive_success"] + h["drive_progress"]) for h in state["history"]]
    assert all(h["drive_progress"] > 0 for h in state["history"])
    assert state["best_metric"] == min(scores)
    assert load_checkpoint(best, kind="student")["epoch"] == scores.index(min(scores))
    assert train_student.main([*argv[:-4], "--valid_split", ""]) != 0         # nothing to drive


def test_model_flags_reach_the_model_and_a_resume_must_repeat_them(setup, tmp_path, capsys):
    """--norm/--input_norm (like every model flag) build the student; resuming with a model flag that differs
    from the run's own is refused naming the flag, not silently trained as the checkpoint was."""
    last = tmp_path / "last.pt"
    flags = ("--epochs", "2", "--norm", "group", "--input_norm", "per_image", "--splat_pool", "mean")
    out = _train(setup, tmp_path, *flags, "--save_path", str(tmp_path / "s.pt"), "--checkpoint_path", str(last),
                 "--stop_after_epoch", "1")
    assert len(out["history"]) == 1
    got = load_checkpoint(last, kind="student")["config"]
    assert (got["norm"], got["input_norm"], got["splat_pool"]) == ("group", "per_image", "mean")
    model, _ = load_student(tmp_path / "s.pt")
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    resume = ("--save_path", str(tmp_path / "s.pt"), "--checkpoint_path", str(last), "--resume_path", str(last))
    for dropped in ("--norm", "--input_norm", "--splat_pool"):
        i = flags.index(dropped)
        argv = _args(setup, tmp_path, *(flags[:i] + flags[i + 2:]), *resume)
        assert train_student.main(argv) != 0
        assert f"{dropped} " in capsys.readouterr().err and load_checkpoint(last)["epoch"] == 0
    assert len(_train(setup, tmp_path, *flags, *resume)["history"]) == 2
