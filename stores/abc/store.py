"""`MemoryBank`: the abstract reader/writer API of a memorybank, shared by every back end.

Rows are a single global axis. A split owns the contiguous rows ``[start, start + count)``; ``start`` is a
multiple of ``alignment`` (the shard row count), so a new split never touches an existing split's chunks.
A row is *complete* once its data and then its flag in the ``complete`` mask are written; readers index
complete rows only. Writers that fill split positions ``[a, b)`` with ``a`` and ``b`` multiples of
``alignment`` (``b`` may be the split's end) never share a chunk or shard with another writer.

This class holds all back-end independent logic; a back end implements the ``@abstractmethod``
primitives at the end. It never imports a back end: `stores.factory` chooses one for a path.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from e2r.keys import split_of, validate_part
from stores.errors import NotAMemoryBankError, StoreReadOnlyError
from stores.index import KeyIndex, check_keys
from stores.layout import FORMAT_NAME, check_block, new_store_attrs, ranges_of
from stores.schema import Provenance, StoreSchema, check_compatible, json_attrs, now_iso


class MemoryBank(ABC):
    """A memorybank of teacher outputs indexed by sample key. Open with `stores.open_memorybank` /
    `stores.create_memorybank` (which pick the back end), or ``<BackEnd>.open`` / ``<BackEnd>.create``.

    Reading: ``has(key)``, ``keys(split)``, ``get(key)``, ``get_batch(keys, fields)``.
    Writing (mode "r+"): ``reserve_split``, ``incomplete_ranges``, ``task_ranges``, ``write_rows``,
    ``remove_split``. The key index is loaded once at open; call ``refresh()`` to see rows written since.
    """

    backend = "abstract"

    def __init__(self, path: str, mode: str) -> None:
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        self.path = str(path)
        self.mode = mode
        self._attrs: dict[str, Any] = {}
        self._index: KeyIndex | None = None

    # ------------------------------------------------------------------ opening (this back end)
    @classmethod
    def _concrete(cls) -> None:
        if getattr(cls, "__abstractmethods__", None):
            raise TypeError(f"{cls.__name__} is abstract: open or create stores with stores.open_memorybank / "
                            "stores.create_memorybank (they pick the back end for the path)")

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> "MemoryBank":
        """Open an existing store of this back end; ``mode="r"`` (read-only) or ``"r+"`` (write rows into
        reserved splits)."""
        cls._concrete()
        bank = cls(str(path), mode)
        bank._open_existing()
        bank._attrs = bank._read_attrs()
        if bank._attrs.get("format") != FORMAT_NAME:
            raise NotAMemoryBankError(f"{path} is not an e2r memorybank "
                                      f"(group attribute format={bank._attrs.get('format')!r})")
        bank.refresh()
        return bank

    @classmethod
    def create(cls, path: str | os.PathLike, schema: StoreSchema, provenance: Provenance, *,
               shard_rows: int | None = None, exist_ok: bool = True) -> "MemoryBank":
        """Create a store of this back end, or open an existing one for writing after checking that its
        schema and teacher match (StoreMismatchError says what differs). ``shard_rows`` (a power of two) is
        the alignment unit; default ``default_shard_rows(schema)``."""
        cls._concrete()
        if cls.exists(str(path)):
            if not exist_ok:
                raise FileExistsError(f"memorybank {path} already exists")
            bank = cls.open(path, mode="r+")
            check_compatible(bank.schema, bank.provenance, schema, provenance, str(path))
            return bank
        attrs = new_store_attrs(schema, provenance, shard_rows)
        bank = cls(str(path), "r+")
        bank._attrs = attrs
        bank._create_new(schema)
        bank._write_attrs(bank._attrs)
        bank.refresh()
        return bank

    # ------------------------------------------------------------------ properties
    @property
    def attrs(self) -> dict[str, Any]:
        """A copy of the group attributes (schema, provenance, splits, times, shard_rows)."""
        return json_attrs(self._attrs)

    @property
    def schema(self) -> StoreSchema:
        return StoreSchema.from_dict(self._attrs)

    @property
    def provenance(self) -> Provenance:
        return Provenance.from_dict(self._attrs)

    @property
    def alignment(self) -> int:
        """Rows per shard: concurrent writers must own split positions cut at multiples of this."""
        return int(self._attrs["shard_rows"])

    @property
    def splits(self) -> dict[str, tuple[int, int]]:
        """``{split: (start_row, count)}``."""
        return {k: (int(v["start"]), int(v["count"])) for k, v in self._attrs["splits"].items()}

    @property
    def n_rows(self) -> int:
        return self._n_rows()

    def __len__(self) -> int:
        return len(self._index or ())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, mode={self.mode!r}, complete_rows={len(self)})"

    # ------------------------------------------------------------------ reading
    def refresh(self) -> None:
        """(Re)load the key index from disk (complete rows only)."""
        n = self._n_rows()
        self._index = KeyIndex(self._read_keys(0, n), self._read_complete(0, n))

    def has(self, key: str) -> bool:
        """True when ``key`` has a complete row. Malformed keys raise InvalidKeyError."""
        assert self._index is not None
        return self._index.row(key) is not None

    def keys(self, split: str | None = None) -> list[str]:
        """Keys of complete rows, in row order; only those of ``split`` when given."""
        assert self._index is not None
        items = sorted(self._index.items(), key=lambda kv: kv[1])
        if split is None:
            return [k for k, _ in items]
        start, count = self._split(split)
        return [k for k, r in items if start <= r < start + count]

    def get(self, key: str, fields: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """``{field: array (T, ...)}`` of one key; KeyError when the key has no complete row."""
        out, missing = self.get_batch([key], fields)
        if missing:
            raise KeyError(f"key {key!r} is not in memorybank {self.path}")
        return {f: a[0] for f, a in out.items()}

    def get_batch(self, keys: Sequence[str], fields: Sequence[str] | None = None,
                  fill_missing: bool = False) -> tuple[dict[str, np.ndarray], list[str]]:
        """Read many keys with one vectorised read per field.

        Returns ``({field: array (B', T, ...)}, missing_keys)``: B' = the found keys, in request order
        (duplicates allowed). With ``fill_missing=True`` arrays have B = len(keys) rows, zeros where the key
        is missing, and ``out["found"]`` is a (B,) bool mask. Arrays have the store's dtype. Malformed keys
        raise InvalidKeyError; absent ones are reported, not raised.
        """
        assert self._index is not None
        fields = tuple(fields) if fields is not None else self.schema.fields
        stored = self.schema.fields
        for f in fields:
            if f not in stored:
                raise KeyError(f"field {f!r} is not stored in {self.path} (fields: {stored})")
        rows, missing = self._index.rows(list(keys))
        found = rows >= 0
        uniq, inv = np.unique(rows[found], return_inverse=True)
        data = self._read_rows(fields, uniq) if len(uniq) else {
            f: np.zeros((0, *self.schema.row_shape(f)), self.schema.dtype) for f in fields}
        out = {f: d[inv] for f, d in data.items()}
        if fill_missing:
            full = {}
            for f, d in out.items():
                a = np.zeros((len(rows), *d.shape[1:]), d.dtype)
                a[found] = d
                full[f] = a
            full["found"] = found
            out = full
        return out, missing

    def get_batch_into(self, keys: Sequence[str], out: Mapping[str, np.ndarray]) -> np.ndarray:
        """Read ``keys`` straight into caller-owned arrays ``out = {field: (B, T, ...)}`` (B = len(keys),
        any float dtype: values are cast on copy); rows of absent keys are zeroed. Returns ``found`` (B,)
        bool. One read of the needed rows (sorted, de-duplicated) for all fields; used by
        `stores.torch_data.MemoryBankDataset` to fill one shared float32 buffer per batch."""
        assert self._index is not None
        stored = self.schema.fields
        for f, o in out.items():
            if f not in stored:
                raise KeyError(f"field {f!r} is not stored in {self.path} (fields: {stored})")
            want = (len(keys), *self.schema.row_shape(f))
            if o.shape != want:
                raise ValueError(f"get_batch_into: out[{f!r}] has shape {o.shape}, expected {want}")
        rows, _ = self._index.rows(list(keys))
        found = rows >= 0
        pos = np.flatnonzero(found)
        if len(pos):
            uniq, inv = np.unique(rows[pos], return_inverse=True)
            data = self._read_rows(tuple(out), uniq)
            all_found = len(pos) == len(keys)
            for f, o in out.items():
                if all_found:
                    o[...] = data[f][inv]
                else:
                    o[pos] = data[f][inv]
        for o in out.values():
            if len(pos) < len(keys):
                o[~found] = 0
        return found

    # ------------------------------------------------------------------ writing
    def _need_write(self) -> None:
        if self.mode != "r+":
            raise StoreReadOnlyError(f"memorybank {self.path} is open read-only (mode='r'); open with mode='r+'")

    def _split(self, split: str) -> tuple[int, int]:
        try:
            return self.splits[split]
        except KeyError:
            raise KeyError(f"split {split!r} is not in memorybank {self.path} (splits: {sorted(self.splits)})") from None

    def reserve_split(self, split: str, keys: Sequence[str], replace: bool = False) -> tuple[int, int]:
        """Pre-allocate rows for ``split`` holding ``keys`` in this order; returns ``(start_row, count)``.

        Refuses a split that is already present unless ``replace=True`` (its rows are cleared first). Call
        from one process, before starting writers. Every key must be valid, belong to ``split`` and be unique.
        """
        self._need_write()
        validate_part(split, "split")
        keys = check_keys(list(keys), f"reserve_split({split!r})")
        for k in keys:
            if split_of(k) != split:
                raise ValueError(f"reserve_split({split!r}): key {k!r} belongs to split {split_of(k)!r}")
        if split in self.splits:
            if not replace:
                raise ValueError(f"split {split!r} already has {self.splits[split][1]} rows in {self.path}; "
                                 "pass replace=True (or run `python -m stores rm-split`) to rewrite it")
            self.remove_split(split)
        start = self._free_start(len(keys))
        if start + len(keys) > self._n_rows():
            self._resize(start + len(keys))
        if keys:
            self._write_keys(start, np.array(keys, dtype=object))
        self._attrs["splits"][split] = {"start": start, "count": len(keys)}
        self._attrs["updated"] = now_iso()
        self._write_attrs(self._attrs)
        return start, len(keys)

    def _free_start(self, count: int) -> int:
        """First row, a multiple of ``alignment``, of a free gap of ``count`` rows between splits (or the end)."""
        S = self.alignment
        pos = 0
        for s, c in sorted(self.splits.values()):
            if s - pos >= count:
                return pos
            pos = max(pos, -(-(s + c) // S) * S)
        return pos

    def split_keys(self, split: str) -> list[str]:
        """All reserved keys of ``split`` in reserved order (complete or not)."""
        start, count = self._split(split)
        return [str(k) for k in self._read_keys(start, start + count)]

    def incomplete_ranges(self, split: str) -> list[tuple[int, int]]:
        """Split-relative ``[a, b)`` position ranges whose rows are not complete yet (read fresh from disk)."""
        start, count = self._split(split)
        return ranges_of(~self._read_complete(start, start + count))

    def task_ranges(self, split: str, rows_per_task: int | None = None) -> list[tuple[int, int]]:
        """Cut a split's positions into ``[a, b)`` writer tasks on multiples of ``alignment``
        (``rows_per_task`` is rounded up to one). Tasks never share a chunk or shard."""
        _, count = self._split(split)
        S = self.alignment
        step = max(S, -(-int(rows_per_task or S) // S) * S)
        return [(a, min(a + step, count)) for a in range(0, count, step)]

    def write_rows(self, split: str, offset: int, block: Mapping[str, np.ndarray],
                   keys: Sequence[str] | None = None) -> None:
        """Write ``block = {field: array (n, T, ...)}`` at split positions ``[offset, offset + n)``: data
        first, then the rows' completion flags. Every stored field is required; values must be finite.
        ``keys``, when given, must equal the reserved keys at those positions."""
        self._need_write()
        start, count = self._split(split)
        arrays, n = check_block(self.schema, block, split, offset, self.path)
        if offset < 0 or offset + n > count:
            raise IndexError(f"write_rows({split!r}): positions [{offset}, {offset + n}) outside split of {count} rows")
        if keys is not None:
            have = self._read_keys(start + offset, start + offset + n)
            if len(keys) != n or any(str(a) != b for a, b in zip(have, keys)):
                raise ValueError(f"write_rows({split!r}, offset={offset}): keys differ from the reserved keys")
        if n == 0:
            return
        self._write_fields(start + offset, arrays)
        self._write_complete(start + offset, start + offset + n, True)

    def remove_split(self, split: str) -> None:
        """Delete a split's rows (data, keys, completion flags) and its entry."""
        self._need_write()
        start, count = self._split(split)
        if count:
            self._clear_rows(start, start + count)
        del self._attrs["splits"][split]
        self._attrs["updated"] = now_iso()
        self._write_attrs(self._attrs)
        self.refresh()

    def close(self) -> None:
        """Release file handles (the store on disk is always consistent; there is nothing to flush)."""

    def __enter__(self) -> "MemoryBank":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ back-end primitives
    @staticmethod
    @abstractmethod
    def exists(path: str) -> bool:
        """True when a store of this back end exists at ``path``."""

    @abstractmethod
    def _open_existing(self) -> None:
        """Open the store's files (FileNotFoundError when absent)."""

    @abstractmethod
    def _create_new(self, schema: StoreSchema) -> None:
        """Create empty arrays for ``schema``; ``self._attrs`` already holds the new root attributes."""

    @abstractmethod
    def _read_attrs(self) -> dict[str, Any]: ...

    @abstractmethod
    def _write_attrs(self, attrs: dict[str, Any]) -> None: ...

    @abstractmethod
    def _n_rows(self) -> int: ...

    @abstractmethod
    def _resize(self, n: int) -> None: ...

    @abstractmethod
    def _read_keys(self, a: int, b: int) -> np.ndarray: ...

    @abstractmethod
    def _write_keys(self, a: int, keys: np.ndarray) -> None: ...

    @abstractmethod
    def _read_complete(self, a: int, b: int) -> np.ndarray: ...

    @abstractmethod
    def _write_complete(self, a: int, b: int, flag: bool) -> None: ...

    @abstractmethod
    def _write_field(self, name: str, a: int, data: np.ndarray) -> None: ...

    def _write_fields(self, a: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write every field's block at rows ``[a, a + n)`` (back ends that pack fields override this)."""
        for f, d in arrays.items():
            self._write_field(f, a, d)

    @abstractmethod
    def _read_rows(self, fields: Sequence[str], rows: np.ndarray) -> dict[str, np.ndarray]:
        """Hot path: ``{field: array (len(rows), T, ...)}`` for sorted unique ``rows``."""

    @abstractmethod
    def _clear_rows(self, a: int, b: int) -> None: ...

    @abstractmethod
    def dask_array(self, name: str) -> Any:
        """A dask array (N, T, ...) over field ``name``'s chunks (lazy; nothing is loaded)."""

    @abstractmethod
    def describe(self) -> list[dict[str, Any]]:
        """Per stored array: name, shape, dtype, chunks, shards, codecs, stored bytes, raw bytes."""
