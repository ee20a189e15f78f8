"""The key index of a memorybank on object storage opened without a cache_dir (moto's S3 server on 127.0.0.1):
mapped from an unlinked temporary file (page cache, not the process's private memory) and read as the local
store reads; in memory when the temporary directory is not writable; a damaged block refused at the first
lookup landing in it; a pickled handle carries neither the index nor its map and fetches the index again."""
from __future__ import annotations

import mmap
import pickle
import tempfile

import pytest

from stores import StoreCorruptError, open_memorybank
from stores.index import SplitIndex
from stores.index_file import HEADER_BYTES
from tests.store_fixtures import local_store, s3_fs, upload_store



def _split_index(bank) -> SplitIndex:
    return bank._index.splits["train"]


def _backing(idx: SplitIndex) -> object:
    """What the index's sorted keys are a view of: an mmap (a file's pages) or bytes (private memory)."""
    base = idx.mapped().keys.base
    return getattr(base, "obj", base)                                  # np.frombuffer(mmap): a memoryview


def _same_rows(a, b, keys: list[str]) -> None:
    got, missing = a.get_batch(keys)
    want, _ = b.get_batch(keys)
    assert missing == []
    for f in want:
        assert got[f].tobytes() == want[f].tobytes(), f


def test_index_without_cache_dir_is_a_file_mapping_and_reads_as_the_local_store(s3, tmp_path, monkeypatch):
    local, keys, _ = local_store(tmp_path)
    url = upload_store(local, "idx_map.zarr")
    bank, lb = open_memorybank(url), open_memorybank(local)
    idx = _split_index(bank)
    assert idx.fetched and idx.on_disk
    assert isinstance(_backing(idx), mmap.mmap)          # page cache of a temp file, not bytes
    _same_rows(bank, lb, [keys[3], keys[39], keys[0], keys[3]])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no_such_dir"))   # temp dir unusable: in memory
    held = open_memorybank(url)
    assert isinstance(_backing(_split_index(held)), bytes)
    _same_rows(held, lb, [keys[7], keys[21]])


def test_damaged_block_of_a_fetched_index_is_refused_at_its_first_lookup(s3, tmp_path):
    local, keys, _ = local_store(tmp_path)
    url = upload_store(local, "idx_bad.zarr")
    obj = "bkt/idx_bad.zarr/keys/index/train.idx"
    raw = bytearray(s3_fs().cat(obj))
    raw[HEADER_BYTES + 5] ^= 0x01                                      # a key byte of block 0 (all 40 keys)
    s3_fs().pipe(obj, bytes(raw))
    bank = open_memorybank(url)                                        # header and block table are intact
    with pytest.raises(StoreCorruptError, match=r"keys/index/train\.idx.*block 0 .*crc32c.*reindex"):
        bank.get_batch([keys[0]])


def test_pickled_handle_fetches_the_index_again_instead_of_carrying_it(s3, tmp_path):
    local, keys, _ = local_store(tmp_path)
    url = upload_store(local, "idx_pickle.zarr")
    bank, lb = open_memorybank(url), open_memorybank(local)
    _same_rows(bank, lb, [keys[1], keys[30]])
    blob = pickle.dumps(bank)
    assert b"E2RKIDX1" not in blob                                     # the index's bytes did not travel
    other = pickle.loads(blob)
    assert _split_index(other)._m is None
    gets = other.files.counts["get"]
    _same_rows(other, lb, [keys[30], keys[2], keys[17]])
    assert other.files.counts["get"] == gets + 1 + 2      # the index object, fetched once (+ the tag chunks of
    #                                                          the 2 shards read, whole objects too)
    assert isinstance(_backing(_split_index(other)), mmap.mmap)
    _same_rows(pickle.loads(blob), bank, keys[:5])
