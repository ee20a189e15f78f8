"""The errors of the `stores` package. Catch `StoreError` for any of them.

Each also derives from the builtin its callers caught before this module existed (``ValueError``,
``PermissionError``), so ``except ValueError`` / ``except PermissionError`` keep working.
"""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StoreError", "StoreMismatchError", "NotAMemoryBankError", "StoreReadOnlyError", "UnsupportedLayout",
           "StoreCorruptError", "StoreVersionError", "StoreStaleError", "InvalidKeyError"]


class StoreError(Exception):
    """Base class of every error raised by the memorybank store on purpose."""


class InvalidKeyError(StoreError, ValueError):
    """A key (or a key part) that does not follow the grammar of `stores.keys`; the message names it and the
    reason."""


class StoreMismatchError(StoreError, ValueError):
    """The store on disk was made with a different schema or teacher than the caller's; the message says what."""


class NotAMemoryBankError(StoreError, ValueError):
    """The path holds a Zarr group or HDF5 file, but not an e2r memorybank."""


class StoreReadOnlyError(StoreError, PermissionError):
    """A write was attempted on a store opened with ``mode="r"``, or on files this process may not write
    (read-only file system, permissions)."""


class UnsupportedLayout(StoreError):
    """The array is not stored one row per chunk with codecs this reader decodes."""


class StoreVersionError(StoreError, ValueError):
    """The store was written in an older on-disk format (``schema_version``); the message says how to
    convert or re-export it."""


class StoreStaleError(StoreError):
    """A split this handle reads (or writes) was removed or reserved anew by another process since the handle
    loaded the store's attributes (its generation changed): nothing of it is served, because its rows may now
    hold another split's data. ``splits`` names them; open the store again (or ``bank.refresh()``)."""

    def __init__(self, message: str, *, path: str = "", splits: Sequence[str] = ()) -> None:
        self.path, self.splits = str(path), list(splits)
        super().__init__(message)

    def __reduce__(self) -> tuple:          # survive pickling across DataLoader / dask workers
        return (_rebuild_stale, (str(self), self.path, self.splits))


def _rebuild_stale(message: str, path: str, splits: list[str]) -> StoreStaleError:
    return StoreStaleError(message, path=path, splits=splits)


def _short(keys: Sequence[str], limit: int = 8) -> str:
    keys = list(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more


class StoreCorruptError(StoreError):
    """Data or metadata on disk fail a check: a chunk's crc32c checksum, a missing shard or chunk file for rows
    marked complete, something that is not a regular file where a chunk is expected, a truncated file, or
    attributes that contradict the arrays. The store's data are never served past such a check.

    ``path`` (the store), ``array`` (e.g. ``"light"``), ``chunk`` (e.g. ``"light/c/3/0/0 inner chunk 17"``) and
    ``keys`` (sample keys of the rows it holds, when known) name what is damaged; the message says them too.
    """

    def __init__(self, message: str, *, path: str = "", array: str = "", chunk: str = "",
                 keys: Sequence[str] = ()) -> None:
        self.path, self.array, self.chunk, self.keys = str(path), array, chunk, list(keys)
        if self.keys and "key" not in message:
            message = f"{message} (keys {_short(self.keys)})"
        super().__init__(message)

    def __reduce__(self) -> tuple:          # survive pickling across DataLoader / dask workers
        return (_rebuild_corrupt, (str(self), self.path, self.array, self.chunk, self.keys))


def _rebuild_corrupt(message: str, path: str, array: str, chunk: str, keys: list[str]) -> StoreCorruptError:
    err = StoreCorruptError.__new__(StoreCorruptError)
    err.path, err.array, err.chunk, err.keys = path, array, chunk, keys
    Exception.__init__(err, message)
    return err
