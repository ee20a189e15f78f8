"""Upkeep of a local Zarr memorybank's data files outside the hot path (`stores.zarr_v3.store.ZarrMemoryBank`):

* `intact_rows`: which rows' inner chunks are on disk AND pass their crc32c, read fresh from the shard files.
  A resumed export re-checks with it the rows it would skip (``MemoryBank.incomplete_ranges``): a row flagged
  complete whose chunk was damaged since is redone, not kept. A shard whose index fails its own checksum is
  refused (`StoreCorruptError` naming it): its rows cannot be told apart;
* `drop_files`: removing rows no split uses (``remove_split``, ``reindex`` clearing orphans) deletes their
  whole shard files without reading them, so a damaged shard of removed rows never blocks the removal;
* `zarr_errors`: what zarr-python raises while it reads or writes rows (its own messages name neither the
  file nor the keys, e.g. "Stored and computed checksum do not match") becomes a `StoreCorruptError` naming
  the store, the array, the files and the keys.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import google_crc32c
import numpy as np

from stores.errors import StoreCorruptError, StoreError
from stores.fsio import read_regular, remove_path
from stores.zarr_v3.checks import chunk_failure
from stores.zarr_v3.row_reader import RowChunkReader
from stores.zarr_v3.shard_codec import EMPTY


def _crc_ok(u8: np.ndarray, off: int, nbytes: int) -> bool:
    """The chunk of ``nbytes`` at ``off`` of the file's bytes ``u8`` ends with the crc32c of what precedes it."""
    end = off + nbytes - 4
    return nbytes >= 4 and google_crc32c.value(u8[off:end]) == int.from_bytes(u8[end:end + 4].tobytes(), "little")


def intact_rows(reader: RowChunkReader, a: int, b: int, keys_of: Callable[[range], list[str]] | None = None
                ) -> np.ndarray:
    """(b - a,) bool: rows ``[a, b)`` whose chunk is present and whose bytes pass their crc32c, read now from
    disk (each shard file once, not the reader's cached maps). StoreCorruptError when a shard's index fails its
    checksum (naming the shard and, with ``keys_of(rows)``, the keys it holds) or a file is not a regular file."""
    out = np.zeros(max(0, b - a), bool)
    S = reader.rows_per_file
    for i in range(a // S, -(-b // S)):
        lo, hi = max(a, i * S), min(b, (i + 1) * S)
        if reader.sharded:
            try:
                got = reader.read_shard(i)
            except StoreCorruptError as e:
                keys = keys_of(range(lo, min(hi, lo + 8))) if keys_of is not None else []
                raise StoreCorruptError(f"{e}: its rows cannot be checked or kept; delete the file and resume the "
                                        "export (it redoes them)", path=e.path, array=e.array, chunk=e.chunk,
                                        keys=keys) from None
            if got is None:
                continue
            raw, index = got
            u8 = np.frombuffer(raw, np.uint8)
            for k in range(lo - i * S, hi - i * S):
                off, nb = int(index[k, 0]), int(index[k, 1])
                out[i * S + k - a] = off != EMPTY and (not reader.crc or _crc_ok(u8, off, nb))
        else:
            raw = read_regular(reader.file_path(i), reader.store, reader.name)
            ok = raw is not None and (not reader.crc or _crc_ok(np.frombuffer(raw, np.uint8), 0, len(raw)))
            out[lo - a:hi - a] = ok
    return out


def drop_files(reader: RowChunkReader | None, a: int, b: int, used: Iterable[tuple[int, int]]
               ) -> list[tuple[int, int]]:
    """Delete the files of ``reader``'s array holding rows ``[a, b)`` that hold no row of the ``used`` ranges
    ``[(start, count)]`` (the splits); return the row ranges still to clear (inside a file shared with a used
    row, or all of ``[a, b)`` without a row reader). The caller fsyncs the directories."""
    if reader is None:
        return [(a, b)] if b > a else []
    spans = list(used)
    S, rest = reader.rows_per_file, []
    for i in range(a // S, -(-b // S)):
        if any(s < (i + 1) * S and s + c > i * S for s, c in spans if c):
            rest.append((max(a, i * S), min(b, (i + 1) * S)))
        else:
            remove_path(reader.file_str(i))
    return rest


@contextlib.contextmanager
def zarr_errors(store: str, array: str, files: Sequence[Path], keys: Callable[[], list[str]]) -> Iterator[None]:
    """Run a zarr-python read or write of rows of ``array`` held by ``files`` (paths in the store); anything it
    raises but a StoreError or an OSError (`stores.fsio.writing` names those) becomes a StoreCorruptError
    naming the store, the array, the files and ``keys()``."""
    try:
        yield
    except (StoreError, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - zarr-python's codecs raise ValueError, IndexError, RuntimeError, ...
        names = [os.path.relpath(f, store) for f in files]
        where = ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
        raise StoreCorruptError(f"memorybank {store}: array {array!r}, {where}: {chunk_failure(e)} (zarr-python). "
                                f"Run `python -m stores verify {store}`; a damaged shard: delete the file and resume "
                                "the export (it redoes its rows)", path=store, array=array,
                                chunk=names[0] if names else "", keys=keys()[:8]) from None
