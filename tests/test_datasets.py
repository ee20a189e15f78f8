import csv

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import e2r.data.datasets as datasets_module
from e2r.data.datasets import (CameraSequenceDataset, LidarFrameDataset, LidarSequenceDataset,
                               PairedSequenceDataset, collate_camera, collate_frames, collate_lidar,
                               collate_paired)
from e2r.data.readers import DataError
from stores.keys import parse_key
from tests.fixtures import make_points, read_csv_rows, write_points_bin, write_tiny_dataset

SEG = "segment_0000"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("data"), splits={"train": 2, "valid": 1}, frames=12)


@pytest.fixture
def fresh(tmp_path):
    return write_tiny_dataset(tmp_path / "d", splits={"train": 2}, frames=8)


def edit_csv(root, split, segment, row, column, value):
    path = root / split / segment / "meta" / "data.csv"
    rows = read_csv_rows(path)
    header = list(rows[0])
    if value is None:
        header.remove(column)
        for r in rows:
            r.pop(column)
    else:
        rows[row][column] = value
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.mark.parametrize("start", [0, 4])
def test_lidar_item_semantics_match_csv(data, start):
    ds = LidarSequenceDataset(data, "train", seq_len=5, stride=2)
    index = ds.windows.index((SEG, start))
    item = ds[index]
    rows = read_csv_rows(data / "train" / SEG / "meta" / "data.csv")
    vel = [float(rows[t]["velocity"]) for t in range(start, start + 5)]
    wheel = [float(rows[t]["wheel_angle"]) for t in range(start, start + 5)]
    prev = [0.0 if t == 0 else float(rows[t - 1]["wheel_angle"]) for t in range(start, start + 5)]
    assert item["key"] == f"train/{SEG}:{start}" == ds.keys[index]
    assert torch.equal(item["speed"], torch.tensor(vel, dtype=torch.float32))
    assert torch.equal(item["steering"], torch.tensor(prev, dtype=torch.float32))
    command = [float(rows[t]["speed_command"]) for t in range(start, start + 5)]      # the speed action
    assert torch.equal(item["actions"], torch.tensor(list(zip(wheel, command)), dtype=torch.float32))
    if start == 0:
        assert item["steering"][0] == 0.0
    else:
        assert item["steering"][0] == torch.tensor(float(rows[start - 1]["wheel_angle"]))
    assert len(item["points"]) == 5
    for t, pts in enumerate(item["points"]):
        raw = np.fromfile(data / "train" / SEG / rows[start + t]["lidar_filepath"], dtype=np.float32)
        assert pts.dtype == torch.float32 and torch.equal(pts, torch.from_numpy(raw.reshape(-1, 4)))


@pytest.mark.parametrize("stride,starts", [(1, list(range(8))), (2, [0, 2, 4, 6]), (3, [0, 3, 6]), (8, [0])])
def test_stride_and_windows(data, stride, starts):
    ds = LidarSequenceDataset(data, "train", seq_len=5, stride=stride)
    assert ds.windows == [(s, i) for s in ("segment_0000", "segment_0001") for i in starts]
    assert len(ds) == len(ds.keys) == 2 * len(starts)
    assert all(parse_key(k).start == st for k, (_, st) in zip(ds.keys, ds.windows))


def test_speed_action_without_speed_command_is_the_next_velocity(tmp_path):
    """No speed_command column: the speed action is velocity[t+1], so the last frame starts no window's last
    step and its actions are left out of the statistics."""
    root = write_tiny_dataset(tmp_path / "d", splits={"train": 1}, frames=8, camera=False, speed_command=False)
    ds = LidarSequenceDataset(root, "train", seq_len=5, stride=1)
    rows = read_csv_rows(root / "train" / SEG / "meta" / "data.csv")
    assert "speed_command" not in rows[0]
    assert [s for _, s in ds.windows] == [0, 1, 2]                   # 8 frames, 7 with a next velocity
    item = ds[2]
    nxt = [float(rows[t + 1]["velocity"]) for t in range(2, 7)]
    assert torch.equal(item["actions"][:, 1], torch.tensor(nxt, dtype=torch.float32))
    assert torch.equal(item["speed"], torch.tensor([float(rows[t]["velocity"]) for t in range(2, 7)]))
    fa = ds.frame_actions()
    assert fa.shape == (7, 2) and np.isfinite(fa).all() and fa[6, 1] == float(rows[7]["velocity"])


