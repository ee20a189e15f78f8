"""On-policy distillation rounds (e2r.workflow.dagger, pipelines.dagger): each round records the mixed drives
as a split, appends the teacher's outputs for it to the memorybank, fine-tunes on the union and evaluates;
the rounds resume, and the report is written."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from e2r.checkpoints import save_checkpoint
from e2r.errors import ConfigError
from e2r.models.config import TeacherConfig
from e2r.models.student import CameraBEVStudent
from e2r.models.student_config import StudentConfig
from e2r.models.teacher import LiDARBEVTeacher
from e2r.sim.closed_loop import load_world, start_indices
from e2r.sim.world import generate_dataset
from e2r.workflow.configs import TrainConfig
from e2r.workflow.dagger import DaggerConfig, p_student_of_round, run_dagger
from pipelines.dagger import main as dagger_main
from pipelines.export import main as export_main
from stores import open_memorybank


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("dagger")
    root = tmp / "world"
    generate_dataset(root, tracks=3, frames=12, seed=4, image_size=(64, 32), workers=1, progress=False)
    torch.manual_seed(0)
    tc = TeacherConfig.preset_named("tiny")
    sc = StudentConfig.from_teacher(tc, "tiny", image_size=(32, 16))
    ckpt = {kind: save_checkpoint(tmp / f"{kind}.pt", {"model": model.state_dict(), "config": cfg.to_dict()},
                                  kind=kind)
            for kind, model, cfg in (("teacher", LiDARBEVTeacher(tc), tc), ("student", CameraBEVStudent(sc), sc))}
    store = tmp / "mb.zarr"
    assert export_main(["--data_root", str(root), "--split", "train", "--teacher_ckpt", str(ckpt["teacher"]),
                        "--store", str(store), "--shard_rows", "16", "--num_workers", "0", "--no_progress"]) == 0
    return {"root": root, "store": store, **ckpt}


def test_rounds_record_label_train_evaluate_and_resume(setup, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data_root", str(setup["root"]), "--teacher_ckpt", str(setup["teacher"]), "--student_ckpt",
            str(setup["student"]), "--memorybank", str(setup["store"]), "--out", str(out), "--rounds", "2",
            "--record_seconds", "0.5", "--steps", "3", "--warmup_steps", "0", "--eval_starts", "1",
            "--eval_time_limit", "0.5", "--no_progress"]
    assert dagger_main(argv) == 0
    printed = capsys.readouterr().out
    assert "round 2: success" in printed and "last student" in printed
    with open(out / "dagger.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert [float(r["p_student"]) for r in rows[1:]] == [0.5, 1.0]
    assert [int(r["recorded_frames"]) for r in rows[1:]] == [10, 10]
    assert [int(r["camera_frames"]) for r in rows] == [12, 22, 32]
    assert (out / "dagger.png").stat().st_size > 0 and (out / "round_02" / "student.pt").is_file()
    bank = open_memorybank(str(setup["store"]))
    assert {"train", "dagger_s0_r01", "dagger_s0_r02"} <= set(bank.splits)
    assert len(bank.split_keys("dagger_s0_r01")) == 10 - 4               # 10 frames, windows of 5
    assert (setup["root"] / "dagger_s0_r02" / "segment_0000_c00" / "meta" / "recorded.json").is_file()
    # the second run finds every round done: nothing is driven, labelled or trained again
    logs: list[str] = []
    again = run_dagger(DaggerConfig(data_root=str(setup["root"]), teacher_ckpt=str(setup["teacher"]),
                                    student_ckpt=str(setup["student"]), memorybank=str(setup["store"]), out=str(out),
                                    rounds=2, record_seconds=0.5, steps=3, eval_starts=1, eval_time_limit=0.5,
                                    no_progress=True), log=logs.append)
    assert not any("drives with p" in line or "fine-tuning" in line for line in logs)
    assert [r["success"] for r in again["rounds"]] == [float(r["success"]) for r in rows]


def test_schedule_and_bad_settings(setup, tmp_path):
    cfg = DaggerConfig(data_root=str(setup["root"]), teacher_ckpt=str(setup["teacher"]),
                       student_ckpt=str(setup["student"]), memorybank=str(setup["store"]), out=str(tmp_path),
                       rounds=5, p_student_first=0.2, p_student_last=1.0)
    assert [round(p_student_of_round(cfg, r), 3) for r in range(1, 6)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    for bad, match in ((dict(p_student_last=1.5), "p_student_last"), (dict(kd_action_w=float("nan")), "kd_action_w"),
                       (dict(student_ckpt=str(tmp_path)), "student_ckpt"), (dict(memorybank=str(tmp_path / "x")),
                                                                            "memorybank")):
        with pytest.raises(ConfigError, match=match):
            DaggerConfig(**{**cfg.__dict__, **bad}).check()


def test_aggregation_rules_choose_the_recorded_frames_and_rounds_report_disagreement(setup, tmp_path):
    """--aggregate: all rounds (default), the latest round only, or every round's most disagreed windows; the
    rule needs drives that both parties proposed on; dagger.csv reports each round's disagreement."""
    base = dict(data_root=str(setup["root"]), teacher_ckpt=str(setup["teacher"]), student_ckpt=str(setup["student"]),
                memorybank=str(setup["store"]), out=str(tmp_path / "agg"))
    rec = ["r01", "r02", "r03"]
    assert DaggerConfig(**base).training_splits(rec) == (rec, 1.0)
    assert DaggerConfig(**base, aggregate="latest").training_splits(rec) == (["r03"], 1.0)
    assert DaggerConfig(**base, aggregate="disagreement", keep_fraction=0.3).training_splits(rec) == (rec, 0.3)
    for bad, match in ((dict(aggregate="disagreement", mode="bc_extra"), "needs drives where"),
                       (dict(aggregate="some"), "aggregate"), (dict(aggregate="disagreement", keep_fraction=0.0),
                                                                 "keep_fraction")):
        with pytest.raises(ConfigError, match=match):
            DaggerConfig(**{**base, **bad}).check()
    out = tmp_path / "agg"
    run_dagger(DaggerConfig(**{**base, "out": str(out)}, rounds=1, aggregate="disagreement", keep_fraction=0.5,
                            split_prefix="agg_r", record_seconds=0.5, steps=2, warmup_steps=0, eval_starts=1,
                            eval_time_limit=0.5, no_progress=True), log=lambda _: None)
    with open(out / "dagger.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(setup["root"] / "agg_r01" / "segment_0000_c00" / "meta" / "data.csv", newline="") as f:
        drove = list(csv.DictReader(f))
    gap = sum(abs(float(r["student_wheel_angle"]) - float(r["teacher_wheel_angle"])) for r in drove) / len(drove)
    assert rows[0]["disagreement"] == "nan" and float(rows[1]["disagreement"]) == pytest.approx(gap, abs=1e-6)


def test_oracle_rounds_are_driven_as_dagger_and_labelled_by_the_expert(setup, tmp_path):
    """--mode oracle: the student drives mixed with the teacher, as dagger; the recorded split's labels are the
    simulator expert's would-be commands; the teacher's outputs are still appended for the KD terms."""
    out = tmp_path / "oracle"
    cfg = DaggerConfig(data_root=str(setup["root"]), teacher_ckpt=str(setup["teacher"]),
                       student_ckpt=str(setup["student"]), memorybank=str(setup["store"]), out=str(out), rounds=1,
                       mode="oracle", record_seconds=0.5, steps=2, warmup_steps=0, eval_starts=1,
                       eval_time_limit=0.5, no_progress=True)
    logs: list[str] = []
    run_dagger(cfg, log=logs.append)
    assert any("the student drives with p" in line for line in logs)
    segment = setup["root"] / "oracle_s0_r01" / "segment_0000_c00"
    doc = __import__("json").loads((segment / "meta" / "recorded.json").read_text())
    assert doc["expert_labels"] is True and doc["label_columns"]["wheel_angle"] == "expert_wheel_angle"
    with open(segment / "meta" / "data.csv", newline="") as f:
        controls = {row["control"] for row in csv.DictReader(f)}
    assert controls <= {"student", "teacher", "takeover"} and "expert" not in controls
    assert "oracle_s0_r01" in open_memorybank(str(setup["store"])).splits


def test_the_teacher_learns_from_the_experts_labels_of_its_own_drives(setup, tmp_path):
    """--learner teacher --mode oracle: the teacher drives alone, the expert labels, the teacher fine-tunes (its
    own model config kept) and is evaluated; no memorybank, no student."""
    out = tmp_path / "teacher"
    cfg = DaggerConfig(data_root=str(setup["root"]), teacher_ckpt=str(setup["teacher"]), learner="teacher",
                       mode="oracle", out=str(out), rounds=1, record_seconds=0.5, steps=2, warmup_steps=0,
                       eval_starts=1, eval_time_limit=0.5, split_prefix="teacher_r", no_progress=True)
    logs: list[str] = []
    result = run_dagger(cfg, log=logs.append)
    assert any("the teacher drives" in line for line in logs)
    assert result["student"] == str(out / "round_01" / "teacher.pt")
    from e2r.checkpoints import load_checkpoint
    ckpt, start = load_checkpoint(result["student"]), load_checkpoint(str(setup["teacher"]))
    assert ckpt["kind"] == "teacher" and ckpt["config"] == start["config"]
    assert ckpt["train_args"]["speed_loss_weight"] == 1.0          # the teacher's rounds weigh speed at 1 by default
    assert DaggerConfig(**{**cfg.__dict__, "speed_loss_weight": 0.3}).for_learner("speed_loss_weight") == 0.3
    student_cfg = DaggerConfig(**{**cfg.__dict__, "learner": "student"})
    assert student_cfg.for_learner("speed_loss_weight") == TrainConfig.speed_loss_weight
    assert student_cfg.for_learner("oversample_braking") == 1 and student_cfg.for_learner("record_starts") == "shifted"
    recorded = sorted((setup["root"] / "teacher_r01").iterdir())
    assert [p.name for p in recorded] == [f"{p.name}_c00" for p in sorted((setup["root"] / "train").iterdir())]
    for segment in recorded:
        with open(segment / "meta" / "data.csv", newline="") as f:
            assert {row["control"] for row in csv.DictReader(f)} == {"teacher"}
        assert '"label_columns"' in (segment / "meta" / "recorded.json").read_text()
    for bad, match in ((dict(mode="dagger"), "--mode oracle"), (dict(memorybank=str(setup["store"])), "drop"),
                       (dict(speed_loss_weight=float("nan")), "speed_loss_weight")):
        with pytest.raises(ConfigError, match=match):
            DaggerConfig(**{**cfg.__dict__, **bad}).check()
    with pytest.raises(ConfigError, match="--residual_actions is for --learner teacher"):
        DaggerConfig(**{**student_cfg.__dict__, "student_ckpt": str(setup["student"]),
                        "memorybank": str(setup["store"]), "residual_actions": "scene_only"}).check()
    assert ckpt["train_args"]["oversample_braking"] == 5           # ... and repeat the braking windows 5 times
    # --residual_actions: the rounds fine-tune that head from the round-0 teacher's weights; --oversample_braking
    # reaches the fine-tune; the teacher's recording cars start just behind each track's first other car unless
    # --record_starts shifted
    other = tmp_path / "scene_only"
    head = run_dagger(DaggerConfig(**{**cfg.__dict__, "out": str(other), "split_prefix": "teacher_so_r",
                                      "residual_actions": "scene_only", "oversample_braking": 4,
                                      "record_starts": "shifted"}),
                      log=lambda line: None)
    for prefix, starts in (("teacher_r01", "behind_cars"), ("teacher_so_r01", "shifted")):
        for segment in sorted((setup["root"] / prefix).iterdir()):
            track = load_world(setup["root"], "train", segment.name.rsplit("_c", 1)[0]).track
            first = json.loads((segment / "meta" / "recorded.json").read_text())["start_index"]
            behind, shifted = start_indices(track, 1, behind_car=0)[0], start_indices(track, 1)[0]
            assert behind != shifted and first == (behind if starts == "behind_cars" else shifted)
    assert load_checkpoint(head["student"])["config"] == {**start["config"], "residual_actions": "scene_only"}
    assert load_checkpoint(head["student"])["train_args"]["oversample_braking"] == 4
    with pytest.raises(ConfigError, match="--oversample_braking must be >= 1"):
        DaggerConfig(**{**cfg.__dict__, "oversample_braking": 0}).check()
