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

Writers put whole objects only (the protocol: `stores.remote.writes`). Fork safe: the fsspec filesystem (and
s3fs's event-loop thread) is created on first use in each process (`stores.remote.objstore.ObjectFiles`); shard
state and cache handles inherited by a forked worker stay valid; pickling drops every handle.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from stores.abc.inspection import Inspection
from stores.remote.cache import ShardCache
from stores.remote.identity import RemoteIdentity, crcs_of_parts
from stores.errors import StoreCorruptError, StoreError
from stores.zarr_v3.flat_chunks import FlatChunkReader
from stores.fsio import json_object
from stores.index import SplitIndex
from stores.index_file import INDEX_DIR, SUFFIX, write_index
from stores.layout import COMPLETE_UNSET
from stores.remote.objstore import Entry, ObjectFiles
from stores.remote.reader import RemoteRowReader
from stores.remote.writes import ROOT, create_remote
from stores.zarr_v3.row_reader import RowChunkReader
from stores.schema import GROUP_FIELDS, LIGHT_ARRAY, LIGHT_FIELDS, Provenance, StoreSchema
from stores.zarr_v3.checks import field_path
from stores.zarr_v3.flat_chunks import encode_flat_chunk
from stores.zarr_v3.key_array import encode_keys
from stores.zarr_v3.shard_codec import encode_threads
from stores.zarr_v3.store import ZarrMemoryBank

DEFAULT_CACHE_BYTES = 20 * 2**30
INDEX_PREFIX = "/".join(INDEX_DIR) + "/"


class RemoteZarrMemoryBank(RemoteIdentity, ZarrMemoryBank):
    """`ZarrMemoryBank` whose files are objects under a URL (see the module docstring). Open it with
    `stores.open_memorybank(url, storage_options=..., cache_dir=...)`."""

    recheck_chunks = False      # a resume checks shard indexes and presence, not every chunk's bytes (one GET each)

    def __init__(self, path: str, mode: str, fsync: bool = True, *, storage_options: dict[str, Any] | None = None,
                 cache_dir: str | os.PathLike | None = None, cache_bytes: int | None = None) -> None:
        super().__init__(str(path).rstrip("/"), mode, fsync)
        self.files = ObjectFiles(self.path, storage_options)
        self.cache = ShardCache(cache_dir, cache_bytes or DEFAULT_CACHE_BYTES) if cache_dir else None
        self._listing: dict[str, Entry] = {}
        self._group_pid = -1
        self._staged: dict[tuple[str, int], dict[str, Any]] = {}
        self._stored: list[tuple[int, int]] = []
        self._put_crcs: dict[tuple[str, int], np.ndarray] = {}    # (array, shard) -> crc32c of each chunk put

    def __getstate__(self) -> dict[str, Any]:
        d = super().__getstate__()
        d["_flat"], d["_staged"], d["_stored"], d["_put_crcs"] = {}, {}, [], {}
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
        return f"{field_path(name)}/c/{c}" + ("/0" if name == "keys" and self._key_width() else "")

    def _flat_reader(self, name: str) -> FlatChunkReader:
        if name not in self._flat:
            self._flat[name] = FlatChunkReader(name, self._metas.get(name) or self._meta(name) or {}, store=self.path,
                                               name=name, read=lambda c: self.files.get(self._chunk_path(name, c)))
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

    def _close_handles(self) -> None:
        try:
            super().close()
        finally:
            if self.cache is not None:
                self.cache.close()

    @classmethod
    def create(cls, path: str | os.PathLike, schema: StoreSchema, provenance: Provenance, *,
               shard_rows: int | None = None, exist_ok: bool = True, fsync: bool = True,
               storage_options: dict[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
               cache_bytes: int | None = None) -> "RemoteZarrMemoryBank":
        """Create the store at the URL ``path`` (uploaded whole, root metadata last, each object only if absent),
        or open an existing one "r+" after checking its schema and teacher (StoreMismatchError; FileExistsError
        when ``exist_ok=False``); a creator that loses a race ends as if the store had existed
        (`stores.remote.writes`)."""
        return create_remote(cls, path, schema, provenance, shard_rows=shard_rows, exist_ok=exist_ok, fsync=fsync,
                             storage_options=storage_options, cache_dir=cache_dir, cache_bytes=cache_bytes)

    # ------------------------------------------------------------------ metadata, keys, flags
    def _write_attrs(self, attrs: dict[str, Any]) -> None:
        self.files.put(ROOT, json.dumps({"attributes": attrs, "zarr_format": 3, "node_type": "group"},
                                               indent=2).encode())

    def _resize(self, n: int) -> None:
        """Grow every array to ``n`` rows (their zarr.json objects, the keys array last)."""
        for name in [*self._arrays_on_disk(), "complete", "keys"]:
            path = field_path(name)
            meta = self._metas[path]
            if int(meta["shape"][0]) > n:
                raise StoreError(f"{self.path}: arrays of an object store only grow ({path} has {meta['shape'][0]} "
                                 f"rows, asked {n})")
            if int(meta["shape"][0]) != n:
                meta = {**meta, "shape": [n, *meta["shape"][1:]]}
                self.files.put(f"{path}/zarr.json", json.dumps(meta, indent=2).encode())
                self._metas[path] = meta
        self._readers.clear()

    def _put_flat(self, name: str, a: int, values: np.ndarray, fill: Any) -> None:
        """Rows ``[a, a + len(values))`` of ``keys`` / ``complete``: each chunk they touch written whole (the
        rest of a partly covered chunk read first; a damaged or absent one counts as fill); an all-fill
        chunk is deleted (as zarr-python does)."""
        C, b = self._chunk_rows(name), a + len(values)
        for c in range(a // C, -(-b // C)):
            lo, hi = max(a, c * C), min(b, (c + 1) * C)
            if lo == c * C and hi == (c + 1) * C:
                chunk = np.asarray(values[lo - a:hi - a])
            else:
                try:
                    old = self._flat_reader(name).chunk(c)
                except ValueError:
                    old = None                             # damaged: its rows are lost anyway (redo / re-reserve)
                chunk = np.full((C, *values.shape[1:]), fill, values.dtype) if old is None else old.copy()
                chunk[lo - c * C:hi - c * C] = values[lo - a:hi - a]
            rel = self._chunk_path(name, c)
            if (chunk == fill).all():
                self.files.delete([rel])
            else:
                self.files.put(rel, encode_flat_chunk(self._metas[name], chunk))

    def _write_keys(self, a: int, keys: np.ndarray) -> None:
        """Key bytes (N, W) encoded one chunk at a time (bounded memory), or vlen strings (schema_version 4)."""
        w, C, b = self._key_width(), self._chunk_rows("keys"), a + len(keys)
        for c in range(a // C, -(-b // C)) if w else []:
            x, y = max(a, c * C), min(b, (c + 1) * C)
            self._put_flat("keys", x, encode_keys(keys[x - a:y - a], w, self.path), 0)
        if not w:
            self._put_flat("keys", a, np.asarray(keys, dtype=object), "")

    def _write_flags(self, a: int, b: int, value: int) -> None:
        if b > a:
            self._put_flat("complete", a, np.full(b - a, value, np.uint8), COMPLETE_UNSET)

    def _write_split_index(self, split: str, start: int, keys: list[str], crc: int) -> None:
        if self.disk_index:
            with tempfile.TemporaryDirectory(prefix="e2r-idx-") as tmp:
                local = Path(tmp).joinpath(*INDEX_DIR, f"{split}{SUFFIX}")
                write_index(local, split, start, crc, keys, fsync=False)
                self.files.put("/".join([*INDEX_DIR, f"{split}{SUFFIX}"]), local.read_bytes())

    def _remove_split_index(self, split: str) -> None:
        self.files.delete(["/".join([*INDEX_DIR, f"{split}{SUFFIX}"])])

    def reindex(self) -> list[str]:
        raise StoreError(f"{self.path}: `reindex` rewrites a store in place; run it on a local copy and upload the "
                         "`keys/index` objects it writes (or re-export)")

    # ------------------------------------------------------------------ data: whole shards
    def _write_fields(self, a: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Stage rows ``[a, a + n)`` of every data array; put each shard object whose rows are all given."""
        n = len(next(iter(arrays.values())))
        light = [arrays[f] for f in LIGHT_FIELDS if f in arrays]
        if len(light) != len(LIGHT_FIELDS):
            raise ValueError(f"{self.path}: the packed light array needs all of {LIGHT_FIELDS} in one write")
        data = {LIGHT_ARRAY: np.concatenate(light, axis=-1)}
        data.update({n: np.asarray(arrays[n]) for n in GROUP_FIELDS if n in arrays})
        end = next((s + c for s, c in self.splits.values() if s <= a < s + c), a + n)
        staged = self._staged
        for name, block in data.items():
            R = self._codec(field_path(name)).rows_per_shard
            for i in range(a // R, -(-(a + n) // R)):
                lo, hi = max(a, i * R), min(a + n, (i + 1) * R)
                st = staged.get((name, i))
                if st is None:
                    if lo != i * R:
                        raise StoreError(
                            f"memorybank {self.path}: write_rows starts at row {lo}, inside shard {i} of {field_path(name)!r} "
                            f"(rows [{i * R}, {(i + 1) * R})) that this handle did not start: an object store cannot "
                            "rewrite part of a shard object (no partial writes). Write the whole shard from its first "
                            "row, e.g. re-export the split (--overwrite)")
                    st = staged[(name, i)] = {"first": lo, "next": lo, "end": min((i + 1) * R, end), "blocks": []}
                if lo != st["next"]:
                    raise StoreError(f"memorybank {self.path}: rows of shard {i} of {field_path(name)!r} must be written in "
                                     f"order by one handle: expected row {st['next']}, got {lo}")
                st["blocks"].append(block[lo - a:hi - a])
                st["next"] = hi
                if hi >= st["end"]:
                    self._put_shard(name, i, np.concatenate(st.pop("blocks")))
                    del staged[(name, i)]
                    if name == LIGHT_ARRAY:
                        self._stored.append((i * R, hi))
        self._readers.clear()

    def _put_shard(self, name: str, i: int, rows: np.ndarray) -> None:
        path = field_path(name)
        codec = self._codec(path)
        parts = codec.shard(rows, 0, None, threads=self.write_threads or encode_threads())
        self._put_crcs[(path, i)] = crcs_of_parts(parts, codec.rows_per_shard)      # for the identity tags
        rel = f"{path}/c/{i}" + "/0" * (rows.ndim - 1)
        if parts is None:
            self.files.delete([rel])
        else:
            self.files.put(rel, b"".join(bytes(p) for p in parts))

    def _write_complete(self, a: int, b: int, flag: bool) -> None:
        """Flags of the rows whose shards were just put (``write_rows`` calls this after `_write_fields`)."""
        if not flag:
            self._write_flags(a, b, 0)
            return
        stored, self._stored = self._stored, []
        for lo, hi in stored:
            self._write_flags(lo, hi, 1)

    def _write_field(self, name: str, a: int, data: np.ndarray) -> None:
        raise StoreError(f"{self.path}: one field alone cannot be written to an object store (whole shards only)")

    def _clear_rows(self, a: int, b: int) -> None:
        """remove_split: the rows' flags, then their shard objects, then their keys."""
        self._write_flags(a, b, COMPLETE_UNSET)
        for name in self._arrays_on_disk():
            R = self._codec(field_path(name)).rows_per_shard
            tail = "/0" * (len(self._metas[field_path(name)]["shape"]) - 1)
            self.files.delete([f"{field_path(name)}/c/{i}{tail}" for i in range(a // R, -(-b // R))])
        self._write_keys(a, np.full(b - a, "", dtype=object))
        self._readers.clear()

    # ------------------------------------------------------------------ no local files to sync or check
    def _sync_rows(self, names: Any, a: int, b: int) -> None:
        """A PUT that returned is durable: nothing to sync."""

    def _sync_meta(self) -> None:
        """A PUT that returned is durable: nothing to sync."""

    def _check_files(self, names: Any, a: int, b: int) -> None:
        """Objects are never special files: nothing to check."""

    def pending_rows(self) -> list[tuple[str, int, int]]:
        """``[(array, first, next)]`` of rows given to ``write_rows`` but not stored yet (partial shards)."""
        return [(field_path(n), st["first"], st["next"]) for (n, _), st in self._staged.items()]

    def close(self) -> None:
        """StoreError when rows given to ``write_rows`` are still staged (their shard was never completed):
        they were not stored; write the rest of their shards first."""
        pending = self.pending_rows()
        self._staged.clear()
        self._close_handles()
        if pending:
            raise StoreError(f"memorybank {self.path}: rows were given to write_rows but NOT stored, because their "
                             "shards were never completed (an object store takes whole shards only): "
                             + ", ".join(f"{n} rows [{x}, {y})" for n, x, y in pending)
                             + ". Write every row of a shard (up to the split's end) before closing; a resume redoes them")

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is not None:
            self._staged.clear()               # the exception in flight explains why; do not mask it
        self.close()

