"""The behaviour every memorybank back end shares, run on each (as zarr-python's ``StoreTests``): local Zarr,
Zarr on object storage (the local S3 server of `stores.remote.local_s3`) and HDF5. `StoreTests` holds the tests;
a subclass per back end names where its stores live (`store_path`)."""
from __future__ import annotations

import uuid

import numpy as np
import pytest

from stores import StoreMismatchError, create_memorybank, open_memorybank
from stores.keys import InvalidKeyError
from tests.store_fixtures import filled, make_keys, rows_for, tiny_prov, tiny_schema


class StoreTests:
    """Round trip, incomplete rows, hostile keys, split replacement, schema / teacher mismatch, write checks."""

    @pytest.fixture
    def store_path(self, tmp_path) -> str:
        raise NotImplementedError("a back end's subclass gives the path (or URL) of a new store")

    @pytest.mark.parametrize("bev", [False, True])
    def test_roundtrip_batch_order_missing_and_duplicates(self, store_path, bev):
        schema, keys, data = filled(store_path, bev=bev)
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

    def test_incomplete_rows_invisible_and_ranges(self, store_path):
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

    def test_hostile_keys_refused_on_write_and_lookup(self, store_path):
        filled(store_path)
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

    def test_split_refused_then_replaced_and_new_split_appended(self, store_path):
        schema, keys, data = filled(store_path)
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

    def test_schema_and_teacher_mismatch_refused_with_what_differs(self, store_path):
        filled(store_path)
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

    def test_write_validation_messages(self, store_path):
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


class TestZarr(StoreTests):
    @pytest.fixture
    def store_path(self, tmp_path) -> str:
        return str(tmp_path / "mb.zarr")


class TestHDF5(StoreTests):
    @pytest.fixture
    def store_path(self, tmp_path) -> str:
        return str(tmp_path / "mb.h5")


class TestZarrOnObjectStorage(StoreTests):
    @pytest.fixture
    def store_path(self, s3) -> str:
        return f"s3://bkt/{uuid.uuid4().hex}/mb.zarr"
