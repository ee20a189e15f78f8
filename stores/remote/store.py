"""The Zarr memorybank on object storage: ``s3://bucket/path.zarr`` or any fsspec URL (`RemoteZarrMemoryBank`).

The same store, byte for byte, as a local ``*.zarr`` directory (one can be uploaded as is: ``aws s3 sync
mb.zarr s3://bucket/mb.zarr``), read with the same checks:

* opening reads the root and array ``zarr.json`` objects (validated like a local store's), lists the store
  once (size and ETag of every object: which shards and chunks exist), reads the completion flag chunks and
  each split's key index object (header, block table and, on use, every block's crc32c) — the index is
  mapped from ``cache_dir`` when one is given, else from an unlinked temporary file (page cache, not private
  memory; in memory only when the temporary directory is not writable); a read-only handle refuses a store
  whose rows lost their keys, flags, key index or data shards, as locally;
* rows are read by `stores.remote.reader.RemoteRowReader`: ranged GETs of exactly the requested rows'
  inner chunks, issued concurrently, shard indexes cached per shard, every chunk's crc32c checked before
  decoding; ``cache_dir`` keeps what was fetched (`stores.remote.cache.ShardCache`, size-capped LRU, checked on
  every read) for the next epochs;
* keys and flags are read chunk by chunk without zarr-python (`stores.zarr_v3.flat_chunks`), crc32c first.

Writers (`stores.remote.writes.RemoteWrites`) put whole objects only. Fork safe: the fsspec filesystem (and
s3fs's event-loop thread) is created on first use in each process (`stores.remote.objstore.ObjectFiles`); shard
state and cache handles inherited by a forked worker stay valid; pickling drops every handle.
"""
from __future__ import annotations

import functools
from dataclasses import replace
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from stores.abc.inspection import Inspection
from stores.remote.cache import ShardCache
from stores.errors import StoreCorruptError, StoreError
from stores.zarr_v3.flat_chunks import FlatChunkReader
from stores.fsio import json_object
from stores.index import SplitIndex
from stores.index_file import INDEX_DIR, SUFFIX
from stores.remote.objstore import Entry, ObjectFiles
from stores.remote.reader import RemoteRowReader
from stores.remote.writes import RemoteWrites
from stores.zarr_v3.row_reader import RowChunkReader
from stores.schema import LIGHT_ARRAY, LIGHT_FIELDS
from stores.zarr_v3.checks import field_path
from stores.zarr_v3.store import ZarrMemoryBank

DEFAULT_CACHE_BYTES = 20 * 2**30
INDEX_PREFIX = "/".join(INDEX_DIR) + "/"


