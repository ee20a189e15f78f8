"""MemoryBank writer/reader over both back ends, plus third-party openers of the Zarr layout."""
from __future__ import annotations

import os

import numpy as np
import pytest

from stores.keys import InvalidKeyError
from stores import StoreMismatchError, create_memorybank, open_memorybank
from tests.test_store_helpers import make_keys, rows_for, tiny_prov, tiny_schema


@pytest.fixture(params=["zarr", "hdf5"])
def store_path(request, tmp_path):
    return str(tmp_path / ("mb.zarr" if request.param == "zarr" else "mb.h5"))


def _filled(path, bev=False, n=25, shard_rows=8):
    schema = tiny_schema(bev=bev)
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=shard_rows)
    keys = make_keys("train", n)
    bank.reserve_split("train", keys)
    data = rows_for(schema, keys)
    bank.write_rows("train", 0, {f: a[:10] for f, a in data.items()}, keys=keys[:10])
    bank.write_rows("train", 10, {f: a[10:] for f, a in data.items()})
    bank.close()
    return schema, keys, data


@pytest.mark.parametrize("bev", [False, True])
def test_roundtrip_batch_order_missing_and_duplicates(store_path, bev):
    schema, keys, data = _filled(store_path, bev=bev)
    bank = open_memorybank(store_path, mode="r")
    assert len(bank) == 25 and bank.keys("train") == keys and bank.has(keys[7])
    req = [keys[20], "train/nope:1", keys[3], keys[20], keys[0]]
    out, missing = bank.get_batch(req)
    assert missing == ["train/nope:1"]
    for f in schema.fields:
        np.testing.assert_array_equal(out[f], data[f][[20, 3, 20, 0]])
    full, _ = bank.get_batch(req, fields=["actions"], fill_missing=True)
    assert full["found"].tolist() == [True, False, True, True, True]
    assert set(full) == {"actions", "found"} and not full["actions"][1].any()
    np.testing.assert_array_equal(bank.get(keys[4])["gru_out"], data["gru_out"][4])
    with pytest.raises(KeyError, match="nope"):
        bank.get("train/nope:2")
    with pytest.raises(PermissionError, match="read-only"):
        bank.write_rows("train", 0, {f: a[:1] for f, a in data.items()})


def test_incomplete_rows_invisible_and_ranges(store_path):
    schema = tiny_schema()
    bank = create_memorybank(store_path, schema, tiny_prov(), shard_rows=8)
    keys = make_keys("train", 30)
    assert bank.reserve_split("train", keys) == (0, 30)
    data = rows_for(schema, keys)
    bank.write_rows("train", 8, {f: a[8:16] for f, a in data.items()})
    assert bank.incomplete_ranges("train") == [(0, 8), (16, 30)]
    assert bank.task_ranges("train", 10) == [(0, 16), (16, 30)]
    r = open_memorybank(store_path)
    assert r.keys() == keys[8:16]
    out, missing = r.get_batch([keys[0], keys[9]])
    assert missing == [keys[0]] and out["actions"].shape == (1, 3, 2)


def test_hostile_keys_refused_on_write_and_lookup(store_path):
    _filled(store_path)
    bank = open_memorybank(store_path, mode="r+")
    for bad in ["../etc/passwd:1", "train/seg:01", "train/a/b:1", "", "train/seg:-1", "train/se\x00g:1"]:
        with pytest.raises(InvalidKeyError):
            bank.get_batch([bad])
        with pytest.raises(InvalidKeyError):
            bank.has(bad)
        with pytest.raises(InvalidKeyError):
            bank.reserve_split("test", ["test/ok:1", bad])
    with pytest.raises(InvalidKeyError, match="twice"):
        bank.reserve_split("test", ["test/a:1", "test/a:1"])
    with pytest.raises(ValueError, match="belongs to split 'train'"):
        bank.reserve_split("test", ["train/a:1"])
    assert "test" not in bank.splits


def test_split_refused_then_replaced_and_new_split_appended(store_path):
    schema, keys, data = _filled(store_path)
    bank = open_memorybank(store_path, mode="r+")
    with pytest.raises(ValueError, match="already has 25 rows"):
        bank.reserve_split("train", keys)
    vkeys = make_keys("valid", 5)
    start, count = bank.reserve_split("valid", vkeys)
    assert start % bank.alignment == 0 and start >= 25 and count == 5
    vdata = rows_for(schema, vkeys, seed_base=1)
    bank.write_rows("valid", 0, vdata)
    new_keys = make_keys("train", 12)
    assert bank.reserve_split("train", new_keys, replace=True) == (0, 12)
    bank.write_rows("train", 0, {f: a[:12] + 1 for f, a in data.items()})
    r = open_memorybank(store_path)
    assert r.keys("train") == new_keys and r.keys("valid") == vkeys
    np.testing.assert_array_equal(r.get(vkeys[2])["bev_vec"], vdata["bev_vec"][2])
    np.testing.assert_array_equal(r.get(new_keys[11])["bev_vec"], data["bev_vec"][11] + 1)
    assert not r.has(keys[20])


def test_append_split_leaves_existing_chunk_files_untouched(tmp_path):
    path = str(tmp_path / "mb.zarr")
    schema, keys, _ = _filled(path)
    def data_files():
        out = {}
        for root, _, files in os.walk(path):
            for f in files:
                if f != "zarr.json" and "keys" not in root and "complete" not in root:
                    p = os.path.join(root, f)
                    out[p] = (os.stat(p).st_mtime_ns, open(p, "rb").read())
        return out
    before = data_files()
    bank = open_memorybank(path, mode="r+")
    vkeys = make_keys("valid", 9)
    bank.reserve_split("valid", vkeys)
    bank.write_rows("valid", 0, rows_for(schema, vkeys))
    after = data_files()
    assert all(after[p] == v for p, v in before.items())
    assert len(after) > len(before)


