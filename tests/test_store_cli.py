"""`python -m stores` commands, conversion between back ends / from an npz cache, and corruption detection."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stores.keys import InvalidKeyError
from stores import create_memorybank, open_memorybank
from stores.__main__ import main
from stores.convert import filename_to_key, key_to_filename
from tests.store_fixtures import make_keys, rows_for, tiny_prov, tiny_schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _store(path, n=20, bev=True):
    schema = tiny_schema(bev=bev)
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=8)
    keys = make_keys("train", n)
    bank.reserve_split("train", keys)
    data = rows_for(schema, keys)
    bank.write_rows("train", 0, {f: a[: n - 3] for f, a in data.items()})   # last 3 stay incomplete
    vkeys = make_keys("valid", 4)
    bank.reserve_split("valid", vkeys)
    bank.write_rows("valid", 0, rows_for(schema, vkeys))
    return keys, data


def test_info_ls_show_stats_rm_split(tmp_path, capsys):
    path = str(tmp_path / "mb.zarr")
    keys, data = _store(path)
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "bev_feat/bev_feat" in out and "BloscCodec" in out and "reserved=20  complete=17" in out
    assert "teacher_sha256=" + "ab" * 32 in out
    assert main(["ls", path, "--split", "train", "--limit", "5"]) == 0
    assert capsys.readouterr().out.split() == keys[:5]
    assert main(["show", path, keys[2], "--values"]) == 0
    out = capsys.readouterr().out
    assert f"max={data['gru_out'][2].max():.5g}" in out and "shape=(3, 12)" in out
    assert main(["show", path, "train/absent:0"]) == 1
    js = str(tmp_path / "s.json")
    assert main(["stats", path, "--field", "bev_vec", "--json", js]) == 0
    st = json.load(open(js))["bev_vec"]
    allrows = np.concatenate([data["bev_vec"][:17], rows_for(tiny_schema(bev=True), make_keys("valid", 4))["bev_vec"]])
    np.testing.assert_allclose(st["mean"], allrows.mean((0, 1)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st["max"], allrows.max((0, 1)), rtol=1e-6)
    assert main(["stats", path, "--field", "bev_feat"]) == 0 and "4 channels" in capsys.readouterr().out
    assert main(["rm-split", path, "valid"]) == 0
    assert "valid" not in open_memorybank(path).splits
    assert main(["rm-split", path, "valid"]) == 1


def test_verify_detects_corrupted_chunk_and_bad_values(tmp_path, capsys):
    path = str(tmp_path / "mb.zarr")
    _store(path, bev=False)
    assert main(["verify", path]) == 0
    assert "3 reserved rows not yet written, 0 problem(s)" in capsys.readouterr().out
    shard = Path(path) / "light" / "c" / "1" / "0" / "0"          # packed light fields, rows 8..15
    good = shard.read_bytes()
    raw = bytearray(good)
    for i in range(0, len(raw) - 200, 7):                         # scribble over the inner chunks
        raw[i] ^= 0x5A
    shard.write_bytes(bytes(raw))
    r = subprocess.run([sys.executable, "-m", "stores", "verify", path], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "gru_out" in r.stdout and "PROBLEM" in r.stdout and "row 8 does not decode" in r.stdout
    raw = bytearray(good)
    raw[-20] ^= 0x01                                              # one bit of the shard index
    shard.write_bytes(bytes(raw))
    r = subprocess.run([sys.executable, "-m", "stores", "verify", path], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "checksum" in r.stdout, r.stdout + r.stderr


def test_verify_flags_orphan_and_nonfinite_rows(tmp_path, capsys):
    import zarr
    path = str(tmp_path / "mb.zarr")
    _store(path, bev=False)
    g = zarr.open_group(path, mode="r+")
    g["light"][3, :, 2:10] = np.full((3, 8), np.inf, dtype="float32")  # bev_vec of row 3 tampered after the fact
    g["complete"][22] = 1                                              # a row no split owns
    assert main(["verify", path]) == 1
    out = capsys.readouterr().out
    assert "field 'bev_vec' row 3" in out and "non-finite" in out and "actions' row 3" not in out and "row 22: complete but belongs to no split" in out


def test_convert_zarr_hdf5_roundtrip_and_float16(tmp_path):
    z = str(tmp_path / "a.zarr")
    keys, data = _store(z)
    h = str(tmp_path / "b.h5")
    z2 = str(tmp_path / "c.zarr")
    assert main(["convert", z, h]) == 0
    assert main(["convert", h, z2, "--dtype", "float16"]) == 0
    bh, b2 = open_memorybank(h), open_memorybank(z2)
    assert bh.backend == "hdf5" and bh.keys("train") == keys[:17]
    assert bh.split_keys("train") == keys and bh.incomplete_ranges("train") == [(17, 20)]
    out, _ = bh.get_batch(keys[:17])
    for f in data:
        np.testing.assert_array_equal(out[f], data[f][:17])
    out2, _ = b2.get_batch(keys[:17])
    assert out2["bev_vec"].dtype == np.float16 and b2.schema.dtype == "float16"
    np.testing.assert_allclose(out2["bev_vec"], data["bev_vec"][:17], atol=2e-3, rtol=2e-3)
    assert b2.provenance.teacher_sha256 == "ab" * 32
    assert main(["info", h]) == 0 and main(["verify", h]) == 0


def test_npz_filename_mapping_and_import(tmp_path):
    for k in ["train/segment_0001:123", "my.split/seg__x-1:0"]:
        assert filename_to_key(key_to_filename(k)) == k
    with pytest.raises(InvalidKeyError, match="evil"):
        filename_to_key("..__evil@1.npz")
    src = tmp_path / "cache"
    src.mkdir()
    schema = tiny_schema(bev=False)
    keys = make_keys("train", 12) + make_keys("valid", 3)
    data = rows_for(schema, keys)
    for i, k in enumerate(keys):
        extra = {"key": np.array(k)} if i % 2 else {}       # some files carry the key inside, some only in the name
        np.savez_compressed(src / key_to_filename(k), **{f: data[f][i] for f in data}, **extra)
    dst = str(tmp_path / "imported.zarr")
    assert main(["convert", str(src), dst, "--teacher-sha256", "cd" * 32]) == 0
    bank = open_memorybank(dst)
    assert sorted(bank.keys()) == sorted(keys) and set(bank.splits) == {"train", "valid"}
    out, missing = bank.get_batch(keys)
    assert not missing
    for f in data:
        np.testing.assert_array_equal(out[f], data[f])
    assert bank.provenance.teacher_sha256 == "cd" * 32
    (src / "train__bad@007.npz").write_bytes(b"x")
    assert main(["convert", str(src), str(tmp_path / "x.zarr")]) == 1


def test_console_help():
    r = subprocess.run([sys.executable, "-m", "stores", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "verify" in r.stdout and "rm-split" in r.stdout
