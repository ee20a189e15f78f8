"""The memorybank on object storage, against a local S3-compatible server (moto's, started on 127.0.0.1 by a
fixture; nothing leaves the machine): reads equal to the local store's bit for bit fetching only the asked
rows' chunks, remote writes of whole shards (byte-identical to a local store, partial rewrites refused),
damaged objects refused naming key and shard, the local cache (no network on a second read, a damaged entry
fetched again, LRU cap), DataLoader workers forked after the parent used the store, the CLI."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from e2r.data.sampler import EpochBatchSampler
from stores import StoreCorruptError, StoreError, create_memorybank, open_dataset, open_memorybank
from stores.__main__ import main as stores_main
from stores.remote.cache import ShardCache
from stores.torch_data import MemoryBankDataset, make_loader
from stores.remote.local_s3 import free_port
from tests.store_fixtures import S, local_store, s3_fs, upload_store, make_keys, rows_for, tiny_prov, tiny_schema

NIDX = 16 * S + 4          # bytes of a shard index (+ its crc32c)



def _chunk_span(obj: bytes, k: int) -> tuple[int, int]:
    """(offset, nbytes) of inner chunk ``k`` in the shard object ``obj`` (its index, at the end)."""
    index = np.frombuffer(obj[-NIDX:-4], "<u8").reshape(S, 2)
    return int(index[k, 0]), int(index[k, 1])


def test_uploaded_store_reads_bit_for_bit_fetching_only_the_asked_chunks(s3, tmp_path):
    local, keys, data = local_store(tmp_path)
    url = upload_store(local, "read.zarr")
    bank = open_memorybank(url)
    lb = open_memorybank(local)
    assert (bank.schema, len(bank), bank.splits, bank.keys("train")) == (lb.schema, 40, lb.splits, keys)
    ask = [keys[5], keys[33], keys[5], "train/seg_999:1", keys[17], keys[0]]
    before = dict(bank.files.counts)
    got, missing = bank.get_batch(ask)
    want, _ = lb.get_batch(ask)
    assert missing == ["train/seg_999:1"]
    for f in want:
        assert got[f].tobytes() == want[f].tobytes()
    # bytes fetched = the 3 touched shards' indexes + the 4 distinct rows' inner chunks + the 3 shards' identity
    # tag chunks (8 bytes a row + a crc32c), nothing else
    chunks = sum(_chunk_span(s3_fs().cat(f"bkt/read.zarr/light/c/{r // S}/0/0"), r % S)[1] for r in (0, 5, 17, 33))
    assert bank.files.counts["bytes_in"] - before["bytes_in"] == 3 * NIDX + chunks + 3 * (8 * S + 4)
    assert bank.files.counts["get"] - before["get"] == 3              # whole objects: only the 3 tag chunks
    before = dict(bank.files.counts)
    out = {f: np.zeros((2, *bank.schema.row_shape(f)), np.float32) for f in ("gru_out",)}
    assert bank.get_batch_into([keys[6], keys[7]], out).all()         # adjacent chunks: one merged request
    assert bank.files.counts["range"] - before["range"] == 1          # and the shard index is not fetched again
    np.testing.assert_array_equal(out["gru_out"], data["gru_out"][6:8])
    view = open_dataset(url, cache_dir=str(tmp_path / "cache"))      # the xarray view, dask threads reading
    assert list(view["key"].values) == keys and view["gru_out"].values.tobytes() == data["gru_out"].tobytes()


def test_remote_writer_puts_whole_shards_byte_identical_to_a_local_store(s3, tmp_path):
    schema, keys = tiny_schema(bev=True), make_keys("train", 40)
    data = rows_for(schema, keys)
    local = create_memorybank(str(tmp_path / "w.zarr"), schema, tiny_prov(), shard_rows=S)
    remote = create_memorybank("s3://bkt/w.zarr", schema, tiny_prov(), shard_rows=S)
    watcher = open_memorybank("s3://bkt/w.zarr")
    for bank in (local, remote):
        bank.reserve_split("train", keys)
        for lo in range(0, 40, 8):
            bank.write_rows("train", lo, {f: v[lo:lo + 8] for f, v in data.items()}, keys=keys[lo:lo + 8])
            if bank is remote and lo == 0:
                watcher.refresh()
                assert watcher.complete_count() == 0          # half a shard given: nothing stored, nothing flagged
    remote.close()
    fs, root = s3_fs(), tmp_path / "w.zarr"
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert sorted(n[len("bkt/w.zarr/"):] for n in fs.find("bkt/w.zarr")) == files
    for rel in files:
        obj, disk = fs.cat(f"bkt/w.zarr/{rel}"), (root / rel).read_bytes()
        if rel.endswith("zarr.json"):
            a, b = json.loads(obj), json.loads(disk)
            for m in (a, b):
                for t in ("created", "updated"):
                    m.get("attributes", {}).pop(t, None)
                m.get("attributes", {}).get("identity", {}).pop("store_uid", None)    # random, per store
                for v in m.get("attributes", {}).get("splits", {}).values():
                    v.pop("uid", None)                                             # random, per reservation
            assert a == b, rel
        elif not rel.startswith("complete/tags/"):    # tags are salted with each store's uids: compared below
            assert obj == disk, rel
    tagged = [open_memorybank(p).inspect().expected_crcs for p in (str(root), "s3://bkt/w.zarr")]
    for array in ("light", "bev_feat/bev_feat"):     # both tag the same chunk bytes (crc32c) at every row
        assert np.array_equal(tagged[0](array, np.arange(40))[0], tagged[1](array, np.arange(40))[0])
    back = open_memorybank("s3://bkt/w.zarr")
    got, _ = back.get_batch(keys[::-1])
    for f in data:
        assert got[f].tobytes() == data[f][::-1].tobytes()

    again = open_memorybank("s3://bkt/w.zarr", mode="r+")
    with pytest.raises(StoreError, match="cannot rewrite part of a shard"):
        again.write_rows("train", 4, {f: v[4:8] for f, v in data.items()})
    again.reserve_split("val", make_keys("val", 20))
    again.write_rows("val", 0, {f: v[:8] for f, v in rows_for(schema, make_keys("val", 20)).items()})
    with pytest.raises(StoreError, match="NOT stored"):
        again.close()
    assert open_memorybank("s3://bkt/w.zarr").complete_count("val") == 0


def test_damaged_remote_shard_is_refused_naming_key_and_shard(s3, tmp_path):
    local, keys, data = local_store(tmp_path)
    url = upload_store(local, "bad.zarr")
    fs = s3_fs()
    obj = bytearray(fs.cat("bkt/bad.zarr/light/c/1/0/0"))
    off, nb = _chunk_span(bytes(obj), 3)
    obj[off + nb // 2] ^= 0x40
    fs.pipe("bkt/bad.zarr/light/c/1/0/0", bytes(obj))
    idx = bytearray(fs.cat("bkt/bad.zarr/light/c/2/0/0"))
    idx[-20] ^= 0x01                                    # a byte of shard 2's index
    fs.pipe("bkt/bad.zarr/light/c/2/0/0", bytes(idx))
    bank = open_memorybank(url, cache_dir=str(tmp_path / "cache"))
    for _ in range(2):                                  # never served, not from the cache either
        with pytest.raises(StoreCorruptError) as e:
            bank.get_batch([keys[18], keys[19]])
        assert e.value.keys == [keys[19]] and "light/c/1/0/0 inner chunk 3" in str(e.value) and url in str(e.value)
    got, _ = bank.get_batch([keys[18], keys[20]])       # the intact rows of that shard still read
    np.testing.assert_array_equal(got["actions"], data["actions"][[18, 20]])
    with pytest.raises(StoreCorruptError, match="light/c/2/0/0.*index checksum"):
        bank.get_batch([keys[35]])
    assert stores_main(["verify", url]) == 1


def test_cache_serves_the_second_read_without_network_and_refetches_a_damaged_entry(s3, tmp_path):
    local, keys, data = local_store(tmp_path)
    url = upload_store(local, "cached.zarr")
    cache = str(tmp_path / "cache")
    first = open_memorybank(url, cache_dir=cache)
    first.get_batch(keys)
    assert first.files.counts["range"] > 0 and first.cache.hits == 0
    second = open_memorybank(url, cache_dir=cache)
    before = dict(second.files.counts)
    got, _ = second.get_batch(keys[::-1])
    assert second.files.counts == before and second.cache.hits == 40       # not one request
    for f in data:
        assert got[f].tobytes() == data[f][::-1].tobytes()

    entry = second._listing["light/c/0/0/0"]
    path = os.path.join(cache, ShardCache.name_of(f"{url}/light/c/0/0/0", entry.size, entry.tag))
    raw = bytearray(open(path, "rb").read())
    off, nb = _chunk_span(bytes(raw), 2)
    with open(path, "r+b") as fh:                      # damage row 2's cached chunk
        fh.seek(off + 1)
        fh.write(bytes([raw[off + 1] ^ 0xFF]))
    third = open_memorybank(url, cache_dir=cache)
    before = dict(third.files.counts)
    got, _ = third.get_batch([keys[2], keys[3]])
    np.testing.assert_array_equal(got["gru_out"], data["gru_out"][2:4])
    assert third.files.counts["range"] - before["range"] == 1 and third.files.counts["bytes_in"] - before["bytes_in"] == nb
    assert open(path, "rb").read() == bytes(raw)       # repaired in place
    with open(path, "r+b") as fh:                      # damage the cached shard index: fetched again, then used
        fh.seek(len(raw) - 10)
        fh.write(b"\xff\xff\xff")
    fourth = open_memorybank(url, cache_dir=cache)
    before = dict(fourth.files.counts)
    got, _ = fourth.get_batch([keys[4]])
    np.testing.assert_array_equal(got["bev_vec"], data["bev_vec"][4:5])
    assert fourth.files.counts["bytes_in"] - before["bytes_in"] == NIDX


def test_shard_cache_keeps_under_its_cap_evicting_the_least_recently_used(tmp_path):
    cache = ShardCache(tmp_path / "c", max_bytes=3 * 2**16)
    shards = [cache.shard(f"s3://b/x/{i}", 2**16, "etag") for i in range(5)]
    for i, sh in enumerate(shards):
        cache.write(sh, 0, os.urandom(2**16))
        os.utime(sh.path, (1000 + i, 1000 + i))        # shard i used at time 1000 + i
    gone = cache.evict()
    assert [os.path.basename(p) for p in gone] == [os.path.basename(s.path) for s in shards[:3]]
    assert cache.usage() <= 0.9 * cache.max_bytes and os.path.exists(shards[4].path)
    assert "s3://b/x/0" not in cache._open and "s3://b/x/4" in cache._open      # handles of deleted files dropped


def test_dataloader_workers_forked_after_the_parent_read_the_remote_store(s3, tmp_path):
    local, keys, data = local_store(tmp_path)
    url = upload_store(local, "loader.zarr")
    ds = MemoryBankDataset(url, keys=keys + ["train/absent:1"], fields=("actions", "gru_out"),
                           cache_dir=str(tmp_path / "cache"))
    ds.reader.read(keys[:4])              # the parent's filesystem (and s3fs's event-loop thread) exist before fork
    loader = make_loader(ds, EpochBatchSampler(len(ds), batch_size=8, shuffle=True, seed=0), num_workers=2,
                         multiprocessing_context="fork", timeout=60)
    for epoch in range(2):
        loader.batch_sampler.set_epoch(epoch) if hasattr(loader.batch_sampler, "set_epoch") else None
        seen = 0
        for batch in loader:
            for i, k in enumerate(batch["keys"]):
                if k == "train/absent:1":
                    assert not batch["found"][i]
                    continue
                np.testing.assert_array_equal(batch["gru_out"][i].numpy(), data["gru_out"][keys.index(k)])
                seen += 1
        assert seen == 40


def test_cli_info_ls_verify_with_storage_options(s3, tmp_path, capsys, monkeypatch):
    local, keys, _ = local_store(tmp_path)
    url = upload_store(local, "cli.zarr")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    opts = ["--storage_options", json.dumps({"endpoint_url": s3})]
    assert stores_main(["info", url, *opts]) == 0
    out = capsys.readouterr().out
    assert "complete=40" in out and "light" in out and "keys/index" in out
    assert stores_main(["ls", url, "--limit", "3", *opts, "--cache_dir", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().out.split() == keys[:3]
    assert stores_main(["verify", url, *opts]) == 0
    assert "40 complete rows" in capsys.readouterr().out
    assert stores_main(["info", url, "--storage_options", "not json"]) == 1
    assert "must be a JSON object" in capsys.readouterr().err
    assert stores_main(["info", "s3://bkt/none.zarr", *opts]) == 1
    assert "no Zarr memorybank" in capsys.readouterr().err
    dead = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "config_kwargs": {"retries": {"max_attempts": 1}}}
    assert stores_main(["info", url, "--storage_options", json.dumps(dead)]) == 1
    assert "Check that the object store is reachable" in capsys.readouterr().err
    assert stores_main(["info", url, "--storage_options", json.dumps({"endpoint_url": s3, "no_such": 1})]) == 1
    assert "does not take the storage options ['endpoint_url', 'no_such']" in capsys.readouterr().err
