"""`StoreBase`, the plain base of `stores.abc.MemoryBank`: the primitives a back end implements (attributes,
keys, completion flags, row reads/writes, durability and integrity hooks), the state every handle keeps, and
the key side built on them: the key index loaded at open / ``refresh``, listing keys, the keys of rows for
error messages, and the on-disk index of each split (written by ``reserve_split``, removed by
``remove_split``, rebuilt by ``reindex``).

Rows are global row numbers; ``[a, b)`` ranges are half-open. The primitives (``_``-named) are called by the
back-end independent logic here and in `MemoryBank`; they are not public API.

A schema_version 4 store of a back end with index files (Zarr) keeps one key index per split
(`stores.index_file`). Opening maps them and reads only the completion flags: O(rows / shard_rows) small file
reads and one byte per row of memory, never a Python object per key, and the mapped pages are shared by every
process. Stores of schema_version 3, and HDF5 stores, get the same index built in memory at open from their
keys (checked against each split's ``keys_crc32c``); ``reindex`` writes the files of a schema_version 3 Zarr
store and upgrades it to 4 in place.
"""
from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stores.abc.guard import StoreGuard
from stores.abc.leftovers import Leftovers
from stores.errors import StoreCorruptError, StoreError, StoreReadOnlyError
from stores.fsio import fsync_files, remove_path, writing
from stores.index import KeyIndex, SplitIndex, check_keys
from stores.index_file import index_files, write_index
from stores.keys import InvalidKeyError
from stores.layout import keys_chunk_rows, keys_crc32c, ranges_of
from stores.schema import INDEXED_SCHEMA_VERSIONS, INDEXLESS_SCHEMA_VERSIONS, StoreSchema, json_attrs, now_iso
from stores.validate import orphan_mask, split_damage, used_rows


