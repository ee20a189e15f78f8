"""Another Zarr v3 implementation (tensorstore's ``zarr3`` driver) opens every array of a store and reads what
our reader serves, bit for bit; stores whose keys use zarr-python's ``string`` extension type (schema_version
3/4) are still read right, and ``python -m stores convert`` makes them portable."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
import zarr
import zarr.codecs as zc

from stores import StoreCorruptError, create_memorybank, open_memorybank
from tests.store_fixtures import as_vlen_keys, make_keys, rows_for, tiny_prov, tiny_schema

ROOT = Path(__file__).resolve().parents[1]


def _arrays(path: str) -> list[str]:
    """Every Zarr array under the store (a ``zarr.json`` whose node_type is array)."""
    out = []
    for meta in Path(path).rglob("zarr.json"):
        if json.loads(meta.read_text()).get("node_type") == "array":
            out.append(str(meta.parent.relative_to(path)))
    return sorted(out)


def _ts_read(path: str, name: str) -> np.ndarray:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{path}/{name}/"}}
    return ts.open(spec, open=True, read=True).result().read().result()


def _store(path: str, dtype: str) -> tuple[dict[str, list[str]], dict[str, dict[str, np.ndarray]]]:
    """Two splits: train whole, valid half written (its other rows reserved only), bev_feat stored."""
    schema = tiny_schema(bev=True, dtype=dtype)
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=8)
    keys = {"train": make_keys("train", 21), "valid": make_keys("valid", 13)}
    data = {s: rows_for(schema, k) for s, k in keys.items()}
    bank.reserve_split("train", keys["train"])
    bank.write_rows("train", 0, data["train"])
    bank.reserve_split("valid", keys["valid"])
    bank.write_rows("valid", 0, {f: a[:8] for f, a in data["valid"].items()})
    return keys, data


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tensorstore_opens_every_array_and_reads_what_our_reader_serves(tmp_path, dtype):
    path = str(tmp_path / "mb.zarr")
    keys, data = _store(path, dtype)
    bank = open_memorybank(path)
    assert _arrays(path) == ["bev_feat/bev_feat", "complete", "keys", "light"]
    got = {name: _ts_read(path, name) for name in _arrays(path)}
    n = bank.n_rows
    assert {k: v.shape[0] for k, v in got.items()} == dict.fromkeys(got, n)

    key_rows = got["keys"]
    assert key_rows.dtype == np.uint8 and key_rows.shape == (n, 276)
    as_text = [bytes(r).rstrip(b"\0").decode("ascii") for r in key_rows]
    v = bank.inspect()
    assert as_text == list(v.read_keys(0, n))
    for split, (start, count) in bank.splits.items():
        assert as_text[start:start + count] == keys[split] == bank.split_keys(split)
    np.testing.assert_array_equal(got["complete"], v.read_flags(0, n))

    rows = bank.complete_rows()
    assert len(rows) == 21 + 8
    ours, missing = bank.get_batch([as_text[r] for r in rows], fields=["actions", "bev_vec", "gru_out", "bev_feat"])
    assert not missing
    light = np.concatenate([ours["actions"], ours["bev_vec"], ours["gru_out"]], axis=-1)
    np.testing.assert_array_equal(got["light"][rows].view(np.uint8), light.view(np.uint8))       # bit for bit
    np.testing.assert_array_equal(got["bev_feat/bev_feat"][rows].view(np.uint8), ours["bev_feat"].view(np.uint8))
    np.testing.assert_array_equal(ours["gru_out"][:21], data["train"]["gru_out"])
    unwritten = np.setdiff1d(np.arange(n), rows)
    assert np.isnan(got["light"][unwritten]).all() and np.isnan(got["bev_feat/bev_feat"][unwritten]).all()


def test_store_of_vlen_keys_is_read_right_and_convert_makes_it_portable(tmp_path):
    old = str(tmp_path / "old.zarr")
    keys, data = _store(old, "float32")
    as_vlen_keys(old, version=4)                        # what schema_version 4 wrote
    with pytest.raises(ValueError, match="string data type is not one of the supported"):
        _ts_read(old, "keys")
    bank = open_memorybank(old)
    assert bank.attrs["schema_version"] == 4 and bank.keys("train") == keys["train"]
    out, _ = bank.get_batch(keys["valid"][:8])
    np.testing.assert_array_equal(out["bev_vec"], data["valid"]["bev_vec"][:8])
    info = subprocess.run([sys.executable, "-m", "stores", "info", old], cwd=ROOT, capture_output=True, text=True)
    assert "other Zarr implementations cannot open" in info.stdout and "stores convert" in info.stdout

    new = str(tmp_path / "new.zarr")
    r = subprocess.run([sys.executable, "-m", "stores", "convert", old, new], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    conv = open_memorybank(new)
    assert conv.attrs["schema_version"] == 5
    for split in ("train", "valid"):
        assert conv.split_keys(split) == keys[split] and conv.keys(split) == bank.keys(split)
    start, count = conv.splits["valid"]
    assert [bytes(r).rstrip(b"\0").decode() for r in _ts_read(new, "keys")[start:start + count]] == keys["valid"]
    out2, _ = conv.get_batch(keys["valid"][:8])
    np.testing.assert_array_equal(out2["bev_vec"], out["bev_vec"])


@pytest.mark.parametrize("version,encoding", [(5, "vlen"), (4, "bytes")])
def test_keys_encoding_that_contradicts_the_schema_version_is_refused(tmp_path, version, encoding):
    """Never read wrong: the keys' encoding must be the one the store's schema_version says."""
    path = str(tmp_path / "mb.zarr")
    _store(path, "float32")
    if encoding == "vlen":
        as_vlen_keys(path, version=4)
    meta = json.loads((Path(path) / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = version
    (Path(path) / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreCorruptError, match=r"array 'keys' has shape .* keeps keys as"):
        open_memorybank(path)


def test_key_chunks_written_by_the_store_are_the_bytes_zarr_python_writes(tmp_path):
    """reserve_split encodes the key chunks itself (bounded memory): every chunk file equals zarr-python's."""
    path = str(tmp_path / "mb.zarr")
    bank = create_memorybank(path, tiny_schema(), tiny_prov(), shard_rows=8)
    keys = {"train": make_keys("train", 21), "valid": make_keys("valid", 13)}
    for split in keys:                                     # the second split rewrites the chunk the first began
        bank.reserve_split(split, keys[split])
    n = bank.n_rows
    ref = zarr.open_group(str(tmp_path / "ref.zarr"), mode="w", zarr_format=3)
    meta = json.loads((Path(path) / "keys" / "zarr.json").read_text())
    arr = ref.create_array("keys", shape=(n, 276), chunks=tuple(meta["chunk_grid"]["configuration"]["chunk_shape"]),
                           dtype="uint8", fill_value=0, compressors=[zc.ZstdCodec(level=3), zc.Crc32cCodec()])
    arr[:] = zarr.open_array(str(Path(path) / "keys"), mode="r")[:]
    mine, ref_dir = Path(path) / "keys", tmp_path / "ref.zarr" / "keys"
    ours = sorted(p.relative_to(mine) for p in (mine / "c").rglob("*") if p.is_file())
    theirs = sorted(p.relative_to(ref_dir) for p in (ref_dir / "c").rglob("*") if p.is_file())
    assert ours == theirs == [Path("c/0/0")]
    assert (mine / "c" / "0" / "0").read_bytes() == (ref_dir / "c" / "0" / "0").read_bytes()
    bank.remove_split("train")
    assert bank.split_keys("valid") == keys["valid"]
    assert open_memorybank(path).inspect().read_keys(0, 21).tolist() == [""] * 21
