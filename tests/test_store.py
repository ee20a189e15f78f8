"""The Zarr back end beyond the shared behaviour (tests/test_store_conformance.py): appended splits leave existing
chunk files untouched, float16, third-party openers of the layout, rows written into a mapped shard."""
from __future__ import annotations

import os

import numpy as np

from stores import create_memorybank, open_memorybank
from tests.store_fixtures import filled, make_keys, rows_for, tiny_prov, tiny_schema


def test_append_split_leaves_existing_chunk_files_untouched(tmp_path):
    path = str(tmp_path / "mb.zarr")
    schema, keys, _ = filled(path)
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
    schema, keys, data = filled(path, bev=True)
    g = zarr.open_group(path, mode="r")
    assert g.attrs["seq_len"] == 3 and g["keys"].dtype == np.uint8 and g["keys"].shape == (25, 276)
    assert [bytes(r).rstrip(b"\0").decode() for r in g["keys"][:2]] == keys[:2]     # ASCII, NUL padded
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