class StoreBase(StoreGuard, Leftovers, ABC):
    """A memorybank handle's state, its back-end primitives (abstract) and its key side (see the module
    docstring). Back ends with index files set ``index_files = True`` and implement ``_index_path``. The
    identity, generation and lock checks come from `stores.abc.guard.StoreGuard`."""

    index_files = False
    schema: StoreSchema

    def __init__(self, path: str, mode: str, fsync: bool = True) -> None:
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        self.path = str(path)
        self.mode = mode
        self.fsync = bool(fsync)          # fsync data, then flags, on every write (crash/power-loss safety)
        self._attrs: dict[str, Any] = {}
        self._index: KeyIndex | None = None
        self._used_rows = 0                     # rows [0, used) that the splits occupy (at the last refresh)
        self._owned: dict[str, set[int]] = {}   # split -> shards this handle wrote into (alignment rule)
        self.sole_writer = False               # True: the alignment rule is not enforced (stores.convert)
        self._legacy_ok = False                 # open() may accept an older schema_version (`convert`)
        self._legacy = False                    # True: this store IS of an older schema_version
        self._lenient = False                   # True: a read-only handle that lists damage (verify)
        self.damage: list[str] = []             # what the last refresh() found lost (keys, flags, data files)
        self._lost_files: list[str] = []        # the data-file part of ``damage``
        self._read_damage: list[str] = []       # chunks of keys / complete that failed their checks (r+)
        self._guard_init()

    @property
    def alignment(self) -> int:
        """Rows per shard: concurrent writers must own split positions cut at multiples of this."""
        return int(self._attrs["shard_rows"])

    @property
    def splits(self) -> dict[str, tuple[int, int]]:
        """``{split: (start_row, count)}``."""
        return {k: (int(v["start"]), int(v["count"])) for k, v in self._attrs["splits"].items()}

    def _need_write(self) -> None:
        if self.mode != "r+":
            raise StoreReadOnlyError(f"memorybank {self.path} is open read-only (mode='r'); open with mode='r+'")

    def _split(self, split: str) -> tuple[int, int]:
        try:
            return self.splits[split]
        except KeyError:
            raise KeyError(f"split {split!r} is not in memorybank {self.path} (splits: {sorted(self.splits)})") from None

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
    def _read_rows(self, fields: Sequence[str], rows: np.ndarray, views: bool = False,
                   salts: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Hot path: ``{field: array (len(rows), T, ...)}`` for ``rows`` in any order (repeats allowed), in
        that order. ``views=True``: the arrays may be views of a larger buffer (the caller copies them).
        ``salts`` ((len(rows),) uint64, `stores.abc.identity.RowIdentity.salts`): check every row's identity
        tag (StoreCorruptError naming the chunk and key when one does not match); None: unchecked."""

    @abstractmethod
    def _clear_rows(self, a: int, b: int) -> None: ...

    @abstractmethod
    def dask_array(self, name: str) -> Any:
        """A dask array (N, T, ...) over field ``name``'s chunks (lazy; nothing is loaded)."""

    @abstractmethod
    def describe(self) -> list[dict[str, Any]]:
        """Per stored array: name, shape, dtype, chunks, shards, codecs, stored bytes, raw bytes."""

    # ------------------------------------------------------------------ the key side
    def _index_path(self, split: str) -> Path:
        raise NotImplementedError

    @property
    def disk_index(self) -> bool:
        """True when this store keeps its key index on disk (schema_version 4 or 5 on a back end with index files)."""
        return self.index_files and self._attrs.get("schema_version") in INDEXED_SCHEMA_VERSIONS

    def refresh(self) -> None:
        """(Re)load the completion flags and the key index from disk (and the attributes, when another process
        changed them: the handle then sees the current splits and no longer reports stale ones, see
        `stores.abc.guard`). A read-only handle refuses
        (StoreCorruptError) a store whose split rows lost their keys, completion flags, key index or data
        files; a writable one opens it (``damage`` lists what was found) so that ``incomplete_ranges`` lets a
        resumed writer redo those rows, or ``remove_split`` / ``reserve_split(replace=True)`` / ``reindex``
        rewrite them."""
        if not self._lock_depth:
            sig = self._attrs_signature()
            if sig is not None and sig != self._gen_sig:
                self._reload_attrs()             # another process changed the split table: see it now
            self._gen_sig = sig
        n = self._n_rows()
        self._read_damage = []
        entries = self._attrs.get("splits", {})
        used = self._used_rows = min(used_rows(entries), n)
        flags = self._read_flags(0, used)
        indexes: dict[str, SplitIndex] = {}
        problems: list[str] = []
        keys_lost = np.zeros(used, bool)
        for name, (s, c) in self.splits.items():
            idx, keys_lost[s:s + c], probs = self._split_index(name, s, c, entries[name])
            problems += probs
            if idx is not None:
                indexes[name] = idx
        ident = self._identity_problems()
        if ident and not self._lenient:          # edited or foreign attributes: no handle may read or write
            raise StoreCorruptError(f"memorybank {self.path}: " + "; ".join(ident) + f". Restore the attributes "
                                    f"(zarr.json) or re-export; `python -m stores verify {self.path}` lists the rest",
                                    path=self.path)
        problems += ident
        complete, damage = split_damage(self.splits, flags, keys_lost, self._keys_of)
        del flags, keys_lost
        self._lost_files = self._missing_data(complete)
        self.damage = self._read_damage + problems + damage + self._lost_files
        if self.damage and self.mode == "r" and not self._lenient:
            raise StoreCorruptError(f"memorybank {self.path} is damaged: " + "; ".join(self.damage) + ". Nothing is "
                                    f"served from it. Run `python -m stores verify {self.path}` for details; resume "
                                    "the export (it redoes rows whose flags or data are missing) or re-export",
                                    path=self.path)
        self._index = KeyIndex(indexes, complete)
        self._note_loaded()

    def _split_index(self, name: str, s: int, c: int, entry: dict[str, Any]
                     ) -> tuple[SplitIndex | None, np.ndarray, list[str]]:
        """``(index, keys lost (c,) bool, problems)`` of one split: its index file mapped, or (schema_version
        3, HDF5, or a damaged file on a writable / verify handle) built from its keys."""
        crc = entry.get("keys_crc32c")
        problems = []
        if self.disk_index:
            lost = ~self._keys_present(s, s + c)
            try:
                return self._open_split_index(name, s, c, crc), lost, []
            except FileNotFoundError as e:
                problems.append(f"{e}: rebuild it from the checksummed keys: `python -m stores reindex {self.path}`")
            except StoreCorruptError as e:
                problems.append(str(e))
            if self.mode == "r" and not self._lenient:
                return None, lost, problems                  # refused by refresh
        keys = self._read_keys(s, s + c)
        lost = keys == ""
        if crc is not None and not lost.any() and keys_crc32c(keys) != crc:
            problems.append(f"the keys of split {name!r} do not match their checksum (keys_crc32c)")
        return SplitIndex.build(name, s, keys), lost, problems

    def _open_split_index(self, name: str, s: int, c: int, crc: int | None) -> SplitIndex:
        """The stored key index of split ``name`` (rows ``[s, s + c)``, ``keys_crc32c`` ``crc``): its file mapped.
        FileNotFoundError when absent, StoreCorruptError when damaged or of other keys."""
        return SplitIndex.open(self._index_path(name), self.path, name, s, c, crc)

    def _keys_of(self, rows: Iterable[int]) -> list[str]:
        """Keys of ``rows`` in that order (for error messages): read on demand; rows without a readable key are
        skipped."""
        rows = [int(r) for r in rows]
        want = sorted({r for r in rows if 0 <= r < getattr(self, "_used_rows", 0)})
        got: dict[int, str] = {}
        C = keys_chunk_rows(self.alignment)
        try:
            for _, grp in itertools.groupby(want, key=lambda r: r // C):
                g = list(grp)
                ks = self._read_keys(g[0], g[-1] + 1)
                got.update((r, str(ks[r - g[0]])) for r in g)
        except (StoreError, OSError):
            pass
        return [got[r] for r in rows if got.get(r)]

    def keys(self, split: str | None = None) -> list[str]:
        """Keys of complete rows, in row order; only those of ``split`` when given (read from the keys array)."""
        assert self._index is not None
        out: list[str] = []
        for s, c in (sorted(self.splits.values()) if split is None else [self._split(split)]):
            done = self._index.complete_rows(s, s + c)
            if len(done):
                ks = self._read_keys(s, s + c)[done - s]
                out += [str(k) for k in ks if k]
        return out

    def complete_rows(self, split: str | None = None) -> np.ndarray:
        """Store rows (int64) of the complete rows, in row order: aligned with ``keys(split)``."""
        assert self._index is not None
        if split is None:
            return self._index.complete_rows()
        s, c = self._split(split)
        return self._index.complete_rows(s, s + c)

    def complete_count(self, split: str | None = None) -> int:
        """How many complete rows the store (or ``split``) holds (from the index: nothing is read)."""
        assert self._index is not None
        if split is None:
            return len(self._index)
        s, c = self._split(split)
        return self._index.count(s, s + c)

    # ------------------------------------------------------------------ the on-disk index of a split
    def _write_split_index(self, split: str, start: int, keys: list[str], crc: int) -> None:
        """Write ``split``'s index file (before its split entry; no-op without on-disk indexes)."""
        if self.disk_index:
            write_index(self._index_path(split), split, start, crc, keys, fsync=self.fsync)

    def _remove_split_index(self, split: str) -> None:
        """Delete ``split``'s index file (after its entry and rows)."""
        if self.index_files:
            p = self._index_path(split)
            remove_path(p)
            if self.fsync:
                fsync_files([p.parent], self.path)

    def orphan_ranges(self) -> list[tuple[int, int]]:
        """``[a, b)`` row ranges flagged complete that belong to no split (`stores.validate.orphan_mask`): what an
        rm-split interrupted between removing the split's entry and clearing its rows leaves. ``verify`` lists
        them (the same rows: flags up to the last chunk present), ``reindex`` clears them."""
        n = self._n_rows()
        flags = self._read_flags(0, max(self._used_rows, min(n, self._flags_extent())))
        return ranges_of(orphan_mask(flags, self.splits))

    def reindex(self) -> list[str]:
        """Clear the orphan rows (`orphan_ranges`: their flags, data, keys and tags) and the leftovers of rows of
        no split (`leftover_ranges`), then write the on-disk key index of
        every split from its keys (read through their checksums and checked against the split's
        ``keys_crc32c``, the key grammar and uniqueness), delete index files of no split, then upgrade a
        schema_version 3 store to 4 (its keys keep their encoding). Returns the splits indexed; ``[]`` on a back
        end without index files (HDF5: its index is built at open; orphans are cleared). Run it while no other
        process writes the store."""
        self._need_write()
        with self._split_table(), writing("clear orphan rows", self.path):
            for a, b in self.orphan_ranges():
                self._clear_rows(a, b)
                self._clear_tags(a, b)
                if self.fsync:
                    self._sync_rows(["keys", "complete", *self._data_arrays()], a, b)
            self._clear_leftovers()
        done = self._write_indexes() if self.index_files else []
        self.refresh()
        return done

    def _write_indexes(self) -> list[str]:
        """`reindex`'s index files (see there); returns the splits indexed."""
        done = []
        with self._split_table(), writing("rebuild the key index", self.path):
            entries = self._attrs.get("splits", {})
            for name, (s, c) in sorted(self.splits.items()):
                self._read_damage = []
                keys = [str(k) for k in self._read_keys(s, s + c)]
                try:
                    if self._read_damage:
                        raise InvalidKeyError("; ".join(self._read_damage))
                    check_keys(keys, f"split {name!r}")
                    wrong = [k for k in keys if not k.startswith(name + "/")]
                    if wrong:
                        raise InvalidKeyError(f"key {wrong[0]!r} does not belong to split {name!r}")
                    crc = keys_crc32c(keys)
                    if entries[name].get("keys_crc32c", crc) != crc:
                        raise InvalidKeyError("the keys do not match their checksum (keys_crc32c)")
                except InvalidKeyError as e:
                    raise StoreCorruptError(f"memorybank {self.path}: cannot index split {name!r}: {e}. Its keys are "
                                            f"damaged: remove the split (`python -m stores rm-split {self.path} "
                                            f"{name}`) and export it again", path=self.path, array="keys") from None
                write_index(self._index_path(name), name, s, crc, keys, fsync=self.fsync)
                done.append(name)
            for name, p in index_files(self.path).items():
                if name not in self.splits:
                    remove_path(p)
            if self._attrs.get("schema_version") in INDEXLESS_SCHEMA_VERSIONS:    # files first, then the version
                attrs = json_attrs(self._attrs)          # 3 -> 4: the keys keep their encoding (convert changes it)
                attrs["schema_version"], attrs["updated"] = min(INDEXED_SCHEMA_VERSIONS), now_iso()
                self._write_attrs(attrs)
                self._attrs = attrs
                if self.fsync:
                    self._sync_meta()
        return done
