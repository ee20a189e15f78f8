"""The files a local Zarr memorybank keeps for rows of no split (`stores.abc.leftovers`, the Zarr side): data
shards, completion-flag chunks and identity tag chunks wholly inside such rows, found with ``lstat`` (never
read), and the key index files of no split (deleted with the rest). On object storage (a URL) only the leftover keys are looked for: there ``rm-split`` deletes the shard
objects before the keys."""
from __future__ import annotations

import os

from stores.fsio import fsync_files, remove_path
from stores.index_file import index_files


class ZarrLeftovers:
    """`stores.abc.leftovers.Leftovers._leftovers` plus the files (mixed into `ZarrMemoryBank`)."""

    def _leftovers(self, a: int, b: int) -> list[str]:
        """What rows ``[a, b)`` (whole blocks of no split) still hold: their keys, and the store files that lie
        wholly inside them (paths relative to the store)."""
        out: list[str] = super()._leftovers(a, b)            # type: ignore[misc]
        store = str(self.path)                               # type: ignore[attr-defined]
        if "://" in store:
            return out
        files = []
        for name in self._arrays_on_disk():                  # type: ignore[attr-defined]
            r = self._reader(name)                           # type: ignore[attr-defined]
            if r is not None:
                R = r.rows_per_file
                files += [r.file_str(i) for i in range(-(-a // R), b // R)]
        S = self.alignment                                   # type: ignore[attr-defined]
        files += [str(self._chunk_path("complete", c)) for c in range(a // S, b // S)]    # type: ignore[attr-defined]
        if self.has_identity:                                # type: ignore[attr-defined]
            files += [str(self._tag_path(c)) for c in range(a // S, b // S)]              # type: ignore[attr-defined]
        there = [os.path.relpath(f, store) for f in files if os.path.lexists(f)]
        if there:
            out.append(f"{len(there)} file(s) ({', '.join(there[:4])}{' ...' if len(there) > 4 else ''})")
        return out

    def _clear_leftovers(self) -> list[tuple[int, int, list[str]]]:
        """`stores.abc.leftovers.Leftovers._clear_leftovers`, then the key index files of no split (local)."""
        found: list[tuple[int, int, list[str]]] = super()._clear_leftovers()    # type: ignore[misc]
        store = str(self.path)                               # type: ignore[attr-defined]
        if "://" not in store:
            stray = [p for name, p in index_files(store).items() if name not in self.splits]   # type: ignore[attr-defined]
            for p in stray:
                remove_path(p)
            if stray and self.fsync:                         # type: ignore[attr-defined]
                fsync_files([stray[0].parent], store)
        return found
