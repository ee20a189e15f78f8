import json
import re
import subprocess
import sys

import numpy as np
from PIL import Image

from e2r.sim.world import SyntheticConfig, generate_dataset
from pipelines.check_dataset import main
from tests.fixtures import read_csv_rows, write_points_bin, write_tiny_dataset


def run(capsys, *argv):
    code = main([str(a) for a in argv] + ["--no_progress"])
    return code, capsys.readouterr().out


def mean_points(root, split, segment, nf):
    rows = read_csv_rows(root / split / segment / "meta" / "data.csv")
    return np.mean([np.fromfile(root / split / segment / r["lidar_filepath"], np.float32).size / nf for r in rows])


def test_clean_dataset_summary_and_exit_zero(tmp_path, capsys):
    root = write_tiny_dataset(tmp_path, splits={"train": 2, "valid": 1}, frames=7, num_features=5)
    code, out = run(capsys, root, "--seq_len", 3, "--stride", 2, "--image_size", "16x8")
    assert code == 0, out
    assert "split(s) train, valid" in out
    assert "split train (lidar+camera): 2 usable segment(s) of 2, 14 frames, 6 windows" in out
    for split, segment in (("train", "segment_0000"), ("train", "segment_0001"), ("valid", "segment_0000")):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(segment)
                    and out.index(ln) > out.index(f"split {split}"))
        assert "5 features/point (detected)" in line
        shown = float(re.search(r"mean ([0-9.]+) points/frame", line).group(1))
        assert abs(shown - mean_points(root, split, segment, 5)) < 0.051
    assert "summary: 2 split(s), 3 segment(s), 21 frames, 9 windows, 0 problem(s) -> OK" in out


def test_given_layout_and_split_selection(tmp_path, capsys):
    root = write_tiny_dataset(tmp_path, splits={"train": 1, "valid": 1}, frames=6, camera=False)
    code, out = run(capsys, root, "--seq_len", 2, "--lidar_num_features", 4, "--splits", "valid")
    assert code == 0
    assert "split valid (lidar)" in out and "split train" not in out and "4 features/point (given)" in out


def test_problems_listed_with_file_and_row_and_exit_one(tmp_path, capsys):
    root = write_tiny_dataset(tmp_path, splits={"train": 3}, frames=6)
    seg0, seg1, seg2 = (root / "train" / f"segment_000{i}" for i in range(3))
    rows0 = read_csv_rows(seg0 / "meta" / "data.csv")
    (seg0 / rows0[4]["image_filepath"]).write_bytes(b"not an image")
    rows1 = read_csv_rows(seg1 / "meta" / "data.csv")
    (seg1 / rows1[2]["lidar_filepath"]).unlink()
    Image.new("RGB", (20, 10)).save(seg1 / rows1[5]["image_filepath"])
    csv2 = seg2 / "meta" / "data.csv"
    velocity_1 = read_csv_rows(csv2)[1]["velocity"]
    csv2.write_text(csv2.read_text().replace(f",{velocity_1},", ",oops,", 1))
    code, out = run(capsys, root, "--seq_len", 2, "--image_size", "16x8")
    assert code == 1
    assert "problems found: 4" in out
    assert f"{seg0 / rows0[4]['image_filepath']}: row 4: corrupt or unreadable image" in out
    assert f"{seg1 / rows1[2]['lidar_filepath']}: row 2: file is missing" in out
    assert f"{seg1 / rows1[5]['image_filepath']}: row 5: image size 20x10 differs" in out
    assert f"{csv2}: row 1: column 'velocity' (line 3): 'oops' is not a number" in out
    # windows: seg0 loses (3,4),(4,5); seg1 loses (1,2),(2,3),(4,5); seg2 unusable
    assert "2 usable segment(s) of 3, 12 frames, 5 windows" in out and "5 dropped for bad files" in out
    assert out.rstrip().endswith("4 problem(s) -> FAILED")