def test_keys_equal_across_lidar_camera_paired_and_cheap_arrays(data, monkeypatch):
    def no_reads(*a, **k):
        raise AssertionError("construction must not read point clouds or images")
    monkeypatch.setattr(datasets_module, "read_points", no_reads)
    monkeypatch.setattr(datasets_module, "read_image", no_reads)
    lid = LidarSequenceDataset(data, "valid", seq_len=4, stride=3)
    cam = CameraSequenceDataset(data, "valid", seq_len=4, stride=3, image_size=(16, 8))
    pair = PairedSequenceDataset(data, "valid", seq_len=4, stride=3)
    assert lid.keys == cam.keys == pair.keys == ["valid/segment_0000:0", "valid/segment_0000:3",
                                                 "valid/segment_0000:6"]
    rows = read_csv_rows(data / "valid" / SEG / "meta" / "data.csv")
    np.testing.assert_array_equal(lid.tables[SEG].velocity, [float(r["velocity"]) for r in rows])
    np.testing.assert_array_equal(cam.tables[SEG].wheel_angle, [float(r["wheel_angle"]) for r in rows])
    fa = lid.frame_actions()
    assert fa.shape == (12, 2) and fa[3, 0] == float(rows[3]["wheel_angle"])
    assert fa[3, 1] == float(rows[3]["speed_command"])


def test_camera_item_and_intrinsics(data):
    ds = CameraSequenceDataset(data, "train", seq_len=3, stride=4, image_size=(64, 8))
    item = ds[1]
    assert item["images"].shape == (3, 1, 3, 8, 64) and item["images"].dtype == torch.float32
    assert 0 <= item["images"].min() and item["images"].max() <= 1
    # fixture K for 32x16: fx = fy = 16, cx = 16, cy = 8 -> x2 horizontally, x0.5 vertically, pixel centres
    # mapped as (c + 0.5) * s - 0.5 (calib.scale_intrinsics)
    torch.testing.assert_close(item["intrinsics"][0], torch.tensor([[32.0, 0, 32.5], [0, 8, 3.75], [0, 0, 1]]))
    assert item["cam2ego"].shape == (1, 4, 4)
    batch = collate_camera([ds[0], None, ds[2]])
    assert batch["images"].shape == (2, 3, 1, 3, 8, 64) and batch["keys"] == [ds.keys[0], ds.keys[2]]
    loader = DataLoader(ds, batch_size=2, collate_fn=collate_camera)
    assert next(iter(loader))["actions"].shape == (2, 3, 2)


def test_multi_camera(tmp_path):
    root = write_tiny_dataset(tmp_path, splits={"train": 1}, frames=6, cameras=("front", "left", "right"))
    ds = CameraSequenceDataset(root, "train", seq_len=2, image_size=(16, 16))
    assert ds.camera_names == ["front", "left", "right"]
    item = ds[0]
    assert item["images"].shape == (2, 3, 3, 16, 16) and item["intrinsics"].shape == (3, 3, 3)
    rows = read_csv_rows(root / "train" / SEG / "meta" / "data.csv")
    left = np.asarray(Image.open(root / "train" / SEG / rows[1]["image_filepath_left"]).resize((16, 16),
                                                                                              Image.BILINEAR))
    torch.testing.assert_close(item["images"][1, 1], torch.from_numpy(left.transpose(2, 0, 1) / 255.0).float())


