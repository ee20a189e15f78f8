"""Issue 25, the export side: ``--overwrite`` never deletes what is not a memorybank, a resume over a damaged
chunk redoes its row instead of keeping it, and impossible ``--store`` paths or teacher configs are refused
by name before anything is computed."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipelines.export import main
from stores import open_memorybank
from stores.verify import verify_path
from tests.export_fixtures import FIELDS, args_for, make_teacher_ckpt, read_all
from tests.fixtures import write_tiny_dataset


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_hygiene")
    data = write_tiny_dataset(root / "data", {"train": 2}, frames=9, camera=False)
    return {"root": root, "data": data, "ckpt": make_teacher_ckpt(root / "teacher.pt")}


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["zarr_group", "zarr_array", "directory"])
def test_overwrite_refuses_what_is_not_a_memorybank(world, tmp_path, capsys, kind):
    store = tmp_path / "mb.zarr"
    if kind == "zarr_group":
        g = zarr.open_group(str(store), mode="w", zarr_format=3)
        g.attrs["project"] = "someone else's"
        g.create_array("weights", shape=(5,), dtype="f4")[:] = np.arange(5)
    elif kind == "zarr_array":
        zarr.open_array(str(store), mode="w", shape=(4,), dtype="i4", zarr_format=3)[:] = 3
    else:
        store.mkdir()
        (store / "notes.txt").write_text("precious")
    before = _tree(store)
    assert main(args_for(world, store, "--overwrite")) == 1
    err = capsys.readouterr().err
    want = "export never deletes what is not a memorybank" if kind != "directory" else "exists and is not a memorybank"
    assert "is not an e2r memorybank" in err or kind == "directory", err
    assert want in err and "--overwrite: deleting" not in err, err
    assert _tree(store) == before


def test_overwrite_replaces_a_memorybank_of_another_teacher(world, tmp_path):
    store = tmp_path / "mb.zarr"
    other = make_teacher_ckpt(tmp_path / "other.pt", seed=3)
    argv = args_for(world, store)
    argv[argv.index("--teacher_ckpt") + 1] = str(other)
    assert main(argv) == 0
    assert main(args_for(world, store)) == 1                        # another teacher: refused
    assert main(args_for(world, store, "--overwrite")) == 0         # a memorybank: replaced
    from e2r.checkpoints import file_sha256
    assert open_memorybank(store).provenance.teacher_sha256 == file_sha256(world["ckpt"])


def test_resume_over_a_damaged_chunk_redoes_the_row(world, tmp_path, capsys):
    ref, store = tmp_path / "ref.zarr", tmp_path / "mb.zarr"
    common = ("--shard_rows", "4", "--window_batch", "4")
    assert main(args_for(world, ref, *common)) == 0
    assert main(args_for(world, store, *common)) == 0
    bank = open_memorybank(store)
    reader = bank.inspect().row_reader("light")
    row = 6                                                # shard 1, inner chunk 2
    raw, index = reader.read_shard(1)
    shard = reader.file_path(1)
    buf = bytearray(shard.read_bytes())
    buf[int(index[row % 4, 0]) + 1] ^= 0x40
    shard.write_bytes(bytes(buf))
    assert verify_path(str(store))[0]                      # verify sees it
    capsys.readouterr()
    assert main(args_for(world, store, *common)) == 0      # the resume re-checks the rows it would skip
    out = capsys.readouterr().out
    assert verify_path(str(store))[0] == []
    line = next(x for x in out.splitlines() if x.startswith("train"))
    assert line.split()[1:4] == ["resume", "10", "1"], line     # 10 rows, 1 written (the damaged one)
    a, b = read_all(ref), read_all(store)
    for f in FIELDS:
        assert np.array_equal(a[f], b[f]), f


def test_store_path_under_a_file_or_in_proc_is_refused_naming_the_flag(world, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for store, why in ((tmp_path / "file" / "mb.zarr", "is a regular file, not a folder"),
                       (Path("/etc/passwd/x.zarr"), "/etc/passwd is a regular file, not a folder"),
                       (Path("/proc/e2r_mb.zarr"), "/proc is on proc, a virtual file system"),
                       ("", "the path is empty")):
        assert main(args_for(world, store)) == 2
        err = capsys.readouterr().err
        assert err.startswith("--store: cannot create memorybank") and why in err, err


def test_teacher_config_whose_bev_grid_needs_terabytes_is_refused_before_the_export(world, tmp_path, capsys):
    ckpt = tmp_path / "huge.pt"
    state = torch.load(world["ckpt"], weights_only=True)
    state["config"]["voxel_size"] = [1e-4, 1e-4, 4.0]
    torch.save(state, ckpt)
    argv = args_for(world, tmp_path / "mb.zarr")
    argv[argv.index("--teacher_ckpt") + 1] = str(ckpt)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "huge.pt" in err and "voxel_size" in err and "BEV grid" in err and "GiB" in err, err
    assert not (tmp_path / "mb.zarr").exists()
    assert json.dumps(state["config"]["voxel_size"]) == "[0.0001, 0.0001, 4.0]"
