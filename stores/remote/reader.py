"""Rows of one sharded array of a store on object storage: ranged reads of exactly the inner chunks asked for.

`RemoteRowReader` is `stores.zarr_v3.row_reader.RowChunkReader` with the shard files replaced by objects:

* per shard, on first use in a process: its size and ETag come from the store's listing (taken at open /
  ``refresh``), its index (S x (offset, nbytes) + crc32c, the last bytes of the object) is read with one
  ranged GET — or from the local cache — checked, and kept for the life of the reader;
* per batch: the inner chunks of the requested rows that the local cache does not hold intact are fetched
  concurrently with one ``cat_ranges`` call (adjacent ranges merged, repeated rows fetched once); each one's
  crc32c is checked BEFORE it is decoded (the same `decode_into` as the local reader) and then written into
  the cache;
* a missing shard object or index entry for a requested row (the bank asks only for rows marked complete), a
  failed checksum or a short read raises `StoreCorruptError` naming the store URL, the array, the shard
  object + inner chunk and the keys — never zeros.

No threads of its own; the fsspec filesystem lives in `stores.remote.objstore.ObjectFiles` (re-created after a
fork). ``verify`` reads whole shard objects through `scan` (one GET each, dropped after the scan).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np

from stores.abc.identity import U64
from stores.remote.cache import CachedShard, ShardCache
from stores.errors import StoreError, UnsupportedLayout
from stores.remote.objstore import Entry, ObjectFiles
from stores.zarr_v3.row_reader import _EMPTY_INT, RowChunkReader


@dataclass
class _Shard:
    """What a reader keeps per shard object: its listing entry, checked index (S, 2), cache file."""

    entry: Entry
    index: np.ndarray
    cached: CachedShard | None
    view: memoryview | None


def _crc_ok(buf: Any, end: int) -> bool:
    """True when the 4 bytes at ``end`` of ``buf`` (a uint8 array) are the crc32c of ``buf[:end]``."""
    return google_crc32c.value(buf[:end]) == int.from_bytes(buf[end:end + 4].tobytes(), "little")


class RemoteRowReader(RowChunkReader):
    """Reads rows of the array at ``rel_dir`` (e.g. ``"light"``) of the store behind ``files``; ``listing``
    is the store's ``{relative name: Entry}``, ``cache`` the optional local `ShardCache`. Other arguments as
    `RowChunkReader`. UnsupportedLayout unless the array is sharded with crc32c on its chunks and index."""

    def __init__(self, files: ObjectFiles, rel_dir: str, listing: Mapping[str, Entry], cache: ShardCache | None,
                 **kw: Any) -> None:
        super().__init__(rel_dir, **kw)
        if not (self.sharded and self._index_crc and self.crc):
            raise UnsupportedLayout(f"{files.url}/{rel_dir}: object-store reads need shards with crc32c on every "
                                    "inner chunk and on the index (schema_version >= 3)")
        self.files, self.listing, self.cache = files, listing, cache
        self._shards: dict[int, _Shard | None] = {}
        self._nidx = 16 * self.rows_per_file + 4

    def file_str(self, i: int) -> str:
        return f"{self.dir.as_posix()}/c/{i}" + "/0" * self._tail

    def invalidate(self) -> None:
        super().invalidate()
        self._shards.clear()

    def files_present(self) -> list[int]:
        prefix = f"{self.dir.as_posix()}/c/"
        return sorted(int(n[len(prefix):].split("/")[0]) for n in self.listing
                      if n.startswith(prefix) and n[len(prefix):].split("/")[0].isdigit())

    # ------------------------------------------------------------------ shard state
    def _shard(self, i: int) -> _Shard | None:
        """The state of shard ``i`` (None when the listing has no such object); its index read and checked
        once (from the cache when intact there)."""
        if i in self._shards:
            return self._shards[i]
        rel = self.file_str(i)
        entry = self.listing.get(rel)
        if entry is None:
            self._shards[i] = None
            return None
        if entry.size < self._nidx:
            raise self._corrupt(f"{entry.size} bytes, shorter than its {self._nidx}-byte index (truncated)", i)
        cached = self.cache.shard(self.files.name(rel), entry.size, entry.tag) if self.cache is not None else None
        lo = entry.size - self._nidx
        if cached is not None and _crc_ok(cached.u8[lo:], self._nidx - 4):
            index = self._index_of(i, cached.mm[lo:], entry.size)
        else:
            raw = self.files.get_ranges([(rel, lo, entry.size)])[0]
            if raw is None or len(raw) != self._nidx:
                raise self._corrupt("the shard object vanished or shrank since the store was listed (replaced by a "
                                    "writer? open the store again)", i)
            index = self._index_of(i, raw, entry.size)          # checks the crc32c: a damaged index raises
            if cached is not None:
                self.cache.write(cached, lo, raw)                # type: ignore[union-attr]
        sh = _Shard(entry, index, cached, memoryview(cached.mm) if cached is not None else None)
        self._shards[i] = sh
        return sh

    # ------------------------------------------------------------------ reading
    def read(self, rows: Sequence[int] | np.ndarray, salts: np.ndarray | None = None) -> np.ndarray:
        """Rows ``rows`` (any order, repeats allowed) as (len(rows), *row_shape), in the order asked: rows
        intact in the cache are decoded from it, the others fetched in one concurrent request batch. ``salts``:
        each chunk's identity tag checked too (`RowChunkReader.read`)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.row_shape), self.dtype)
        if not len(rows):
            return out
        flat = out.reshape(len(rows), self.row_items)
        dest = memoryview(flat.reshape(-1).view(np.uint8))
        S = self.rows_per_file
        tags = self.tags if salts is not None else None
        ident = (tags, tags.offsets(rows, self.tag_col), salts.tolist()) if tags is not None else None  # type: ignore[union-attr]
        want: dict[tuple[int, int, int], list[int]] = {}      # (shard, offset, nbytes) -> positions in rows
        for i, group in self.by_file(rows):
            sh = self._shard(i)
            if sh is None:
                if self.strict:
                    raise self.missing_file(i, rows[group])
                flat[group] = self.fill
                continue
            for j, (off, nb) in zip(group.tolist(), sh.index[rows[group] % S].tolist()):
                if off == _EMPTY_INT:
                    if self.strict:
                        raise self.missing_chunk(i, int(rows[j]))
                    flat[j] = self.fill
                elif sh.view is not None and _crc_ok(sh.cached.u8[off:off + nb], nb - 4):   # type: ignore[union-attr]
                    self._check_tag(i, int(rows[j]), j, sh.cached.u8[off + nb - 4:off + nb], ident)  # type: ignore[union-attr]
                    self.decode_into(i, sh.view[off:off + nb - 4], dest, j, int(rows[j]))
                    if self.cache is not None:
                        self.cache.hits += 1
                else:
                    want.setdefault((i, off, nb), []).append(j)
        if want:
            self._fetch(want, rows, dest, ident)
        return out

    def _check_tag(self, i: int, row: int, j: int, crc: Any, ident: tuple[Any, list[int], list[int]] | None) -> None:
        """The identity check of position ``j`` (row ``row`` of shard ``i``) whose chunk (checked) ends with the
        4 bytes ``crc``; ``ident`` = (the tag chunks, each position's tag offset, each position's salt)."""
        if ident is None:
            return
        tags, toff, salts = ident
        tag = U64.unpack_from(tags.raw(row // tags.S), toff[j])[0]
        if tag ^ salts[j] != int.from_bytes(bytes(crc), "little"):
            raise self.foreign(i, row, tag)

    def _fetch(self, want: dict[tuple[int, int, int], list[int]], rows: np.ndarray, dest: memoryview,
               ident: tuple[Any, list[int], list[int]] | None = None) -> None:
        """Fetch the chunks ``want`` concurrently, check each one's crc32c (and identity), decode it into its
        positions and put it in the cache."""
        spans = list(want)
        blobs = self.files.get_ranges([(self.file_str(i), off, off + nb) for i, off, nb in spans])
        for (i, off, nb), blob in zip(spans, blobs):
            js = want[(i, off, nb)]
            row = int(rows[js[0]])
            if blob is None or len(blob) != nb:
                raise self._corrupt(f"row {row}: the shard object is shorter than its index says, or vanished (replaced "
                                    "since the store was opened? open it again)", i, [row], row % self.rows_per_file)
            u8 = np.frombuffer(blob, np.uint8)
            if not _crc_ok(u8, nb - 4):
                raise self.bad_checksum(i, row)
            src = memoryview(blob)[:nb - 4]
            for j in js:
                self._check_tag(i, int(rows[j]), j, blob[nb - 4:nb], ident)
                self.decode_into(i, src, dest, j, int(rows[j]))
            sh = self._shards[i]
            if sh is not None and sh.cached is not None and self.cache is not None:
                self.cache.write(sh.cached, off, blob)

    # ------------------------------------------------------------------ whole objects (verify, writers)
    def _open(self, i: int) -> tuple[Any, np.ndarray | None, np.ndarray | None]:
        """The whole shard object ``i`` (one GET; verify's `scan`), its checked index and a uint8 view."""
        got = self._files.get(i)
        if got is not None:
            return got
        raw = self.files.get(self.file_str(i))
        if raw is None:
            return None, None, None
        if not raw:
            raise self._corrupt("empty object (truncated)", i, range(i * self.rows_per_file, (i + 1) * self.rows_per_file))
        got = (raw, self._index_of(i, raw, len(raw)), np.frombuffer(raw, np.uint8))
        self._views[i] = memoryview(raw)
        self._files[i] = got
        return got

    def scan(self, i: int, check: Callable[[int, np.ndarray], str | None] | None = None,
             expect: dict[int, tuple[int, bool]] | None = None) -> tuple[np.ndarray, list[tuple[int, str]]]:
        try:
            return super().scan(i, check, expect)
        finally:
            self._files.pop(i, None)
            self._views.pop(i, None)

    def _fresh_index(self, i: int) -> np.ndarray | None:
        """Shard ``i``'s index read now (a HEAD and one ranged GET; None when the object is absent)."""
        rel = self.file_str(i)
        entry = self.files.info(rel)
        if entry is None:
            return None
        if entry.size < self._nidx:
            raise self._corrupt(f"{entry.size} bytes, shorter than its {self._nidx}-byte index (truncated)", i)
        raw = self.files.get_ranges([(rel, entry.size - self._nidx, entry.size)])[0]
        if raw is None:
            return None
        return self._index_of(i, raw, entry.size)

    def read_shard(self, i: int) -> tuple[bytes, np.ndarray] | None:
        raise StoreError(f"memorybank {self.store}: {self.chunk_name(i)}: an object store cannot rewrite part of a "
                         "shard object; write whole shards (split positions cut at multiples of bank.alignment)")
