"""Issue 25, the store side: what is not a memorybank is never deleted, a failed convert leaves nothing, a
resume re-checks the rows it skips, reindex clears exactly the orphans verify lists (a crash at each step of
rm-split), and hostile metadata or paths give one clear error naming the file, never a traceback."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from stores import (HDF5MemoryBank, NotAMemoryBankError, StoreCorruptError, StoreError, ZarrMemoryBank,
                    create_memorybank, is_memorybank, open_memorybank, remove_memorybank)
from stores.__main__ import main
from stores.verify import verify_path
from tests.store_fixtures import filled, make_keys, rows_for, tiny_prov, tiny_schema

ROOT = Path(__file__).resolve().parents[1]


def _two_splits(path: str) -> tuple[dict[str, list[str]], dict[str, dict[str, np.ndarray]]]:
    """train: 25 rows (shards of 8), valid: 10 rows after it; every row complete."""
    schema = tiny_schema(bev=not path.endswith(".h5"))
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=8)
    keys = {"train": make_keys("train", 25), "valid": make_keys("valid", 10)}
    data = {s: rows_for(schema, k) for s, k in keys.items()}
    for s in keys:
        bank.reserve_split(s, keys[s])
        bank.write_rows(s, 0, data[s])
    bank.close()
    return keys, data


def _flip_chunk(path: str, row: int) -> None:
    """Flip one byte inside the light inner chunk of ``row`` (its crc32c then fails)."""
    bank = open_memorybank(path, "r+")
    reader = bank.inspect().row_reader("light")
    raw, index = reader.read_shard(row // reader.rows_per_file)
    f = reader.file_path(row // reader.rows_per_file)
    buf = bytearray(f.read_bytes())
    buf[int(index[row % reader.rows_per_file, 0]) + 2] ^= 0x10
    f.write_bytes(bytes(buf))


# ----- overwrite never deletes what is not a memorybank --------------------------------------------------------
@pytest.mark.parametrize("kind", ["zarr_group", "zarr_array", "directory", "file", "unreadable_root"])
def test_remove_memorybank_refuses_anything_without_the_marker(tmp_path, kind):
    path = tmp_path / "thing.zarr"
    if kind == "zarr_group":
        g = zarr.open_group(str(path), mode="w", zarr_format=3)
        g.attrs["format"] = "someone-elses"
        g.create_array("x", shape=(4,), dtype="f4")[:] = 1
    elif kind == "zarr_array":
        zarr.open_array(str(path), mode="w", shape=(3,), dtype="i4", zarr_format=3)[:] = 7
    elif kind == "directory":
        path.mkdir()
        (path / "precious.txt").write_text("keep me")
    elif kind == "file":
        path.write_text("keep me")
    else:                                                  # a memorybank whose root metadata is gone bad
        filled(str(path))
        (path / "zarr.json").write_text("{not json")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert not is_memorybank(path)
    with pytest.raises(NotAMemoryBankError, match="refusing to delete .* not an e2r memorybank"):
        remove_memorybank(path)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("name", ["mb.zarr", "mb.h5"])
def test_a_damaged_memorybank_is_still_one_and_can_be_removed(tmp_path, name):
    path = str(tmp_path / name)
    filled(path)
    if name.endswith(".zarr"):
        (Path(path) / "light" / "zarr.json").write_text("{}")
    assert is_memorybank(path)
    remove_memorybank(path)
    assert not os.path.lexists(path) and not is_memorybank(path)


# ----- convert leaves nothing behind on failure ---------------------------------------------------------------
@pytest.mark.parametrize("dst", ["copy.zarr", "copy.h5"])
def test_convert_of_a_damaged_store_leaves_nothing(tmp_path, dst):
    src = str(tmp_path / "src.zarr")
    _two_splits(src)
    _flip_chunk(src, 34)                                   # row 2 of 'valid' (rows 32..): after all of 'train'
    before = sorted(os.listdir(tmp_path))
    assert main(["convert", src, str(tmp_path / dst)]) == 1
    assert sorted(os.listdir(tmp_path)) == before          # no dst, no temporary sibling
    assert main(["convert", src, str(tmp_path / "x" / dst)]) == 1
    assert not (tmp_path / "x" / dst).exists() and os.listdir(tmp_path / "x") == []


def test_convert_killed_midway_leaves_a_temporary_the_next_convert_removes(tmp_path):
    src, dst = str(tmp_path / "src.zarr"), str(tmp_path / "dst.zarr")
    keys, data = _two_splits(src)
    code = ("import os, signal, stores.convert as C\n"
            "real = C._copy_rows\n"
            "def kill(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "C._copy_rows = kill\n"
            f"C.convert({src!r}, {dst!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True)
    assert proc.returncode == -9
    left = [p for p in os.listdir(tmp_path) if p.startswith(".dst.zarr.e2r-tmp-")]
    assert left and not os.path.exists(dst)                # a temporary only, never a half store at dst
    assert main(["convert", src, dst]) == 0
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".dst.zarr.e2r-tmp-")]
    out, _ = open_memorybank(dst).get_batch(keys["valid"])
    np.testing.assert_array_equal(out["gru_out"], data["valid"]["gru_out"])
    assert main(["convert", src, dst]) == 1                # never over an existing path


def test_convert_to_a_path_under_a_file_or_in_proc_is_a_clear_error(tmp_path, capsys):
    src = str(tmp_path / "src.zarr")
    filled(src)
    (tmp_path / "file").write_text("x")
    assert main(["convert", src, str(tmp_path / "file" / "x.zarr")]) == 1
    assert f"{tmp_path / 'file'} is a regular file, not a folder" in capsys.readouterr().err
    assert main(["convert", src, "/proc/e2r_x.h5"]) == 1
    assert "/proc is on proc, a virtual file system" in capsys.readouterr().err
    with pytest.raises(StoreError, match=r"/etc/passwd is a regular file, not a folder"):
        create_memorybank("/etc/passwd/x.zarr", tiny_schema(), tiny_prov())


# ----- resume re-checks the rows it would skip -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["mb.zarr", "mb.h5"])
def test_incomplete_ranges_redo_complete_rows_whose_chunk_fails_its_checksum(tmp_path, name):
    path = str(tmp_path / name)
    schema, keys, data = filled(path)
    if name.endswith(".zarr"):
        _flip_chunk(path, 11)
    else:
        import h5py
        with h5py.File(path, "r") as f:
            off = f["gru_out"].id.get_chunk_info(11).byte_offset
        raw = bytearray(Path(path).read_bytes())
        raw[off + 3] ^= 0xFF
        Path(path).write_bytes(bytes(raw))
    bank = open_memorybank(path, "r+")
    assert bank.incomplete_ranges("train") == [(11, 12)]
    assert bank.incomplete_ranges("train", (8, 16)) == [(11, 12)] and bank.incomplete_ranges("train", (0, 8)) == []
    bank.write_rows("train", 11, {f: a[11:12] for f, a in data.items()})
    assert bank.incomplete_ranges("train") == []
    problems, _ = verify_path(path)
    assert problems == []
    out, _ = open_memorybank(path).get_batch(keys)
    np.testing.assert_array_equal(out["bev_vec"], data["bev_vec"])


def damage_shard_index(path: str) -> tuple[Path, bytearray]:
    """Flip a byte of the second light shard's index (its checksummed tail) -> (the file, its damaged bytes)."""
    shard = Path(path) / "light" / "c" / "1" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    return shard, raw


