"""Identity, generation and the append lock of the Zarr back end (`ZarrIdentity`, a mixin of
`stores.zarr_v3.store.ZarrMemoryBank`; what they are: `stores.abc.identity`, `stores.abc.guard`).

* Tag chunks are plain files ``complete/tags/<c>`` next to the completion flags' chunks, inside the
  ``complete`` array's directory, where Zarr tools do not look (like the key index in ``keys/index``): no new
  Zarr node and no file beyond one per S rows. Chunk ``c`` holds the tags of rows ``[c * S, (c + 1) * S)``
  (S = ``shard_rows``) as (S, F) little-endian uint64 (F = the data arrays: ``light`` and, when stored,
  ``bev_feat/bev_feat``) followed by their crc32c — the bytes of a Zarr v3 chunk with codecs ``bytes`` +
  ``crc32c``. One writer task's rows (the alignment rule), written whole (temporary name, fsync, rename)
  after the rows' data and before their flags. Readers map each chunk they touch once per process and check
  its crc32c once.
* A writer reads the crc32c of each row it wrote back from the shard files (the shard index and 4 bytes a
  row: pages just written), so a tag names the bytes on disk.
* Generation signature: ``os.stat`` of the root ``zarr.json`` (inode, size, mtime, ctime; zarr-python
  replaces it by rename at every attribute write).
* Lock: ``fcntl.flock`` of the store directory (no lock file; held by one handle of one process at a time,
  released when the process dies). Local file systems; on a network file system flock may not be shared
  between machines: there run ``reserve_split`` / ``rm-split`` from one machine.
"""
from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stores.abc.identity import IDENTITY, check_tag_size, decode_tags, tag_chunk_bytes
from stores.errors import StoreCorruptError
from stores.fsio import fsync_files, open_regular, read_regular, remove_path, write_atomic
from stores.schema import GROUP_FIELDS, LIGHT_ARRAY

TAGS_DIR = ("complete", "tags")          # where the tag chunks live, inside the ``complete`` array's directory
from stores.zarr_v3.checks import field_path
from stores.zarr_v3.row_reader import _EMPTY, RowChunkReader