def test_undecidable_layout_is_a_problem(tmp_path, capsys):
    root = write_tiny_dataset(tmp_path, splits={"train": 1}, frames=4, camera=False)
    seg = root / "train" / "segment_0000"
    for r in read_csv_rows(seg / "meta" / "data.csv"):
        write_points_bin(seg / r["lidar_filepath"], np.zeros((40, 4), np.float32))
    code, out = run(capsys, root, "--seq_len", 2)
    assert code == 1 and "cannot auto-detect the point layout" in out and str(seg / "meta" / "data.csv") in out
    code, out = run(capsys, root, "--seq_len", 2, "--lidar_num_features", 4)
    assert code == 1 and "all 40 points are zero: a zero-filled file" in out     # given a layout: each frame


def test_unusable_root_and_help(tmp_path, capsys):
    code, _ = run(capsys, tmp_path / "nothing")
    assert code == 2
    (tmp_path / "empty").mkdir()
    assert run(capsys, tmp_path / "empty")[0] == 2
    res = subprocess.run([sys.executable, "-m", "pipelines.check_dataset", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "Exit status" in res.stdout and "1 = problems found" in res.stdout


def test_lidar_only_segments_of_a_paired_split_are_checked_too(tmp_path, capsys):
    """A train split mixing paired and LiDAR-only tracks: every segment is read, LiDAR-only ones included."""
    root = tmp_path / "w"
    generate_dataset(root, config=SyntheticConfig(tracks=3, frames=8, image_size=(32, 16), lidar_only_tracks=1))
    code, out = run(capsys, root, "--splits", "train", "--image_size", "32x16")
    assert code == 0, out
    assert "2 usable segment(s) of 2" in out and "LiDAR only" in out
    # a broken point cloud in the LiDAR-only segment is found
    lidar_only = next(p for p in (root / "train").iterdir() if not (p / "camera").exists())
    next((lidar_only / "lidar").iterdir()).write_bytes(b"\x00" * 7)
    code, out = run(capsys, root, "--splits", "train", "--image_size", "32x16")
    assert code == 1 and str(lidar_only.name) in out


def test_missing_calib_still_checks_csv_and_lidar(tmp_path, capsys):
    """A paired segment without camera/calib.json: the missing calib is a problem of its camera part, and its
    csv and every LiDAR file are still read (a bad point file there is found too)."""
    root = write_tiny_dataset(tmp_path, splits={"train": 2}, frames=6)
    seg0, seg1 = (root / "train" / f"segment_000{i}" for i in range(2))
    (seg1 / "camera" / "calib.json").unlink()
    rows1 = read_csv_rows(seg1 / "meta" / "data.csv")
    (seg1 / rows1[3]["lidar_filepath"]).write_bytes(b"\x00" * 7)
    code, out = run(capsys, root, "--seq_len", 2, "--image_size", "32x16")
    assert code == 1, out
    assert f"{seg1 / 'camera' / 'calib.json'}: file is missing" in out
    assert f"{seg1 / rows1[3]['lidar_filepath']}: row 3: truncated" in out
    assert "problems found: 2" in out
    # both segments' frames are counted; segment_0001's LiDAR windows avoid its bad frame 3 (5 -> 3)
    assert "2 usable segment(s) of 2, 12 frames, 8 windows" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("segment_0001:"))
    assert "camera part unusable" in line and "points/frame" in line
    # a broken csv is still reported once, whichever dataset reads it
    csv1 = seg1 / "meta" / "data.csv"
    csv1.write_text(csv1.read_text().replace(f",{rows1[2]['velocity']},", ",oops,", 1))
    code, out = run(capsys, root, "--seq_len", 2, "--image_size", "32x16")
    assert code == 1 and out.count("'oops' is not a number") == 1 and "problems found: 1" in out


def test_lidar2ego_reported_and_bad_extrinsic_is_a_problem(tmp_path, capsys):
    root = write_tiny_dataset(tmp_path, splits={"train": 1}, frames=4, camera=False)
    seg = root / "train" / "segment_0000"
    T = np.eye(4)
    T[:3, :3] = [[0, 1, 0], [-1, 0, 0], [0, 0, 1]]
    (seg / "lidar" / "calib.json").write_text(json.dumps({"lidar2ego": T.tolist()}))
    code, out = run(capsys, root, "--seq_len", 2)
    assert code == 0 and "lidar2ego applied" in out, out
    T[0, 0] = 2.0
    (seg / "lidar" / "calib.json").write_text(json.dumps({"lidar2ego": T.tolist()}))
    code, out = run(capsys, root, "--seq_len", 2)
    assert code == 1 and f"{seg / 'lidar' / 'calib.json'}: lidar2ego is not a rigid transform" in out


def test_camera_only_drives_beside_paired_segments_are_checked_as_camera(tmp_path, capsys):
    """make_dataset --camera_only_drives without --camera_root: the camera-only drives sit beside the paired
    segments; they are checked with the camera reader, not reported as segments without LiDAR."""
    from pipelines.make_dataset import main as make

    root = tmp_path / "w"
    assert make(["--out", str(root), "--tracks", "3", "--frames", "8", "--image_size", "32x16",
                 "--camera_only_drives", "1", "--no_progress"]) == 0
    drives = sorted(p.name for p in (root / "train").iterdir() if p.name.endswith("_d1"))
    assert drives
    code, out = run(capsys, root, "--splits", "train", "--image_size", "32x16")
    assert code == 0, out
    assert all(d in out for d in drives)
    image = next((root / "train" / drives[0] / "camera").glob("*.png"))
    image.write_bytes(b"not a png")
    code, out = run(capsys, root, "--splits", "train", "--image_size", "32x16")
    assert code == 1 and drives[0] in out


def test_reports_what_training_refuses_column_case_layout_and_symlinks(tmp_path, capsys):
    """issue 25: a column named in the wrong case, a frame of another feature count and a data file linked to
    outside the data root are problems check_dataset lists (naming the file), as training refuses them."""
    root = write_tiny_dataset(tmp_path / "d", splits={"train": 3}, frames=6, camera=False)
    seg0, seg1, seg2 = (root / "train" / f"segment_000{i}" for i in range(3))
    csv0 = seg0 / "meta" / "data.csv"
    csv0.write_text(csv0.read_text().replace("speed_command", "Speed_command", 1))
    rows1 = read_csv_rows(seg1 / "meta" / "data.csv")
    frame = seg1 / rows1[3]["lidar_filepath"]
    pts = np.fromfile(frame, np.float32).reshape(-1, 4)
    rng = np.random.default_rng(0)
    extras = np.column_stack([rng.integers(0, 32, len(pts)), rng.uniform(0, 0.1, len(pts)),
                              rng.uniform(0, 80, len(pts)), rng.uniform(0, 1000, len(pts))])
    write_points_bin(frame, np.hstack([pts, extras]).astype(np.float32))
    rows2 = read_csv_rows(seg2 / "meta" / "data.csv")
    outside = tmp_path / "elsewhere.bin"
    (seg2 / rows2[1]["lidar_filepath"]).rename(outside)
    (seg2 / rows2[1]["lidar_filepath"]).symlink_to(outside)
    code, out = run(capsys, root, "--seq_len", 2, "--lidar_num_features", 4)
    assert code == 1, out
    assert f"{csv0}: column(s) ['Speed_command'] differ from the column names the layout reads only by letter case" in out
    assert f"{frame}: row 3: does not have the segment's point layout: its values look like 8 features" in out
    assert (f"{seg2 / 'meta' / 'data.csv'}: row 1: column 'lidar_filepath' (line 3): path "
            f"{rows2[1]['lidar_filepath']!r} is a symlink (or lies under one) leading outside the data root") in out
    assert "3 problem(s) -> FAILED" in out


def test_impossible_speeds_and_angles_and_nul_in_paths_are_problems_naming_file_and_row(tmp_path, capsys):
    """Sweep of issue 25, part two: a velocity of 1e300 m/s or a wheel angle of a million degrees passed as OK
    (training then normalised by infinite statistics); a NUL byte in a file path was a traceback."""
    root = write_tiny_dataset(tmp_path, splits={"train": 4}, frames=6, camera=False)
    edits = {0: ("velocity", "1e300"), 1: ("wheel_angle", "-1000000"), 2: ("lidar_filepath", None), 3: ("yaw", "1e9")}
    csvs = {}
    for s, (column, value) in edits.items():
        csv_path = root / "train" / f"segment_000{s}" / "meta" / "data.csv"
        lines = csv_path.read_text().splitlines()
        if column == "yaw":                                   # a pose: x, y, yaw
            lines = [lines[0] + ",x,y,yaw"] + [ln + ",1.0,2.0,0.5" for ln in lines[1:]]
        header = lines[0].split(",")
        cells = lines[3].split(",")
        i = header.index(column)
        cells[i] = value if value is not None else cells[i].replace("/", "/\0", 1)
        lines[3] = ",".join(cells)
        csv_path.write_text("\n".join(lines) + "\n")
        csvs[s] = csv_path
    code, out = run(capsys, root, "--seq_len", 2)
    assert code == 1 and "Traceback" not in out
    assert f"{csvs[0]}: row 2: column 'velocity' (line 4): 1e300 m/s is beyond any car's (|velocity| <= 150 m/s)" in out
    assert f"{csvs[1]}: row 2: column 'wheel_angle' (line 4): -1000000 degrees is beyond any car's" in out
    assert f"{csvs[2]}: row 2: column 'lidar_filepath' (line 4): path" in out and "contains a NUL byte" in out
    assert f"{csvs[3]}: row 2: column 'yaw' (line 4): 1e9 rad is beyond any car's (|yaw| <= 100000 rad)" in out


def test_frames_of_one_repeated_point_leading_zeros_or_a_sliver_of_points_are_problems(tmp_path, capsys):
    """Sweep of issue 25, part two: three LiDAR frames passed as OK — every point the same (a stuck buffer), the
    first half zero-filled (a write that filled only the end), and 3 points where the segment holds thousands (a
    copy cut off at a whole point); each changed what the teacher saw."""
    root = write_tiny_dataset(tmp_path, splits={"train": 1}, frames=10, camera=False, points_per_frame=(2000, 2400))
    seg = root / "train" / "segment_0000"
    rows = read_csv_rows(seg / "meta" / "data.csv")
    files = [seg / rows[i]["lidar_filepath"] for i in (2, 5, 7)]
    pts = [np.fromfile(f, np.float32).reshape(-1, 4) for f in files]
    np.repeat(pts[0][:1], len(pts[0]), 0).tofile(files[0])
    pts[1][: len(pts[1]) // 2] = 0
    pts[1].tofile(files[1])
    pts[2][:3].tofile(files[2])
    code, out = run(capsys, root, "--seq_len", 2)
    assert code == 1 and "problems found: 3" in out, out
    assert f"{files[0]}: row 2: all {len(pts[0])} points are the same point" in out
    assert f"{files[1]}: row 5: the first {len(pts[1]) // 2} of {len(pts[1])} points are all zeros: a torn write" in out
    assert f"{files[2]}: row 7: 3 points, under 1/20 of the segment's median" in out


def test_a_principal_point_far_outside_the_image_is_a_problem(tmp_path, capsys):
    """Sweep of issue 25, part two: cx = 1e6 for a 32-pixel image passed as OK (every ray missed the image)."""
    root = write_tiny_dataset(tmp_path, splits={"train": 1}, frames=6)
    calib = root / "train" / "segment_0000" / "camera" / "calib.json"
    doc = json.loads(calib.read_text())
    doc["cameras"][0]["K"][0][2] = 1e6
    calib.write_text(json.dumps(doc))
    code, out = run(capsys, root, "--seq_len", 2, "--image_size", "16x8")
    assert code == 1 and f"{calib}: cameras[0].K: cx = 1e+06 lies more than 100 image sides outside" in out, out


def test_an_image_size_of_a_billion_pixels_is_refused_at_the_flag(tmp_path, capsys):
    """Sweep of issue 25, part two: ``--image_size 1000000000x1`` allocated an image that size per frame."""
    root = write_tiny_dataset(tmp_path, splits={"train": 1}, frames=4)
    for bad in ("1000000000x1", "16385x8", "8000x8000"):
        try:
            main([str(root), "--image_size", bad, "--no_progress"])
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(bad)
        assert "at most 16384 pixels per side and 40000000 in all" in capsys.readouterr().err