def test_a_resume_over_a_damaged_shard_index_is_refused_naming_file_and_keys_then_redone(tmp_path):
    path = str(tmp_path / "mb.zarr")
    schema, keys, data = filled(path)
    shard, raw = damage_shard_index(path)
    with pytest.raises(StoreCorruptError, match=r"light/c/1/0/0: shard index checksum.*delete the file") as e:
        open_memorybank(path, "r+").incomplete_ranges("train")
    assert e.value.keys == keys[8:16] and e.value.chunk == "light/c/1/0/0"
    problems, _ = verify_path(path)
    assert len(problems) == 1 and "light/c/1/0/0: shard index checksum" in problems[0] and keys[8] in problems[0]
    shard.unlink()                                         # the remedy the message names
    bank = open_memorybank(path, "r+")
    assert bank.incomplete_ranges("train") == [(8, 16)]
    bank.write_rows("train", 8, {f: a[8:16] for f, a in data.items()})
    assert verify_path(path)[0] == []


def test_stats_json_output_path_is_checked_before_the_work_and_written_whole(tmp_path, capsys):
    path = str(tmp_path / "mb.zarr")
    filled(path)
    (tmp_path / "file").write_text("x")
    for bad, why in ((tmp_path / "file" / "s.json", "is a regular file, not a folder"),
                     (Path("/proc/e2r_stats.json"), "/proc is on proc, a virtual file system"),
                     (tmp_path, "is a directory; name a file to write")):
        assert main(["stats", path, "--json", str(bad)]) == 1
        out = capsys.readouterr()
        assert why in out.err and out.out == "", out           # refused before any statistics were computed
    assert main(["stats", path, "--json", str(tmp_path / "new" / "s.json")]) == 0
    assert set(json.loads((tmp_path / "new" / "s.json").read_text())) == {"actions", "bev_vec", "gru_out"}


# ----- reindex clears exactly what verify calls orphan (a crash at each step of rm-split) ----------------------
class Crash(Exception):
    pass


