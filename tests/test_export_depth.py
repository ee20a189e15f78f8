"""``pipelines.export --store_depth``: every window's stored depth bytes are the LiDAR depth targets
(``e2r.depth.rig_depth_targets``) of its frames on its segment's camera rig for the tiny student's feature map; a
LiDAR-only segment gets none; ``--append`` adds a split leaving the earlier bytes as they were; a damaged depth chunk
is redone by a re-run; a store with depth refuses an export without it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from e2r.data.datasets import LidarFrameDataset
from e2r.depth import NO_DEPTH, depth_grid, rig_depth_targets
from e2r.models.student_config import StudentConfig
from e2r.workflow.export_plan import split_rigs
from pipelines.export import main
from stores import open_memorybank
from stores.keys import parse_key
from tests.export_fixtures import args_for, make_teacher_ckpt
from e2r.sim.tiny import write_tiny_dataset

T = 5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_depth")
    data = write_tiny_dataset(root / "data", {"train": 2, "extra": 1}, frames=8, points_per_frame=(1500, 2000))
    write_tiny_dataset(root / "data", {"lidar": 1}, frames=6, camera=False, seed=3)
    return {"root": root, "data": data, "ckpt": make_teacher_ckpt(root / "teacher.pt")}


def expected_depth(data: Path, keys: list[str]) -> np.ndarray:
    """(N, T, Ncam, h, w): the targets of each key's frames, computed here from the LiDAR files and calib.json."""
    student = StudentConfig.preset_named("tiny")
    out = []
    for key in keys:
        k = parse_key(key)
        frames = LidarFrameDataset(data, k.split)
        rigs = split_rigs(data, k.split)
        rows = []
        for t in range(T):
            points = frames[frames.frames.index((k.segment, k.start + t))]["points"]
            if k.segment in rigs:
                rows.append(rig_depth_targets(points, rigs[k.segment], depth_grid(student), student.feat_hw))
            else:
                rows.append(torch.full((1, *student.feat_hw), NO_DEPTH, dtype=torch.uint8))
        out.append(torch.stack(rows).numpy())
    return np.stack(out)


def test_export_store_depth_round_trip_append_damage_and_mismatch(world, tmp_path, capsys):
    store = tmp_path / "mb.zarr"
    assert main(args_for(world, store, "--store_depth", split=("train", "lidar"))) == 0
    assert "depth targets per sample: shape (5, 1, 16, 32) uint8" in capsys.readouterr().out
    bank = open_memorybank(str(store))
    schema = bank.schema
    assert schema.store_depth and schema.depth_shape == (1, 16, 32)
    assert schema.depth_grid == {"image_size": [128, 64], "depth_bins": [2.0, 50.0, 2.0], "n_bins": 24}
    keys = bank.keys()
    got, _ = bank.get_batch(keys, fields=("depth",))
    want = expected_depth(world["data"], keys)
    np.testing.assert_array_equal(got["depth"], want)
    paired = np.array([parse_key(k).split == "train" for k in keys])
    hits = (got["depth"][paired] != NO_DEPTH).sum(axis=(2, 3, 4))           # (windows, T) pixels with a target
    assert hits.min() > 0 and (got["depth"][~paired] == NO_DEPTH).all()
    assert len(np.unique(got["depth"][paired])) > 5                           # many bins, not one value

    # --append a split: its targets are right and every earlier byte is unchanged (the export checks the files)
    assert main(args_for(world, store, "--store_depth", "--append", split=("extra",))) == 0
    bank = open_memorybank(str(store))
    extra = bank.keys("extra")
    got2, _ = bank.get_batch(keys + extra, fields=("depth",))
    np.testing.assert_array_equal(got2["depth"][:len(keys)], want)
    np.testing.assert_array_equal(got2["depth"][len(keys):], expected_depth(world["data"], extra))

    # a damaged depth chunk: refused by name, then redone by a re-run of the export
    shard = next(p for p in sorted((store / "depth" / "depth" / "c").rglob("*")) if p.is_file())
    raw = bytearray(shard.read_bytes())
    raw[3] ^= 0x10
    shard.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="crc32c") as e:
        open_memorybank(str(store)).get_batch(keys, fields=("depth",))
    assert keys[0] in str(e.value)
    capsys.readouterr()
    assert main(args_for(world, store, "--store_depth", split=("train",))) == 0
    row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("train "))
    assert (int(row[3]), int(row[4])) == (1, 7)                       # rows written, skipped: the damaged one redone
    got3, _ = open_memorybank(str(store)).get_batch(keys, fields=("depth",))
    np.testing.assert_array_equal(got3["depth"], want)

    # the same store without --store_depth (or for another student preset) is a different schema: refused
    assert main(args_for(world, store, split=("train",))) != 0
    assert "store_depth: store=True, given=False" in capsys.readouterr().err
