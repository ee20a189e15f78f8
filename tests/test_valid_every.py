"""--valid_every_steps K: validation (valid loss and selection metric) every K optimizer steps and at the end of
training, mid-epoch included; the kept checkpoint is the best validated one; a run killed right after a mid-epoch
validation resumes to the uninterrupted run's history and weights, also under 2 gloo ranks (rank 0 writes); bad K
refused naming the flag."""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

import e2r.workflow.trainer as trainer_module
from e2r.checkpoints import load_checkpoint
from e2r.errors import ConfigError
from e2r.sim.world import generate_dataset
from e2r.workflow.train import train_teacher as run_train_teacher
from pipelines import train_student, train_teacher
from tests.fixtures import free_port, run_ranks, write_tiny_dataset

#: 2 train segments of 8 frames, windows of 3 frames every 2: 6 windows, 6 batches of 1 per epoch; the flips
#: draw from the global RNG, which each validation's loader also draws from
STEPS = ("--steps", "7", "--batch_size", "1", "--valid_every_steps", "3", "--hflip_prob", "0.5")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("lidar"), splits={"train": 2, "valid": 1}, frames=8,
                              camera=False, points_per_frame=(100, 200))


def _args(root, tmp, name, *extra):
    return ["--data_root", str(root), "--preset", "tiny", "--seq_len", "3", "--stride", "2", "--device", "cpu",
            "--no_progress", "--lr", "3e-3", "--save_path", str(tmp / f"{name}_best.pt"),
            "--checkpoint_path", str(tmp / f"{name}_last.pt"), *extra]


def _train(root, tmp, name, *extra):
    return run_train_teacher(train_teacher.parse_config(_args(root, tmp, name, *extra)))


class _Killed(Exception):
    """Stands for the process dying right after a checkpoint was written."""


def test_teacher_validates_every_k_steps_and_keeps_the_best(data_root, tmp_path, capsys):
    out = _train(data_root, tmp_path, "a", *STEPS)
    history = out["history"]
    assert [(h["epoch"], h["steps"]) for h in history] == [(0, 3), (0, 6), (1, 7)]   # step 3 mid-epoch
    assert all(math.isfinite(h["valid_loss"]) and math.isfinite(h["train_loss"]) for h in history)
    assert capsys.readouterr().out.count("valid ") == 3
    best_i = min(range(3), key=lambda i: history[i]["valid_loss"])
    assert out["best_metric"] == history[best_i]["valid_loss"]
    best = load_checkpoint(tmp_path / "a_best.pt", kind="teacher")
    assert [h["steps"] for h in best["history"]] == [3, 6, 7][:best_i + 1]
    last = load_checkpoint(tmp_path / "a_last.pt", kind="teacher")
    assert last["scheduler"]["steps_done"] == 7 and "position" not in last and last["history"] == history
    if best_i == 2:
        assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])


