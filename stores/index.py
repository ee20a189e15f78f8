"""Key -> row index of a memorybank: per split, its keys sorted as fixed-width ASCII bytes with their split
positions, searched by a vectorised binary search (``numpy.searchsorted``); nothing per key in Python objects.

One lookup, three sources. `SplitIndex.open` maps a split's index file read-only (schema_version 4, Zarr back
end; format in `stores.index_file`): opening costs a few KiB whatever the store's size, the pages are shared
by every process through the page cache, and each checksummed block is checked the first time a lookup lands
in it. `SplitIndex.from_bytes` takes the same file fetched whole from an object store (checked alike) and,
given how to fetch it again, moves it to an unlinked temporary file it maps (`stores.index_file.spill`): page
cache too, not private memory. `SplitIndex.build` sorts keys read (checked) from the store in memory: the HDF5
back end and stores of schema_version 3. `KeyIndex` joins the splits' indexes with the completion mask: only
complete rows are found.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from stores.keys import InvalidKeyError, validate_key
from stores.errors import StoreCorruptError
from stores.index_file import BLOCK, MappedIndex, index_from_bytes, map_index, sort_keys, spill


class SplitIndex:
    """The keys of one split (rows ``[start, start + count)``) -> rows, by binary search.

    ``find(q)`` takes keys as a bytes array and returns their rows (-1 when absent). A mapped index checks the
    crc32c of every block a search result lies in (once per process) and that the checked neighbours bracket
    the key, so a search misled by a damaged block elsewhere is detected too: it never returns a wrong row.
    """

    def __init__(self, split: str, start: int, count: int, mapped: MappedIndex | None = None, *,
                 path: Path | None = None, store: str = "", keys_crc32c: int | None = None) -> None:
        self.split, self.start, self.count = split, int(start), int(count)
        self.path, self.store, self.keys_crc32c = path, store, keys_crc32c
        self.where = str(path)                                # names the index in errors (a file or an object)
        self.fetched = False                                  # True: the bytes of a stored index (object store)
        self._fetch: Callable[[], bytes | None] | None = None  # fetches those bytes again (after pickling)
        self.duplicates: list[tuple[str, int, int]] = []      # (key, first row, other row); built indexes only
        self._m = mapped
        self._verified: np.ndarray | None = None

    @classmethod
    def open(cls, path: Path, store: str, split: str, start: int, count: int,
             keys_crc32c: int | None) -> "SplitIndex":
        """Map the index file of a split; FileNotFoundError when absent, StoreCorruptError when damaged or
        left over from other keys."""
        idx = cls(split, start, count, path=path, store=store, keys_crc32c=keys_crc32c)
        idx.mapped()
        return idx

    @classmethod
    def from_bytes(cls, buf: bytes, store: str, where: str, split: str, start: int, count: int,
                   keys_crc32c: int | None, fetch: Callable[[], bytes | None] | None = None) -> "SplitIndex":
        """The stored index file of a split as bytes (fetched from an object store; ``where`` names it):
        checked like `open` (header, block table), each block's crc32c on first use.

        With ``fetch`` (a picklable callable returning the same object's bytes again, None when it is gone),
        ``buf`` is copied into an unlinked temporary file mapped read-only (`stores.index_file.spill`; the
        caller then drops ``buf``): the index lives in the page cache, shared with forked workers, instead of
        ~22 bytes per key of private memory in each process; where the temporary directory is not writable it
        stays in memory. Pickling drops it (neither its bytes nor the map travel): the receiving process
        (a spawned worker, a dask task) calls ``fetch`` at its first lookup and checks those bytes afresh.
        Without ``fetch`` the index views ``buf`` and is pickled with its entries."""
        idx = cls(split, start, count, store=store, keys_crc32c=keys_crc32c)
        idx.where, idx.fetched, idx._fetch = where, True, fetch
        idx._load(buf)
        return idx

    def _load(self, buf: bytes) -> None:
        """Check and use the fetched bytes of the index (mapped from a temporary file when it can be fetched
        again)."""
        mm = spill(buf) if self._fetch is not None else None
        m = index_from_bytes(buf if mm is None else mm, self.store, Path(self.where), self.split, self.start,
                             self.count, self.keys_crc32c)
        self._m, self._verified = m, np.zeros(len(m.crcs), bool)

    @classmethod
    def build(cls, split: str, start: int, keys: np.ndarray) -> "SplitIndex":
        """In memory, from a split's keys as read from the store ("" = lost, not indexed). Duplicate keys are
        recorded in ``duplicates``; lookups find the first."""
        keys = np.asarray(keys, dtype=object)
        have = np.flatnonzero(keys != "")
        try:
            sorted_keys, order = sort_keys(keys[have].tolist())
        except UnicodeEncodeError:           # a key outside the grammar (damaged): not indexed, never found
            have = np.array([i for i in have.tolist() if str(keys[i]).isascii()], np.int64)
            sorted_keys, order = sort_keys(keys[have].tolist())
        pos = have[order.astype(np.int64)].astype("<u4")
        idx = cls(split, start, len(keys), MappedIndex(sorted_keys, pos, np.zeros((0, 2), "<u4"), BLOCK))
        for i in np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1]).tolist():
            idx.duplicates.append((sorted_keys[i].decode(), idx.start + int(pos[i]), idx.start + int(pos[i + 1])))
        return idx

    @property
    def on_disk(self) -> bool:
        """True for a stored index (a mapped file, or the fetched bytes of an object), False when built."""
        return self.path is not None or self.fetched

    @property
    def width(self) -> int:
        return self.mapped().keys.dtype.itemsize

    def mapped(self) -> MappedIndex:
        if self._m is None and self._fetch is not None:          # unpickled: fetched again in this process
            buf = self._fetch()
            if buf is None:
                raise FileNotFoundError(f"memorybank {self.store}: the key index of split {self.split!r} "
                                        f"({self.where}) is missing: open the store again")
            self._load(buf)
        if self._m is None:
            assert self.path is not None
            m = map_index(self.path, self.store, self.split, self.start, self.count, self.keys_crc32c)
            if m is None:
                raise FileNotFoundError(f"memorybank {self.store}: the key index of split {self.split!r} "
                                        f"({self.path}) is missing")
            self._m = m
            self._verified = np.zeros(len(m.crcs), bool)
        return self._m

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        if self.path is not None or self._fetch is not None:   # the other process maps / fetches it itself
            d["_m"], d["_verified"] = None, None
        return d

    def check_blocks(self, blocks: np.ndarray) -> None:
        """StoreCorruptError unless every block in ``blocks`` matches its crc32c (each checked once)."""
        m, seen = self.mapped(), self._verified
        if seen is None:                   # built in memory from checked keys
            return
        todo = blocks[~seen[blocks]]
        if not len(todo):
            return
        w = m.keys.dtype.itemsize
        kb, pb = m.keys.view(np.uint8), m.pos.view(np.uint8)
        for j in np.unique(todo).tolist():
            a, b = j * m.block, min(len(m.keys), (j + 1) * m.block)
            if (google_crc32c.value(kb[a * w:b * w]) != int(m.crcs[j, 0])
                    or google_crc32c.value(pb[4 * a:4 * b]) != int(m.crcs[j, 1])):
                raise self._corrupt(f"block {j} (entries [{a}, {b})) crc32c checksum mismatch - file corrupted")
            seen[j] = True

    def _corrupt(self, what: str) -> StoreCorruptError:
        return StoreCorruptError(f"memorybank {self.store}: key index of split {self.split!r} ({self.where}): {what}. "
                                 f"Rebuild it from the checksummed keys: `python -m stores reindex {self.store}`",
                                 path=self.store, array="keys/index", chunk=self.where)

    def check_all(self) -> None:
        """Check every block (``verify``)."""
        m = self.mapped()
        self.check_blocks(np.arange(len(m.crcs)))

    def find(self, q: np.ndarray) -> np.ndarray:
        """Rows (int64, -1 when absent) of the keys ``q`` (a bytes array ``S<n>``, any width)."""
        m = self.mapped()
        n, w = len(m.keys), m.keys.dtype.itemsize
        out = np.full(len(q), -1, np.int64)
        if not n or not len(q):
            return out
        qq = q.astype(f"S{w}") if q.dtype.itemsize != w else q     # exactly the index's width: no copy of it
        i = np.searchsorted(m.keys, qq)
        at = np.minimum(i, n - 1)
        hit = m.keys[at] == qq
        if q.dtype.itemsize > w:
            hit &= qq == q                                          # a longer key is not a truncated one
        if self._verified is not None and not self._verified[at // m.block].all():
            self.check_blocks(at // m.block)                        # a hit's entry is then authentic
        if not hit.all():
            self._check_misses(i[~hit], qq[~hit])
        p = m.pos[at[hit]].astype(np.int64)
        if len(p) and int(p.max()) >= self.count:
            raise self._corrupt(f"a position beyond the split's {self.count} rows")
        out[hit] = self.start + p
        return out

    def _check_misses(self, i: np.ndarray, qq: np.ndarray) -> None:
        """A key is absent only if the checked entries around where its search landed bracket it: a search
        misled by a damaged block elsewhere lands where they do not (StoreCorruptError), so damage never
        makes a stored key look absent."""
        m = self.mapped()
        n = len(m.keys)
        at, before = np.minimum(i, n - 1), np.maximum(i - 1, 0)
        self.check_blocks(np.concatenate([at, before]) // m.block)
        if not (((i == n) | (m.keys[at] >= qq)) & ((i == 0) | (m.keys[before] < qq))).all():
            raise self._corrupt("keys out of order where a search landed (a damaged block misled it)")


class KeyIndex:
    """Maps each key of a *complete* row to its row number, over all splits.

    ``splits`` ``{name: SplitIndex}``; ``complete`` (rows used,) bool: rows of a split whose flag says complete.
    A key is looked up in the index of the split its prefix names; rows reserved but not complete are not
    found, so readers never see them.
    """

    def __init__(self, splits: dict[str, SplitIndex], complete: np.ndarray) -> None:
        self.splits = splits
        self._complete = np.asarray(complete, bool)
        self._n = int(np.count_nonzero(self._complete))

    def __len__(self) -> int:
        return self._n

    @property
    def duplicates(self) -> list[tuple[str, int, int]]:
        return [d for s in self.splits.values() for d in s.duplicates]

    def complete_rows(self, a: int = 0, b: int | None = None) -> np.ndarray:
        """Rows (int64, ascending) of complete rows in ``[a, b)``."""
        return a + np.flatnonzero(self._complete[a:b])

    def count(self, a: int = 0, b: int | None = None) -> int:
        """How many rows of ``[a, b)`` are complete."""
        return int(np.count_nonzero(self._complete[a:b]))

    def row(self, key: str) -> int | None:
        """Row of a valid key, or None when absent. Raises InvalidKeyError for malformed keys."""
        r = int(self.rows([key])[0][0])
        return r if r >= 0 else None

    def rows(self, keys: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Rows (int64, -1 where absent) for ``keys`` in request order, and the list of absent keys.

        A malformed key raises InvalidKeyError naming it. (Indexed keys were validated when reserved, so only
        keys not found are validated here.)
        """
        rows, missing, _ = self.lookup(keys)
        return rows, missing

    def lookup(self, keys: Sequence[str]) -> tuple[np.ndarray, list[str], np.ndarray | None]:
        """`rows`, plus the keys as the bytes array ``S<w>`` they were searched with (None when some key is not
        ASCII: then none is found), which the identity check digests without converting them again."""
        keys = keys if isinstance(keys, list) else list(keys)
        out = np.full(len(keys), -1, np.int64)
        q = None
        try:
            joined = "".join(keys)
        except TypeError:                    # a key is not a string: validated below
            joined = ""
        # keys of the grammar are ASCII without NULs (numpy would drop trailing NULs): others are validated below
        if joined and joined.isascii() and "\x00" not in joined:
            q = np.array(keys, dtype="S")
            if len(self.splits) == 1:
                out[:] = next(iter(self.splits.values())).find(q)    # keys of other splits are not in it
            else:
                for name, idx in self.splits.items():           # a key's split is its prefix
                    sel = np.char.startswith(q, f"{name}/".encode())
                    if sel.all():
                        out[:] = idx.find(q)
                    elif sel.any():
                        out[sel] = idx.find(q[sel])
            hit = out >= 0
            hit[hit] = self._complete[out[hit]]
            out[~hit] = -1
        missing: list[str] = []
        for i in np.flatnonzero(out < 0).tolist():
            validate_key(keys[i])
            missing.append(keys[i])
        return out, missing, q


def check_keys(keys: Sequence[str], where: str) -> list[str]:
    """Validate a list of keys for writing: grammar and uniqueness. ``where`` names the source in errors."""
    seen: dict[str, int] = {}
    out = []
    for i, k in enumerate(keys):
        try:
            validate_key(k)
        except InvalidKeyError as e:
            raise InvalidKeyError(f"{where}: key #{i}: {e}") from None
        if k in seen:
            raise InvalidKeyError(f"{where}: key {k!r} appears twice (positions {seen[k]} and {i})")
        seen[k] = i
        out.append(k)
    return out