def test_collate_lidar_and_paired_b_major(data):
    ds = LidarSequenceDataset(data, "train", seq_len=3, stride=5)
    items = [ds[0], ds[1], ds[2]]
    batch = collate_lidar(items)
    assert batch["speed"].shape == (3, 3) and batch["steering"].shape == (3, 3) and batch["actions"].shape == (3, 3, 2)
    assert len(batch["points"]) == 9 and batch["keys"] == ds.keys[:3]
    for b in range(3):
        for t in range(3):
            assert batch["points"][b * 3 + t] is items[b]["points"][t]
    loader = DataLoader(ds, batch_size=2, collate_fn=collate_lidar, shuffle=False)
    assert [len(b["points"]) for b in loader] == [6, 6]
    pair = PairedSequenceDataset(data, "train", seq_len=3, stride=5, image_size=(16, 8))
    pb = collate_paired([pair[0], pair[3]])
    assert len(pb["points"]) == 6 and pb["images"].shape == (2, 3, 1, 3, 8, 16)
    assert pb["intrinsics"].shape == (2, 1, 3, 3) and pb["keys"] == [pair.keys[0], pair.keys[3]]
    assert torch.equal(pb["points"][4], ds[3]["points"][1])
    assert collate_lidar([None, None]) is None


def test_lidar_frame_dataset(data):
    ds = LidarFrameDataset(data, "train")
    assert len(ds) == 24 and ds.frames[13] == ("segment_0001", 1)
    item = ds[13]
    rows = read_csv_rows(data / "train" / "segment_0001" / "meta" / "data.csv")
    raw = np.fromfile(data / "train" / "segment_0001" / rows[1]["lidar_filepath"], dtype=np.float32)
    assert item["segment"] == "segment_0001" and item["frame"] == 1
    assert torch.equal(item["points"], torch.from_numpy(raw.reshape(-1, 4)))
    batch = collate_frames([ds[0], ds[1]])
    assert batch["frames"] == [0, 1] and len(batch["points"]) == 2


def test_auto_layout_decided_once_per_segment(tmp_path, monkeypatch):
    root = write_tiny_dataset(tmp_path / "a", splits={"train": 1}, frames=8, num_features=5, camera=False)
    write_tiny_dataset(tmp_path / "b", splits={"train": 1}, frames=8, num_features=8, camera=False, seed=3)
    (root / "train" / "segment_0001").symlink_to(tmp_path / "b" / "train" / SEG)
    calls = []
    real = datasets_module.detect_bin_layout
    monkeypatch.setattr(datasets_module, "detect_bin_layout", lambda paths: calls.append(paths) or real(paths))
    ds = LidarSequenceDataset(root, "train", seq_len=2)
    for i in range(len(ds)):
        assert ds[i]["points"][0].shape[1] == 4
    assert len(calls) == 2 and all(len(c) == 3 for c in calls)
    assert ds.layouts[SEG].num_features == 5 and ds.layouts["segment_0001"].num_features == 8
    rows = read_csv_rows(root / "train" / "segment_0001" / "meta" / "data.csv")
    raw = np.fromfile(root / "train" / "segment_0001" / rows[0]["lidar_filepath"], dtype=np.float32)
    assert torch.equal(ds[ds.windows.index(("segment_0001", 0))]["points"][0],
                       torch.from_numpy(raw.reshape(-1, 8)[:, :4]))


