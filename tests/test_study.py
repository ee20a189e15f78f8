"""The KD study (pipelines.study) on a tiny world: every unit runs once, finished units are skipped on a
re-run, changed settings are refused, the report's rows, table and goals follow from the results."""
from __future__ import annotations

import csv
import json
import math
import os
import shlex

import numpy as np
import pytest

from e2r.errors import ConfigError
from e2r.workflow.configs import command_line
from e2r.workflow.study import (StudyConfig, StudyUnit, plan_units, read_results,
                                student_train_config)
from e2r.workflow.study_report import epochs_to_reach, format_summary, goals, study_rows, summary_table
from pipelines import study, train_student

TINY = ["--camera_tracks", "2", "--lidar_only_tracks", "1", "--valid_tracks", "1", "--test_tracks", "1",
        "--frames", "16", "--budgets", "1", "2", "--seeds", "0", "--variants", "bc", "kd", "--ablations",
        "--teacher_epochs", "1", "--student_epochs", "2", "--starts", "1", "--time_limit", "0.5",
        "--device", "cpu", "--no_progress"]


def test_plan_runs_smallest_budget_first_then_ablations():
    cfg = StudyConfig(budgets=[4, 1], seeds=[0, 1], variants=["bc", "kd"], ablations=["kd_state", "kd"],
                      ablation_budgets=[1, 2])
    names = [u.name for u in plan_units(cfg)]
    assert names[:6] == ["bc-b1-s0", "kd-b1-s0", "bc-b1-s1", "kd-b1-s1", "bc-b4-s0", "kd-b4-s0"]
    assert names[8:] == ["kd_state-b1-s0", "kd_state-b1-s1", "kd_state-b2-s0", "kd-b2-s0", "kd_state-b2-s1",
                         "kd-b2-s1"]
    with pytest.raises(ConfigError, match="--budgets"):
        StudyConfig(budgets=[5]).check()
    with pytest.raises(ConfigError, match="kd_magic"):
        StudyConfig(variants=["kd_magic"]).check()


def test_epochs_to_reach_and_goals_from_made_up_results():
    assert epochs_to_reach([0.5, 0.3, 0.2], 0.3) == 2.0 and math.isnan(epochs_to_reach([0.5], 0.1))

    def unit(variant, budget, seed, mse, success, valid):
        loop = [{"row": "run", "policy": f"{variant}-b{budget}-s{seed}", "segment": t, "success": success,
                 "progress": success / 2, "collisions": 0} for t in ("s8", "s9")]
        return {"name": f"{variant}-b{budget}-s{seed}", "variant": variant, "budget": budget, "seed": seed,
                "test": {"overall_weighted_mse": mse, "steering_mse": mse, "speed_mse": 0.0},
                "per_segment": {t: {"overall_weighted_mse": mse * f, "steering_mse": mse * f, "speed_mse": 0.0}
                                for t, f in (("s8", 0.5), ("s9", 1.5))},
                "closed_loop": loop, "valid_losses": valid}
    units = [unit("bc", b, s, 1.0 / b, 0.5, [1.0, 0.8, 0.6, 0.4]) for b in (1, 2) for s in (0, 1)]
    units += [unit("kd", b, s, 0.7 / b + 0.01 * s, 0.5, [0.5, 0.3, 0.3, 0.3]) for b in (1, 2) for s in (0, 1)]
    results = {"teacher": None, "units": units}
    rows = study_rows(results)
    assert len(rows) == 8 * 3 and {r["track"] for r in rows} == {"s8", "s9", "ALL"}
    table = summary_table(rows)
    mean, std, n = table[(1, "kd")]["overall_weighted_mse"]
    assert n == 2 and mean == pytest.approx(0.705) and std == pytest.approx(0.005)
    assert table[(1, "bc")]["track_std"]["overall_weighted_mse"] == pytest.approx(0.5)
    assert table[(1, "kd")]["per_seed"] == pytest.approx([0.70, 0.71])
    assert "| 1 | kd | 2 | 0.7050 ± 0.0050 | 0.7000, 0.7100 |" in format_summary(table)
    met = {g["goal"].split(" ")[0] + str(i): g for i, g in enumerate(goals(table, results))}
    # 0.705 <= 0.8; KD 0.5 < BC 0.5 + 0.15; KD at 1 track 0.5 >= BC at 2 0.5; no teacher to reach 80 % of
    assert [g["met"] for g in met.values()] == [True, False, True, False, True]
    assert "KD 1 0.50 vs BC 2 0.50" in list(met.values())[2]["value"]
    no_laps = {k: {**e, "success": (0.0, 0.0, 2)} if k[1] == "bc" else e for k, e in table.items()}
    assert goals(no_laps, results)[1]["met"] and "BC completes no lap" in goals(no_laps, results)[1]["value"]
    reaches = lambda ts: goals({**table, (0, "teacher"): {**table[(1, "kd")], "success": (ts, 0.0, 1)}},  # noqa: E731
                               results)[3]["met"]
    assert reaches(0.6) and not reaches(0.9)                    # KD 0.5: >= 0.8 x 0.6, not >= 0.8 x 0.9
    assert "4/4 pairs reach it; median fraction 0.50" in list(met.values())[-1]["value"]
    better = lambda ts, tp: [g for g in goals({**table, (0, "teacher"): {**table[(1, "kd")], "success": (ts, 0.0, 1),  # noqa: E731
                                                                   "progress": (tp, 0.0, 1)}}, results)
                             if g["goal"].startswith("the LiDAR teacher")][0]
    assert better(0.9, 0.95)["met"] and not better(0.4, 0.9)["met"] and "best student" in better(0.4, 0.9)["value"]
    # the goals judge the KD variant they are given: the same units named kd_all give the same verdicts
    renamed = [{**u, "name": u["name"].replace("kd-", "kd_all-"), "variant": "kd_all",
                "closed_loop": [{**r, "policy": r["policy"].replace("kd-", "kd_all-")} for r in u["closed_loop"]]}
               if u["variant"] == "kd" else u for u in units]
    table_all = summary_table(study_rows({"teacher": None, "units": renamed}))
    judged = goals(table_all, {"teacher": None, "units": renamed}, kd="kd_all")
    assert [g["met"] for g in judged] == [g["met"] for g in met.values()] and "(kd_all)" in judged[0]["goal"]
    assert goals(table_all, {"teacher": None, "units": renamed}) == []       # no "kd" units: nothing to judge


