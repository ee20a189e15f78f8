"""The store never serves damaged data ("Nothing served wrong"): checksums on every chunk, lost shards / chunks,
special files, attribute edits, crash-proof and concurrent creation, the alignment rule, clear errors."""
from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from stores import (StoreCorruptError, StoreError, StoreMismatchError, StoreVersionError, create_memorybank,
                    open_memorybank)
from stores.__main__ import main
from stores.convert import convert
from stores.fsio import temp_sibling
from stores.schema import SCHEMA_VERSION
from tests.store_fixtures import make_keys, rows_for, tiny_prov, tiny_schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _store(path, n=20, bev=False, shard_rows=8):
    schema = tiny_schema(bev=bev)
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=shard_rows)
    keys = make_keys("train", n)
    bank.reserve_split("train", keys)
    data = rows_for(schema, keys)
    bank.write_rows("train", 0, data)
    return keys, data


def _verify(path, timeout=30):
    """``python -m stores verify`` in a subprocess (a hang fails the test after ``timeout`` s)."""
    r = subprocess.run([sys.executable, "-m", "stores", "verify", str(path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def _shard(path, i=1):
    return Path(path) / "light" / "c" / str(i) / "0" / "0"


def test_deleted_shard_is_corruption_not_zeros(tmp_path):
    path = str(tmp_path / "mb.zarr")
    keys, data = _store(path)
    early = open_memorybank(path)                      # opened before the loss: shard 1 not mapped yet
    _shard(path).unlink()
    with pytest.raises(StoreCorruptError, match=r"light/c/1/0/0 is missing") as e:
        open_memorybank(path)
    assert "train/seg_000:8" in str(e.value)
    with pytest.raises(StoreCorruptError, match="shard file is missing") as e:
        early.get_batch([keys[0], keys[9]])
    assert e.value.keys == [keys[9]] and e.value.array == "light" and "light/c/1/0/0" in e.value.chunk
    out, _ = early.get_batch(keys[:8])                 # rows of intact shards are still served
    np.testing.assert_array_equal(out["gru_out"], data["gru_out"][:8])
    r = _verify(path)
    assert r.returncode == 1 and "shard file is missing for 8 row(s)" in r.stdout and keys[8] in r.stdout
    bank = open_memorybank(path, "r+")                 # a writer opens it: a resume redoes the lost rows
    assert bank.incomplete_ranges("train") == [(8, 16)]
    bank.write_rows("train", 8, {f: a[8:16] for f, a in data.items()})
    assert _verify(path).returncode == 0
    out, _ = open_memorybank(path).get_batch(keys)
    np.testing.assert_array_equal(out["bev_vec"], data["bev_vec"])


@pytest.mark.parametrize("kind", ["dev_zero_symlink", "fifo", "directory"])
@pytest.mark.parametrize("where", ["light/c/1/0/0", "complete/c/0", "keys/c/0/0", "light/zarr.json"])
def test_special_file_in_place_of_a_chunk_is_refused_and_verify_does_not_hang(tmp_path, kind, where):
    path = str(tmp_path / "mb.zarr")
    keys, _ = _store(path)
    early = open_memorybank(path)
    target = Path(path) / where
    target.unlink()
    if kind == "dev_zero_symlink":
        target.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    with pytest.raises(StoreCorruptError, match="not a regular file"):
        open_memorybank(path)
    if where.startswith("light/c"):
        with pytest.raises(StoreCorruptError, match="not a regular file"):
            early.get_batch(keys[8:10])
    r = _verify(path)
    assert r.returncode == 1 and "not a regular file" in r.stdout, r.stdout


def test_200_random_byte_flips_in_shard_data_are_all_detected(tmp_path):
    path = str(tmp_path / "mb.zarr")
    keys, data = _store(path, n=64, shard_rows=64)
    shard = _shard(path, 0)
    good = shard.read_bytes()
    data_end = len(good) - (16 * 64 + 4)               # the shard index (with its own crc32c) follows the data
    rng = np.random.default_rng(0)
    detected = silent = 0
    for off in rng.choice(data_end, size=200, replace=False):
        raw = bytearray(good)
        raw[off] ^= int(rng.integers(1, 256))
        shard.write_bytes(bytes(raw))
        try:
            out, _ = open_memorybank(path).get_batch(keys)
        except StoreCorruptError as e:
            assert "crc32c" in str(e) and e.keys and e.keys[0] in keys
            detected += 1
            continue
        if any(not np.array_equal(out[f], data[f]) for f in data):
            silent += 1
    assert silent == 0 and detected == 200
    r = _verify(path)                                  # the last flipped copy is on disk
    assert r.returncode == 1 and "crc32c checksum mismatch" in r.stdout


def test_deleted_or_garbage_complete_chunk_is_detected_and_redone(tmp_path):
    path = str(tmp_path / "mb.zarr")
    keys, data = _store(path)
    chunk = Path(path) / "complete" / "c" / "1"
    good = chunk.read_bytes()
    chunk.unlink()
    with pytest.raises(StoreCorruptError, match="lost their completion flags"):
        open_memorybank(path)
    r = _verify(path)
    assert r.returncode == 1 and "completion flags" in r.stdout
    bank = open_memorybank(path, "r+")
    assert bank.incomplete_ranges("train") == [(8, 16)]          # a resume redoes them
    bank.write_rows("train", 8, {f: a[8:16] for f, a in data.items()})
    assert _verify(path).returncode == 0
    chunk.write_bytes(b"\x00garbage" + good[8:])                  # garbage: clear error, never a traceback
    with pytest.raises(StoreCorruptError, match=r"complete/c/1 .*crc32c"):
        open_memorybank(path)
    for cmd in (["stats", path], ["info", path], ["ls", path], ["verify", path]):
        r = subprocess.run([sys.executable, "-m", "stores", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "Traceback" not in r.stderr and "complete/c/1" in r.stdout + r.stderr, cmd
    bank = open_memorybank(path, "r+")                             # the writer repairs it by a resume
    assert bank.incomplete_ranges("train") == [(8, 16)]
    bank.write_rows("train", 8, {f: a[8:16] for f, a in data.items()})
    assert _verify(path).returncode == 0 and len(open_memorybank(path)) == 20


def test_lost_inner_chunk_of_a_complete_row_is_detected_and_redone(tmp_path):
    import zarr
    path = str(tmp_path / "mb.zarr")
    keys, data = _store(path)
    zarr.open_group(path, mode="r+")["light"][11] = np.nan       # inner chunk deleted, flag still 1
    with pytest.raises(StoreCorruptError, match="inner chunk is missing"):
        open_memorybank(path).get_batch([keys[11]])
    r = _verify(path)
    assert r.returncode == 1 and "inner chunks are missing for 1 row(s)" in r.stdout and keys[11] in r.stdout
    bank = open_memorybank(path, "r+")
    assert bank.incomplete_ranges("train") == [(11, 12)]
    bank.write_rows("train", 11, {f: a[11:12] for f, a in data.items()})   # resume: earlier rows complete
    assert _verify(path).returncode == 0


def _reserved_bank(tmp_path, n: int):
    """A new store (shards of 8 rows) with ``n`` train keys reserved -> ``(path, bank, keys, rows to write)``."""
    path = str(tmp_path / "mb.zarr")
    schema = tiny_schema()
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=8)
    keys = make_keys("train", n)
    bank.reserve_split("train", keys)
    return path, bank, keys, rows_for(schema, keys)


def test_writes_breaking_the_alignment_rule_are_refused(tmp_path):
    path, bank, keys, data = _reserved_bank(tmp_path, 24)
    other = open_memorybank(path, "r+")
    with pytest.raises(ValueError, match=r"breaks the alignment rule: positions \[0, 6\) of shard \[0, 8\)"):
        other.write_rows("train", 6, {f: a[6:12] for f, a in data.items()})
    bank.write_rows("train", 0, {f: a[:3] for f, a in data.items()})       # aligned start
    bank.write_rows("train", 3, {f: a[3:6] for f, a in data.items()})      # continues its own shard
    other.write_rows("train", 6, {f: a[6:12] for f, a in data.items()})   # resumes: rows [0, 6) complete
    other.write_rows("train", 12, {f: a[12:14] for f, a in data.items()})  # inside a shard it is filling
    with pytest.raises(ValueError, match="alignment rule"):
        open_memorybank(path, "r+").write_rows("train", 20, {f: a[20:24] for f, a in data.items()})
    assert open_memorybank(path).keys("train") == keys[:14]


EDITS = {
    "bev_dim": ("zarr.json", lambda d: d["attributes"].__setitem__("bev_dim", 9), "light_channels"),
    "gru_hidden": ("zarr.json", lambda d: d["attributes"].__setitem__("gru_hidden", 11), "light_channels"),
    "seq_len": ("zarr.json", lambda d: d["attributes"].__setitem__("seq_len", 4), "rows of shape"),
    "shard_rows_0": ("zarr.json", lambda d: d["attributes"].__setitem__("shard_rows", 0), "shard_rows=0"),
    "keys_shape_2e8": ("keys/zarr.json", lambda d: d.__setitem__("shape", [200_000_000, 276]), "200000000 rows"),
    "split_count_2e8": ("zarr.json", lambda d: d["attributes"]["splits"]["train"].__setitem__("count", 200_000_000),
                        "beyond"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_attribute_edits_give_a_clear_error_without_allocating(tmp_path, edit):
    path = str(tmp_path / "mb.zarr")
    _store(path)
    rel, fn, msg = EDITS[edit]
    p = Path(path) / rel
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))
    tracemalloc.start()
    try:
        with pytest.raises(StoreCorruptError, match=msg):
            open_memorybank(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 * 2**20, f"{peak / 2**20:.0f} MiB allocated by an open"
    r = _verify(path)
    assert r.returncode == 1 and msg in r.stdout


def test_kill_during_create_then_rerun_succeeds(tmp_path):
    path = str(tmp_path / "mb.zarr")
    code = ("import time, stores.abc.lifecycle as L\n"
            "L.publish = lambda tmp, path: (print('built', flush=True), time.sleep(60))\n"
            "from stores import create_memorybank\nfrom tests.store_fixtures import tiny_prov, tiny_schema\n"
            f"create_memorybank({path!r}, tiny_schema(), tiny_prov(), shard_rows=8)\n")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "built"      # killed after the store was built, before it was placed
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    left = [x for x in os.listdir(tmp_path) if ".e2r-tmp-" in x]
    assert left and not os.path.exists(path)          # nothing half-made at the target
    keys, _ = _store(path)                             # a re-run succeeds and removes the dead creator's temp
    assert not [x for x in os.listdir(tmp_path) if ".e2r-tmp-" in x]
    assert open_memorybank(path).keys() == keys


def test_remains_of_an_in_place_creation_and_a_full_disk(tmp_path, monkeypatch):
    import zarr
    import zarr.storage._local as local
    path = str(tmp_path / "mb.zarr")
    g = zarr.open_group(path, mode="w-", zarr_format=3)      # what an older version left when killed
    g.create_array("keys", shape=(0,), chunks=(8,), dtype=str)
    keys, _ = _store(path)
    assert open_memorybank(path).keys() == keys
    put = local._put

    def full(p, value, exclusive=False):
        if "light" in str(p):
            raise OSError(errno.ENOSPC, "No space left on device", str(p))
        return put(p, value, exclusive)
    monkeypatch.setattr(local, "_put", full)
    other = str(tmp_path / "other.zarr")
    with pytest.raises(StoreError, match="No space left on device"):
        create_memorybank(other, tiny_schema(), tiny_prov(), shard_rows=8)
    assert not os.path.exists(other) and not [x for x in os.listdir(tmp_path) if ".e2r-tmp-" in x]
    monkeypatch.setattr(local, "_put", put)
    _store(other)                                      # disk freed: a re-run succeeds


def _create(args):
    path, sha = args
    try:
        bank = create_memorybank(path, tiny_schema(), tiny_prov(sha=sha), shard_rows=8)
        return "ok" if bank.mode == "r+" else "bad"
    except StoreMismatchError:
        return "mismatch"
    except Exception as e:  # noqa: BLE001 - reported to the test
        return f"{type(e).__name__}: {e}"


def test_concurrent_creators_one_wins_the_others_open_or_get_a_clear_error(tmp_path):
    same = str(tmp_path / "same.zarr")
    diff = str(tmp_path / "diff.zarr")
    with mp.get_context("fork").Pool(4) as pool:
        got = pool.map(_create, [(same, "ab" * 32)] * 4)
        got2 = pool.map(_create, [(diff, ("ab" if i % 2 else "cd") * 32) for i in range(4)])
    assert got == ["ok"] * 4
    assert set(got2) <= {"ok", "mismatch"} and "ok" in got2
    for p in (same, diff):
        bank = open_memorybank(p, "r+")
        bank.reserve_split("train", make_keys("train", 3))
        bank.write_rows("train", 0, rows_for(bank.schema, make_keys("train", 3)))
    assert not [x for x in os.listdir(tmp_path) if ".e2r-tmp-" in x]


def test_rm_split_on_a_read_only_store_exits_1_with_a_message(tmp_path, monkeypatch, capsys):
    import zarr.storage._local as local
    path = str(tmp_path / "mb.zarr")
    _store(path)

    def read_only(p, value, exclusive=False):
        raise OSError(errno.EROFS, "Read-only file system", str(p))
    monkeypatch.setattr(local, "_put", read_only)
    assert main(["rm-split", path, "train"]) == 1
    err = capsys.readouterr().err
    assert "read-only file system" in err and path in err and "nothing was changed" in err
    monkeypatch.undo()
    assert open_memorybank(path).splits == {"train": (0, 20)} and len(open_memorybank(path)) == 20


def test_stats_on_corrupt_data_and_a_truncated_h5_give_messages(tmp_path, capsys):
    path = str(tmp_path / "mb.zarr")
    _store(path)
    raw = bytearray(_shard(path).read_bytes())
    raw[40] ^= 0xFF
    _shard(path).write_bytes(bytes(raw))
    assert main(["stats", path]) == 1
    assert "crc32c checksum mismatch" in capsys.readouterr().err
    h5 = str(tmp_path / "mb.h5")
    _store(h5)
    blob = Path(h5).read_bytes()
    Path(h5).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(StoreCorruptError, match="truncated or damaged"):
        open_memorybank(h5)
    assert main(["info", h5]) == 1 and "truncated" in capsys.readouterr().err
    assert _verify(h5).returncode == 1


def _legacy_v2_store(path, keys, data):
    """A store as schema_version 2 wrote it: no crc32c in the chunks, fill values 0."""
    import zarr
    import zarr.codecs as zc
    from stores.layout import new_store_attrs
    schema = tiny_schema()
    attrs = new_store_attrs(schema, tiny_prov(), 8)
    attrs.update(schema_version=2, light_channels={f: list(v) for f, v in schema.light_channels().items()})
    attrs["splits"] = {"train": {"start": 0, "count": len(keys)}}
    g = zarr.open_group(path, mode="w-", zarr_format=3)
    g.create_array("keys", shape=(len(keys),), chunks=(65536,), dtype=str, fill_value="")[:] = np.array(keys)
    c = g.create_array("complete", shape=(len(keys),), chunks=(8,), dtype="uint8", fill_value=0,
                       compressors=zc.ZstdCodec(level=3))
    c[:] = 1
    shp = schema.row_shape("light")
    light = g.create_array("light", shape=(len(keys), *shp), chunks=(1, *shp), shards=(8, *shp), dtype="float32",
                           fill_value=0, compressors=zc.BloscCodec(cname="lz4hc", clevel=5, shuffle="shuffle"))
    light[:] = np.concatenate([data[f] for f in ("actions", "bev_vec", "gru_out")], -1)
    g.attrs.put(attrs)


def test_old_format_refused_with_a_message_and_converted(tmp_path):
    old, new = str(tmp_path / "old.zarr"), str(tmp_path / "new.zarr")
    keys = make_keys("train", 12)
    data = rows_for(tiny_schema(), keys)
    _legacy_v2_store(old, keys, data)
    with pytest.raises(StoreVersionError, match=r"schema_version 2.*python -m stores convert"):
        open_memorybank(old)
    assert main(["convert", old, new]) == 0
    bank = open_memorybank(new)
    assert bank.attrs["schema_version"] == SCHEMA_VERSION and bank.keys() == keys
    out, _ = bank.get_batch(keys)
    for f in data:
        np.testing.assert_array_equal(out[f], data[f])
    assert _verify(new).returncode == 0


def test_fsync_option_and_data_before_flags(tmp_path, monkeypatch):
    path = str(tmp_path / "mb.zarr")
    schema = tiny_schema()
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=8)
    keys = make_keys("train", 16)
    bank.reserve_split("train", keys)
    synced: list[str] = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", spy)
    bank.write_rows("train", 0, rows_for(schema, keys[:8]))
    # the shard's bytes are synced under their temporary name (then renamed), then its directory: both before
    # the flags; the shard itself is not synced a second time
    light = [i for i, p in enumerate(synced) if re.search(r"light/c/0/0/0(\.[0-9a-f]+\.partial)?$", p)]
    light_dir = [i for i, p in enumerate(synced) if p.endswith("light/c/0/0")]
    flags = [i for i, p in enumerate(synced) if p.endswith("complete/c/0")]
    assert len(light) == 1 and light_dir and flags and max(light + light_dir) < min(flags)
    assert light[0] < light_dir[0]
    # the rows' identity tags: after their data, before their flags (file under its temporary name, directory)
    tags = [i for i, p in enumerate(synced) if re.search(r"complete/tags/0(\.[0-9a-f]+\.partial)?$", p)]
    tags_dir = [i for i, p in enumerate(synced) if p.endswith("complete/tags")]
    assert tags and tags_dir and max(light + light_dir) < min(tags) and max(tags + tags_dir) < min(flags)
    synced.clear()
    fast = open_memorybank(path, "r+", fsync=False)
    assert fast.fsync is False
    fast.write_rows("train", 8, rows_for(schema, keys[8:]))
    assert synced == [] and len(open_memorybank(path)) == 16
    time.sleep(0)
    shutil.rmtree(path)


def test_convert_refuses_a_damaged_store_and_h5_chunks_are_checksummed(tmp_path):
    import h5py
    path = str(tmp_path / "mb.zarr")
    keys, data = _store(path)
    _shard(path).unlink()
    with pytest.raises(StoreCorruptError, match="missing"):
        convert(path, str(tmp_path / "copy.h5"))            # never copies zeros for lost rows
    h5 = str(tmp_path / "mb.h5")
    _store(h5)
    with h5py.File(h5, "r") as f:
        assert f["gru_out"].fletcher32 and f["complete"].fletcher32
        off = f["gru_out"].id.get_chunk_info(5).byte_offset
    raw = bytearray(Path(h5).read_bytes())
    raw[off + 3] ^= 0x01
    Path(h5).write_bytes(bytes(raw))
    with pytest.raises(StoreCorruptError, match="fletcher32") as e:
        open_memorybank(h5).get_batch(keys)
    assert e.value.keys == [keys[5]]
    r = _verify(h5)
    assert r.returncode == 1 and keys[5] in r.stdout


def test_a_writer_never_reads_a_fifo_it_would_rewrite(tmp_path):
    path, bank, keys, data = _reserved_bank(tmp_path, 20)
    bank.write_rows("train", 0, {f: a[:8] for f, a in data.items()})
    _shard(path).parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(_shard(path))                               # where the next shard will be written
    with pytest.raises(StoreCorruptError, match="FIFO"):
        open_memorybank(path, "r+").write_rows("train", 8, {f: a[8:12] for f, a in data.items()})
    assert _verify(path).returncode == 1
