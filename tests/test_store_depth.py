"""The ``depth`` chunk group of a memorybank (LiDAR depth-bin targets, one byte per feature pixel): written and read
by key like every field on every back end (local Zarr, Zarr on object storage, HDF5), uint8 on disk and in the
row reader, checksummed (a damaged depth chunk is refused naming its key, listed by verify, redone by a resume),
bytes that are no bin refused at the write, carried by convert and the xarray view; stores without it open as
before."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stores import DEPTH_NONE, StoreCorruptError, StoreSchema, create_memorybank, open_dataset, open_memorybank
from stores.convert import convert
from stores.schema import DEPTH_FILL
from stores.torch_data import TeacherRowReader
from tests.store_fixtures import make_keys, tiny_prov, upload_store

ROOT = Path(__file__).resolve().parents[1]
GRID = {"image_size": [32, 16], "depth_bins": [2.0, 50.0, 2.0], "n_bins": 24}


def depth_schema(bev: bool = False) -> StoreSchema:
    return StoreSchema(seq_len=3, action_dim=2, bev_dim=8, gru_hidden=12, bev_feat_shape=(4, 6, 5) if bev else None,
                       store_bev_feat=bev, store_depth=True, depth_shape=(2, 4, 8), depth_grid=dict(GRID))


def depth_rows(schema: StoreSchema, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of every field; depth: random bins with a third of the pixels DEPTH_NONE, row 0 all DEPTH_NONE."""
    rng = np.random.default_rng(seed)
    out = {f: rng.standard_normal((n, *schema.row_shape(f))).astype(np.float32) for f in schema.fields if f != "depth"}
    depth = rng.integers(0, GRID["n_bins"], (n, *schema.row_shape("depth"))).astype(np.uint8)
    depth[rng.random(depth.shape) < 0.33] = DEPTH_NONE
    depth[0] = DEPTH_NONE                              # a window no point lands in: stored, not a missing chunk
    out["depth"] = depth
    return out


def _filled(path: str, n: int = 20, shard_rows: int = 8, bev: bool = False) -> tuple[list[str], dict[str, np.ndarray]]:
    schema = depth_schema(bev)
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=shard_rows)
    keys = make_keys("train", n)
    bank.reserve_split("train", keys)
    data = depth_rows(schema, n)
    bank.write_rows("train", 0, data, keys=keys)
    bank.close()
    return keys, data


def _verify(path: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "stores", "verify", path], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert "Traceback" not in r.stderr, r.stderr
    return r


@pytest.mark.parametrize("name", ["mb.zarr", "mb.h5"])
def test_depth_round_trips_by_key_as_uint8(tmp_path, name):
    path = str(tmp_path / name)
    keys, data = _filled(path, bev=name.endswith(".zarr"))
    bank = open_memorybank(path)
    assert bank.schema.store_depth and bank.schema.fields[-1] == "depth"
    assert bank.attrs["field_dtypes"]["depth"] == "uint8" and bank.attrs["depth_grid"] == GRID
    order = [keys[i] for i in (7, 0, 19, 8, 7)]
    out, missing = bank.get_batch(order + ["train/seg_009:9"], fields=("depth", "actions"))
    assert missing == ["train/seg_009:9"] and out["depth"].dtype == np.uint8
    np.testing.assert_array_equal(out["depth"], data["depth"][[7, 0, 19, 8, 7]])
    np.testing.assert_array_equal(out["actions"], data["actions"][[7, 0, 19, 8, 7]])
    batch = TeacherRowReader(path).read(order + ["train/seg_009:9"])     # one buffer, float fields 4-byte aligned
    assert batch["depth"].dtype.itemsize == 1 and batch["found"].tolist() == [True] * 5 + [False]
    np.testing.assert_array_equal(batch["depth"][:5].numpy(), data["depth"][[7, 0, 19, 8, 7]])
    assert (batch["depth"][5] == 0).all()
    np.testing.assert_array_equal(batch["gru_out"][:5].numpy(), data["gru_out"][[7, 0, 19, 8, 7]])
    sent = pickle.loads(pickle.dumps(batch))          # what a DataLoader worker hands over (one buffer)
    assert sent["depth"].dtype == batch["depth"].dtype and all(bool((sent[f] == batch[f]).all()) for f in
                                                              ("depth", "actions", "found"))
    if name.endswith(".zarr"):
        meta = json.loads((Path(path) / "depth" / "depth" / "zarr.json").read_text())
        assert meta["data_type"] == "uint8" and meta["fill_value"] == DEPTH_FILL
        assert any(c["name"] == "crc32c" for c in meta["codecs"][0]["configuration"]["codecs"])
        ds = open_dataset(path)
        assert ds["depth"].dims == ("key", "t", "cam", "v", "u") and ds["depth"].dtype == np.uint8
        np.testing.assert_array_equal(ds["depth"].values, data["depth"])
    assert _verify(path).returncode == 0


