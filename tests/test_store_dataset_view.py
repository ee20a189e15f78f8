"""`stores.open_dataset`: the store as an xarray.Dataset - named dims, key coordinate, complete rows only, one
dask chunk per shard, every byte read through the store's checked path."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import dask
import numpy as np
import pytest

import stores
from stores import StoreCorruptError, create_memorybank, open_dataset, open_memorybank
from stores.zarr_v3.store import ZarrMemoryBank
from tests.store_fixtures import make_keys, rows_for, tiny_prov, tiny_schema


def _store(path, bev=False, shard_rows=8):
    """train: 30 keys, rows [10, 13) never written (shard 1 partly complete); valid: 5 keys, all written."""
    schema = tiny_schema(bev=bev)
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=shard_rows)
    keys = {"train": make_keys("train", 30), "valid": make_keys("valid", 5)}
    data = {s: rows_for(schema, k) for s, k in keys.items()}
    for s, k in keys.items():
        bank.reserve_split(s, k)
    bank.write_rows("train", 0, {f: a[:10] for f, a in data["train"].items()})
    bank.write_rows("train", 13, {f: a[13:] for f, a in data["train"].items()})
    bank.write_rows("valid", 0, data["valid"])
    return schema, keys, data


@pytest.mark.parametrize("name,bev", [("mb.zarr", True), ("mb.h5", False)])
def test_values_keys_dims_and_one_chunk_per_shard(tmp_path, name, bev):
    path = str(tmp_path / name)
    schema, keys, data = _store(path, bev=bev)
    ds = open_dataset(path)
    complete = keys["train"][:10] + keys["train"][13:] + keys["valid"]
    assert list(ds["key"].values) == complete == open_memorybank(path).keys()
    assert ds["actions"].dims == ("key", "t", "action") and ds["bev_vec"].dims == ("key", "t", "bev_channel")
    assert ds["gru_out"].dims == ("key", "t", "gru_channel") and ds.sizes["gru_channel"] == 12
    assert ds.attrs["seq_len"] == 3 and ds.attrs["teacher_sha256"] == tiny_prov().teacher_sha256
    # complete train rows [0, 10) and [13, 30) lie in shards 0..3 (8 rows each), valid rows [32, 37) in shard 4
    assert ds["actions"].data.chunks[0] == (8, 5, 8, 6, 5)
    assert list(ds["row"].values[:12]) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14]
    values = ds.compute()
    want, missing = open_memorybank(path).get_batch(complete)
    assert not missing
    for f in schema.fields:
        np.testing.assert_array_equal(values[f].values, want[f])
    np.testing.assert_array_equal(ds["bev_vec"].sel(key=keys["valid"][2]).values, data["valid"]["bev_vec"][2])
    if bev:
        assert ds["bev_feat"].dims == ("key", "t", "feat_channel", "y", "x")
        assert ds["bev_feat"].data.chunks[0] == (8, 5, 8, 6, 5)          # bev_feat shards: 8 rows here too
    ds.close()


def test_each_shard_is_read_once_for_all_light_fields(tmp_path, monkeypatch):
    path = str(tmp_path / "mb.zarr")
    _store(path, shard_rows=16)
    calls: list[int] = []
    real = ZarrMemoryBank.get_batch

    def counted(self, keys, fields=None, fill_missing=False):
        calls.append(len(keys))
        return real(self, keys, fields, fill_missing)
    monkeypatch.setattr(ZarrMemoryBank, "get_batch", counted)
    ds = open_dataset(path)
    assert calls == []                                   # lazy: nothing read at open
    with dask.config.set(scheduler="synchronous"):
        ds.compute()
    assert sorted(calls) == [5, 13, 14]                  # shards 0, 1 (train) and 2 (valid): one read each


def test_a_damaged_chunk_raises_on_compute_never_zeros(tmp_path):
    path = str(tmp_path / "mb.zarr")
    _, keys, data = _store(path)
    ds = open_dataset(path)
    shard = Path(path) / "light" / "c" / "1" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[20] ^= 0xFF                                      # inside the first inner chunk of shard 1 (row 8)
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreCorruptError, match="crc32c") as e:
        ds["gru_out"].compute()
    assert e.value.keys == [keys["train"][8]]
    np.testing.assert_array_equal(ds["actions"].isel(key=slice(0, 8)).values, data["train"]["actions"][:8])
    shard.unlink()
    with pytest.raises(StoreCorruptError, match="missing"):
        open_dataset(path)                               # a damaged store is refused at open, as by open_memorybank


def test_opened_read_only(tmp_path):
    path = str(tmp_path / "mb.zarr")
    _store(path)

    def snapshot():
        return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(path) for f in fs}
    before = snapshot()
    ds = open_dataset(path)
    ds.compute()
    ds.close()
    assert snapshot() == before


def test_missing_xarray_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "xarray", None)          # import xarray -> ImportError
    with pytest.raises(ImportError, match=r"xarray.*e2r-kd\[dev\]"):
        stores.open_dataset(str(tmp_path / "none.zarr"))