class RemoteZarrMemoryBank(RemoteWrites, ZarrMemoryBank):
    """`ZarrMemoryBank` whose files are objects under a URL (see the module docstring). Open it with
    `stores.open_memorybank(url, storage_options=..., cache_dir=...)`."""

    def __init__(self, path: str, mode: str, fsync: bool = True, *, storage_options: dict[str, Any] | None = None,
                 cache_dir: str | os.PathLike | None = None, cache_bytes: int | None = None) -> None:
        super().__init__(str(path).rstrip("/"), mode, fsync)
        self.files = ObjectFiles(self.path, storage_options)
        self.cache = ShardCache(cache_dir, cache_bytes or DEFAULT_CACHE_BYTES) if cache_dir else None
        self._listing: dict[str, Entry] = {}
        self._group_pid = -1
        self._staged: dict[tuple[str, int], dict[str, Any]] = {}
        self._stored: list[tuple[int, int]] = []

    def __getstate__(self) -> dict[str, Any]:
        d = super().__getstate__()
        d["_flat"], d["_staged"], d["_stored"] = {}, {}, []
        return d

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", *, fsync: bool = True, legacy: bool = False,
             lenient: bool = False, storage_options: dict[str, Any] | None = None,
             cache_dir: str | os.PathLike | None = None, cache_bytes: int | None = None) -> "RemoteZarrMemoryBank":
        """Open the store at the URL ``path`` (``mode`` "r" or "r+", ``lenient`` as `MemoryBank.open`)."""
        if legacy:
            raise StoreError(f"{path}: stores of an older schema_version are converted locally: download it, then "
                             "`python -m stores convert OLD NEW`")
        bank = cls(str(path), mode, fsync, storage_options=storage_options, cache_dir=cache_dir,
                   cache_bytes=cache_bytes)
        bank._open_checked(lenient)
        return bank

    @staticmethod
    def exists(path: str) -> bool:
        """True when the root ``zarr.json`` exists at the URL (credentials/endpoint from the environment)."""
        return RemoteZarrMemoryBank.exists_at(path)

    @staticmethod
    def exists_at(path: str, storage_options: dict[str, Any] | None = None) -> bool:
        return ObjectFiles(str(path).rstrip("/"), storage_options).info("zarr.json") is not None

    # ------------------------------------------------------------------ the hooks of ZarrMemoryBank
    def _json(self, rel: str) -> dict[str, Any] | None:
        raw = self.files.get(rel)
        return None if raw is None else json_object(raw, self.files.name(rel), self.path)

    def _n_rows(self) -> int:
        return int(self._metas["keys"]["shape"][0])

    def _chunk_rows(self, name: str) -> int:
        return int(self._metas[name]["chunk_grid"]["configuration"]["chunk_shape"][0])

    def _file_size(self, path: str | os.PathLike, name: str) -> int | None:
        got = self._listing.get(str(path))
        return None if got is None else got.size

    def _chunk_path(self, name: str, c: int) -> str:      # type: ignore[override]
        return f"{field_path(name)}/c/{c}"

    def _flat_reader(self, name: str) -> FlatChunkReader:
        if name not in self._flat:
            self._flat[name] = FlatChunkReader(name, self._metas.get(name) or self._meta(name) or {}, store=self.path,
                                               name=name, read=lambda c: self.files.get(f"{name}/c/{c}"))
        return self._flat[name]

    def _row_reader(self, path: str, meta: dict[str, Any] | None) -> RowChunkReader:
        return RemoteRowReader(self.files, path, self._listing, self.cache, store=self.path, name=path,
                               strict=not self._legacy, keys_of=self._keys_of, meta=meta,
                               fields=LIGHT_FIELDS if path == LIGHT_ARRAY else ())

    def _open_split_index(self, name: str, s: int, c: int, crc: int | None) -> SplitIndex:
        """The split's index object: mapped from the cache when it holds it intact (every block checked),
        else fetched, checked, and put in the cache; without a cache (or when it cannot take it) mapped from
        an unlinked temporary file (`SplitIndex.from_bytes` with ``fetch``: a pickled handle fetches it
        again)."""
        rel = f"{INDEX_PREFIX}{name}{SUFFIX}"
        entry = self._listing.get(rel)
        if entry is None:
            raise FileNotFoundError(f"memorybank {self.path}: the key index of split {name!r} ({rel}) is missing")
        local = self.cache.blob_path(self.files.name(rel), entry.size, entry.tag, SUFFIX) if self.cache else None
        if local is not None and os.path.exists(local):
            try:
                idx = SplitIndex.open(Path(local), self.path, name, s, c, crc)
                idx.check_all()
                return idx
            except (StoreCorruptError, OSError):
                os.unlink(local)                            # a damaged cache copy: fetched again
        raw = self.files.get(rel)
        if raw is None:
            raise FileNotFoundError(f"memorybank {self.path}: the key index of split {name!r} ({rel}) is missing")
        if local is not None and self.cache is not None:
            SplitIndex.from_bytes(raw, self.path, rel, name, s, c, crc)        # checked before it is cached
            if self.cache.put_blob(local, raw):
                return SplitIndex.open(Path(local), self.path, name, s, c, crc)
        return SplitIndex.from_bytes(raw, self.path, rel, name, s, c, crc,
                                     fetch=functools.partial(self.files.get, rel))

    def _flags_extent(self) -> int:
        ids = [int(n.split("/")[2]) for n in self._listing if n.startswith("complete/c/") and n.split("/")[2].isdigit()]
        return (max(ids) + 1) * self._chunk_rows("complete") if ids else 0

    def refresh(self) -> None:
        """List the store again, then reload the flags and key index (`MemoryBank.refresh`)."""
        self._listing = self.files.listing()
        self._flat = {}
        super().refresh()

    # ------------------------------------------------------------------ views
    def _g(self) -> zarr.Group:
        """zarr-python's view of the store (for `dask_array`), opened read-only in this process."""
        if self._group is None or self._group_pid != os.getpid():
            self._group = zarr.open_group(self.path, mode="r", zarr_format=3,
                                          storage_options=self.files.storage_options or None)
            self._arrays, self._group_pid = {}, os.getpid()
        return self._group

    def inspect(self) -> Inspection:
        """`ZarrMemoryBank.inspect` plus the listing of the store's objects."""
        return replace(super().inspect(), listing=self._listing)

    def describe(self) -> list[dict[str, Any]]:
        """As `ZarrMemoryBank.describe`, from the arrays' metadata and the store's listing."""
        out = []
        for name in ["keys", "complete", *self._arrays_on_disk()]:
            path = field_path(name)
            m = self._metas.get(path) or self._meta(path) or {}
            codecs = [c.get("name") for c in m.get("codecs", [])]
            grid = tuple(m["chunk_grid"]["configuration"]["chunk_shape"])
            inner = grid
            if codecs[:1] == ["sharding_indexed"]:
                inner = tuple(m["codecs"][0]["configuration"]["chunk_shape"])
                codecs += [c.get("name") for c in m["codecs"][0]["configuration"].get("codecs", [])]
            shape = tuple(m["shape"])
            dtype = np.dtype(m["data_type"]) if m.get("data_type") != "string" else None
            d = {"name": path, "shape": shape, "dtype": str(dtype or "string"), "chunks": inner,
                 "shards": grid if inner != grid else None, "codecs": codecs,
                 "stored_bytes": sum(e.size for n, e in self._listing.items() if n.startswith(f"{path}/c/")),
                 "raw_bytes": int(np.prod(shape)) * (dtype.itemsize if dtype is not None else 0)}
            if name == LIGHT_ARRAY:
                d["fields"] = {f: tuple(v) for f, v in self.schema.light_channels().items()}
            out.append(d)
        if self.disk_index and self._index is not None:
            width = max((s.width for s in self._index.splits.values()), default=1)
            count = sum(s.count for s in self._index.splits.values())
            out.append({"name": "keys/index", "shape": (count,), "dtype": f"|S{width}", "chunks": None, "shards": None,
                        "codecs": ["sorted", "crc32c/block"], "raw_bytes": count * (width + 4),
                        "stored_bytes": sum(e.size for n, e in self._listing.items() if n.startswith(INDEX_PREFIX))})
        return out

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.cache is not None:
                self.cache.close()
