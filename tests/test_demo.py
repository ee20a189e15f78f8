"""The README's first command, end to end on a very small synthetic world."""
import csv
import json

from e2r.released import TRACK_STATUS
from pipelines import demo


def test_demo_end_to_end_small(tmp_path, capsys):
    run, data = tmp_path / "run", tmp_path / "data"
    rc = demo.main(["--out", str(run), "--data_root", str(data), "--tracks", "3", "--frames", "16",
                    "--teacher_epochs", "1", "--student_epochs", "1", "--device", "cpu", "--starts", "2",
                    "--time_limit", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for stage in ("synthetic racing world", "validate", "train the tiny LiDAR teacher", "export",
                  "BC only", "BC + KD", "results on the held-out test track", "closed loop",
                  "offline vs closed loop"):
        assert stage in out
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["students"]) == {"student_bc_seed0", "student_kd_seed0"}
    rows = list(csv.DictReader(open(run / "results.csv")))
    models = [r["model"] for r in rows]
    assert models[0] == "teacher (LiDAR)" and "student BC (camera)" in models and "student KD (camera)" in models
    for r in rows:
        assert float(r["overall_weighted_mse"]) >= 0
    for name in ("teacher.pt", "student_bc_seed0.pt", "student_kd_seed0.pt", "eval_teacher_test.png",
                 "eval_student_kd_seed0.csv"):
        assert (run / name).is_file(), name
    assert (run / "memorybank.zarr").is_dir()
    loop = {r["policy"]: r for r in summary["closed_loop"]}
    released = {"released_student_dagger", "released_student_bc", "released_teacher_rounds"}
    assert set(loop) == {"expert", "constant", "train_mean", "teacher", "student_bc_seed0", "student_kd_seed0"} | released
    # the released models drive beside the trained ones, each marked with what this track is for it
    assert {r["policy"] for r in summary["released"]} == released
    assert all(r["track"] in TRACK_STATUS and r["runs"] == 2 for r in summary["released"])
    assert "released models (shipped in e2r/released" in out and "released:student_dagger" in out
    assert all(r["runs"] == 2 and 0 <= r["progress"] for r in loop.values())
    for name in ("drive_test.csv", "drive_test.png", "drive_student.gif", "offline_vs_closed_loop.csv"):
        assert (run / name).is_file(), name
    # a second run reuses the generated world instead of regenerating it
    assert demo.main(["--out", str(tmp_path / "run2"), "--data_root", str(data), "--tracks", "3", "--frames", "16",
                      "--stages", "data", "--device", "cpu"]) == 0
    assert "reusing" in capsys.readouterr().out


def test_demo_fails_nonzero_on_bad_data_root(tmp_path, capsys):
    bad = tmp_path / "notempty"
    bad.mkdir()
    (bad / "something.txt").write_text("not a synthetic dataset")
    assert demo.main(["--out", str(tmp_path / "run"), "--data_root", str(bad), "--tracks", "3", "--frames", "16",
                      "--stages", "data"]) == 1
    assert "FAILED" in capsys.readouterr().err