def stored_crcs(r: RowChunkReader, a: int, b: int) -> np.ndarray:
    """(b - a,) int64: the crc32c stored after the chunk of each row of ``[a, b)`` of the array ``r`` reads
    (-1: no chunk), read now from the files (the index and 4 bytes a row; a writer tagging its rows)."""
    out = np.full(max(0, b - a), -1, np.int64)
    S = r.rows_per_file
    for i in range(a // S, -(-b // S)) if r.crc else ():
        lo, hi = max(a, i * S), min(b, (i + 1) * S)
        try:
            opened = open_regular(r.file_path(i), r.store, r.name)
        except StoreCorruptError as e:
            raise r._corrupt(str(e), i) from None
        if opened is None:
            continue
        fd, size = opened
        try:
            r.check_size(i, size)
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else None
        finally:
            os.close(fd)
        if mm is None:
            continue
        try:
            if r.sharded:
                index = r._index_of(i, mm, len(mm))[lo - i * S:hi - i * S]
                full = index[:, 0] != _EMPTY
                ends = (index[full, 0] + index[full, 1]).astype(np.int64)
            else:
                full, ends = np.ones(1, bool), np.array([len(mm)], np.int64)
            u8 = np.frombuffer(mm, np.uint8)
            out[lo - a:hi - a][full] = u8[ends[:, None] - 4 + np.arange(4)].copy().view("<u4").reshape(-1)
            del u8
        finally:
            mm.close()
    return out


class ZarrIdentity:
    """The `stores.abc.guard.StoreGuard` primitives of a local Zarr store (module docstring). Relies on
    `ZarrMemoryBank`'s members (path, schema, fsync, ``_reader``, ``_meta``, ``_json``, ``_file_size``, ...)."""

    path: str
    fsync: bool
    _attrs: dict[str, Any]

    # ------------------------------------------------------------------ the tag files
    def _identity_arrays(self) -> list[str]:
        return [LIGHT_ARRAY] + [field_path(f) for f in self.schema.fields if f in GROUP_FIELDS]   # type: ignore[attr-defined]

    def _bind_tags(self, r: RowChunkReader, array: str) -> RowChunkReader:
        """``r`` (the row reader of ``array``) checking rows against this store's tag chunks, when it has them."""
        ident = self._identity()                                 # type: ignore[attr-defined]
        if ident is not None:
            r.tags, r.tag_col = self._tag_chunks(), ident.columns[array]   # type: ignore[attr-defined]
        return r

    def _array_salts(self, salts: np.ndarray | None, array: str) -> list[int] | None:
        """The per-row salts of ``array`` for a read (`stores.abc.identity.RowIdentity.array_salts`), None
        when unchecked."""
        ident = self._identity() if salts is not None else None  # type: ignore[attr-defined]
        return None if ident is None else ident.array_salts(salts, array)

    def _tag_path(self, c: int) -> Any:
        return Path(self.path).joinpath(*TAGS_DIR, str(c))

    def _tag_file(self, c: int) -> str:
        return "/".join([*TAGS_DIR, str(c)])

    def _files_of_rows(self, a: int, b: int) -> list[str]:
        """Paths, relative to the store, of every file holding rows ``[a, b)``: keys, flags, data, identity tags."""
        S, names = self.alignment, ("keys", "complete", *self._arrays_on_disk())  # type: ignore[attr-defined]
        files = [str(p.relative_to(self.path)) for n in names  # type: ignore[attr-defined]
                 for p in self._files_of(n, a, b)]  # type: ignore[attr-defined]
        return files + [self._tag_file(c) for c in range(a // S, -(-b // S))] if b > a else []

    def _load_tags(self, c: int) -> Any | None:
        """A read-only map of tag chunk ``c`` (None when absent; StoreCorruptError when not a regular file)."""
        opened = open_regular(self._tag_path(c), self.path, IDENTITY)
        if opened is None:
            return None
        fd, size = opened
        try:
            check_tag_size(size, self.alignment, len(self._identity_arrays()))    # type: ignore[attr-defined]
            return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)

    def _read_tags_fresh(self, c: int) -> bytes | None:
        """The stored bytes of tag chunk ``c``, at most one byte more than a tag chunk has (a longer file reads
        as damaged, never allocated whole)."""
        S, F = self.alignment, len(self._identity_arrays())      # type: ignore[attr-defined]
        return read_regular(self._tag_path(c), self.path, IDENTITY, max_bytes=tag_chunk_bytes(S, F) + 1)

    def _put_tags(self, c: int, raw: bytes | None) -> None:
        p = self._tag_path(c)
        if raw is None:
            remove_path(p)
            return
        os.makedirs(p.parent, exist_ok=True)
        write_atomic(p, [raw], self.fsync, tmp=f"{p}.{uuid.uuid4().hex}.partial")

    def _sync_tags(self, a: int, b: int) -> None:
        S = self.alignment                                       # type: ignore[attr-defined]
        files = [str(self._tag_path(c)) for c in range(a // S, -(-b // S))]
        fsync_files(files, self.path, synced=files, durable=self._durable)   # type: ignore[attr-defined]

    def _row_crcs(self, array: str, a: int, b: int, block: Mapping[str, np.ndarray]) -> np.ndarray:
        r = self._reader(array)                                  # type: ignore[attr-defined]
        if r is None:
            raise StoreCorruptError(f"memorybank {self.path}: array {array!r} is not stored one row per chunk with "
                                    "crc32c: its rows cannot carry identity tags", path=self.path, array=array)
        return stored_crcs(r, a, b)

    def _tags_present(self, a: int, b: int) -> np.ndarray:
        """(b - a,) bool: rows with a tag in every column, read now (a lost or damaged tag chunk: none)."""
        ok = np.zeros(max(0, b - a), bool)
        if not self.has_identity:                                # type: ignore[attr-defined]
            return ~ok
        S, F = self.alignment, len(self._identity_arrays())     # type: ignore[attr-defined]
        for c in range(a // S, -(-b // S)):
            lo, hi = max(a, c * S), min(b, (c + 1) * S)
            raw = self._read_tags_fresh(c)
            try:
                tags = decode_tags(raw, S, F) if raw is not None else None
            except ValueError:
                tags = None
            if tags is not None:
                ok[lo - a:hi - a] = (tags[lo - c * S:hi - c * S] != 0).all(axis=1)
        return ok

    def _missing_tags(self, complete: np.ndarray) -> list[str]:
        """Tag chunks that rows flagged in ``complete`` (bool over rows ``[0, n)``) need and that are absent
        (one stat per chunk holding a complete row)."""
        if not self.has_identity or not len(complete):           # type: ignore[attr-defined]
            return []
        S = self.alignment                                       # type: ignore[attr-defined]
        held = np.pad(complete, (0, -len(complete) % S)).reshape(-1, S).any(axis=1)
        out = []
        for c in np.flatnonzero(held).tolist():
            if self._file_size(self._tag_path(c), IDENTITY) is None:   # type: ignore[attr-defined]
                keys = self._keys_of(c * S + np.flatnonzero(complete[c * S:(c + 1) * S])[:4])  # type: ignore[attr-defined]
                out.append(f"{self._tag_file(c)} (the identity tags of rows [{c * S}, {(c + 1) * S})) is missing but "
                           f"rows there are complete (keys {', '.join(map(repr, keys))} ...): resume the export to "
                           "redo them")
        return out

    # ------------------------------------------------------------------ generation, lock
    def _attrs_signature(self) -> Any:
        try:
            st = os.stat(self.path + "/zarr.json")          # one stat per read: a string, not a Path
        except FileNotFoundError:
            return ("gone",)
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _read_attrs_fresh(self) -> dict[str, Any] | None:
        try:
            root = self._json("zarr.json")                      # type: ignore[attr-defined]
        except StoreCorruptError:
            return None
        return None if root is None else dict(root.get("attributes") or {})

    def _reload_attrs(self) -> None:
        """Drop every cached view of the arrays (shapes, maps, metadata) and read the attributes again."""
        self._group, self._readers, self._flat = None, {}, {}     # type: ignore[assignment]
        self._arrays.clear()                                     # type: ignore[attr-defined]
        self._metas.clear()                                      # type: ignore[attr-defined]
        self._attrs = self._open_existing()                      # type: ignore[attr-defined]

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)                                         # closing the descriptor releases the lock
