"""`MemoryBank`: the abstract reader/writer API of a memorybank, shared by every back end.

Rows are a single global axis. A split owns the contiguous rows ``[start, start + count)``; ``start`` is a
multiple of ``alignment`` (the shard row count), so a new split never touches an existing split's chunks.
A row is *complete* once its data and then its flag in the ``complete`` mask are written (each fsync-ed
unless ``fsync=False``); readers index complete rows only. Writers that fill split positions ``[a, b)`` with
``a`` and ``b`` multiples of ``alignment`` (``b`` may be the split's end) never share a chunk or shard with
another writer; ``write_rows`` refuses writes that break this rule (`stores.layout.check_alignment`).
A store is created under a temporary name and renamed into place (`stores.abc.lifecycle`): it exists whole
or not at all. Opening validates the attributes against the arrays (`stores.validate`), reads the completion
flags and maps the key index (`stores.abc.base`); a read-only handle refuses a store whose rows have lost
their keys, completion flags, key index or data files.

This class holds the reader/writer API; its plain base `stores.abc.base.StoreBase` declares the
``@abstractmethod`` primitives a back end implements and builds the key side on them. A back end is one class
deriving from `MemoryBank`. Nothing here imports a back end: `stores.factory` chooses one for a path.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stores.keys import split_of, validate_part
from stores.abc.base import StoreBase
from stores.abc.identity import new_split_uid
from stores.abc.inspection import Inspection
from stores.abc.lifecycle import check_version, create_store, not_a_bank
from stores.fsio import writing
from stores.index import check_keys
from stores.layout import COMPLETE_UNSET, check_alignment, check_block, keys_crc32c, ranges_of
from stores.schema import LEGACY_SCHEMA_VERSIONS, Provenance, StoreSchema, json_attrs, now_iso


class MemoryBank(StoreBase):
    """A memorybank of teacher outputs indexed by sample key. Open with `stores.open_memorybank` /
    `stores.create_memorybank` (which pick the back end), or ``<BackEnd>.open`` / ``<BackEnd>.create``.

    Reading: ``has(key)``, ``keys(split)``, ``complete_count(split)``, ``get(key)``, ``get_batch(keys,
    fields)``. Writing (mode "r+"): ``reserve_split``, ``incomplete_ranges``, ``task_ranges``, ``write_rows``,
    ``remove_split``, ``reindex``. The completion flags are read and the key index mapped once at open; call
    ``refresh()`` to see rows written since.
    """

    backend = "abstract"

    # ------------------------------------------------------------------ opening (this back end)
    @classmethod
    def _concrete(cls) -> None:
        if getattr(cls, "__abstractmethods__", None):
            raise TypeError(f"{cls.__name__} is abstract: open or create stores with stores.open_memorybank / "
                            "stores.create_memorybank (they pick the back end for the path)")

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", *, fsync: bool = True,
             legacy: bool = False, lenient: bool = False) -> "MemoryBank":
        """Open an existing store of this back end; ``mode="r"`` (read-only) or ``"r+"`` (write rows into
        reserved splits). ``fsync=False`` skips the fsyncs of writes (faster; a power loss may then lose
        recently completed rows, which ``verify`` reports and a resume redoes). ``legacy=True`` (used by
        `stores.convert`) reads a store of an older schema_version, read-only. ``lenient=True`` (used by
        `stores.verify`) opens a damaged store read-only instead of refusing it; ``damage`` lists what is lost."""
        cls._concrete()
        bank = cls(str(path), mode, fsync)
        bank._legacy_ok = bool(legacy)
        if legacy and mode != "r":
            raise ValueError("stores of an older schema_version open read-only (for `python -m stores convert`)")
        bank._open_checked(lenient)
        return bank

    def _open_checked(self, lenient: bool) -> None:
        """Read the attributes (checked against the arrays) and the key index; ``lenient``: see `open`."""
        if lenient and self.mode != "r":
            raise ValueError("a damaged store is opened leniently read-only only (mode='r')")
        self._lenient = bool(lenient)
        self._gen_sig = self._attrs_signature()      # before the attributes are read: a change after is seen
        self._attrs = self._open_existing()
        self.refresh()

    def inspect(self) -> Inspection:
        """The raw readers and key index of this bank, for `stores.verify` (see `Inspection`)."""
        return Inspection(keys_of=self._keys_of, read_keys=self._read_keys, read_flags=self._read_flags,
                          read_complete=self._read_complete, flags_extent=self._flags_extent,
                          read_rows=self._read_found, index=self._index, lost_files=tuple(self._lost_files),
                          expected_crcs=self._expected_crcs if self.has_identity else None)

    @classmethod
    def create(cls, path: str | os.PathLike, schema: StoreSchema, provenance: Provenance, *,
               shard_rows: int | None = None, exist_ok: bool = True, fsync: bool = True) -> "MemoryBank":
        """Create a store of this back end, or open an existing one for writing after checking that its
        schema and teacher match (StoreMismatchError says what differs). ``shard_rows`` (a power of two) is
        the alignment unit; default ``default_shard_rows(schema)``. Creation is atomic (built under a
        temporary name, renamed into place): after a crash a re-run succeeds; of two concurrent creators one
        creates and the other opens its store."""
        cls._concrete()
        return create_store(cls, str(path), schema, provenance, shard_rows, exist_ok, fsync)

    def _check_version(self, attrs: dict[str, Any]) -> None:
        check_version(self.path, attrs, self._legacy_ok)
        self._legacy = attrs.get("schema_version") in LEGACY_SCHEMA_VERSIONS

    def _not_a_bank(self, why: str) -> Exception:
        return not_a_bank(self.path, why)

    # ------------------------------------------------------------------ properties
    @property
    def attrs(self) -> dict[str, Any]:
        """A copy of the group attributes (schema, provenance, splits, times, shard_rows)."""
        return json_attrs(self._attrs)

    @property
    def schema(self) -> StoreSchema:
        """The store's schema (a fresh object: callers may change it, e.g. `convert`)."""
        return StoreSchema.from_dict(self._attrs)

    def _fixed(self) -> StoreSchema:
        """The schema for the hot path: built once per attributes object (never handed out)."""
        cache = self.__dict__.get("_schema_cache")
        if cache is None or cache[0] is not self._attrs:
            cache = self._schema_cache = (self._attrs, StoreSchema.from_dict(self._attrs))
        return cache[1]

    @property
    def provenance(self) -> Provenance:
        return Provenance.from_dict(self._attrs)

    @property
    def n_rows(self) -> int:
        return self._n_rows()

    def __len__(self) -> int:
        return len(self._index or ())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, mode={self.mode!r}, complete_rows={len(self)})"

    # ------------------------------------------------------------------ reading
    def has(self, key: str) -> bool:
        """True when ``key`` has a complete row. Malformed keys raise InvalidKeyError."""
        assert self._index is not None
        return self._index.row(key) is not None

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
        is missing, and ``out["found"]`` is a (B,) bool mask. Arrays have the store's dtype (depth: uint8). Malformed keys
        raise InvalidKeyError; absent ones are reported, not raised.
        """
        assert self._index is not None
        schema = self._fixed()
        fields = tuple(fields) if fields is not None else schema.fields
        stored = schema.fields
        for f in fields:
            if f not in stored:
                raise KeyError(f"field {f!r} is not stored in {self.path} (fields: {stored})")
        rows, missing, q = self._index.lookup(list(keys))
        found = rows >= 0
        asked = None if q is None else q if len(missing) == 0 else q[found]
        out = self._read_found(fields, rows[found], asked) if found.any() else {
            f: np.zeros((0, *schema.row_shape(f)), schema.field_dtype(f)) for f in fields}
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
        bool. One read of the needed rows for all fields, each decoded once and copied once; used by
        `stores.torch_data.MemoryBankDataset` to fill one shared float32 buffer per batch."""
        assert self._index is not None
        schema = self._fixed()
        stored = schema.fields
        for f, o in out.items():
            if f not in stored:
                raise KeyError(f"field {f!r} is not stored in {self.path} (fields: {stored})")
            want = (len(keys), *schema.row_shape(f))
            if o.shape != want:
                raise ValueError(f"get_batch_into: out[{f!r}] has shape {o.shape}, expected {want}")
        rows, _, q = self._index.lookup(list(keys))
        found = rows >= 0
        pos = np.flatnonzero(found)
        if len(pos):
            all_found = len(pos) == len(keys)
            asked = None if q is None else q if all_found else q[pos]
            data = self._read_found(tuple(out), rows[pos], asked, views=True)    # decoded in request order
            for f, o in out.items():
                if all_found:
                    o[...] = data[f]
                else:
                    o[pos] = data[f]
        for o in out.values():
            if len(pos) < len(keys):
                o[~found] = 0
        return found

    # ------------------------------------------------------------------ writing
    def reserve_split(self, split: str, keys: Sequence[str], replace: bool = False) -> tuple[int, int]:
        """Pre-allocate rows for ``split`` holding ``keys`` in this order; returns ``(start_row, count)``.

        Refuses a split that is already present unless ``replace=True`` (its rows are cleared first). Runs under
        the store's lock on the attributes as they are on disk then, so processes appending different splits at
        once get disjoint rows (`stores.abc.guard`); call it before starting the split's writers. Every key must
        be valid, belong to ``split`` and be unique.
        """
        self._need_write()
        validate_part(split, "split")
        keys = check_keys(list(keys), f"reserve_split({split!r})")
        for k in keys:
            if split_of(k) != split:
                raise ValueError(f"reserve_split({split!r}): key {k!r} belongs to split {split_of(k)!r}")
        with self._split_table():           # appends serialise; the split table as it is on disk now
            if split in self.splits:
                if not replace:
                    raise ValueError(f"split {split!r} already has {self.splits[split][1]} rows in {self.path}; "
                                     "pass replace=True (or run `python -m stores rm-split`) to rewrite it")
                self.remove_split(split)
            start = self._reserve_rows(split, keys)
        self._owned.pop(split, None)
        return start, len(keys)

    def _reserve_rows(self, split: str, keys: list[str]) -> int:
        """`reserve_split` under the lock: rows in the first free gap, keys, flags, index, then the entry (with
        a new ``uid``: the reservation's generation). Returns the start row."""
        start = self._free_start(len(keys))
        end = start + len(keys)
        S = self.alignment
        with writing(f"reserve split {split!r}", self.path):
            self._clear_leftovers()                          # rows an interrupted rm-split left: taken clean
            if end > self._n_rows():
                self._resize(end)
            tail = min(-(-end // S) * S, self._n_rows())
            self._write_flags(start, end, 0)                 # every reserved row's flag chunk exists
            self._write_flags(end, tail, COMPLETE_UNSET)     # rest of the last chunk: unused
            if keys:
                self._write_keys(start, np.array(keys, dtype=object))
            if self.fsync:
                self._sync_rows(["keys", "complete"], start, tail)
                self._sync_meta()
            crc = keys_crc32c(keys)
            self._write_split_index(split, start, keys, crc)   # on disk before the entry that makes it used
            attrs = json_attrs(self._attrs)
            attrs["splits"][split] = {"start": start, "count": len(keys), "keys_crc32c": crc, "uid": new_split_uid()}
            attrs["updated"] = now_iso()
            self._write_attrs(attrs)                         # the entry last: a crash leaves no half split
            self._attrs = attrs
            if self.fsync:
                self._sync_meta()
        return start

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

    def incomplete_ranges(self, split: str, within: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """Split-relative ``[a, b)`` position ranges whose rows are not complete yet (read fresh from disk):
        rows without their completion flag, and rows flagged complete whose data are missing or damaged (a lost
        shard or inner chunk; on a local Zarr store also a chunk failing its crc32c), so a resumed writer
        redoes them all instead of skipping them. ``within=(a, b)``: only split positions ``[a, b)`` (a task's)."""
        start, count = self._split(split)
        lo, hi = (0, count) if within is None else (max(0, int(within[0])), min(count, int(within[1])))
        done = self._read_complete(start + lo, start + max(lo, hi))
        for x, y in ranges_of(done):            # only rows flagged complete need their data checked
            done[x:y] &= self._rows_with_data(start + lo + x, start + lo + y)
        return [(lo + x, lo + y) for x, y in ranges_of(~done)]

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
        first (fsync-ed), then the rows' completion flags (fsync-ed). Every stored field is required; values
        must be finite. ``keys``, when given, must equal the reserved keys at those positions. A write that
        breaks the alignment rule (`stores.layout.check_alignment`: it starts inside a shard this handle is
        not filling and whose earlier rows are not complete) raises ValueError."""
        self._need_write()
        start, count = self._split(split)
        arrays, n = check_block(self.schema, block, split, offset, self.path)
        if offset < 0 or offset + n > count:
            raise IndexError(f"write_rows({split!r}): positions [{offset}, {offset + n}) outside split of {count} rows")
        self._check_generation(np.array([start + offset, start + max(offset, offset + n - 1)]))
        have = None
        if keys is not None:
            have = self._read_keys(start + offset, start + offset + n)
            if len(keys) != n or any(str(a) != b for a, b in zip(have, keys)):
                raise ValueError(f"write_rows({split!r}, offset={offset}): keys differ from the reserved keys")
        if n == 0:
            return
        if not self.sole_writer:
            check_alignment(split, offset, n, self.alignment, self._owned.setdefault(split, set()),
                            lambda lo, hi: bool(self._read_complete(start + lo, start + hi).all()))
        a, b = start + offset, start + offset + n
        with writing(f"write rows [{offset}, {offset + n}) of split {split!r}", self.path):
            self._write_fields(a, arrays)
            if self.fsync:
                self._sync_rows(self._data_arrays(), a, b)
            self._tag_rows(a, b, arrays, have)               # identity: after the data, before the flags
            self._write_complete(a, b, True)
            if self.fsync:
                self._sync_rows(["complete"], a, b)

    def remove_split(self, split: str) -> None:
        """Delete a split's entry, then its rows (data, identity tags, keys, completion flags), then what an earlier
        interrupted rm-split left (`leftover_ranges`), under the store's lock. Handles of other processes that read or write the split then get `StoreStaleError` naming it."""
        self._need_write()
        with self._split_table(), writing(f"remove split {split!r}", self.path):
            start, count = self._split(split)
            attrs = json_attrs(self._attrs)
            del attrs["splits"][split]
            attrs["updated"] = now_iso()
            self._write_attrs(attrs)           # entry first: a crash leaves invisible rows, never a broken split
            self._attrs = attrs
            if self.fsync:
                self._sync_meta()
            if count:
                self._clear_rows(start, start + count)
                self._clear_tags(start, start + count)
                if self.fsync:
                    self._sync_rows(["keys", "complete", *self._data_arrays()], start, start + count)
            self._remove_split_index(split)
            self._clear_leftovers()            # what an earlier interrupted rm-split or reserve_split left
            self._owned.pop(split, None)
            self.refresh()

    def close(self) -> None:
        """Release file handles (the store on disk is always consistent; there is nothing to flush)."""

    def __enter__(self) -> "MemoryBank":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
