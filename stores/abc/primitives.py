"""The primitives a memorybank back end implements (`StorePrimitives`, the base of `stores.abc.MemoryBank`):
attributes, keys, completion flags, row reads/writes, durability (fsync) and integrity hooks.

Rows are global row numbers; ``[a, b)`` ranges are half-open. Everything here is called by the back-end
independent logic of `MemoryBank`; nothing here is public API.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stores.schema import StoreSchema


class StorePrimitives(ABC):
    """Abstract back-end primitives (see the module docstring)."""

    schema: StoreSchema

    # ------------------------------------------------------------------ back-end primitives
    @staticmethod
    @abstractmethod
    def exists(path: str) -> bool:
        """True when a store of this back end exists at ``path``."""

    @abstractmethod
    def _open_existing(self) -> dict[str, Any]:
        """Open the store's files and return its root attributes after checking them (FileNotFoundError
        when absent, NotAMemoryBankError, StoreVersionError, StoreCorruptError)."""

    @abstractmethod
    def _create_new(self, schema: StoreSchema) -> None:
        """Create empty arrays for ``schema``; ``self._attrs`` already holds the new root attributes."""

    @classmethod
    def abandoned(cls, path: str) -> bool:
        """True when ``path`` holds only the remains of a creation killed in place (no data): replaceable."""
        return False

    @staticmethod
    def _discard(path: str) -> None:
        """Remove an abandoned store at ``path``."""
        raise NotImplementedError

    @abstractmethod
    def _write_attrs(self, attrs: dict[str, Any]) -> None: ...

    @abstractmethod
    def _n_rows(self) -> int: ...

    @abstractmethod
    def _resize(self, n: int) -> None:
        """Set every array's length to ``n``, the keys array last."""

    @abstractmethod
    def _read_keys(self, a: int, b: int) -> np.ndarray: ...

    @abstractmethod
    def _write_keys(self, a: int, keys: np.ndarray) -> None: ...

    @abstractmethod
    def _read_flags(self, a: int, b: int) -> np.ndarray:
        """Raw completion flags (uint8): 0 reserved, 1 complete, 255 no chunk (Zarr)."""

    @abstractmethod
    def _write_flags(self, a: int, b: int, value: int) -> None: ...

    def _read_complete(self, a: int, b: int) -> np.ndarray:
        """(b - a,) bool: rows flagged complete."""
        return self._read_flags(a, b) == 1

    def _write_complete(self, a: int, b: int, flag: bool) -> None:
        self._write_flags(a, b, 1 if flag else 0)

    def _data_arrays(self) -> list[str]:
        """Names of the arrays holding row data (for `_sync_rows`)."""
        return list(self.schema.fields)

    @abstractmethod
    def _sync_rows(self, names: Sequence[str], a: int, b: int) -> None:
        """fsync the files holding rows ``[a, b)`` of arrays ``names``, and their directories."""

    @abstractmethod
    def _sync_meta(self) -> None:
        """fsync the attributes and array metadata."""

    def _rows_with_data(self, a: int, b: int) -> np.ndarray:
        """(b - a,) bool: rows whose data chunks exist (back ends that can lose a chunk override this)."""
        return np.ones(max(0, b - a), bool)

    def _flags_extent(self) -> int:
        """Rows of the completion flags worth scanning for orphans (verify); all by default."""
        return 2**62

    def _keys_present(self, a: int, b: int) -> np.ndarray:
        """(b - a,) bool: rows whose keys chunk exists (back ends that can lose a chunk override this; a
        chunk that is not a regular file raises StoreCorruptError)."""
        return np.ones(max(0, b - a), bool)

    def _missing_data(self, complete: np.ndarray) -> list[str]:
        """Problems: data files that the rows flagged in ``complete`` (bool over rows ``[0, n)``) need and
        that are absent."""
        return []

    @abstractmethod
    def _write_field(self, name: str, a: int, data: np.ndarray) -> None: ...

    def _write_fields(self, a: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write every field's block at rows ``[a, a + n)`` (back ends that pack fields override this)."""
        for f, d in arrays.items():
            self._write_field(f, a, d)

    @abstractmethod
    def _read_rows(self, fields: Sequence[str], rows: np.ndarray, views: bool = False) -> dict[str, np.ndarray]:
        """Hot path: ``{field: array (len(rows), T, ...)}`` for ``rows`` in any order (repeats allowed), in
        that order. ``views=True``: the arrays may be views of a larger buffer (the caller copies them)."""

    @abstractmethod
    def _clear_rows(self, a: int, b: int) -> None: ...

    @abstractmethod
    def dask_array(self, name: str) -> Any:
        """A dask array (N, T, ...) over field ``name``'s chunks (lazy; nothing is loaded)."""

    @abstractmethod
    def describe(self) -> list[dict[str, Any]]:
        """Per stored array: name, shape, dtype, chunks, shards, codecs, stored bytes, raw bytes."""