# ----- hostile inputs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("column,value,match,row", [
    ("velocity", None, r"missing column\(s\) \['velocity'\]", None),
    ("lidar_filepath", None, r"missing column\(s\) \['lidar_filepath'\]", None),
    ("velocity", "fast", r"'fast' is not a number", 3),
    ("wheel_angle", "nan", r"'nan' is not finite", 5),
    ("velocity", "inf", r"'inf' is not finite", 0),
    ("wheel_angle", "", r"'' is not a number", 2),
    ("lidar_filepath", "", r"'lidar_filepath' \(line 9\) is empty", 7),
    ("lidar_filepath", "../../x.bin", "must be relative", 1),
])
def test_bad_csv_raises_at_construction_naming_file_and_row(fresh, column, value, match, row):
    csv_path = edit_csv(fresh, "train", "segment_0001", row or 0, column, value)
    with pytest.raises(DataError, match=match) as e:
        LidarSequenceDataset(fresh, "train", seq_len=3)
    assert e.value.file == str(csv_path) and e.value.row == row
    if row is not None:
        assert f"row {row}" in str(e.value) and f"line {row + 2}" in str(e.value)
    ds = LidarSequenceDataset(fresh, "train", seq_len=3, skip_bad=True)
    assert [p.file for p in ds.problems] == [str(csv_path)] and {s for s, _ in ds.windows} == {SEG}


def test_short_segment_and_missing_calib_column(fresh):
    rows_path = fresh / "train" / SEG / "meta" / "data.csv"
    with pytest.raises(DataError, match="segment has 8 frames, fewer than seq_len=9") as e:
        LidarSequenceDataset(fresh, "train", seq_len=9)
    assert e.value.file == str(rows_path)
    ds = LidarSequenceDataset(fresh, "train", seq_len=9, skip_bad=True)
    assert len(ds) == 0 and len(ds.problems) == 2
    edit_csv(fresh, "train", "segment_0001", 0, "image_filepath", None)
    with pytest.raises(DataError, match=r"missing column 'image_filepath_front' or 'image_filepath'"):
        CameraSequenceDataset(fresh, "train", seq_len=2)
    LidarSequenceDataset(fresh, "train", seq_len=2)  # lidar does not need the image column
    (fresh / "train" / SEG / "camera" / "calib.json").unlink()
    with pytest.raises(DataError, match="calib.json: file is missing"):
        CameraSequenceDataset(fresh, "train", seq_len=2)


def _lidar_file(root, segment, frame):
    rows = read_csv_rows(root / "train" / segment / "meta" / "data.csv")
    return root / "train" / segment / rows[frame]["lidar_filepath"]


def _image_file(root, segment, frame):
    rows = read_csv_rows(root / "train" / segment / "meta" / "data.csv")
    return root / "train" / segment / rows[frame]["image_filepath"]


def _break(kind, root):
    """Damage frame 3 of segment_0001; return the damaged file and the expected message."""
    if kind == "missing":
        path = _lidar_file(root, "segment_0001", 3)
        path.unlink()
        return path, "file is missing"
    if kind == "empty":
        path = _lidar_file(root, "segment_0001", 3)
        path.write_bytes(b"")
        return path, "file is empty"
    if kind == "truncated":
        path = _lidar_file(root, "segment_0001", 3)
        path.write_bytes(path.read_bytes()[:-3])
        return path, "not a whole number of float32"
    if kind == "not_multiple":
        path = _lidar_file(root, "segment_0001", 3)
        path.write_bytes(path.read_bytes() + np.zeros(2, np.float32).tobytes())
        return path, "not a multiple of the point size 16 bytes"
    if kind == "corrupt_image":
        path = _image_file(root, "segment_0001", 3)
        path.write_bytes(path.read_bytes()[:30])
        return path, "corrupt or unreadable image"
    if kind == "image_size":
        path = _image_file(root, "segment_0001", 3)
        Image.new("RGB", (40, 16)).save(path)
        return path, "image size 40x16 differs from the segment's 32x16"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "not_multiple", "corrupt_image", "image_size"])
