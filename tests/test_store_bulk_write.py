"""The bulk shard write path (`stores.zarr_v3.shard_codec`): byte-identical to zarr-python, read by zarr-python, the row
reader and verify; crash-safe (temporary file, fsync, rename; data before flags); a damaged shard refused."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr
from numcodecs import blosc

import stores.zarr_v3.shard_codec as shard_codec
from stores import create_memorybank, open_memorybank
from stores.errors import StoreCorruptError, StoreError, UnsupportedLayout
from stores.fsio import read_json
from stores.zarr_v3.shard_codec import ShardCodec
from stores.verify import verify_path
from stores.zarr_v3.store import ZarrMemoryBank
from tests.store_fixtures import make_keys, rows_for, tiny_prov, tiny_schema

LIGHT = ("actions", "bev_vec", "gru_out")
# split of 21 rows in shards of 8: a whole shard, a shard filled by two blocks (the second merges into the
# first's file), then the last, partial shard of the split; then rows [2, 5) rewritten by the same handle
BLOCKS = [(0, 8), (8, 11), (11, 16), (16, 21), (2, 5)]


def _rows(schema, keys, lo, hi, seed):
    data = rows_for(schema, keys[lo:hi], seed_base=seed)
    if lo == 0 and seed == 0:
        for f in data:
            data[f][1] = 0.0                   # an all-zero row is data (fill is NaN): it gets a chunk
    return data


def _write(path, schema, bulk):
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=8)
    bank.bulk_writes = bulk
    keys = make_keys("train", 21)
    bank.reserve_split("train", keys)
    expect = {f: np.zeros((21, *schema.row_shape(f)), schema.dtype) for f in schema.fields}
    for n, (lo, hi) in enumerate(BLOCKS):
        block = _rows(schema, keys, lo, hi, seed=0 if n < 4 else 7)
        bank.write_rows("train", lo, block)
        for f in schema.fields:
            expect[f][lo:hi] = block[f]
    bank.close()
    return keys, expect


def _chunk_files(path):
    root = Path(path)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and "/c/" in str(p.relative_to(root)) and ("light" in p.parts or "bev_feat" in p.parts)}


@pytest.mark.parametrize("dtype,bev", [("float32", False), ("float16", False), ("float16", True)])
def test_bulk_shards_are_byte_identical_to_zarr_python(tmp_path, monkeypatch, dtype, bev):
    schema = tiny_schema(bev=bev, dtype=dtype)
    ref, bulk = str(tmp_path / "ref.zarr"), str(tmp_path / "bulk.zarr")
    _write(ref, schema, bulk=False)
    zarr_writes: list[str] = []
    real = zarr.Array.__setitem__

    def spy(self, sel, value):
        zarr_writes.append(self.path)
        return real(self, sel, value)
    monkeypatch.setattr(zarr.Array, "__setitem__", spy)
    _write(bulk, schema, bulk=True)
    assert not [p for p in zarr_writes if p in ("light", "bev_feat/bev_feat")]     # the bulk path wrote them
    a, b = _chunk_files(ref), _chunk_files(bulk)
    assert len(a) == (6 if bev else 3) and sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], f"{name} differs from zarr-python's"


def test_zarr_python_the_row_reader_and_verify_read_bulk_shards(tmp_path):
    schema = tiny_schema(bev=True)
    path = str(tmp_path / "mb.zarr")
    keys, expect = _write(path, schema, bulk=True)
    packed = np.concatenate([expect[f] for f in LIGHT], -1)
    g = zarr.open_group(path, mode="r", zarr_format=3)
    light = np.asarray(g["light"][:])
    assert light.shape[0] == 21                          # the array ends inside its last shard
    np.testing.assert_array_equal(light, packed)
    np.testing.assert_array_equal(np.asarray(g["bev_feat/bev_feat"][:21]), expect["bev_feat"])
    bank = open_memorybank(path)
    out, missing = bank.get_batch(keys[::-1])
    assert not missing
    for f in schema.fields:
        np.testing.assert_array_equal(out[f], expect[f][::-1])
    np.testing.assert_array_equal(bank.dask_array("gru_out")[:21].compute(), expect["gru_out"])
    problems, _ = verify_path(path)
    assert problems == []
    index = bank._reader("light").read_shard(2)[1]           # the split's last, partial shard
    assert (index[:5, 0] != 2**64 - 1).all() and (index[5:] == 2**64 - 1).all()


def test_a_failed_shard_write_leaves_the_old_file_whole_and_no_flags(tmp_path, monkeypatch):
    schema = tiny_schema()
    path = str(tmp_path / "mb.zarr")
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=8)
    keys = make_keys("train", 16)
    bank.reserve_split("train", keys)
    bank.write_rows("train", 0, rows_for(schema, keys[:4]))
    shard = Path(path) / "light" / "c" / "0" / "0" / "0"
    before = shard.read_bytes()

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(StoreError, match="No space left on device"):
        bank.write_rows("train", 4, rows_for(schema, keys[4:8]))
    monkeypatch.undo()
    assert shard.read_bytes() == before
    assert not [p for p in Path(path).rglob("*.partial")]      # the temporary file is removed
    assert len(open_memorybank(path)) == 4                      # the failed rows are not complete
    bank.write_rows("train", 4, rows_for(schema, keys[4:8]))    # a retry by the same handle succeeds
    out, missing = open_memorybank(path).get_batch(keys[:8])
    assert not missing
    np.testing.assert_array_equal(out["gru_out"], rows_for(schema, keys[:8])["gru_out"])


@pytest.mark.parametrize("fsync", [True, False])
def test_shard_fsynced_under_its_temporary_name_before_the_rename_and_the_flags(tmp_path, monkeypatch, fsync):
    schema = tiny_schema()
    path = str(tmp_path / "mb.zarr")
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=8, fsync=fsync)
    keys = make_keys("train", 8)
    bank.reserve_split("train", keys)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda s, d: (events.append(("replace", str(s))), real_replace(s, d))[1])
    bank.write_rows("train", 0, rows_for(schema, keys))
    renamed = [i for i, (e, p) in enumerate(events) if e == "replace" and "/light/c/" in p]
    assert len(renamed) == 1 and events[renamed[0]][1].endswith(".partial")   # one file write for the shard
    tmp = events[renamed[0]][1]
    flags = [i for i, (e, p) in enumerate(events) if e == "fsync" and p.endswith("complete/c/0")]
    if fsync:
        assert ("fsync", tmp) in events[:renamed[0]] and flags and min(flags) > renamed[0]
    else:
        assert [e for e in events if e[0] == "fsync"] == [] and not flags
    assert len(open_memorybank(path)) == 8


def test_merging_into_a_damaged_shard_is_refused_and_changes_nothing(tmp_path):
    schema = tiny_schema()
    path = str(tmp_path / "mb.zarr")
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=8)
    keys = make_keys("train", 8)
    bank.reserve_split("train", keys)
    bank.write_rows("train", 0, rows_for(schema, keys[:4]))
    shard = Path(path) / "light" / "c" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF                                            # inside the shard index: its crc32c fails
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreCorruptError, match="shard index checksum"):
        bank.write_rows("train", 4, rows_for(schema, keys[4:]))
    assert shard.read_bytes() == bytes(raw)


def test_writers_breaking_the_alignment_rule_are_still_refused(tmp_path):
    schema = tiny_schema()
    path = str(tmp_path / "mb.zarr")
    create_memorybank(path, schema, tiny_prov(), shard_rows=8).reserve_split("train", make_keys("train", 16))
    other = open_memorybank(path, "r+")
    with pytest.raises(ValueError, match="alignment rule"):
        other.write_rows("train", 3, rows_for(schema, make_keys("train", 16)[3:8]))
    assert not (Path(path) / "light" / "c" / "0").exists()


def test_layouts_the_encoder_does_not_handle_are_refused_at_construction(tmp_path):
    path = str(tmp_path / "mb.zarr")
    create_memorybank(path, tiny_schema(), tiny_prov(), shard_rows=8)
    with pytest.raises(UnsupportedLayout):
        ShardCodec(read_json(Path(path) / "complete" / "zarr.json"))      # not sharded
    meta = read_json(Path(path) / "light" / "zarr.json")
    meta["codecs"][0]["configuration"]["codecs"][1] = {"name": "gzip", "configuration": {"level": 1}}
    with pytest.raises(UnsupportedLayout, match="gzip"):
        ShardCodec(meta)
    assert ZarrMemoryBank.bulk_writes is True


def test_threaded_encoding_gives_the_same_bytes(tmp_path, monkeypatch):
    path = str(tmp_path / "mb.zarr")
    create_memorybank(path, tiny_schema(), tiny_prov(), shard_rows=8)
    codec = ShardCodec(read_json(Path(path) / "light" / "zarr.json"))
    rows = np.random.default_rng(0).standard_normal((8, *codec.row_shape)).astype(np.float32)
    one = b"".join(codec.shard(rows, 0, threads=1))
    monkeypatch.setattr(shard_codec, "_MIN_THREAD_BYTES", 1)             # tiny rows: force the thread split
    assert codec.encode_rows(rows, threads=3) == codec.encode_rows(rows, threads=1)
    assert b"".join(codec.shard(rows, 0, threads=3)) == one


def test_a_checksummed_chunk_of_the_wrong_length_is_refused_not_served(tmp_path):
    schema = tiny_schema()
    path = str(tmp_path / "mb.zarr")
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=8)
    keys = make_keys("train", 8)
    bank.reserve_split("train", keys)
    bank.write_rows("train", 0, rows_for(schema, keys))
    codec = ShardCodec(read_json(Path(path) / "light" / "zarr.json"))
    short = blosc.compress(np.ones(5, np.float32).tobytes(), b"lz4hc", 5, 1, 0, 4)
    chunks = codec.encode_rows(np.concatenate([rows_for(schema, keys)[f] for f in LIGHT], -1))
    chunks[3] = short + google_crc32c.value(short).to_bytes(4, "little")     # valid crc, wrong row size
    (Path(path) / "light" / "c" / "0" / "0" / "0").write_bytes(b"".join(codec.build(chunks)))
    reader = open_memorybank(path)
    assert reader.get_batch(keys[:3])[1] == []
    with pytest.raises(StoreCorruptError, match=r"row 3 .* failed its identity check") as e:
        reader.get_batch([keys[3]])                  # not the chunk written there: its identity tag says so
    assert e.value.keys == [keys[3]]
    bank._tag_rows(3, 4, {}, [keys[3]])              # a writer that tagged such a chunk: the length check still
    with pytest.raises(StoreCorruptError, match=r"does not decode \(ValueError: 20 bytes, expected") as e:
        open_memorybank(path).get_batch([keys[3]])
    assert e.value.keys == [keys[3]]


def test_fill_rows_get_no_chunk_as_in_zarr_python(tmp_path):
    path = str(tmp_path / "mb.zarr")
    create_memorybank(path, tiny_schema(), tiny_prov(), shard_rows=8).reserve_split("train", make_keys("train", 8))
    codec = ShardCodec(read_json(Path(path) / "light" / "zarr.json"))
    rows = np.random.default_rng(1).standard_normal((8, *codec.row_shape)).astype(np.float32)
    rows[2] = np.nan                                             # all fill: no chunk
    rows[5, 0, 0] = np.nan                                       # NaN first value only: a chunk
    zarr.open_group(path, mode="r+", zarr_format=3)["light"][0:8] = rows       # zarr-python's own write
    assert b"".join(codec.shard(rows, 0)) == (Path(path) / "light" / "c" / "0" / "0" / "0").read_bytes()
    assert [c is None for c in codec.encode_rows(rows)] == [False, False, True] + [False] * 5


def test_short_writes_are_continued(tmp_path, monkeypatch):
    parts = [b"abc", memoryview(b"0123456789"), b"", bytes(range(256)) * 9, b"z"]
    real = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, bufs: real(fd, [bytes(bufs[0])[:7]]))   # at most 7 bytes a call
    target = tmp_path / "shard"
    shard_codec.write_file(str(target), parts, fsync=True)
    assert target.read_bytes() == b"".join(bytes(p) for p in parts)
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e5])     # 1e5 overflows float16 to inf
def test_a_float16_store_refuses_non_finite_values_after_the_cast(tmp_path, bad):
    schema = tiny_schema(dtype="float16")
    bank = create_memorybank(str(tmp_path / "mb.zarr"), schema, tiny_prov(), shard_rows=8)
    keys = make_keys("train", 4)
    bank.reserve_split("train", keys)
    data = {f: a.astype(np.float32) for f, a in rows_for(schema, keys).items()}
    data["gru_out"][3, 2, 1] = bad
    with pytest.raises(ValueError, match="'gru_out' of split position 3 has non-finite"):
        bank.write_rows("train", 0, data)
    data["gru_out"][3, 2, 1] = 65504.0                            # the largest float16 is finite
    bank.write_rows("train", 0, data)
    assert len(open_memorybank(bank.path)) == 4