def test_the_default_grid_judges_the_kd_that_drove_best():
    cfg = StudyConfig()
    assert cfg.variants == ["bc", "kd_all"] and cfg.kd_variant() == "kd_all" and "kd" in cfg.ablations
    assert StudyConfig(variants=["kd_depth", "bc"]).kd_variant() == "kd_depth"


def test_study_end_to_end_resumes_and_refuses_changed_settings(tmp_path, capsys):
    out = tmp_path / "study"
    assert study.main(["--out", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    units = read_results(out)
    names = sorted(u["name"] for u in units["units"])
    assert names == ["bc-b1-s0", "bc-b2-s0", "kd-b1-s0", "kd-b2-s0"]
    by = {u["name"]: u for u in units["units"]}
    assert by["bc-b1-s0"]["segments"] == ["segment_0000"] and by["kd-b2-s0"]["segments"] == ["segment_0000",
                                                                                           "segment_0001"]
    assert len(by["kd-b1-s0"]["valid_losses"]) == 2 and by["kd-b1-s0"]["kd_gap"]["kd_n"] > 0
    from e2r.checkpoints import load_checkpoint        # BC and KD students share the teacher's head ("scene")
    assert {load_checkpoint(out / n / "student.pt")["config"]["residual_actions"] for n in names} == {"scene"}
    assert load_checkpoint(out / "teacher" / "teacher.pt")["config"]["residual_actions"] == "scene"
    for u in units["units"] + [units["teacher"]]:      # the pooled error is the window-weighted track mean
        per = u["per_segment"].values()
        pooled = sum(m["overall_weighted_mse"] * m["n"] for m in per) / sum(m["n"] for m in per)
        assert pooled == pytest.approx(u["test"]["overall_weighted_mse"])
        assert any(r["row"] == "run" and r["segment"] == "segment_0003" for r in u["closed_loop"])
    rows = list(csv.DictReader(open(out / "study.csv")))
    assert {r["unit"] for r in rows} == set(names) | {"teacher", "expert", "repeat"}
    assert "| 1 | kd |" in (out / "study.md").read_text() and (out / "study.png").stat().st_size > 0
    assert "KD (kd)/BC offline MSE at 1 camera track(s)" in text
    # an interrupted unit continues from its last training state: remove a result, keep the checkpoints
    (out / "bc-b2-s0" / "result.json").unlink()
    assert study.main(["--out", str(out), *TINY]) == 0
    assert "continuing the interrupted training from" in capsys.readouterr().out
    assert read_results(out)["units"][1]["name"] == "bc-b2-s0"
    stamp = (out / "kd-b1-s0" / "result.json").stat().st_mtime_ns
    assert study.main(["--out", str(out), *TINY]) == 0
    assert capsys.readouterr().out.count("done before") == 4 + 2
    assert (out / "kd-b1-s0" / "result.json").stat().st_mtime_ns == stamp
    changed = [x if x != "2" or TINY[i - 1] != "--student_epochs" else "3" for i, x in enumerate(TINY)]
    assert study.main(["--out", str(out), *changed]) == 1
    assert "student_epochs" in capsys.readouterr().err
    assert json.loads((out / "study.json").read_text())["settings"]["student_epochs"] == 2
    assert np.isfinite(float(rows[0]["overall_weighted_mse"]))

    # a given teacher (--teacher_ckpt): copied in byte for byte, not trained, evaluated, and it labels the store
    given = out / "teacher" / "teacher.pt"
    one = TINY[:TINY.index("--budgets")] + ["--budgets", "1", "--seeds", "0", "--variants", "kd"] + \
        TINY[TINY.index("--ablations"):]
    out2 = tmp_path / "given"
    assert study.main(["--out", str(out2), "--data_root", str(out / "data"), "--teacher_ckpt", str(given), *one]) == 0
    text = capsys.readouterr().out
    assert "teacher: given" in text and "training on every LiDAR" not in text
    assert (out2 / "teacher" / "teacher.pt").read_bytes() == given.read_bytes()
    teacher2 = read_results(out2)["teacher"]
    assert teacher2["given"] == str(given) and teacher2["valid_losses"] == []
    assert teacher2["test"] == units["teacher"]["test"]
    assert json.loads((out2 / "study.json").read_text())["settings"]["teacher_ckpt"] == str(given)
    assert [u["name"] for u in read_results(out2)["units"]] == ["kd-b1-s0"] and (out2 / "memorybank.zarr").is_dir()
    # a teacher whose head is not the study's is refused before anything is written
    out3 = tmp_path / "wrong_head"
    assert study.main(["--out", str(out3), "--data_root", str(out / "data"), "--teacher_ckpt", str(given),
                       "--residual_actions", "all", *one]) == 1
    assert "--residual_actions scene" in capsys.readouterr().err and not out3.exists()
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    assert study.main(["--out", str(out3), "--teacher_ckpt", str(fifo), *one]) == 1
    assert "not a regular file" in capsys.readouterr().err
    assert study.main(["--out", str(out3), "--teacher_ckpt", str(tmp_path), *one]) == 1
    assert "--teacher_ckpt: checkpoint" in capsys.readouterr().err and not out3.exists()


def test_a_study_unit_trains_what_the_plain_command_trains(tmp_path):
    """The study's training run of a unit is exactly the printed ``pipelines.train_student`` command: the
    command line parses back to the same config (no hidden setting, such as a thread count, differs)."""
    cfg = StudyConfig(out=str(tmp_path), data_root=str(tmp_path), student_steps=300)
    for unit, segments in ((StudyUnit(2, "bc", 1), ["segment_0000", "segment_0001"]),
                           (StudyUnit(1, "kd_dense", 0), ["segment_0003"]), (StudyUnit(4, "kd_depth", 2), ["s"])):
        train_cfg = student_train_config(cfg, unit, segments, tmp_path / unit.name, tmp_path / "mb.zarr", "t.pt")
        argv = shlex.split(command_line("pipelines.train_student", train_cfg))[3:]
        assert train_student.parse_config(argv) == train_cfg
        assert train_cfg.steps == 300 and train_cfg.epochs is None
        assert train_cfg.warmup_steps == cfg.student_warmup_steps
        assert train_cfg.kd_depth_w == (1.0 if unit.variant == "kd_depth" else 0.0)