def _crash(monkeypatch, step: str) -> None:
    """Make rm-split stop at ``step``: the entry is removed, then flags, data, keys, index file are cleared."""
    import stores.zarr_v3.store as zs

    def boom(*a, **k):
        raise Crash(step)
    if step == "after_entry":
        monkeypatch.setattr(ZarrMemoryBank, "_clear_rows", boom)
    elif step == "after_flags":
        monkeypatch.setattr(zs, "drop_files", boom)
    elif step == "after_data":
        real = ZarrMemoryBank._drop_bad_chunks
        monkeypatch.setattr(ZarrMemoryBank, "_drop_bad_chunks",
                            lambda self, name, a, b: boom() if name == "keys" else real(self, name, a, b))
    elif step == "after_keys":
        monkeypatch.setattr(ZarrMemoryBank, "_remove_split_index", boom)
    elif step == "h5_after_entry":
        monkeypatch.setattr(HDF5MemoryBank, "_clear_rows", boom)


def _orphans_listed(problems: list[str]) -> list[int]:
    found = (re.match(r"row (\d+): complete but belongs to no split", p) for p in problems)
    return sorted(int(m.group(1)) for m in found if m)


@pytest.mark.parametrize("step", ["after_entry", "after_flags", "after_data", "after_keys", "h5_after_entry"])
def test_rm_split_crashed_at_each_step_then_reindex_clears_what_verify_calls_orphan(tmp_path, monkeypatch, step):
    path = str(tmp_path / ("mb.h5" if step.startswith("h5") else "mb.zarr"))
    keys, data = _two_splits(path)
    bank = open_memorybank(path, "r+")
    _crash(monkeypatch, step)
    with pytest.raises(Crash):
        bank.remove_split("train")
    monkeypatch.undo()
    problems, _ = verify_path(path)
    w = open_memorybank(path, "r+")
    orphans = [r for a, b in w.orphan_ranges() for r in range(a, b)]
    assert _orphans_listed(problems) == orphans                      # the same rows, named the same way
    assert orphans == (list(range(25)) if step.endswith("after_entry") else [])
    assert w.reindex() == ([] if step.startswith("h5") else ["valid"])
    problems, bank = verify_path(path)
    assert problems == [] and w.orphan_ranges() == [] and "train" not in bank.splits
    if not step.startswith("h5"):                          # the removed rows' shards are gone, valid's kept
        shards = Path(path) / "light" / "c"                # (after_flags: leftovers, deleted by reindex)
        assert sorted(str(p.relative_to(shards)) for p in shards.rglob("*") if p.is_file()) == ["4/0/0", "5/0/0"]
    out, _ = open_memorybank(path).get_batch(keys["valid"])
    np.testing.assert_array_equal(out["gru_out"], data["valid"]["gru_out"])
    w = open_memorybank(path, "r+")                        # the split can be exported again
    w.reserve_split("train", keys["train"][:12])
    w.write_rows("train", 0, {f: a[:12] for f, a in data["train"].items()})
    assert verify_path(path)[0] == [] and open_memorybank(path).keys("train") == keys["train"][:12]


def test_rm_split_of_a_split_whose_shard_index_is_damaged_deletes_it_unread(tmp_path):
    path = str(tmp_path / "mb.zarr")
    keys, _ = _two_splits(path)
    shard = Path(path) / "light" / "c" / "1" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF                                       # zarr-python failed here: "Stored and computed checksum ..."
    shard.write_bytes(bytes(raw))
    assert main(["rm-split", path, "train"]) == 0
    assert verify_path(path)[0] == [] and not shard.exists()


def test_zarr_python_errors_name_the_files_and_keys(tmp_path):
    path = str(tmp_path / "mb.zarr")
    schema, keys, data = filled(path)
    shard, raw = damage_shard_index(path)
    bank = open_memorybank(path, "r+")
    bank.bulk_writes = False                               # zarr-python merges the new row into the damaged shard
    with pytest.raises(StoreCorruptError, match=r"array 'light', light/c/1/0/0: .*zarr-python") as e:
        bank.write_rows("train", 12, {f: a[12:13] for f, a in data.items()})
    assert e.value.keys == [keys[12]] and e.value.chunk == "light/c/1/0/0"


