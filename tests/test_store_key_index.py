"""The on-disk key index (schema_version 4): what opening reads, lookups, damage to the index, stores of the
previous schema (index built in memory, `reindex` upgrades), and `verify` checking the index against the keys."""
from __future__ import annotations

import json
import os
import pickle
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest

from stores.keys import InvalidKeyError
from stores import StoreCorruptError, create_memorybank, open_memorybank
from stores.__main__ import main
from stores.index_file import HEADER_BYTES, index_path, write_index
from stores.layout import keys_crc32c
from stores.schema import SCHEMA_VERSION
from stores.zarr_v3.store import ZarrMemoryBank
from tests.store_fixtures import make_keys, rows_for, tiny_prov, tiny_schema


def _store(path, splits=(("train", 30), ("valid", 12)), shard_rows=8):
    schema = tiny_schema()
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=shard_rows)
    keys, data = {}, {}
    for split, n in splits:
        keys[split] = make_keys(split, n)
        bank.reserve_split(split, keys[split])
        data[split] = rows_for(schema, keys[split])
        bank.write_rows(split, 0, data[split])
    return bank, keys, data


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x20
    path.write_bytes(bytes(raw))


def _as_schema_3(path: str) -> None:
    """What the previous version wrote: no index files, schema_version 3."""
    for p in (Path(path) / "keys" / "index").iterdir():
        p.unlink()
    (Path(path) / "keys" / "index").rmdir()
    meta = json.loads((Path(path) / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 3
    (Path(path) / "zarr.json").write_text(json.dumps(meta))


def test_open_maps_the_index_and_never_reads_the_keys(tmp_path, monkeypatch):
    path = str(tmp_path / "mb.zarr")
    _, keys, data = _store(path)
    assert sorted(p.name for p in (Path(path) / "keys" / "index").iterdir()) == ["train.idx", "valid.idx"]

    def no_keys(self, a, b):
        raise AssertionError(f"the keys array was read (rows [{a}, {b}))")
    monkeypatch.setattr(ZarrMemoryBank, "_read_keys", no_keys)
    bank = open_memorybank(path)
    assert len(bank) == 42 and bank.complete_count("valid") == 12
    req = [keys["valid"][3], keys["train"][29], "valid/nope:1", keys["train"][0], keys["valid"][3], "test/a:1"]
    out, missing = bank.get_batch(req)
    assert missing == ["valid/nope:1", "test/a:1"]
    want = np.stack([data["valid"]["gru_out"][3], data["train"]["gru_out"][29], data["train"]["gru_out"][0],
                     data["valid"]["gru_out"][3]])
    np.testing.assert_array_equal(out["gru_out"], want)
    again = pickle.loads(pickle.dumps(bank))          # a spawned worker maps the index file itself
    np.testing.assert_array_equal(again.get(keys["train"][7])["actions"], data["train"]["actions"][7])


def test_opening_allocates_no_memory_per_key(tmp_path):
    """50 000 reserved keys: the old per-process dict and key strings took > 6 MiB; the mapped index takes
    nothing per key (the completion flags are one byte per row)."""
    path = str(tmp_path / "mb.zarr")
    schema = tiny_schema()
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=4096)
    keys = [f"train/seg_{i // 1000:05d}:{i % 1000}" for i in range(50_000)]
    bank.reserve_split("train", keys)
    bank.write_rows("train", 0, rows_for(schema, keys[:5]))
    open_memorybank(path)                            # imports, zarr caches
    tracemalloc.start()
    try:
        r = open_memorybank(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * 2**20, f"{peak / 2**20:.2f} MiB allocated by an open of 50 000 keys"
    assert len(r) == 5 and r.has(keys[4]) and not r.has(keys[5])


def test_lookups_refuse_malformed_keys_and_never_match_a_prefix(tmp_path):
    path = str(tmp_path / "mb.zarr")
    bank, keys, _ = _store(path)
    test = ["test/a:1", "test/a:10", "test/a:100", "test/b" + "x" * 60 + ":3"]
    bank.reserve_split("test", test)
    bank.write_rows("test", 0, rows_for(bank.schema, test[:2]))
    bank = open_memorybank(path)
    k = keys["train"][4]
    for bad in [k + "\x00", "train/seg_000:4\x00\x00", "tráin/seg:1", b"train/seg_000:4", None, k[:-1] + "04"]:
        with pytest.raises(InvalidKeyError):
            bank.get_batch([k, bad])
    req = ["test/a:1000", "test/a:10", "test/a:1", "train/" + "s" * 100 + ":1", test[3], k, "test/a:100"]
    out, missing = bank.get_batch(req, fill_missing=True)
    assert out["found"].tolist() == [False, True, True, False, False, True, False]
    assert missing == ["test/a:1000", "train/" + "s" * 100 + ":1", test[3], "test/a:100"]   # last two: not written


def test_damaged_index_is_refused_never_misread_and_reindex_repairs_it(tmp_path, capsys):
    path = str(tmp_path / "mb.zarr")
    _, keys, data = _store(path)
    idx = index_path(path, "train")
    good = idx.read_bytes()
    early = open_memorybank(path)                     # mapped before the damage, blocks not checked yet
    _flip(idx, HEADER_BYTES + 3)                      # a key byte of block 0: only its block checksum sees it
    bank = open_memorybank(path)
    with pytest.raises(StoreCorruptError, match=r"key index of split 'train'.*block 0 .*crc32c.*stores reindex"):
        bank.get_batch([keys["train"][5]])
    with pytest.raises(StoreCorruptError, match="block 0"):
        early.get_batch(keys["train"])
    np.testing.assert_array_equal(bank.get(keys["valid"][2])["bev_vec"], data["valid"]["bev_vec"][2])
    assert main(["verify", path]) == 1
    assert "key index of split 'train'" in capsys.readouterr().out
    for offset in (100, len(good) - 3):               # header; checksum table
        idx.write_bytes(good)
        _flip(idx, offset)
        with pytest.raises(StoreCorruptError, match="stores reindex"):
            open_memorybank(path)
    idx.unlink()
    with pytest.raises(StoreCorruptError, match=r"key index of split 'train' .*missing.*stores reindex"):
        open_memorybank(path)
    writer = open_memorybank(path, "r+")              # a writer opens it (index built in memory), damage listed
    assert any("key index" in d for d in writer.damage) and writer.has(keys["train"][3])
    assert main(["reindex", path]) == 0
    assert idx.read_bytes() == good and main(["verify", path]) == 0
    out, _ = open_memorybank(path).get_batch(keys["train"])
    np.testing.assert_array_equal(out["actions"], data["train"]["actions"])


def test_an_index_of_other_keys_is_refused_and_verify_compares_index_and_keys(tmp_path, capsys):
    path = str(tmp_path / "mb.zarr")
    bank, keys, _ = _store(path)
    idx = index_path(path, "valid")
    stale = idx.read_bytes()
    bank.reserve_split("valid", make_keys("valid", 11), replace=True)   # a crash could leave the old file
    idx.write_bytes(stale)
    with pytest.raises(StoreCorruptError, match="left over from a replaced split"):
        open_memorybank(path)
    assert main(["reindex", path]) == 0
    # an index with valid checksums that maps keys to the wrong positions (a bug, not bit rot): verify finds it
    train = keys["train"]
    write_index(index_path(path, "train"), "train", 0, keys_crc32c(train), train[1:] + train[:1], fsync=False)
    capsys.readouterr()
    assert main(["verify", path]) == 1
    out = capsys.readouterr().out
    assert "key index of split 'train'" in out and "disagrees with the keys array" in out and "30 entries" in out
    write_index(index_path(path, "gone"), "gone", 0, 0, [], fsync=False)     # left by an interrupted reserve
    assert main(["reindex", path]) == 0 and not index_path(path, "gone").exists()
    assert main(["verify", path]) == 0


def test_previous_schema_opens_with_the_index_in_memory_and_reindex_upgrades_it(tmp_path, capsys):
    path = str(tmp_path / "mb.zarr")
    _, keys, data = _store(path)
    _as_schema_3(path)
    old = open_memorybank(path)
    assert old.attrs["schema_version"] == 3 and not old.disk_index
    out, missing = old.get_batch(keys["valid"] + ["valid/x:1"])
    assert missing == ["valid/x:1"]
    np.testing.assert_array_equal(out["gru_out"], data["valid"]["gru_out"])
    w = open_memorybank(path, "r+")                   # the previous schema is still written as it was
    w.reserve_split("test", make_keys("test", 3))
    assert not (Path(path) / "keys" / "index").exists()
    assert main(["info", path]) == 0 and "stores reindex" in capsys.readouterr().out
    assert main(["reindex", path]) == 0
    new = open_memorybank(path)
    assert new.attrs["schema_version"] == SCHEMA_VERSION and new.disk_index
    assert sorted(p.name for p in (Path(path) / "keys" / "index").iterdir()) == ["test.idx", "train.idx", "valid.idx"]
    np.testing.assert_array_equal(new.get(keys["train"][11])["bev_vec"], data["train"]["bev_vec"][11])
    assert main(["verify", path]) == 0


def test_reindex_refuses_keys_that_fail_their_checksum(tmp_path):
    path = str(tmp_path / "mb.zarr")
    _store(path)
    meta = json.loads((Path(path) / "zarr.json").read_text())
    meta["attributes"]["splits"]["train"]["keys_crc32c"] ^= 1
    (Path(path) / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreCorruptError, match="left over from a replaced split"):
        open_memorybank(path)
    with pytest.raises(StoreCorruptError, match=r"cannot index split 'train'.*checksum.*rm-split"):
        open_memorybank(path, "r+").reindex()


def test_the_index_stays_invisible_to_zarr_tools(tmp_path):
    import xarray as xr
    import zarr
    path = str(tmp_path / "mb.zarr")
    _store(path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")              # zarr-python warns about an unknown node next to the arrays
        assert sorted(zarr.open_group(path, mode="r").array_keys()) == ["complete", "keys", "light"]
        assert xr.open_zarr(path, consolidated=False, zarr_format=3)["keys"].shape == (44,)
    assert not [w for w in seen if "not recognized" in str(w.message) or "index" in str(w.message)]


def test_reserve_writes_the_index_durably_before_the_entry_and_a_crash_leaves_no_half_split(tmp_path, monkeypatch,
                                                                                          capsys):
    path = str(tmp_path / "mb.zarr")
    bank, keys, data = _store(path, splits=(("train", 10),))
    events: list[str] = []
    real_fsync, real_attrs = os.fsync, ZarrMemoryBank._write_attrs
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))

    def crash(self, attrs):
        events.append("entry")
        raise RuntimeError("killed before the split entry")
    monkeypatch.setattr(ZarrMemoryBank, "_write_attrs", crash)
    with pytest.raises(RuntimeError, match="killed"):
        bank.reserve_split("valid", make_keys("valid", 6))
    idx = str(index_path(path, "valid"))
    assert idx in events and events.index(idx) < events.index("entry")
    assert events.index(str(Path(idx).parent)) < events.index("entry")       # the rename is durable too
    monkeypatch.setattr(ZarrMemoryBank, "_write_attrs", real_attrs)
    r = open_memorybank(path)                         # the split does not exist; the unused index is harmless
    assert list(r.splits) == ["train"] and len(r) == 10 and not r.has("valid/seg_000:1")
    assert main(["verify", path]) == 1 and "key index of no split" in capsys.readouterr().out
    w = open_memorybank(path, "r+")
    w.reserve_split("valid", make_keys("valid", 4))  # a re-run writes over it
    w.write_rows("valid", 0, rows_for(w.schema, make_keys("valid", 4)))
    assert main(["verify", path]) == 0
    np.testing.assert_array_equal(open_memorybank(path).get(keys["train"][9])["gru_out"], data["train"]["gru_out"][9])
