"""Drives recorded as data (e2r.sim.record) and mixed student/teacher control (e2r.sim.policies.MixedPolicy):
the recorded segments are valid dataset segments whose frames and commands are the ones the run saw and
executed, they are marked as recorded, a crash leaves no half segment, and the mixing rules hold."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from e2r.checkpoints import save_checkpoint
from e2r.data.check import DatasetCheck, check_split
from e2r.data.datasets import CameraSequenceDataset, LidarSequenceDataset
from e2r.data.readers import DataError
from e2r.errors import ConfigError
from e2r.kd import _bc_loss
from e2r.losses import action_loss, action_weights
from e2r.models.config import TeacherConfig
from e2r.models.teacher import LiDARBEVTeacher
from e2r.sim.closed_loop import ClosedLoopConfig, load_world, run_closed_loop
from e2r.sim.policies import (CONTROL_STUDENT, CONTROL_TAKEOVER, CONTROL_TEACHER, ConstantPolicy, ExpertPolicy,
                              MixedPolicy, Policy)
from e2r.sim.record import RECORD_COLUMNS, DriveRecorder, is_recorded, label_by_expert, read_recorded
from e2r.sim.world import generate_dataset
from e2r.workflow.configs import StudentTrainConfig
from e2r.workflow.export_config import ExportConfig
from e2r.workflow.export_run import _append_snapshot, _check_append
from e2r.workflow.trainer import train_valid_datasets
from pipelines.export import main as export_main
from stores import StoreCorruptError, open_memorybank

SIZE = (64, 32)


@pytest.fixture(scope="module")
def world_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("record") / "world"
    generate_dataset(root, tracks=3, frames=6, seed=3, image_size=SIZE, workers=1, progress=False)
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_recorded_drive_is_a_dataset_segment_of_what_the_run_saw_and_did(world_root, tmp_path):
    world = load_world(world_root, "test", "segment_0002")
    out = tmp_path / "rec"
    recorder = DriveRecorder(out, "round_01", world, "expert", info={"round": 1})
    cfg = ClosedLoopConfig(time_limit=1.0, seq_len=3, seed=5)
    runs = run_closed_loop(ExpertPolicy(), world, [0, 40], cfg, recorder=recorder)
    again = run_closed_loop(ExpertPolicy(), world, [0, 40], cfg)          # recording changes nothing
    for a, b in zip(runs, again):
        np.testing.assert_array_equal(a.commands, b.commands)
        np.testing.assert_array_equal(a.trajectory, b.trajectory)
    assert recorder.segments == ["segment_0002_c00", "segment_0002_c01"]
    assert not list(out.glob(".tmp-*"))
    for k, run in enumerate(runs):
        seg = out / "round_01" / f"segment_0002_c{k:02d}"
        assert is_recorded(seg) and read_recorded(seg)["start_index"] == run.start_index
        assert read_recorded(seg)["round"] == 1 and read_recorded(seg)["source_segment"] == "segment_0002"
        rows = _rows(seg / "meta" / "data.csv")
        assert list(rows[0]) == list(RECORD_COLUMNS) and len(rows) == run.steps == 20
        np.testing.assert_allclose([float(r["wheel_angle"]) for r in rows], run.commands[:, 0], atol=1e-4)
        np.testing.assert_allclose([float(r["x"]) for r in rows], run.trajectory[:-1, 0], atol=1e-4)
        # the recorder's expert is the expert that drove: its would-be commands are the executed ones
        np.testing.assert_allclose([float(r["expert_wheel_angle"]) for r in rows], run.commands[:, 0], atol=1e-4)
        assert {r["control"] for r in rows} == {"expert"}
        assert (seg / "camera" / "000019.png").is_file() and (seg / "lidar" / "000019.bin").stat().st_size > 0
    stats, problems = check_split(DatasetCheck(data_root=str(out), seq_len=3, image_size=SIZE, no_progress=True),
                                  "round_01")
    assert problems == [] and stats == {"segments": 2, "frames": 40, "windows": 36}
    cams = CameraSequenceDataset(out, "round_01", seq_len=3, image_size=SIZE)
    lidar = LidarSequenceDataset(out, "round_01", seq_len=3, lidar_num_features=4)
    assert len(cams) == len(lidar) == 2 * 18 and cams.keys == lidar.keys
    with pytest.raises(FileExistsError):
        run_closed_loop(ExpertPolicy(), world, [0], cfg, recorder=DriveRecorder(out, "round_01", world, "expert"))


class _Crash(Policy):
    def act(self, obs):
        if obs.t == 3:
            raise RuntimeError("policy crashed")
        return np.zeros(len(obs.cars)), obs.speed[:, -1].astype(np.float64)


def test_a_crashed_recording_leaves_no_segment_and_the_next_one_cleans_up(world_root, tmp_path):
    world = load_world(world_root, "test", "segment_0002")
    cfg = ClosedLoopConfig(time_limit=1.0, seq_len=3)
    with pytest.raises(RuntimeError, match="crashed"):
        run_closed_loop(_Crash("crash"), world, [0], cfg, recorder=DriveRecorder(tmp_path, "r", world, "crash"))
    assert not (tmp_path / "r").exists() and list(tmp_path.glob(".tmp-*"))
    run_closed_loop(ExpertPolicy(), world, [0], cfg, recorder=DriveRecorder(tmp_path, "r", world, "expert"))
    assert not list(tmp_path.glob(".tmp-*")) and (tmp_path / "r" / "segment_0002_c00" / "meta" / "data.csv").is_file()
    with pytest.raises(ValueError, match="recording split"):
        DriveRecorder(tmp_path, "../x", world, "expert")


class _Veer(Policy):
    """Steers hard left: leaves any envelope within a second."""

    def act(self, obs):
        return np.full(len(obs.cars), 20.0), obs.speed[:, -1].astype(np.float64)


def test_mixed_control_draws_per_period_and_the_teacher_takes_over_outside_the_envelope(world_root):
    world = load_world(world_root, "test", "segment_0002")
    cfg = ClosedLoopConfig(time_limit=3.0, seq_len=3, seed=1)
    teacher_only = MixedPolicy("m", ConstantPolicy("c"), ExpertPolicy(), 0.0)
    expert = run_closed_loop(ExpertPolicy(), world, [0, 50, 100], cfg)
    mixed = run_closed_loop(teacher_only, world, [0, 50, 100], cfg)
    for a, b in zip(expert, mixed):
        np.testing.assert_array_equal(a.commands, b.commands)
    assert set(teacher_only.control) == {CONTROL_TEACHER}

    seen: list[np.ndarray] = []
    lateral: list[np.ndarray] = []

    class Watch(MixedPolicy):
        def act(self, obs):
            out = super().act(obs)
            seen.append(self.control.copy())
            lateral.append(world.track.lateral_offset(obs.state.x, obs.state.y, obs.index))
            return out

    veer = Watch("m", _Veer("veer"), ExpertPolicy(), 1.0, switch_every=5, max_lateral=0.5, recover_steps=10)
    runs = run_closed_loop(veer, world, [0, 50], cfg)
    first, lat = [c[0] for c in seen], np.array([x[0] for x in lateral])
    assert first[0] == CONTROL_STUDENT and CONTROL_TAKEOVER in first
    k = first.index(CONTROL_TAKEOVER)
    assert abs(lat[k]) > 0.5 and (np.abs(lat[:k]) <= 0.5).all()  # taken over at the first step outside
    back = first.index(CONTROL_STUDENT, k)                     # handed back after 10 steps inside again
    assert (np.abs(lat[back - 10:back]) <= 0.5).all() and abs(lat[back - 11]) > 0.5
    assert first[k:back] == [CONTROL_TAKEOVER] * (back - k)
    assert all(r.end == "time" for r in runs)                  # the teacher brought both cars back
    steps: list[tuple[int, np.ndarray, np.ndarray]] = []

    class Log(MixedPolicy):
        def act(self, obs):
            out = super().act(obs)
            steps.append((obs.t, obs.cars.copy(), self.control.copy()))
            return out

    run_closed_loop(Log("m", ConstantPolicy("c"), ExpertPolicy(), 0.5, switch_every=4, max_lateral=50.0,
                        max_heading_deg=179.0), world, list(range(0, 160, 10)), cfg)
    by_period: dict[tuple[int, int], set[str]] = {}
    for t, cars, control in steps:
        for car, who in zip(cars.tolist(), control.tolist()):
            by_period.setdefault((car, t // 4), set()).add(who)
    assert all(len(v) == 1 for v in by_period.values())          # one draw per car and period
    drawn = [next(iter(v)) for v in by_period.values()]
    assert len(drawn) > 100 and 0.35 < drawn.count(CONTROL_STUDENT) / len(drawn) < 0.65


def test_recorded_windows_train_on_the_teachers_actions_and_the_union_keeps_label_statistics(world_root, tmp_path):
    root = tmp_path / "world"
    shutil.copytree(world_root, root)
    world = load_world(root, "test", "segment_0002")
    run_closed_loop(ConstantPolicy("c"), world, [0], ClosedLoopConfig(time_limit=0.5, seq_len=3),
                    recorder=DriveRecorder(root, "round_01", world, "c"))
    cfg = StudentTrainConfig(data_root=str(root), seq_len=3, extra_train_splits=["round_01"])
    train, _ = train_valid_datasets(cfg, lambda split, segs: CameraSequenceDataset(root, split, 3, image_size=SIZE,
                                                                                   segments=segs))
    plain = CameraSequenceDataset(root, "train", 3, image_size=SIZE)
    recorded = CameraSequenceDataset(root, "round_01", 3, image_size=SIZE)
    assert len(train) == len(plain) + len(recorded) == len(plain) + 8 and train.keys == plain.keys + recorded.keys
    assert bool(train[0]["expert_label"]) and not bool(train[len(plain)]["expert_label"])
    np.testing.assert_array_equal(train.frame_actions(), plain.frame_actions())   # executed commands left out
    # BC: labels where the window has them, the teacher's actions for recorded windows with a row, else nothing
    torch.manual_seed(0)
    pred, actions, teacher = torch.randn(4, 3, 2), torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    batch = {"actions": actions, "teacher": {"actions": teacher}, "has_kd": torch.tensor([False, True, False, True]),
             "expert_label": torch.tensor([True, False, False, True])}
    w, norm = action_weights(1.0, 0.05), (lambda a: a * 2.0)
    got = _bc_loss(pred, batch, norm, w, 0.0)
    want = action_loss(norm(pred[[0, 1, 3]]), norm(torch.stack([actions[0], teacher[1], actions[3]])), w, 0.0)
    torch.testing.assert_close(got, want)
    everyone = {**batch, "expert_label": torch.ones(4, dtype=torch.bool)}
    torch.testing.assert_close(_bc_loss(pred, everyone, norm, w, 0.0), action_loss(norm(pred), norm(actions), w, 0.0))


def test_oracle_labels_are_the_experts_would_be_commands_and_inputs_stay_the_executed_ones(world_root, tmp_path):
    """label_by_expert (the oracle baseline) makes the expert_* columns the windows' action labels and the
    windows expert-labelled; the inputs (measured speed, previous executed steering) are unchanged."""
    root = tmp_path / "world"
    shutil.copytree(world_root, root)
    world = load_world(root, "test", "segment_0002")
    run_closed_loop(ConstantPolicy("c"), world, [0], ClosedLoopConfig(time_limit=0.5, seq_len=3),
                    recorder=DriveRecorder(root, "round_01", world, "c"))
    before = CameraSequenceDataset(root, "round_01", 3, image_size=SIZE)
    assert label_by_expert(root, "round_01") == ["segment_0002_c00"]
    after = CameraSequenceDataset(root, "round_01", 3, image_size=SIZE)
    rows = _rows(root / "round_01" / "segment_0002_c00" / "meta" / "data.csv")
    expert = np.array([[float(r["expert_wheel_angle"]), float(r["expert_speed_command"])] for r in rows])
    executed = np.array([[float(r["wheel_angle"]), float(r["speed_command"])] for r in rows])
    assert not np.allclose(expert, executed)                       # the constant policy is no expert
    for i in range(len(after)):
        a, b = after[i], before[i]
        start = after.windows[i][1]
        np.testing.assert_allclose(a["actions"].numpy(), expert[start:start + 3], rtol=0, atol=1e-4)
        np.testing.assert_allclose(b["actions"].numpy(), executed[start:start + 3], rtol=0, atol=1e-4)
        torch.testing.assert_close(a["steering"], b["steering"])
        torch.testing.assert_close(a["speed"], b["speed"])
        assert bool(a["expert_label"]) and not bool(b["expert_label"])
    np.testing.assert_allclose(after.frame_actions(), expert, atol=1e-4)
    doc = read_recorded(root / "round_01" / "segment_0002_c00")
    assert doc["label_columns"] == {"wheel_angle": "expert_wheel_angle", "speed_command": "expert_speed_command"}
    doc["label_columns"] = {"wheel_angle": "nope", "speed_command": "expert_speed_command"}
    (root / "round_01" / "segment_0002_c00" / "meta" / "recorded.json").write_text(__import__("json").dumps(doc))
    with pytest.raises(Exception, match="nope"):
        CameraSequenceDataset(root, "round_01", 3, image_size=SIZE)


def _recorded_round_and_teacher(world_root: Path, tmp_path: Path, seconds: float) -> tuple[Path, Path]:
    """A copy of the world with split ``round_01``: two cars of the constant policy driven ``seconds`` on test
    track segment_0002 and recorded; and a fresh tiny teacher checkpoint (seed 0) to export with."""
    root = tmp_path / "world"
    shutil.copytree(world_root, root)
    world = load_world(root, "test", "segment_0002")
    run_closed_loop(ConstantPolicy("c"), world, [0, 60], ClosedLoopConfig(time_limit=seconds, seq_len=3),
                    recorder=DriveRecorder(root, "round_01", world, "c"))
    torch.manual_seed(0)
    tcfg = TeacherConfig.preset_named("tiny")
    ckpt = save_checkpoint(tmp_path / "teacher.pt", {"model": LiDARBEVTeacher(tcfg).state_dict(),
                                                     "config": tcfg.to_dict()}, kind="teacher")
    return root, Path(ckpt)


def test_export_append_adds_a_recorded_split_and_leaves_earlier_chunks_byte_identical(world_root, tmp_path, capsys):
    root, ckpt = _recorded_round_and_teacher(world_root, tmp_path, seconds=0.5)
    store = tmp_path / "mb.zarr"
    base = ["--data_root", str(root), "--teacher_ckpt", str(ckpt), "--store", str(store), "--seq_len", "3",
            "--shard_rows", "16", "--num_workers", "0", "--no_progress"]
    assert export_main(base + ["--split", "train"]) == 0
    train_rows, _ = open_memorybank(str(store)).get_batch(open_memorybank(str(store)).split_keys("train"))
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file() and "keys" not in p.parts}
    capsys.readouterr()
    assert export_main(base + ["--split", "round_01", "--append"]) == 0
    assert "existing chunk file(s) and the keys of 1 earlier split(s) unchanged" in capsys.readouterr().out
    bank = open_memorybank(str(store))
    assert bank.split_keys("round_01") == CameraSequenceDataset(root, "round_01", 3, image_size=SIZE).keys
    for path, data in before.items():
        if path.name != "zarr.json":
            assert path.read_bytes() == data, path
    again, missing = bank.get_batch(bank.split_keys("train"))
    assert missing == []
    for name in ("actions", "bev_vec", "gru_out"):
        np.testing.assert_array_equal(again[name], train_rows[name])
    assert export_main(base + ["--split", "round_01", "--append", "--overwrite"]) == 2      # a config error
    assert export_main([*base[:5], str(tmp_path / "none.zarr"), *base[6:], "--split", "round_01", "--append"]) == 1
    assert "does not exist" in capsys.readouterr().err
    snapshot = _append_snapshot(ExportConfig(data_root=str(root), split=["round_01"], store=str(store), append=True))
    shard = next(p for p in sorted(store.rglob("*")) if p.is_file() and "light" in p.parts and p.name != "zarr.json")
    shard.write_bytes(shard.read_bytes()[:-1] + bytes([shard.read_bytes()[-1] ^ 1]))
    with pytest.raises(StoreCorruptError, match="an existing chunk changed"):
        _check_append(ExportConfig(data_root=str(root), split=["round_01"], store=str(store), append=True),
                      snapshot, open_memorybank(str(store)))


def test_an_append_cut_short_resumes_and_still_proves_the_earlier_splits_unchanged(world_root, tmp_path, capsys,
                                                                                  monkeypatch):
    """An ``--append`` killed after some of its rows were written: the rerun finishes the split (its own files,
    already on disk, are not the earlier splits' and may change) and still checks the earlier splits' files."""
    root, ckpt = _recorded_round_and_teacher(world_root, tmp_path, seconds=1.0)
    store = tmp_path / "mb.zarr"
    base = ["--data_root", str(root), "--teacher_ckpt", str(ckpt), "--store", str(store), "--seq_len", "3",
            "--shard_rows", "8", "--write_rows", "8", "--num_workers", "0", "--no_progress"]
    assert export_main(base + ["--split", "train"]) == 0
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file() and "keys" not in p.parts
              and p.name != "zarr.json"}
    bank_cls = type(open_memorybank(str(store)))
    write_rows, calls = bank_cls.write_rows, []

    def killed_after_one(self, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return write_rows(self, *args, **kwargs)

    monkeypatch.setattr(bank_cls, "write_rows", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        export_main(base + ["--split", "round_01", "--append"])
    monkeypatch.setattr(bank_cls, "write_rows", write_rows)
    bank = open_memorybank(str(store))
    assert 0 < len(bank.split_keys("round_01")) and bank.incomplete_ranges("round_01")      # cut short
    capsys.readouterr()
    assert export_main(base + ["--split", "round_01", "--append"]) == 0, capsys.readouterr().err
    assert "unchanged" in capsys.readouterr().out
    bank = open_memorybank(str(store))
    assert not bank.incomplete_ranges("round_01")
    for path, data in before.items():
        assert path.read_bytes() == data, path


def test_a_lidar_only_track_is_driven_and_recorded_with_the_worlds_camera_rig(tmp_path):
    """A LiDAR-only training track (no camera/calib.json) can be driven and recorded (the teacher's own rounds):
    the world's camera rig stands in, and the recording is a dataset segment with camera frames."""
    from e2r.sim.world import SyntheticConfig
    root = tmp_path / "world"
    generate_dataset(root, config=SyntheticConfig(tracks=3, frames=6, image_size=SIZE, lidar_only_tracks=1, seed=3),
                     workers=1, progress=False)
    lidar_only = [p for p in sorted((root / "train").iterdir()) if not (p / "camera" / "calib.json").exists()]
    assert len(lidar_only) == 1
    world = load_world(root, "train", lidar_only[0].name)
    assert world.cameras and world.cameras[0].name == "front"
    recorder = DriveRecorder(tmp_path / "rec", "round_01", world, "expert")
    run_closed_loop(ExpertPolicy(), world, [0], ClosedLoopConfig(time_limit=0.3, seq_len=3), recorder=recorder)
    stats, problems = check_split(DatasetCheck(data_root=str(tmp_path / "rec"), seq_len=3, image_size=SIZE,
                                               no_progress=True), "round_01")
    assert problems == [] and stats["frames"] == 6
    assert len(list((tmp_path / "rec" / "round_01").glob("*/camera/*.png"))) == 6


def test_oversample_braking_repeats_the_windows_whose_labels_brake_and_only_labels_count(world_root, tmp_path):
    """``--oversample_braking K`` keeps each window with a speed label over 1 m/s below the measured speed K times
    (in order, keys following), the others once; a recorded drive's executed commands are no labels (no window of
    it brakes) until the expert labels it; K < 1 is refused by name."""
    root = tmp_path / "world"
    shutil.copytree(world_root, root)
    csv_path = root / "train" / "segment_0000" / "meta" / "data.csv"
    rows = _rows(csv_path)
    rows[3]["speed_command"] = f"{float(rows[3]['velocity']) - 5.0:.4f}"        # the expert brakes at frame 3
    for r in rows[:3] + rows[4:]:
        r["speed_command"] = r["velocity"]
    _write_rows(csv_path, rows)
    make = lambda split, segs: CameraSequenceDataset(root, split, 3, image_size=SIZE, segments=segs)  # noqa: E731
    plain = make("train", ["segment_0000"])
    braking = plain.window_braking(1.0)
    np.testing.assert_array_equal(braking, [s <= 3 < s + 3 for _, s in plain.windows])
    assert 0 < braking.sum() < len(plain)
    tcfg = StudentTrainConfig(data_root=str(root), seq_len=3, train_segments=["segment_0000"], oversample_braking=3)
    train, _ = train_valid_datasets(tcfg, make)
    assert train.keys == [k for k, b in zip(plain.keys, braking) for _ in range(3 if b else 1)]
    assert train.windows == [w for w, b in zip(plain.windows, braking) for _ in range(3 if b else 1)]

    world = load_world(root, "test", "segment_0002")
    run_closed_loop(ConstantPolicy("c"), world, [0], ClosedLoopConfig(time_limit=0.5, seq_len=3),
                    recorder=DriveRecorder(root, "round_01", world, "c"))
    rec_path = root / "round_01" / "segment_0002_c00" / "meta" / "data.csv"
    rec = _rows(rec_path)
    for r in rec:                                                           # executed: hard braking throughout
        r["speed_command"] = f"{max(float(r['velocity']) - 5.0, 0.0):.4f}"
    _write_rows(rec_path, rec)
    assert not make("round_01", None).window_braking(1.0).any()              # executed commands: not labels
    label_by_expert(root, "round_01")
    labelled = make("round_01", None)
    table = labelled.tables["segment_0002_c00"]
    frames = table.actions()[:, 1] < table.velocity - 1.0
    np.testing.assert_array_equal(labelled.window_braking(1.0), [frames[s:s + 3].any() for _, s in labelled.windows])
    with pytest.raises(ConfigError, match="--oversample_braking must be >= 1"):
        StudentTrainConfig(data_root=str(root), oversample_braking=0).check()


def test_a_mixed_drive_records_what_student_and_teacher_proposed_and_training_keeps_their_disagreements(
        world_root, tmp_path):
    """The student_* / teacher_* columns of a mixed drive hold each party's would-be command (the executed one is
    the driver's); ``extra_keep_fraction`` keeps the recorded windows where they differ most; a drive recorded
    without them is refused by name when disagreement is asked for."""
    root = tmp_path / "world"
    shutil.copytree(world_root, root)
    world = load_world(root, "test", "segment_0002")
    cfg = ClosedLoopConfig(time_limit=1.5, seq_len=3, seed=2)
    mixed = MixedPolicy("m", ConstantPolicy("c"), ExpertPolicy(), 0.5, switch_every=3, max_lateral=50.0,
                        max_heading_deg=179.0)
    run_closed_loop(mixed, world, [0], cfg, recorder=DriveRecorder(root, "round_01", world, "m"))
    rows = _rows(root / "round_01" / "segment_0002_c00" / "meta" / "data.csv")
    cols = lambda *names: np.array([[float(r[n]) for n in names] for r in rows])      # noqa: E731
    executed = cols("wheel_angle", "speed_command")
    student = cols("student_wheel_angle", "student_speed_command")
    teacher = cols("teacher_wheel_angle", "teacher_speed_command")
    by_student = np.array([r["control"] == CONTROL_STUDENT for r in rows])
    assert 0 < by_student.sum() < len(rows)
    np.testing.assert_allclose(executed[by_student], student[by_student], atol=1e-4)
    np.testing.assert_allclose(executed[~by_student], teacher[~by_student], atol=1e-4)
    assert np.abs(student[:, 0] - teacher[:, 0]).max() > 0.5            # the two parties do disagree

    ds = CameraSequenceDataset(root, "round_01", 3, image_size=SIZE)
    gap = np.abs(student[:, 0] - teacher[:, 0])
    np.testing.assert_allclose(ds.tables["segment_0002_c00"].disagreement, gap, atol=2e-4)
    score = ds.window_disagreement()
    np.testing.assert_allclose(score, [gap[s:s + 3].mean() for _, s in ds.windows], atol=2e-4)
    tcfg = StudentTrainConfig(data_root=str(root), seq_len=3, extra_train_splits=["round_01"], extra_keep_fraction=0.25)
    make = lambda split, segs: CameraSequenceDataset(root, split, 3, image_size=SIZE, segments=segs)  # noqa: E731
    train, _ = train_valid_datasets(tcfg, make)
    kept = train.parts[1]
    n = int(np.ceil(0.25 * len(score)))
    assert len(kept) == n and kept.keys == [ds.keys[i] for i in sorted(np.argsort(-score, kind="stable")[:n])]
    assert kept.window_disagreement().min() >= np.sort(score)[::-1][n - 1]
    assert len(train.parts[0]) == len(CameraSequenceDataset(root, "train", 3, image_size=SIZE))   # labelled: all

    run_closed_loop(ConstantPolicy("c"), world, [0], ClosedLoopConfig(time_limit=0.5, seq_len=3),
                    recorder=DriveRecorder(root, "round_02", world, "c"))
    assert "student_wheel_angle" not in _rows(root / "round_02" / "segment_0002_c00" / "meta" / "data.csv")[0]
    with pytest.raises(DataError, match="round_02.*segment_0002_c00.*teacher_wheel_angle"):
        train_valid_datasets(StudentTrainConfig(data_root=str(root), seq_len=3, extra_train_splits=["round_02"],
                                                extra_keep_fraction=0.5), make)
