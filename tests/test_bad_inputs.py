"""Hostile inputs ("Nothing served wrong"): each is refused with a clear error naming the file (and row), the
checkpoint (and tensor) or the flag, never a traceback, a silent misread or a huge allocation."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from e2r.data.readers import DataError, read_calib, read_image, read_npy, read_pcd, read_points
from tests.export_fixtures import make_teacher_ckpt
from tests.fixtures import make_points, write_calib, write_points_bin


@pytest.fixture
def rng():
    return np.random.default_rng(3)


# ----- 1. silent misreads ------------------------------------------------------------------------------------
def test_16_bit_png_is_scaled_by_its_bit_depth(tmp_path):
    gray = (np.arange(16 * 32).reshape(16, 32) * 100).astype(np.uint16)
    Image.fromarray(gray).save(tmp_path / "a.png")
    image, original = read_image(tmp_path / "a.png")
    assert original == (32, 16) and image.shape == (3, 16, 32)
    np.testing.assert_allclose(image[0], gray / 65535.0, atol=1e-6)
    assert image.min() < 0.01 and 0.7 < image.max() < 0.8          # not all ones
    resized, _ = read_image(tmp_path / "a.png", (16, 8))
    assert resized.shape == (3, 8, 16) and 0.0 <= resized.min() and resized.max() < 0.8


def test_complex_npy_is_refused(tmp_path, rng):
    np.save(tmp_path / "c.npy", make_points(rng, 50, 4).astype(np.complex64) * (1 + 1j))
    with pytest.raises(DataError, match="complex"):
        read_npy(tmp_path / "c.npy", row=3)


def test_npy_header_declaring_more_data_than_the_file_is_refused(tmp_path, rng):
    np.save(tmp_path / "t.npy", make_points(rng, 1000, 4))
    raw = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="t.npy"):
        read_npy(tmp_path / "t.npy")


@pytest.mark.parametrize("column,value,match", [(3, -5.0, "intensity"), (3, 1e9, "intensity"),
                                                 (0, 1e6, "farther than")])
def test_every_read_frame_is_validated_not_only_the_sampled_ones(tmp_path, rng, column, value, match):
    pts = make_points(rng, 200, 4)
    pts[: (50 if match == "farther than" else 1), column] = value
    path = write_points_bin(tmp_path / "x.bin", pts)
    with pytest.raises(DataError, match=match) as e:
        read_points(path, 4, row=7)
    assert e.value.row == 7 and e.value.file == str(path)


def test_five_feature_ring_column_checked_on_every_read(tmp_path, rng):
    pts = make_points(rng, 200, 5)
    pts[10, 4] = 0.5
    with pytest.raises(DataError, match="ring"):
        read_points(write_points_bin(tmp_path / "r.bin", pts), 5, row=2)


def test_a_bad_frame_the_layout_detection_never_sampled_is_refused_by_the_dataset(tmp_path):
    from e2r.data.datasets import LidarSequenceDataset
    from tests.fixtures import write_tiny_dataset

    root = write_tiny_dataset(tmp_path / "d", {"train": 1}, frames=12, camera=False)
    seg = root / "train" / "segment_0000"
    bins = sorted((seg / "lidar").glob("*.bin"))
    pts = np.fromfile(bins[4], dtype="<f4").reshape(-1, 4).copy()   # frame 4: not first, middle or last
    pts[:, 3] = -1.0
    pts.astype("<f4").tofile(bins[4])
    ds = LidarSequenceDataset(root, "train", seq_len=5)
    ds.point_layout("segment_0000")
    with pytest.raises(DataError, match="intensity") as e:
        ds[0]
    assert e.value.row == 4


# ----- 2. tracebacks -----------------------------------------------------------------------------------------
def _pcd(path, fields, sizes, types, counts, n, data: bytes):
    header = (f"VERSION 0.7\nFIELDS {' '.join(fields)}\nSIZE {' '.join(map(str, sizes))}\n"
              f"TYPE {' '.join(types)}\nCOUNT {' '.join(map(str, counts))}\nWIDTH {n}\nHEIGHT 1\n"
              f"POINTS {n}\nDATA binary\n")
    path.write_bytes(header.encode() + data)
    return path


@pytest.mark.parametrize("fields,counts,match", [
    (["x", "y", "z", "intensity"], [2, 1, 1, 1], "COUNT 2"),
    (["x", "y", "z", "intensity", "x"], [1, 1, 1, 1, 1], "appears 2 times"),
])
def test_pcd_count_above_one_or_repeated_field_is_a_data_error(tmp_path, fields, counts, match):
    n = 10
    path = _pcd(tmp_path / "p.pcd", fields, [4] * len(fields), ["F"] * len(fields), counts, n,
                np.zeros(n * sum(counts), "<f4").tobytes())
    with pytest.raises(DataError, match=match):
        read_pcd(path, row=1)


def test_pcd_padding_fields_may_repeat_and_have_counts(tmp_path, rng):
    n = 20
    pts = make_points(rng, n, 4)
    rec = np.zeros(n, dtype=[("x", "<f4"), ("_a", "<f4", (3,)), ("y", "<f4"), ("z", "<f4"), ("_b", "<f4"),
                             ("intensity", "<f4")])
    rec["x"], rec["y"], rec["z"], rec["intensity"] = pts.T
    path = _pcd(tmp_path / "p.pcd", ["x", "_", "y", "z", "_", "intensity"], [4] * 6, ["F"] * 6,
                [1, 3, 1, 1, 1, 1], n, rec.tobytes())
    out, _ = read_pcd(path)
    np.testing.assert_array_equal(out, pts)


def test_decompression_bomb_is_a_data_error(tmp_path):
    Image.new("L", (20000, 14000)).save(tmp_path / "bomb.png")
    with pytest.raises(DataError, match="bomb.png"):
        read_image(tmp_path / "bomb.png", row=5)


def test_deeply_nested_calib_json_is_a_data_error(tmp_path):
    path = tmp_path / "calib.json"
    path.write_text("[" * 200000 + "]" * 200000)
    with pytest.raises(DataError, match="nested"):
        read_calib(path)


@pytest.mark.parametrize("fx", [1e-300, 1e300])
def test_k_that_is_not_invertible_in_float32_is_refused(tmp_path, fx):
    path = write_calib(tmp_path / "calib.json", (32, 16))
    doc = json.loads(path.read_text())
    doc["cameras"][0]["K"][0][0] = fx
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"calib.json.*K is not usable in float32"):
        read_calib(path)


# ----- 3. huge allocations from tiny files -------------------------------------------------------------------
def test_huge_image_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch):
    Image.new("L", (12000, 6000)).save(tmp_path / "big.png")          # 72 M pixels: below Pillow's bomb limit
    assert (tmp_path / "big.png").stat().st_size < 200_000
    loaded = []
    from PIL import ImageFile
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loaded.append(1))
    with pytest.raises(DataError, match="refused before decoding"):
        read_image(tmp_path / "big.png")
    assert not loaded


def test_image_far_larger_than_expected_is_refused(tmp_path):
    Image.new("RGB", (640, 480)).save(tmp_path / "a.png")
    with pytest.raises(DataError, match="expected 32x16"):
        read_image(tmp_path / "a.png", expected_size=(32, 16))
    assert read_image(tmp_path / "a.png", expected_size=(640, 480))[1] == (640, 480)


# ----- 2./4. flags: output paths naming a directory, --epochs 0 ----------------------------------------------
def test_output_flags_naming_a_directory_are_config_errors(tmp_path):
    from e2r.errors import ConfigError
    from e2r.workflow.configs import TeacherEvalConfig, TeacherTrainConfig

    for flag in ("save_path", "checkpoint_path"):
        with pytest.raises(ConfigError, match=f"--{flag}"):
            TeacherTrainConfig(data_root="d", **{flag: str(tmp_path)}).check()
    with pytest.raises(ConfigError, match="--csv_path"):
        TeacherEvalConfig(data_root="d", teacher_ckpt="t.pt", csv_path=str(tmp_path)).check()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="--plot_path"):
        TeacherEvalConfig(data_root="d", teacher_ckpt="t.pt", plot_path=str(tmp_path / "file" / "p.png")).check()
    TeacherTrainConfig(data_root="d", save_path=str(tmp_path / "new" / "best.pt")).check()   # fine


def test_train_pipeline_refuses_epochs_0_and_a_directory_save_path_before_training(tmp_path, capsys):
    from pipelines import train_teacher
    from tests.fixtures import write_tiny_dataset

    root = write_tiny_dataset(tmp_path / "d", {"train": 1, "valid": 1}, camera=False)
    base = ["--data_root", str(root), "--device", "cpu", "--no_progress"]
    assert train_teacher.main(base + ["--epochs", "0", "--save_path", str(tmp_path / "t.pt")]) == 1
    assert "--epochs must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "t.pt").exists()
    assert train_teacher.main(base + ["--epochs", "1", "--save_path", str(tmp_path)]) == 1
    assert "--save_path" in capsys.readouterr().err
    for flag, value in (("--hflip_prob", "1.5"), ("--steer_input_dropout", "-0.1"), ("--hflip_prob", "nan")):
        assert train_teacher.main(base + [flag, value, "--save_path", str(tmp_path / "t.pt")]) == 1
        assert f"{flag} must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "t.pt").exists()


def test_trainer_checks_a_config_built_directly(tmp_path):
    from e2r.errors import ConfigError
    from e2r.workflow.configs import TeacherTrainConfig
    from e2r.workflow.train import train_teacher
    from tests.fixtures import write_tiny_dataset

    root = write_tiny_dataset(tmp_path / "d", {"train": 1}, camera=False)
    with pytest.raises(ConfigError, match="--epochs"):
        train_teacher(TeacherTrainConfig(data_root=str(root), valid_split="", epochs=0, device="cpu",
                                         save_path=str(tmp_path / "t.pt")))


# ----- 4. csv line numbers after blank lines -----------------------------------------------------------------
def test_csv_messages_give_the_true_line_after_blank_lines(tmp_path):
    from e2r.data.layout import read_segment_table
    from tests.fixtures import write_tiny_dataset

    root = write_tiny_dataset(tmp_path / "d", {"train": 1}, frames=6, camera=False)
    csv_path = root / "train" / "segment_0000" / "meta" / "data.csv"
    lines = csv_path.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[4].split(",")
    cells[header.index("velocity")] = "fast"
    lines[4] = ",".join(cells)                                   # frame 3
    csv_path.write_text("\n".join(lines[:2] + ["", ""] + lines[2:]) + "\n")   # two blank lines before frame 1
    with pytest.raises(DataError, match=r"'velocity' \(line 7\)") as e:
        read_segment_table(root, "train", "segment_0000", lidar=True)
    assert e.value.row == 3
    assert csv_path.read_text().splitlines()[6].split(",")[header.index("velocity")] == "fast"


def test_timestamp_and_pose_columns_are_read_and_checked(tmp_path):
    from e2r.data.layout import read_segment_table
    from tests.fixtures import write_tiny_dataset

    root = write_tiny_dataset(tmp_path / "d", {"train": 1}, frames=6, camera=False)
    csv_path = root / "train" / "segment_0000" / "meta" / "data.csv"
    original = csv_path.read_text().splitlines()

    def rewrite(extra: dict[str, list[str]]) -> None:
        lines = [original[0] + "".join(f",{c}" for c in extra)]
        lines += [row + "".join(f",{v[i]}" for v in extra.values()) for i, row in enumerate(original[1:])]
        csv_path.write_text("\n".join(lines) + "\n")

    has_stamp = "timestamp" in original[0].split(",")
    stamps = {} if has_stamp else {"timestamp": [f"{0.05 * i:.3f}" for i in range(6)]}
    rewrite({**stamps, "x": [str(i) for i in range(6)], "y": ["2"] * 6, "yaw": ["0.5"] * 6})
    t = read_segment_table(root, "train", "segment_0000", lidar=True)
    assert t.pose.shape == (6, 3) and t.pose[3].tolist() == [3.0, 2.0, 0.5]
    assert np.all(np.diff(t.timestamp) > 0)
    rewrite({**stamps, "x": ["1"] * 6, "y": ["2"] * 6})                        # yaw missing
    with pytest.raises(DataError, match=r"pose columns \['x', 'y'\] without \['yaw'\]"):
        read_segment_table(root, "train", "segment_0000", lidar=True)
    if has_stamp:
        header = original[0].split(",")
        lines = [line.split(",") for line in original]
        lines[4][header.index("timestamp")] = lines[3][header.index("timestamp")]    # frame 3 repeats frame 2
        csv_path.write_text("\n".join(",".join(c) for c in lines) + "\n")
    else:
        rewrite({"timestamp": ["0", "0.05", "0.1", "0.1", "0.2", "0.25"]})
    with pytest.raises(DataError, match="line 5: timestamp .* is not after") as e:
        read_segment_table(root, "train", "segment_0000", lidar=True)
    assert e.value.row == 3


# ----- 2./3. checkpoints: non-finite weights, sizes the weights do not have ----------------------------------
@pytest.fixture
def teacher_ckpt(tmp_path):
    from e2r.checkpoints import save_checkpoint
    from e2r.models.config import TeacherConfig
    from e2r.models.teacher import LiDARBEVTeacher

    cfg = TeacherConfig.preset_named("tiny")
    model = LiDARBEVTeacher(cfg)
    return save_checkpoint(tmp_path / "t.pt", {"model": model.state_dict(), "config": cfg.to_dict()}, "teacher")


def _rewrite(path, change):
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_checkpoint_with_non_finite_weights_is_refused_naming_file_and_tensor(teacher_ckpt, bad):
    from e2r.checkpoints import load_checkpoint
    from e2r.errors import CheckpointError
    from e2r.models.teacher import load_teacher

    name = next(k for k, v in torch.load(teacher_ckpt, weights_only=True)["model"].items() if v.is_floating_point())
    _rewrite(teacher_ckpt, lambda c: c["model"][name].view(-1).__setitem__(0, bad))
    for load in (load_checkpoint, load_teacher):
        with pytest.raises(CheckpointError, match=rf"{teacher_ckpt}.*{name!r}.*non-finite"):
            load(teacher_ckpt)


def test_tiny_checkpoint_declaring_huge_sizes_is_refused_before_building(tmp_path, teacher_ckpt, monkeypatch):
    from e2r.errors import CheckpointError
    from e2r.models import teacher as teacher_mod

    built = []
    real = teacher_mod.LiDARBEVTeacher.__init__
    monkeypatch.setattr(teacher_mod.LiDARBEVTeacher, "__init__",
                        lambda self, cfg: (built.append(torch.empty(0).device.type), real(self, cfg))[1])
    small = {"a": torch.zeros(4)}
    path = tmp_path / "small.pt"
    torch.save({"format": "e2r-checkpoint", "format_version": 1, "kind": "teacher",
                "config": {**torch.load(teacher_ckpt, weights_only=True)["config"], "gru_hidden": 10 ** 6},
                "model": small}, path)
    assert path.stat().st_size < 4000
    with pytest.raises(CheckpointError, match=r"small.pt.*gru_hidden"):      # beyond any bound: not even built
        teacher_mod.load_teacher(path)
    assert built == []
    # gru_hidden 12000 (1.9 GB if built): refused after a build on the meta device (shapes only, no memory)
    _rewrite(path, lambda c: c["config"].__setitem__("gru_hidden", 12000))
    with pytest.raises(CheckpointError, match=r"small.pt.*do not match"):
        teacher_mod.load_teacher(path)
    assert built == ["meta"]
    _rewrite(teacher_ckpt, lambda c: c["config"].__setitem__("gru_hidden", 256))
    with pytest.raises(CheckpointError, match=r"t.pt.*shape mismatch \['gru"):
        teacher_mod.load_teacher(teacher_ckpt)
    assert built == ["meta", "meta"]
    teacher_mod.load_teacher(_rewrite(teacher_ckpt, lambda c: c["config"].__setitem__("gru_hidden", 128)))
    assert built == ["meta", "meta", "meta", "cpu"]


def test_resume_from_a_checkpoint_declaring_huge_sizes_is_refused(tmp_path, teacher_ckpt, capsys):
    from pipelines import train_student, train_teacher

    for kind, module in (("teacher", train_teacher), ("student", train_student)):
        path = tmp_path / f"{kind}_resume.pt"
        torch.save({"format": "e2r-checkpoint", "format_version": 1, "kind": kind, "epoch": 0,
                    "config": {**torch.load(teacher_ckpt, weights_only=True)["config"], "gru_hidden": 10 ** 6},
                    "model": {"a": torch.zeros(4)}}, path)
        rc = module.main(["--data_root", str(tmp_path / "absent"), "--resume_path", str(path), "--device", "cpu",
                          "--save_path", str(tmp_path / "x.pt"), "--no_progress"])
        assert rc == 1 and f"{path}" in (err := capsys.readouterr().err) and "gru_hidden" in err, err


# ----- 4. export --lidar_num_features 4; 5. DataLoader workers die with their parent --------------------------
def test_export_flag_lidar_num_features_4_is_an_int():
    import argparse

    from e2r.cli_config import num_features

    assert num_features("4") == 4 and num_features("auto") == "auto"
    with pytest.raises(argparse.ArgumentTypeError):
        num_features("6")


def test_die_with_parent_changes_no_random_state():
    from e2r.runtime import capture_rng_state, die_with_parent

    before = capture_rng_state()
    die_with_parent(0)
    after = capture_rng_state()
    assert torch.equal(before["torch"], after["torch"]) and before["python"] == after["python"]


def test_sigkilled_export_leaves_no_worker_process(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil

    from tests.fixtures import write_tiny_dataset

    repo = Path(__file__).resolve().parents[1]
    data = write_tiny_dataset(tmp_path / "data", {"train": 2}, frames=9, camera=False)
    ckpt = make_teacher_ckpt(tmp_path / "teacher.pt")
    store = tmp_path / "orphan_check_unique.zarr"
    cmd = [sys.executable, "-m", "pipelines.export", "--data_root", str(data), "--teacher_ckpt", str(ckpt),
           "--store", str(store), "--split", "train", "--seq_len", "5", "--batch_size", "1", "--write_rows", "1",
           "--shard_rows", "2", "--num_workers", "2", "--no_progress", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    children: list = []
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(children) < 2:
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    assert len(children) >= 2, f"export ended before its workers started: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def survivors():
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        for p in psutil.process_iter(["pid", "cmdline", "status"]):
            if str(store) in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(p)
        return alive

    deadline = time.time() + 3      # less than the DataLoader's own 5 s parent check
    while survivors() and time.time() < deadline:
        time.sleep(0.05)
    left = survivors()
    for p in left:
        p.kill()
    assert not left, f"workers outlived the killed export: {left}"


# ----- issue 25: every format's size and header claims checked against the data before allocating -----------
def _sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.mark.parametrize("name", ["p.bin", "p.npy", "p.pcd", "i.png", "calib.json"])
def test_sparse_8_gib_file_is_refused_from_its_size_before_reading(tmp_path, name, monkeypatch):
    path = _sparse(tmp_path / name, 8 << 30)          # 8 GiB claimed, nothing on disk
    read = []
    monkeypatch.setattr(type(path), "read_bytes", lambda self: read.append(self) or b"")
    reader = {"bin": lambda p: read_points(p, 4), "npy": read_npy, "pcd": read_pcd, "png": read_image,
              "json": read_calib}[name.split(".")[1]]
    with pytest.raises(DataError, match=rf"{name}: file is {8 << 30} bytes, more than .* refused before reading"):
        reader(path)
    assert not read


def test_point_count_cap_and_layout_detection_skip_oversized_files(tmp_path):
    from e2r.data.point_layout import MAX_POINT_FILE_BYTES, MAX_POINTS_PER_FRAME, LayoutUndecidable, detect_bin_layout

    path = _sparse(tmp_path / "many.bin", (MAX_POINTS_PER_FRAME + 1) * 16)    # 4.2 M + 1 points of 4 features
    with pytest.raises(DataError, match=f"{MAX_POINTS_PER_FRAME + 1} points, more than a LiDAR frame may hold"):
        read_points(path, 4)
    with pytest.raises(LayoutUndecidable, match="more than a point file may hold"):
        detect_bin_layout([_sparse(tmp_path / "huge.bin", MAX_POINT_FILE_BYTES + 4)])


def _extras(rng, n):
    """Columns 4..7 of a real 8-feature sensor: ring, time (s), range (m), ambient."""
    return np.column_stack([rng.integers(0, 32, n), rng.uniform(0, 0.1, n), rng.uniform(0, 80, n),
                            rng.uniform(0, 1000, n)]).astype(np.float32)


def test_frame_whose_feature_count_differs_from_the_segment_is_refused_naming_the_file(tmp_path, rng):
    pts = make_points(rng, 600, 4)
    eight = write_points_bin(tmp_path / "eight.bin", np.hstack([pts, _extras(rng, 600)]))
    with pytest.raises(DataError, match=r"eight.bin.*look like 8 features per point.*segment of 4"):
        read_points(eight, 4)                       # would be read as 1200 points
    zeros = write_points_bin(tmp_path / "zeros.bin", np.hstack([pts, np.zeros((600, 4), np.float32)]))
    with pytest.raises(DataError, match=r"zeros.bin.*every other point is at the origin"):
        read_points(zeros, 4)                       # would put 600 of 1200 points at the origin
    four = write_points_bin(tmp_path / "four.bin", pts)
    with pytest.raises(DataError, match=r"four.bin.*look like 4 features per point.*segment of 8"):
        read_points(four, 8)                        # would be read as 300 points
    assert read_points(four, 4)[0].shape == (600, 4)
    assert read_points(eight, 8)[0].shape == (600, 4)


def test_zero_filled_and_torn_frames_are_refused_scattered_zero_points_are_not(tmp_path, rng):
    with pytest.raises(DataError, match=r"z.bin.*all 500 points are zero: a zero-filled file"):
        read_points(write_points_bin(tmp_path / "z.bin", np.zeros((500, 4), np.float32)), 4)
    pts = make_points(rng, 600, 4)
    torn = pts.copy()
    torn[300:] = 0
    with pytest.raises(DataError, match=r"t.bin.*the last 300 of 600 points are all zeros: a torn write"):
        read_points(write_points_bin(tmp_path / "t.bin", torn), 4)
    with pytest.raises(DataError, match="torn write"):
        np.save(tmp_path / "t.npy", torn)
        read_points(tmp_path / "t.npy")
    organised = pts.copy()
    organised[::7] = 0                               # no-return points of an organised cloud
    organised[-20:] = 0                              # a short zero tail: fewer than 64 points
    assert read_points(write_points_bin(tmp_path / "o.bin", organised), 4)[0].shape == (600, 4)


def _camera_doc(tmp_path, **changes):
    path = write_calib(tmp_path / "calib.json", (640, 480))
    doc = json.loads(path.read_text())
    doc["cameras"][0].update(changes)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("scale", [np.diag([2.0, 2.0, 2.0]), np.diag([1.0, -1.0, 1.0])])
def test_scaled_or_mirrored_cam2ego_is_refused(tmp_path, scale):
    good = np.array(json.loads(write_calib(tmp_path / "g.json", (640, 480)).read_text())["cameras"][0]["cam2ego"])
    bad = good.copy()
    bad[:3, :3] = good[:3, :3] @ scale
    with pytest.raises(DataError, match=r"calib.json: cameras\[0\].cam2ego is not a rigid transform"):
        read_calib(_camera_doc(tmp_path, cam2ego=bad.tolist()))


@pytest.mark.parametrize("fx,fy,axis", [(1e30, 1e30, "fx"), (1e6, 400.0, "fx"), (400.0, 0.01, "fy")])
def test_intrinsics_outside_a_physical_field_of_view_are_refused(tmp_path, fx, fy, axis):
    K = [[fx, 0, 320], [0, fy, 240], [0, 0, 1]]
    with pytest.raises(DataError, match=rf"cameras\[0\].K: {axis} = .* field of view of .* outside the physical"):
        read_calib(_camera_doc(tmp_path, K=K))
    assert read_calib(_camera_doc(tmp_path, K=[[120.0, 0, 320], [0, 120.0, 240], [0, 0, 1]]))   # 139 deg: wide


def test_make_dataset_image_size_beyond_the_readers_limit_is_a_clear_error(tmp_path, capsys):
    from pipelines import make_dataset

    with pytest.raises(SystemExit) as e:                   # refused by the flag's parser (e2r.cli_config.image_size)
        make_dataset.main(["--out", str(tmp_path / "d"), "--image_size", "100000x100000", "--no_progress"])
    assert e.value.code == 2
    assert "--image_size 100000x100000: at most 16384 pixels per side" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_teacher_config_whose_bev_grid_needs_terabytes_is_refused_before_allocating(teacher_ckpt):
    from e2r.errors import CheckpointError
    from e2r.models.teacher import load_teacher

    _rewrite(teacher_ckpt, lambda c: c["config"].__setitem__("voxel_size", [1e-4, 1e-4, 4.0]))
    with pytest.raises(CheckpointError, match=r"t.pt.*512000 x 512000 BEV grid, which would need 6.25e\+04 GiB"):
        load_teacher(teacher_ckpt)


def test_output_paths_under_proc_or_under_a_regular_file_are_clear_errors(tmp_path):
    from e2r.atomic import make_dirs, write_text_atomic
    from e2r.errors import ConfigError
    from e2r.metrics import write_metrics_csv

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'file'} is a file, not a folder"):
        make_dirs(tmp_path / "file" / "out")
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'file'} is a file, not a folder"):
        write_text_atomic(tmp_path / "file" / "a" / "r.json", "{}")
    with pytest.raises(ConfigError, match=r"/proc/e2r_out cannot be created in /proc: .*virtual file system"):
        make_dirs("/proc/e2r_out")
    with pytest.raises(ConfigError, match=r"/proc/m.csv cannot be created in /proc"):
        write_metrics_csv("/proc/m.csv", [{"a": 1}])


def test_checkpoint_path_that_is_a_directory_is_named_as_such(tmp_path):
    from e2r.checkpoints import load_checkpoint
    from e2r.errors import CheckpointError

    with pytest.raises(CheckpointError, match=rf"checkpoint {tmp_path} is a directory, expected a checkpoint file"):
        load_checkpoint(tmp_path)


WEIGHTS = ["kd_action_w", "kd_bevvec_w", "kd_temporal_w", "kd_bevfeat_w", "steer_loss_weight",
           "speed_loss_weight", "smooth_weight", "weight_decay", "grad_clip"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
@pytest.mark.parametrize("name", WEIGHTS)
def test_non_finite_or_negative_weights_are_refused_naming_the_flag(name, bad):
    from e2r.errors import ConfigError
    from e2r.workflow.configs import StudentTrainConfig

    with pytest.raises(ConfigError, match=rf"--{name} must be a finite number >= 0, got {bad}"):
        StudentTrainConfig(data_root="d", **{name: bad}).check()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_bad_brake_weight_is_refused_naming_the_flag(bad):
    from e2r.errors import ConfigError
    from e2r.workflow.configs import TeacherTrainConfig

    with pytest.raises(ConfigError, match=rf"--brake_weight must be a finite number >= 0, got {bad}"):
        TeacherTrainConfig(data_root="d", brake_weight=bad).check()


def test_kd_action_w_nan_is_refused_by_the_pipeline_and_by_kd_weights(tmp_path, capsys):
    from e2r.kd import KDWeights
    from pipelines import train_student

    assert train_student.main(["--data_root", str(tmp_path), "--kd_action_w", "nan", "--device", "cpu"]) == 1
    assert "--kd_action_w must be a finite number >= 0, got nan" in capsys.readouterr().err
    with pytest.raises(ValueError, match="KD weight action must be a finite number >= 0, got nan"):
        KDWeights(action=float("nan"))