def test_bad_files_raise_on_access_and_skip_bad_records_them(fresh, kind):
    path, match = _break(kind, fresh)
    cls = CameraSequenceDataset if "image" in kind else LidarSequenceDataset
    make = (lambda **kw: cls(fresh, "train", seq_len=3, image_size=(16, 8), **kw)) if cls is CameraSequenceDataset \
        else (lambda **kw: cls(fresh, "train", seq_len=3, lidar_num_features=4, **kw))
    ds = make()
    bad = ds.windows.index(("segment_0001", 2))  # frames 2, 3, 4
    assert ds[ds.windows.index(("segment_0001", 0))] is not None  # frames 0..2 are fine
    with pytest.raises(DataError, match=match) as e:
        ds[bad]
    assert e.value.file == str(path) and e.value.row == 3 and "row 3" in str(e.value)

    skipping = make(skip_bad=True)
    assert skipping[bad] is None and skipping[bad + 1] is None  # windows starting at 2 and 3 hold frame 3
    assert [(p.file, p.row) for p in skipping.problems] == [(str(path), 3)]
    batch = (collate_lidar if cls is LidarSequenceDataset else collate_camera)([skipping[0], skipping[bad]])
    assert len(batch["speed"]) == 1
    scanning = make(skip_bad=True)
    found = scanning.scan(progress=False)
    assert [(p.file, p.row) for p in found] == [(str(path), 3)]
    assert [w for w in make().windows if w not in scanning.windows] == [("segment_0001", s) for s in (1, 2, 3)]
    assert all(scanning[i] is not None for i in range(len(scanning)))
    strict = make()
    assert [(p.file, p.row) for p in strict.scan(progress=False)] == [(str(path), 3)]  # scan never raises
    assert len(strict.windows) == len(make().windows)


def test_undecidable_auto_layout_names_segment_csv(fresh):
    for f in range(8):
        write_points_bin(_lidar_file(fresh, "segment_0001", f), np.zeros((40, 4), np.float32))
    ds = LidarSequenceDataset(fresh, "train", seq_len=3)
    ds[0]
    with pytest.raises(DataError, match="cannot auto-detect the point layout") as e:
        ds[ds.windows.index(("segment_0001", 0))]
    assert e.value.file.endswith("segment_0001/meta/data.csv")
    given = LidarSequenceDataset(fresh, "train", seq_len=3, lidar_num_features=4)
    with pytest.raises(DataError, match="zero-filled"):         # given a layout, all-zero frames are refused
        given[ds.windows.index(("segment_0001", 0))]
    skipping = LidarSequenceDataset(fresh, "train", seq_len=3, skip_bad=True)
    assert skipping.scan(progress=False)[0].row is None
    assert {s for s, _ in skipping.windows} == {SEG}


def test_points_of_other_formats_in_a_segment(fresh):
    rng = np.random.default_rng(1)
    path = edit_csv(fresh, "train", SEG, 0, "lidar_filepath", "lidar/first.npy")
    pts = make_points(rng, 64, 5)
    np.save(fresh / "train" / SEG / "lidar" / "first.npy", pts)
    ds = LidarSequenceDataset(fresh, "train", seq_len=2)
    item = ds[0]  # the .npy frame first: its 5 columns must not become the segment's .bin layout
    assert torch.equal(item["points"][0], torch.from_numpy(pts[:, :4]))
    assert item["points"][1].shape[1] == 4 and ds.point_layout(SEG).num_features == 4
    assert path.exists()


def test_worker_processes_load_the_same_items(data):
    ds = LidarFrameDataset(data, "valid", lidar_num_features="auto")
    loaded = [b for b in DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate_frames)]
    assert [f for b in loaded for f in b["frames"]] == list(range(12))
    assert all(torch.equal(p, ds[i]["points"]) for i, p in enumerate(p for b in loaded for p in b["points"]))


def test_split_and_segment_names_must_be_key_safe(fresh):
    (fresh / "train" / "segment_0001").rename(fresh / "train" / "seg 1")
    with pytest.raises(DataError, match="segment folder name cannot be used in a sample key") as e:
        LidarSequenceDataset(fresh, "train", seq_len=2)
    assert e.value.file.endswith("seg 1")
    (fresh / "train").rename(fresh / "tr:ain")
    with pytest.raises(DataError, match="split name cannot be used"):
        LidarSequenceDataset(fresh, "tr:ain", seq_len=2)