def test_killed_after_a_mid_epoch_validation_resumes_to_the_same_run(data_root, tmp_path, monkeypatch):
    """Killed right after the step-3 validation wrote its checkpoint (mid-epoch), then after an epoch end
    (--stop_after_epoch): both resumed runs end with the uninterrupted run's history, best and weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = _train(data_root, tmp_path, "full", *STEPS)
        save = trainer_module.save_checkpoint

        def dies_after_first_validation(path, state, **kw):
            save(path, state, **kw)
            if str(path).endswith("killed_last.pt") and len(state["history"]) == 1:
                raise _Killed

        monkeypatch.setattr(trainer_module, "save_checkpoint", dies_after_first_validation)
        with pytest.raises(_Killed):
            _train(data_root, tmp_path, "killed", *STEPS)
        monkeypatch.undo()
        killed = load_checkpoint(tmp_path / "killed_last.pt")
        assert killed["position"] == {**killed["position"], "epoch": 0, "batches": 3}
        resumed = _train(data_root, tmp_path, "killed", *STEPS, "--resume_path", str(tmp_path / "killed_last.pt"))
        part = _train(data_root, tmp_path, "stopped", *STEPS, "--stop_after_epoch", "1")
        assert [h["steps"] for h in part["history"]] == [3, 6]
        stopped = _train(data_root, tmp_path, "stopped", *STEPS, "--resume_path", str(tmp_path / "stopped_last.pt"))
    finally:
        torch.set_num_threads(threads)
    want = load_checkpoint(tmp_path / "full_last.pt")
    for out, name in ((resumed, "killed"), (stopped, "stopped")):
        assert [h["steps"] for h in out["history"]] == [3, 6, 7]
        for got, ref in zip(out["history"], full["history"]):
            for k in ("train_loss", "valid_loss", "lr"):
                assert math.isclose(got[k], ref[k], rel_tol=1e-6), (name, k)
        assert out["best_metric"] == pytest.approx(full["best_metric"], rel=1e-6)
        got = load_checkpoint(tmp_path / f"{name}_last.pt")
        for k in want["model"]:
            torch.testing.assert_close(got["model"][k], want["model"][k], rtol=1e-5, atol=1e-6)


def test_bad_k_is_refused_naming_the_flag(data_root, tmp_path, capsys):
    for extra in (("--valid_every_steps", "0"), ("--valid_every_steps", "-2"),
                  ("--valid_every_steps", "3", "--valid_split", "")):
        with pytest.raises(ConfigError, match="--valid_every_steps"):
            _train(data_root, tmp_path, "bad", "--steps", "2", *extra)
        assert train_teacher.main(_args(data_root, tmp_path, "bad", "--steps", "2", *extra)) == 1
        assert "--valid_every_steps" in capsys.readouterr().err
    assert not (tmp_path / "bad_last.pt").exists()


def test_student_selects_by_driving_every_k_steps(tmp_path, capsys):
    """A student with --select_by drive drives the valid tracks at every validation, mid-epoch included; the
    kept checkpoint is the validation that drove best."""
    root = tmp_path / "world"
    generate_dataset(root, tracks=3, frames=8, seed=3, image_size=(64, 32), workers=1, progress=False)
    best, last = tmp_path / "best.pt", tmp_path / "last.pt"
    argv = ["--data_root", str(root), "--preset", "tiny", "--batch_size", "1", "--device", "cpu", "--no_progress",
            "--steps", "5", "--valid_every_steps", "2", "--select_by", "drive", "--select_starts", "1",
            "--select_time_limit", "0.3", "--save_path", str(best), "--checkpoint_path", str(last)]
    assert train_student.main(argv) == 0
    assert capsys.readouterr().out.count("valid tracks driven: success") == 3
    state = load_checkpoint(last, kind="student")
    assert [(h["epoch"], h["steps"]) for h in state["history"]] == [(0, 2), (0, 4), (1, 5)]   # 4 windows
    scores = [-(h["drive_success"] + h["drive_progress"]) for h in state["history"]]
    assert state["best_metric"] == min(scores)
    kept = load_checkpoint(best, kind="student")
    assert kept["history"][-1]["steps"] == state["history"][scores.index(min(scores))]["steps"]


def _ddp_rank(rank: int, ports: tuple[int, int], root: str, out: str) -> None:
    """One torchrun-like rank: a run validated every 2 steps (the checkpoint of its first, mid-epoch validation
    copied aside: what a kill then would leave), then a run resumed from that copy; writes what it saw."""
    from pathlib import Path
    tmp = Path(out)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    save, written = trainer_module.save_checkpoint, []

    def keeps_first_validation(path, state, **kw):
        save(path, state, **kw)
        written.append(str(path))
        if str(path).endswith("ddp_last.pt") and len(state["history"]) == 1 and "position" in state:
            shutil.copy(path, tmp / "ddp_killed.pt")

    trainer_module.save_checkpoint = keeps_first_validation
    flags = ("--steps", "5", "--batch_size", "1", "--valid_every_steps", "2", "--hflip_prob", "0.5")
    os.environ["MASTER_PORT"] = str(ports[0])
    full = _train(root, tmp, "ddp", *flags)
    os.environ["MASTER_PORT"] = str(ports[1])
    resumed = _train(root, tmp, "ddp2", *flags, "--resume_path", str(tmp / "ddp_killed.pt"))
    torch.save({"full": full["history"], "resumed": resumed["history"], "best": [full["best_metric"],
                resumed["best_metric"]], "written": written}, tmp / f"rank{rank}.pt")


def test_two_gloo_ranks_validate_together_and_resume_mid_epoch(data_root, tmp_path):
    """Every rank validates at the same steps and sees the same history; only rank 0 writes; a resume from
    the checkpoint of a mid-epoch validation gives the same history (6 windows, 2 ranks: 3 steps per epoch)."""
    run_ranks(_ddp_rank, ((free_port(), free_port()), str(data_root), str(tmp_path)), nprocs=2, timeout_s=180)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert got[1]["written"] == [] and got[0]["written"]
    killed = load_checkpoint(tmp_path / "ddp_killed.pt")
    assert (killed["position"]["epoch"], killed["position"]["batches"]) == (0, 2)
    full = got[0]["full"]
    assert [(h["epoch"], h["steps"]) for h in full] == [(0, 2), (1, 4), (1, 5)]
    assert load_checkpoint(tmp_path / "ddp_last.pt")["history"] == full
    for r in range(2):
        for run in ("full", "resumed"):
            assert len(got[r][run]) == 3
            for h, ref in zip(got[r][run], full):
                assert h["steps"] == ref["steps"]
                for k in ("train_loss", "valid_loss"):
                    assert math.isclose(h[k], ref[k], rel_tol=1e-6), (r, run, k)
        assert got[r]["best"] == pytest.approx([got[0]["best"][0]] * 2, rel=1e-6)
