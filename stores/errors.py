"""The errors of the `stores` package. Catch `StoreError` for any of them.

Each also derives from the builtin its callers caught before this module existed (``ValueError``,
``PermissionError``), so ``except ValueError`` / ``except PermissionError`` keep working.
"""
from __future__ import annotations

__all__ = ["StoreError", "StoreMismatchError", "NotAMemoryBankError", "StoreReadOnlyError", "UnsupportedLayout"]


class StoreError(Exception):
    """Base class of every error raised by the memorybank store on purpose."""


class StoreMismatchError(StoreError, ValueError):
    """The store on disk was made with a different schema or teacher than the caller's; the message says what."""


class NotAMemoryBankError(StoreError, ValueError):
    """The path holds a Zarr group or HDF5 file, but not an e2r memorybank."""


class StoreReadOnlyError(StoreError, PermissionError):
    """A write was attempted on a store opened with ``mode="r"``."""


class UnsupportedLayout(StoreError):
    """The array is not stored one row per chunk with codecs this reader decodes."""