def test_segments_restrict_the_split_and_unknown_ones_are_named(data):
    whole = CameraSequenceDataset(data, "train", seq_len=3)
    one = CameraSequenceDataset(data, "train", seq_len=3, segments=["segment_0001"])
    assert set(whole.tables) == {"segment_0000", "segment_0001"}
    assert list(one.tables) == ["segment_0001"]
    assert one.keys == [k for k in whole.keys if parse_key(k)[1] == "segment_0001"]
    assert LidarSequenceDataset(data, "train", seq_len=3, segments=[SEG]).keys[0] == whole.keys[0]
    with pytest.raises(DataError, match="segment_0007.*not in split 'train'"):
        CameraSequenceDataset(data, "train", seq_len=3, segments=["segment_0007"])


def test_sampler_start_batch_yields_the_rest_of_the_epoch_in_order():
    from e2r.data.sampler import EpochBatchSampler

    s = EpochBatchSampler(23, 4, shuffle=True, seed=3, rank=1, world_size=2)
    s.set_epoch(5)
    whole = list(s)
    assert len(s) == s.batches_per_epoch() == 3
    s.set_epoch(5, start_batch=2)
    assert list(s) == whole[2:] and len(s) == 1
    t = EpochBatchSampler(23, 4, shuffle=True, seed=0, rank=1, world_size=2)
    t.load_state_dict(s.state_dict())
    assert list(t) == whole[2:] and t.state_dict()["start_batch"] == 2


def test_frame_cache_decodes_each_frame_once_and_serves_the_same_bits(data, monkeypatch):
    """With the frame cache (on by default) a pass over every window decodes each frame once, and every item is
    bit-identical to the uncached dataset's; a budget too small for a frame caches nothing."""
    calls = []
    real = datasets_module.read_image
    monkeypatch.setattr(datasets_module, "read_image", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    plain = CameraSequenceDataset(data, "train", seq_len=3, image_size=(64, 8), image_cache_mb=0)
    want = [plain[i] for i in range(len(plain))]
    assert len(calls) == 3 * len(plain)                     # uncached: every frame of every window decoded
    calls.clear()
    cached = CameraSequenceDataset(data, "train", seq_len=3, image_size=(64, 8))
    for _ in range(2):                                       # two epochs
        for i, w in zip(range(len(cached)), want):
            got = cached[i]
            assert torch.equal(got["images"], w["images"]) and got["images"].dtype == torch.float32
    frames = sum(t.num_frames for t in cached.tables.values())
    assert len(calls) == len(set(calls)) == frames           # each frame decoded once over both epochs
    assert cached.frame_cache.hits == 2 * 3 * len(cached) - frames
    assert cached.frame_cache.nbytes == frames * 3 * 8 * 64  # stored as uint8: exact for 8-bit images
    tiny = CameraSequenceDataset(data, "train", seq_len=3, image_size=(64, 8), image_cache_mb=1e-4)
    tiny[0]
    assert len(tiny.frame_cache) == 0


def test_frame_cache_keeps_the_most_recent_frames_within_its_budget():
    from e2r.data.frame_cache import FrameCache
    frames = [torch.full((1, 3, 4, 4), 10.0 * (k + 1)) / 255.0 for k in range(3)]     # 8-bit values
    cache = FrameCache(max_mb=2 * frames[0].numel() / 2 ** 20)  # room for two uint8 frames
    for k, frame in enumerate(frames):
        cache.put(k, frame)
    assert cache.get(0) is None and cache.get(1) is not None and len(cache) == 2
    odd = torch.full((1, 3, 4, 4), 0.123456)                 # not k / 255: kept as float32, exactly
    cache = FrameCache(max_mb=1)
    cache.put("odd", odd)
    assert torch.equal(cache.get("odd"), odd) and cache.nbytes == odd.numel() * 4
    with pytest.raises(ValueError, match=">= 0"):
        FrameCache(max_mb=-1)
