"""Leftovers of an interrupted change of the split table (`StoreBase` mixin; docs/STORE.md, "Orphan rows").

``remove_split`` deletes a split's entry, then clears its rows: completion flags, data files, keys, identity
tags, index file. Killed after the entry, it leaves *orphan* rows (flagged complete, of no split:
``orphan_ranges``); killed after the flags, it leaves *leftovers*: data shards, identity tag chunks and keys of
rows no split owns, flagged not complete (never served, never indexed). A ``reserve_split`` killed before its
entry leaves the like (keys and flag chunks of rows it never got). Neither touches a served row.

Here: which whole shard-sized blocks of rows belong to no split (`free_blocks`), what is left in them
(`leftover_ranges`: one entry per run of blocks, naming the files or keys), and clearing them
(`_clear_leftovers`: the same row clearing as ``remove_split``). ``verify`` lists them as leftovers;
``reindex``, the next ``rm-split`` and the next ``reserve_split`` clear them under the store's lock.
"""
from __future__ import annotations

import numpy as np

from stores.errors import StoreCorruptError
from stores.layout import ranges_of


class Leftovers:
    """Leftover rows of no split (module docstring). Mixed into `stores.abc.base.StoreBase`, whose primitives
    (``_n_rows``, ``splits``, ``alignment``, ``_read_flags``, ``_keys_present``, ``_read_keys``, ``_clear_rows``,
    ``_clear_tags``, ``_sync_rows``) it uses."""

    def free_blocks(self, orphans: bool = False) -> list[tuple[int, int]]:
        """``[a, b)`` row ranges made of whole blocks of ``alignment`` rows (shards) that no split touches, up to
        the arrays' length; without ``orphans``, blocks holding an orphan row (`orphan_ranges`') left out. Reads
        the completion flags of those blocks only."""
        S, n = self.alignment, self._n_rows()               # type: ignore[attr-defined]
        free = np.ones(-(-n // S), bool)
        for s, c in self.splits.values():                    # type: ignore[attr-defined]
            if c:
                free[s // S:-(-(s + c) // S)] = False
        if not orphans:
            for x, y in ranges_of(free.copy()):
                flags = self._read_flags(x * S, min(n, y * S))    # type: ignore[attr-defined]
                for p, q in ranges_of(flags == 1):
                    free[x + p // S:x + -(-q // S)] = False
        return [(x * S, min(n, y * S)) for x, y in ranges_of(free)]

    def leftover_ranges(self) -> list[tuple[int, int, list[str]]]:
        """``[(a, b, what)]``: runs of `free_blocks` (orphans aside) that still hold something (``what``: the
        files, or the keys, left there). Reads no data: stats, flags and the keys of those rows."""
        out = []
        for a, b in self.free_blocks():
            what = self._leftovers(a, b)
            if what:
                out.append((a, b, what))
        return out

    def _leftovers(self, a: int, b: int) -> list[str]:
        """What rows ``[a, b)`` of no split still hold: here their keys (back ends with files per block add
        those). A keys chunk that fails its checksum is named too."""
        out = []
        try:
            present = self._keys_present(a, b)                # type: ignore[attr-defined]
            for x, y in ranges_of(present):
                keys = np.asarray(self._read_keys(a + x, a + y), dtype=object)    # type: ignore[attr-defined]
                held = np.flatnonzero(keys != "")
                if len(held):
                    out.append(f"the keys of {len(held)} row(s) ({str(keys[held[0]])!r}"
                               f"{' ...' if len(held) > 1 else ''})")
        except StoreCorruptError as e:
            out.append(f"a damaged keys chunk ({e})")
        return out

    def _clear_leftovers(self) -> list[tuple[int, int, list[str]]]:
        """Clear every run of `free_blocks`, orphans included, that holds anything, like ``remove_split`` clears
        a split's rows (flags, data files deleted unread, keys, tags); the caller holds the store's lock.
        Returns what was cleared."""
        found = []
        for a, b in self.free_blocks(orphans=True):
            what = self._leftovers(a, b)
            flagged = int((self._read_flags(a, b) == 1).sum())    # type: ignore[attr-defined]
            if flagged:
                what.insert(0, f"{flagged} orphan row(s)")
            if not what:
                continue
            self._clear_rows(a, b)                           # type: ignore[attr-defined]
            self._clear_tags(a, b)                           # type: ignore[attr-defined]
            if self.fsync:                                   # type: ignore[attr-defined]
                self._sync_rows(["keys", "complete", *self._data_arrays()], a, b)    # type: ignore[attr-defined]
            found.append((a, b, what))
        return found
