"""What limits the student (docs/STUDENT.md): the offline evaluation's per-look summary on a synthetic world
(each segment's light by the world's own rule, per-look numbers the means of their segments; absent on real
data) and the linear probe of bench/student_probe.py (its ridge fit, and one run on a tiny world)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from e2r.checkpoints import save_checkpoint
from e2r.models.config import TeacherConfig
from e2r.models.student import CameraBEVStudent
from e2r.models.teacher import LiDARBEVTeacher
from e2r.models.student_config import StudentConfig
from e2r.sim.appearance import LIGHTS
from e2r.sim.tiny import write_tiny_dataset
from e2r.sim.world import (MARKER, TRACK_JSON, SyntheticConfig, generate_dataset, light_for_index,
                           segment_lights, segment_name, split_for_track)
from e2r.workflow.configs import StudentEvalConfig, TeacherEvalConfig
from e2r.workflow.evaluate import evaluate_student, evaluate_teacher, per_look_summary
from pipelines import eval_student

SIZE = (32, 16)
WORLD = SyntheticConfig(tracks=5, frames=8, seed=1, image_size=SIZE)     # train tracks 0-2: all three looks
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("limits")
    generate_dataset(tmp / "world", config=WORLD, workers=1, progress=False)
    write_tiny_dataset(tmp / "real", {"train": 2}, frames=8, image_size=SIZE)
    torch.manual_seed(0)
    cfg = StudentConfig.from_teacher(TeacherConfig.preset_named("tiny"), "tiny", image_size=SIZE)
    model = CameraBEVStudent(cfg)
    with torch.no_grad():            # a zero-initialised residual head would only repeat its inputs
        model.head[2].weight.normal_(0.0, 0.05)
    model.set_action_stats(torch.tensor([0.5, 10.0]), torch.tensor([3.0, 2.0]))
    ckpt = save_checkpoint(tmp / "student.pt", {"model": model.state_dict(), "config": cfg.to_dict()}, "student")
    return {"world": tmp / "world", "real": tmp / "real", "ckpt": ckpt}


def _evaluate(root: Path, ckpt: Path) -> dict:
    return evaluate_student(StudentEvalConfig(data_root=str(root), split="train", seq_len=3, stride=2,
                                              student_ckpt=str(ckpt), device="cpu", no_progress=True))


def test_per_look_follows_the_world_rule_and_averages_its_segments(setup):
    ev = _evaluate(setup["world"], setup["ckpt"])
    train = [i for i in range(WORLD.tracks) if split_for_track(i, WORLD.tracks, WORLD.valid_tracks,
                                                                WORLD.test_tracks) == "train"]
    want = {segment_name(i): light_for_index(WORLD, i) for i in train}
    assert ev["segment_light"] == want and set(want.values()) == set(LIGHTS)
    for seg, light in want.items():          # what the world wrote as each track's look
        assert json.loads((setup["world"] / "train" / seg / TRACK_JSON).read_text())["look"]["light"] == light
    assert list(ev["per_look"]) == [light for light in LIGHTS if light in want.values()]
    for light, summary in ev["per_look"].items():
        segs = [seg for seg, lt in want.items() if lt == light]
        assert summary["segments"] == len(segs)
        for key in ("overall_weighted_mse", "steering_mse", "loss_norm", "baseline_mean_loss_norm", "loss_vs_mean"):
            assert summary[key] == pytest.approx(sum(ev["per_segment"][s][key] for s in segs) / len(segs))
    for m in ev["per_segment"].values():     # normalised by the checkpoint's std (3, 2) at weights (1, 0.05)
        assert m["loss_norm"] == pytest.approx(m["steering_mse"] / 9 + 0.05 * m["speed_mse"] / 4, rel=1e-5)
        assert m["loss_vs_mean"] == pytest.approx(m["loss_norm"] / m["baseline_mean_loss_norm"])


def test_the_teacher_evaluation_reports_the_same_looks(setup, tmp_path):
    torch.manual_seed(0)
    cfg = TeacherConfig.preset_named("tiny")
    ckpt = save_checkpoint(tmp_path / "t.pt", {"model": LiDARBEVTeacher(cfg).state_dict(), "config": cfg.to_dict()},
                           "teacher")
    ev = evaluate_teacher(TeacherEvalConfig(data_root=str(setup["world"]), split="train", seq_len=3, stride=2,
                                            teacher_ckpt=str(ckpt), device="cpu", no_progress=True))
    assert ev["segment_light"] == segment_lights(setup["world"], "train") and set(ev["per_look"]) == set(LIGHTS)


def test_real_data_has_no_look(setup, capsys):
    ev = _evaluate(setup["real"], setup["ckpt"])
    assert ev["segment_light"] == {} and ev["per_look"] is None and len(ev["per_segment"]) == 2
    argv = ["--data_root", str(setup["real"]), "--split", "train", "--seq_len", "3", "--student_ckpt",
            str(setup["ckpt"]), "--device", "cpu", "--no_progress"]
    assert eval_student.main(argv) == 0
    assert "per look" not in capsys.readouterr().out
    assert eval_student.main([*argv[:1], str(setup["world"]), *argv[2:]]) == 0
    assert "per look" in capsys.readouterr().out


def test_segments_the_world_did_not_make_have_no_look(setup, tmp_path):
    """A segment without a light (e.g. a recorded drive beside the world's) stays out of the per-look means;
    an incomplete world has no lights yet; an unreadable marker is named."""
    per_segment = {"a": {"loss_norm": 1.0}, "b": {"loss_norm": 3.0}, "rec": {"loss_norm": 100.0}}
    assert per_look_summary(per_segment, {"a": "night", "b": "night"}) == {"night": {"loss_norm": 2.0,
                                                                                      "segments": 2.0}}
    marker = json.loads((setup["world"] / MARKER).read_text())
    (tmp_path / MARKER).write_text(json.dumps({**marker, "status": "incomplete"}))
    assert segment_lights(tmp_path, "train") == {}
    (tmp_path / MARKER).write_text("{not json")
    with pytest.raises(ValueError, match=MARKER):
        segment_lights(tmp_path, "train")


def _probe_module():
    spec = importlib.util.spec_from_file_location("student_probe", ROOT / "bench" / "student_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_ridge_recovers_a_linear_map_and_scores_the_mean_as_one():
    probe = _probe_module()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 6, generator=g, dtype=torch.float64) * 5 + 3
    W_true = torch.randn(6, 2, generator=g, dtype=torch.float64)
    Y = X @ W_true + 0.5
    segments = [f"s{i // 100}" for i in range(400)]
    W, b, lams = probe.fit_probe(X, Y, segments)
    assert lams == [min(probe.LAMBDAS)] * 2
    assert torch.allclose(X @ W + b, Y, atol=1e-2)
    s = probe.probe_scores(X @ W + b, Y, Y.mean(0))
    assert s["steering_r2"] > 0.999 and s["speed_nmse"] < 1e-3
    mean = probe.probe_scores(Y.mean(0).expand_as(Y), Y, Y.mean(0))
    assert mean["steering_nmse"] == pytest.approx(1.0) and mean["speed_r2"] == pytest.approx(0.0, abs=1e-9)


def test_probe_runs_on_a_tiny_world(setup, capsys):
    probe = _probe_module()
    assert probe.main(["--data_root", str(setup["world"]), "--student_ckpt", str(setup["ckpt"]), "--valid_split",
                       "test", "--grid", "1x2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for row in ("trained/avg", "trained/grid", "random/avg", "random/grid", "train (fit) night", "test "):
        assert row in out