def test_depth_on_object_storage(tmp_path, s3):
    local = str(tmp_path / "local.zarr")
    keys, data = _filled(local, n=20, shard_rows=16)
    url = upload_store(local, "depth.zarr")
    out, _ = open_memorybank(url).get_batch(keys[::-1], fields=("depth",))
    np.testing.assert_array_equal(out["depth"], data["depth"][::-1])
    schema = depth_schema()                              # written there by the remote writer
    bank = create_memorybank("s3://bkt/written.zarr", schema, tiny_prov(), shard_rows=16)
    bank.reserve_split("train", keys)
    bank.write_rows("train", 0, data)
    out, _ = open_memorybank("s3://bkt/written.zarr").get_batch(keys, fields=("depth",))
    np.testing.assert_array_equal(out["depth"], data["depth"])


def test_a_damaged_depth_chunk_is_refused_naming_its_key_listed_by_verify_and_redone(tmp_path):
    path = str(tmp_path / "mb.zarr")
    keys, data = _filled(path)
    shard = Path(path) / "depth" / "depth" / "c" / "1" / "0" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[5] ^= 0x40                                     # inside the first inner chunk of shard 1: row 8
    shard.write_bytes(bytes(raw))
    bank = open_memorybank(path)
    out, _ = bank.get_batch(keys[8:10], fields=("actions",))          # the light row is intact
    with pytest.raises(StoreCorruptError, match="crc32c") as e:
        bank.get_batch(keys[8:10], fields=("depth",))
    assert e.value.keys == [keys[8]] and "depth/depth" in str(e.value)
    r = _verify(path)
    assert r.returncode == 1 and "depth/depth" in r.stdout and keys[8] in r.stdout
    writer = open_memorybank(path, "r+")
    assert writer.incomplete_ranges("train") == [(8, 9)]            # a resume redoes the damaged row
    writer.write_rows("train", 8, {f: a[8:9] for f, a in data.items()})
    out, _ = open_memorybank(path).get_batch(keys, fields=("depth",))
    np.testing.assert_array_equal(out["depth"], data["depth"])
    assert _verify(path).returncode == 0


def test_bytes_that_are_no_depth_bin_are_refused_at_the_write(tmp_path):
    schema = depth_schema()
    bank = create_memorybank(str(tmp_path / "mb.zarr"), schema, tiny_prov(), shard_rows=8)
    keys = make_keys("train", 4)
    bank.reserve_split("train", keys)
    data = depth_rows(schema, 4)
    for bad in (GRID["n_bins"], DEPTH_FILL):
        d = dict(data, depth=data["depth"].copy())
        d["depth"][2, 1, 0, 3, 4] = bad
        with pytest.raises(ValueError, match="split position 2 has values that are no depth bin"):
            bank.write_rows("train", 0, d)
    with pytest.raises(ValueError, match="must be uint8"):
        bank.write_rows("train", 0, dict(data, depth=data["depth"].astype(np.float32)))
    with pytest.raises(ValueError, match="store_depth=True needs"):
        StoreSchema(seq_len=3, action_dim=2, bev_dim=8, gru_hidden=12, store_depth=True)
    with pytest.raises(ValueError, match="n_bins"):
        StoreSchema(seq_len=3, action_dim=2, bev_dim=8, gru_hidden=12, store_depth=True, depth_shape=(1, 2, 2),
                    depth_grid=dict(GRID, n_bins=254 + 1))


@pytest.mark.parametrize("dst", ["copy.zarr", "copy.h5"])
def test_convert_carries_the_depth_group(tmp_path, dst):
    src = str(tmp_path / "mb.zarr")
    keys, data = _filled(src)
    convert(src, str(tmp_path / dst))
    out, _ = open_memorybank(str(tmp_path / dst)).get_batch(keys, fields=("depth",))
    np.testing.assert_array_equal(out["depth"], data["depth"])


def test_a_store_without_depth_attributes_opens_as_before(tmp_path):
    """A store written before the depth group existed (no store_depth / depth_* attributes) opens, reads and
    appends as before; asking it for depth names the field."""
    path = str(tmp_path / "old.zarr")
    schema = StoreSchema(seq_len=3, action_dim=2, bev_dim=8, gru_hidden=12)
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=8)
    keys = make_keys("train", 5)
    bank.reserve_split("train", keys)
    rows = {f: np.ones((5, *schema.row_shape(f)), np.float32) for f in schema.fields}
    bank.write_rows("train", 0, rows)
    bank.close()
    meta_path = Path(path) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    for k in ("store_depth", "depth_shape", "depth_grid"):
        meta["attributes"].pop(k)
    meta_path.write_text(json.dumps(meta))
    old = open_memorybank(path, "r+")
    assert not old.schema.store_depth and "depth" not in old.schema.fields
    with pytest.raises(KeyError, match="'depth' is not stored"):
        old.get_batch(keys, fields=("depth",))
    create_memorybank(path, schema, tiny_prov())        # the same schema: opened, not refused
    assert _verify(path).returncode == 0