def test_schema_and_teacher_mismatch_refused_with_what_differs(store_path):
    _filled(store_path)
    with pytest.raises(StoreMismatchError, match=r"gru_hidden: store=12, given=16"):
        s = tiny_schema()
        s.gru_hidden = 16
        create_memorybank(store_path, s, tiny_prov())
    with pytest.raises(StoreMismatchError, match="teacher_sha256"):
        create_memorybank(store_path, tiny_schema(), tiny_prov(sha="cd" * 32))
    with pytest.raises(StoreMismatchError, match="dtype: store='float32', given='float16'"):
        create_memorybank(store_path, tiny_schema(dtype="float16"), tiny_prov())
    bank = create_memorybank(store_path, tiny_schema(), tiny_prov())   # same -> opens for writing
    assert bank.mode == "r+" and bank.attrs["seq_len"] == 3


def test_write_validation_messages(store_path):
    schema = tiny_schema()
    bank = create_memorybank(store_path, schema, tiny_prov(), shard_rows=8)
    keys = make_keys("train", 4)
    bank.reserve_split("train", keys)
    data = rows_for(schema, keys)
    with pytest.raises(ValueError, match="lacks fields"):
        bank.write_rows("train", 0, {"actions": data["actions"]})
    bad = dict(data, gru_out=data["gru_out"][:, :, :5])
    with pytest.raises(ValueError, match=r"'gru_out' has shape \(4, 3, 5\), expected \(4, 3, 12\)"):
        bank.write_rows("train", 0, bad)
    nan = {f: a.copy() for f, a in data.items()}
    nan["bev_vec"][2, 0, 0] = np.nan
    with pytest.raises(ValueError, match="position 2 has non-finite"):
        bank.write_rows("train", 0, nan)
    with pytest.raises(ValueError, match="not stored"):
        bank.write_rows("train", 0, dict(data, bev_feat=np.zeros((4, 3, 4, 6, 5))))
    with pytest.raises(IndexError, match="outside split"):
        bank.write_rows("train", 2, data)
    with pytest.raises(ValueError, match="keys differ"):
        bank.write_rows("train", 0, data, keys=keys[::-1])
    assert bank.incomplete_ranges("train") == [(0, 4)]


def test_float16_store_roundtrip(tmp_path):
    path = str(tmp_path / "h.zarr")
    schema = tiny_schema(dtype="float16")
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=8)
    keys = make_keys("train", 9)
    bank.reserve_split("train", keys)
    data = rows_for(tiny_schema(), keys)   # float32 in, stored as float16
    bank.write_rows("train", 0, data)
    out, _ = open_memorybank(path).get_batch(keys[:3])
    assert out["gru_out"].dtype == np.float16
    np.testing.assert_allclose(out["gru_out"], data["gru_out"][:3], rtol=1e-3, atol=1e-3)


def test_third_party_openers(tmp_path):
    import dask.array as da
    import xarray as xr
    import zarr
    path = str(tmp_path / "mb.zarr")
    schema, keys, data = _filled(path, bev=True)
    g = zarr.open_group(path, mode="r")
    assert g.attrs["seq_len"] == 3 and list(g["keys"][:2]) == keys[:2]
    ch = g.attrs["light_channels"]                       # light fields packed on the channel axis of `light`
    assert ch == {"actions": [0, 2], "bev_vec": [2, 10], "gru_out": [10, 22]}
    np.testing.assert_array_equal(g["light"][5][:, slice(*ch["gru_out"])], data["gru_out"][5])
    np.testing.assert_array_equal(g["bev_feat/bev_feat"][24], data["bev_feat"][24])
    d = da.from_zarr(path, component="light")[..., slice(*ch["bev_vec"])]
    np.testing.assert_allclose(d.mean(axis=0).compute(), data["bev_vec"].mean(0), rtol=1e-5, atol=1e-6)
    ds = xr.open_zarr(path, consolidated=False, zarr_format=3)
    assert ds["light"].dims == ("row", "t", "channel") and ds.sizes["row"] == 25
    np.testing.assert_array_equal(ds["light"].isel(row=3, channel=slice(*ch["actions"])).values, data["actions"][3])
    dsb = xr.open_zarr(path, group="bev_feat", consolidated=False, zarr_format=3)
    assert dsb["bev_feat"].dims == ("row", "t", "c", "y", "x")


def test_reader_sees_rows_written_into_a_mapped_shard_after_refresh(tmp_path):
    path = str(tmp_path / "mb.zarr")
    schema = tiny_schema(bev=True)
    w = create_memorybank(path, schema, tiny_prov(), shard_rows=16)
    keys = make_keys("train", 16)
    w.reserve_split("train", keys)
    data = rows_for(schema, keys)
    w.write_rows("train", 0, {f: a[:4] for f, a in data.items()})
    r = open_memorybank(path)
    out, _ = r.get_batch(keys[:4])                       # maps shard 0 (rows 0..15) with 4 rows in it
    np.testing.assert_array_equal(out["gru_out"], data["gru_out"][:4])
    w.write_rows("train", 4, {f: a[4:] for f, a in data.items()})   # the writer replaces shard 0's file
    assert not r.has(keys[9])
    r.refresh()
    out, missing = r.get_batch(keys[::-1], fields=("bev_feat", "actions"))
    assert not missing and list(out) == ["bev_feat", "actions"]
    np.testing.assert_array_equal(out["actions"], data["actions"][::-1])
    np.testing.assert_array_equal(out["bev_feat"], data["bev_feat"][::-1])
