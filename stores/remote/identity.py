"""Identity, generation and the append lock of the Zarr store on object storage (`RemoteIdentity`, a mixin of
`stores.remote.store.RemoteZarrMemoryBank`; what they are: `stores.abc.identity`, `stores.abc.guard`).

* Tag chunks are the objects ``complete/tags/<c>`` (the local layout, byte for byte). A reader fetches each
  one it needs once (one GET of 8 bytes a row + 4; with a ``cache_dir`` it is kept there and read from it
  afterwards, checked by its crc32c every time), and keeps it in an unlinked temporary file it maps (page
  cache, not private memory). A writer puts a shard object whole, records the crc32c of each of its
  chunks from the bytes it put, and puts the tag chunk of the rows it stored before their flags.
* Generation signature: the root ``zarr.json``'s ETag, by one HEAD at most every ``generation_check_s``
  seconds (default 5) while reading; so a reader notices a split removed or rewritten under it within that
  time, and in between a rewritten row fails its identity tag (another split ``uid``). Limit: rows of a removed
  split that a reader's ``cache_dir`` holds intact are served for up to ``generation_check_s`` after the
  removal.
* Lock: the object ``e2r.lock`` created with a conditional PUT (``If-None-Match: *``,
  `stores.remote.objstore.ObjectFiles.put_if_absent`) and deleted after; others wait for it (``LOCK_WAIT_S``,
  then a `StoreError` naming it: a crashed writer's lock is deleted by hand). On a service without
  conditional PUTs (gcs, azure, ...) the lock is a lookup then a put, which two processes can both pass:
  there, change the split table from one process at a time.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from stores.abc.identity import check_tag_size, decode_tags
from stores.errors import StoreError
from stores.index_file import spill
from stores.zarr_v3.identity import TAGS_DIR

LOCK = "e2r.lock"
LOCK_WAIT_S = 120.0
_EMPTY = 2**64 - 1


def crcs_of_parts(parts: list[Any] | None, rows: int) -> np.ndarray:
    """(rows,) int64: the crc32c of each inner chunk of a shard built by `stores.zarr_v3.shard_codec.ShardCodec`
    (``parts``: its chunks in row order, then its index and the index's crc32c; None: no chunk), -1 when
    absent."""
    out = np.full(rows, -1, np.int64)
    if parts is None:
        return out
    index = np.frombuffer(bytes(parts[-2]), "<u8").reshape(rows, 2)
    present = np.flatnonzero(index[:, 0] != np.uint64(_EMPTY))
    out[present] = [int.from_bytes(bytes(c[-4:]), "little") for c in parts[:len(present)]]
    return out


class RemoteIdentity:
    """The `stores.abc.guard.StoreGuard` primitives of a store on object storage (module docstring). Relies
    on `RemoteZarrMemoryBank`'s members (files, cache, _listing, _stored, ...)."""

    generation_check_s = 5.0
    path: str

    def _tag_path(self, c: int) -> str:                      # type: ignore[override]
        return "/".join([*TAGS_DIR, str(c)])

    def _load_tags(self, c: int) -> Any | None:
        rel = self._tag_path(c)
        entry = self._listing.get(rel)                       # type: ignore[attr-defined]
        if entry is None:
            return None
        cache = self.cache                                   # type: ignore[attr-defined]
        local = cache.blob_path(self.files.name(rel), entry.size, entry.tag, ".tags") if cache else None  # type: ignore[attr-defined]
        S, F = self.alignment, len(self._identity_arrays())  # type: ignore[attr-defined]
        check_tag_size(entry.size, S, F)                     # an object of the wrong size: refused, never fetched
        if local is not None and os.path.exists(local):
            with open(local, "rb") as fh:
                raw = fh.read()
            try:
                decode_tags(raw, S, F)
                return spill(raw) or raw
            except ValueError:
                os.unlink(local)                             # a damaged cache copy: fetched again
        raw = self.files.get(rel)                            # type: ignore[attr-defined]
        if raw is None:
            return None
        if local is not None:
            try:
                decode_tags(raw, S, F)
                cache.put_blob(local, raw)
            except ValueError:
                pass                                         # not cached; the reader reports it
        return spill(raw) or raw

    def _read_tags_fresh(self, c: int) -> bytes | None:
        return self.files.get(self._tag_path(c))             # type: ignore[attr-defined]

    def _put_tags(self, c: int, raw: bytes | None) -> None:
        if raw is None:
            self.files.delete([self._tag_path(c)])           # type: ignore[attr-defined]
        else:
            self.files.put(self._tag_path(c), raw)           # type: ignore[attr-defined]

    def _sync_tags(self, a: int, b: int) -> None:
        """A PUT that returned is durable: nothing to sync."""

    def _row_crcs(self, array: str, a: int, b: int, block: Mapping[str, np.ndarray] | None) -> np.ndarray:
        """From the shards this handle put (`crcs_of_parts`)."""
        R = self._codec(array).rows_per_shard                # type: ignore[attr-defined]
        out = np.full(max(0, b - a), -1, np.int64)
        for i in range(a // R, -(-b // R)):
            got = self._put_crcs.get((array, i))             # type: ignore[attr-defined]
            lo, hi = max(a, i * R), min(b, (i + 1) * R)
            if got is not None:
                out[lo - a:hi - a] = got[lo - i * R:hi - i * R]
        return out

    def _tag_rows(self, a: int, b: int, block: Any, keys: Any) -> None:
        """The rows whose shards were put since the last flags (``_stored``), not ``[a, b)``: only those are
        flagged next (`RemoteZarrMemoryBank._write_complete`)."""
        for lo, hi in self._stored:                          # type: ignore[attr-defined]
            super()._tag_rows(lo, hi, block, None)           # type: ignore[misc]
            for (array, i) in list(self._put_crcs):          # type: ignore[attr-defined]
                if lo <= i * self._codec(array).rows_per_shard < hi:     # type: ignore[attr-defined]
                    del self._put_crcs[(array, i)]           # type: ignore[attr-defined]

    def _tags_present(self, a: int, b: int) -> np.ndarray:
        """Rows whose tag chunk object exists now (one HEAD a chunk; a damaged one is found by reads and
        ``verify``)."""
        S = self.alignment                                   # type: ignore[attr-defined]
        ok = np.zeros(max(0, b - a), bool)
        if not self.has_identity:                            # type: ignore[attr-defined]
            return ~ok
        for c in range(a // S, -(-b // S)):
            if self.files.info(self._tag_path(c)) is not None:   # type: ignore[attr-defined]
                ok[max(a, c * S) - a:min(b, (c + 1) * S) - a] = True
        return ok

    # ------------------------------------------------------------------ generation, lock
    def _attrs_signature(self) -> Any:
        entry = self.files.info("zarr.json")                 # type: ignore[attr-defined]
        return ("gone",) if entry is None else entry.tag

    def _reload_attrs(self) -> None:
        super()._reload_attrs()                              # type: ignore[misc]
        self._listing = self.files.listing()                 # type: ignore[attr-defined]

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        files = self.files                                   # type: ignore[attr-defined]
        me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode()
        deadline, pause = time.monotonic() + LOCK_WAIT_S, 0.05
        while not files.put_if_absent(LOCK, me):
            if time.monotonic() > deadline:
                raise StoreError(f"memorybank {self.path}: another process holds {files.name(LOCK)} ({files.get(LOCK)!r}) "
                                 f"for more than {LOCK_WAIT_S:.0f} s while changing the split table. If no process "
                                 "is (one crashed), delete that object and run again")
            time.sleep(pause)
            pause = min(1.0, pause * 2)
        try:
            yield
        finally:
            files.delete([LOCK])