# ----- hostile metadata: one clear error naming the file, in every command ------------------------------------
@pytest.mark.parametrize("rel", ["zarr.json", "light/zarr.json", "keys/zarr.json"])
@pytest.mark.parametrize("depth", [60, 100_000])
def test_deeply_nested_attributes_are_refused_by_name_in_every_command(tmp_path, capsys, rel, depth):
    path = str(tmp_path / "mb.zarr")
    filled(path)
    meta = json.loads((Path(path) / rel).read_text())
    meta.setdefault("attributes", {})["deep"] = "@"
    text = json.dumps(meta).replace('"@"', "[" * depth + "]" * depth)
    (Path(path) / rel).write_text(text)
    for argv in (["info", path], ["ls", path], ["show", path, "train/seg_000:1"], ["verify", path],
                 ["stats", path], ["rm-split", path, "train"], ["reindex", path],
                 ["convert", path, str(tmp_path / "c.zarr")]):
        rc = main(argv)
        out = capsys.readouterr()
        if depth == 60:                                    # nested but within bounds: read as usual
            assert rc == 0 or argv[0] == "show", (argv, out)
            continue
        assert rc == 1, argv
        assert f"{rel}: its JSON nests {depth + 2} levels deep" in out.err + out.out, (argv, out)
        assert "Traceback" not in out.err and "RecursionError" not in out.err


def test_deeply_nested_hdf5_attribute_is_refused_by_name(tmp_path):
    import h5py
    path = str(tmp_path / "mb.h5")
    filled(path)
    with h5py.File(path, "r+") as f:
        attrs = json.loads(f.attrs["e2r_memorybank"])
        attrs["model_config"] = "@"
        f.attrs["e2r_memorybank"] = json.dumps(attrs).replace('"@"', "[" * 50000 + "]" * 50000)
    with pytest.raises(StoreCorruptError, match=r"mb.h5: attribute 'e2r_memorybank': its JSON nests 50001 levels"):
        open_memorybank(path)


# ----- files far larger than their rows can make them: refused by size, never mapped or read whole -------------
SIZE_PROBE = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))    # an 8 GiB map or read fails under this limit
from stores import StoreCorruptError, open_memorybank
path = sys.argv[1]
try:
    open_memorybank(path).get_batch(["train/seg_001:2"])
    print("served")
except StoreCorruptError as e:
    print("refused", e.chunk, str(e))
try:
    print("redo", open_memorybank(path, "r+").incomplete_ranges("train"))
except StoreCorruptError as e:
    print("resume refused", e.chunk, str(e))
"""


@pytest.mark.parametrize("what", ["light/c/1/0/0", "complete/tags/1"])
def test_a_sparse_8_gib_shard_or_tag_chunk_is_refused_by_its_size(tmp_path, what):
    path = str(tmp_path / "mb.zarr")
    filled(path)
    with open(Path(path, what), "r+b") as f:
        f.truncate(8 << 30)                                  # sparse: nearly nothing on disk
    r = subprocess.run([sys.executable, "-c", SIZE_PROBE, path], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout                # no MemoryError / ENOMEM, no traceback
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"refused {what}") and "8589934592 bytes" in lines[0], lines
    if what == "complete/tags/1":
        assert lines[1] == "redo [(8, 16)]"                  # a resume redoes the rows of the bad tag chunk
    else:                                                    # the shard is refused by name, not read whole
        assert lines[1].startswith(f"resume refused {what}") and "delete the file and resume" in lines[1], lines
    problems, _ = verify_path(path)
    assert any(what in p and "8589934592 bytes" in p for p in problems), problems


# ----- hostile command lines of the store CLI (sweep of issue 25, part two): one clear line, nothing made --------
def test_hostile_store_cli_flags_and_paths_are_refused_by_name(tmp_path, capsys):
    path = str(tmp_path / "mb.zarr")
    filled(path)
    fifo = tmp_path / "a.fifo"
    os.mkfifo(fifo)
    (tmp_path / "plain").write_text("x")
    cases = [
        (["ls", path, "--limit", "-1"], "--limit must be 0 (all keys) or a positive number of keys, got -1"),
        (["info", path, "--cache_gb", "nan"], "--cache_gb must be a positive number of GiB, got nan"),
        (["info", path, "--cache_gb", "-1"], "--cache_gb must be a positive number of GiB, got -1.0"),
        (["info", "nosuch://x/y"], "Protocol not known: nosuch (a store is a local path or an fsspec URL"),
        (["info", str(tmp_path / "plain")], "plain is a regular file, not a memorybank"),
        (["ls", str(fifo)], "a.fifo is a FIFO, not a memorybank"),
        (["convert", path, ""], "cannot create memorybank: the path is empty"),
        (["convert", path, f"{path}/inner.zarr"], "lies inside"),
        (["convert", path, str(tmp_path / "z.zarr"), "--shard-rows", "0"], "power of two in [1, 1048576], got 0"),
        (["convert", path, str(tmp_path / "z.zarr"), "--shard-rows", str(2**40)], f"got {2**40}"),
    ]
    for argv, why in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and why in err and err.count("\n") == 1, (argv, err)
    assert sorted(os.listdir(tmp_path)) == ["a.fifo", "mb.zarr", "plain"]            # nothing was made
    assert not (Path(path) / "inner.zarr").exists() and verify_path(path)[0] == []
