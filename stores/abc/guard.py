"""`StoreGuard`: what a memorybank handle checks around its reads and writes beyond the checksums — the
identity of every row (`stores.abc.identity`), the store's generation, and the lock that serialises
changes of the split table.

**Generation.** Each split entry records a random ``uid``, new at every ``reserve_split``. A handle remembers
the split entries its key index was built from (at open / ``refresh``) and a signature of the root attributes'
file (Zarr: ``os.stat`` of ``zarr.json``: inode, size, mtime, ctime; object storage: its ETag, by one HEAD;
HDF5: ``os.stat`` of the file). Reads and writes compare the signature at most every ``generation_check_s``
(local: 0.05 s, object storage: 5 s; a failed chunk check always does): when it changed, the attributes are read again and every split of the index
that is gone, or whose ``start``/``count``/``keys_crc32c``/``uid`` changed, is *stale*; a read or write that
touches a stale split raises `StoreStaleError` naming it, never serves or overwrites another split's rows.
A failed chunk check (`StoreCorruptError`) re-checks the generation first, so a stale handle is reported
as such. ``refresh()`` reloads the attributes and clears it.

**Appends serialise.** ``reserve_split``, ``remove_split`` and ``reindex`` run under the store's lock (Zarr:
``fcntl.flock`` of the store directory; object storage: a lock object created with a conditional PUT; HDF5:
the library's own single-writer file lock) and re-read the attributes and array metadata inside it, so two
processes appending different splits at once get disjoint rows and both succeed.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from stores.abc.identity import RowIdentity, TagChunks, identity_problems, merge_tags
from stores.errors import StoreCorruptError, StoreStaleError
from stores.layout import keys_chunk_rows
from stores.schema import IDENTITY_SCHEMA_VERSION

GENERATION_FIELDS = ("start", "count", "keys_crc32c", "uid")


def changed_splits(mine: Mapping[str, Any], fresh: Mapping[str, Any] | None) -> dict[str, str]:
    """``{split: why}`` of the split entries ``mine`` that are gone from, or reserved anew in, ``fresh``."""
    out = {}
    for name, v in mine.items():
        f = (fresh or {}).get(name)
        if not isinstance(f, dict):
            out[name] = "was removed"
        elif any(f.get(k) != v.get(k) for k in GENERATION_FIELDS):
            out[name] = "was reserved anew (rewritten)"
    return out


class StoreGuard:
    """Mixin of `stores.abc.MemoryBank` (module docstring). Back ends override the primitives below; the
    defaults mean: no identity array, no lock, no generation signature. ``generation_check_s``: reads compare
    the signature at most this often (a ``stat`` flushes the TLB of a process that reads mapped shards: one
    per batch cost ~3 % of ``get_batch``); a failed chunk check always compares it."""

    generation_check_s = 0.05

    _attrs: dict[str, Any]
    path: str
    alignment: int

    def _guard_init(self) -> None:
        self._gen_sig: Any = None                   # signature of the attributes when they were (re)loaded
        self._seen_sig: Any = None                  # signature at the last generation check
        self._gen_checked = -1e9                    # time.monotonic() of the last signature read
        self._index_entries: dict[str, Any] = {}    # split entries the key index was built from
        self._stale: dict[str, str] = {}            # split -> why, of the index's splits changed on disk
        self._lock_depth = 0
        self._tagc: TagChunks | None = None
        self._keys_cache: tuple[int, np.ndarray] | None = None

    # ------------------------------------------------------------------ primitives (back ends)
    def _identity_arrays(self) -> list[str]:
        """The tag columns of a new store (its data arrays); [] = a back end without identity."""
        return []

    def _load_tags(self, c: int) -> Any | None:
        """Stored bytes (or a read-only map) of tag chunk ``c`` for readers, None when absent."""
        raise NotImplementedError

    def _read_tags_fresh(self, c: int) -> bytes | None:
        """Stored bytes of tag chunk ``c`` read now (writers), None when absent."""
        raise NotImplementedError

    def _put_tags(self, c: int, raw: bytes | None) -> None:
        """Replace tag chunk ``c`` by ``raw`` crash-safely (None: delete it)."""
        raise NotImplementedError

    def _tag_file(self, c: int) -> str:
        """Tag chunk ``c``'s name in messages."""
        return f"identity chunk {c}"

    def _row_crcs(self, array: str, a: int, b: int, block: Mapping[str, np.ndarray]) -> np.ndarray:
        """(b - a,) int64: the crc32c each row of ``[a, b)`` of data array ``array`` is checked with (-1 when
        its chunk is absent), after ``block`` (the rows just written, by field) was written."""
        raise NotImplementedError

    def _sync_tags(self, a: int, b: int) -> None:
        """fsync the tag chunks of rows ``[a, b)`` and their directories."""

    def _attrs_signature(self) -> Any:
        """Something that changes whenever the root attributes are rewritten (None: not checked)."""
        return None

    def _generation_due(self) -> bool:
        """Whether a read should compare the signature now: ``generation_check_s`` after the last time (or
        in a process that received this handle pickled, whose clock may differ)."""
        return not 0.0 <= time.monotonic() - self._gen_checked < self.generation_check_s

    def _read_attrs_fresh(self) -> dict[str, Any] | None:
        """The root attributes read now from the store (None when it is gone)."""
        return None

    def _reload_attrs(self) -> None:
        """Read the attributes and array metadata again (inside the lock, before changing the split table)."""

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The back end's lock of the split table (held by one handle of one process at a time)."""
        yield

    # ------------------------------------------------------------------ identity
    @property
    def has_identity(self) -> bool:
        """True when every row carries an identity tag (stores made since identity; older ones read unchecked)."""
        return isinstance(self._attrs.get("identity"), dict)

    def _identity_problems(self) -> list[str]:
        """What contradicts the ``identity`` attribute (checked at every open; Zarr adds its array's metadata),
        and its absence where the schema_version says the store was written with it (removed: a moved or
        foreign shard would then be served unchecked)."""
        if self.has_identity:
            return identity_problems(self._attrs, self._identity_arrays())
        v = self._attrs.get("schema_version")
        if isinstance(v, int) and v >= IDENTITY_SCHEMA_VERSION:
            return [f"attribute identity is missing, but every schema_version {v} store is written with it (it was "
                    "removed, so no row could be proven to be its key's own); restore the attributes from a backup "
                    "or export the store again"]
        return []

    def _identity(self) -> RowIdentity | None:
        """The salts of this store's rows (built once per attributes object), None without identity."""
        cache = self.__dict__.get("_ident_cache")
        if cache is None or cache[0] is not self._attrs:
            try:
                cache = self._ident_cache = (self._attrs, RowIdentity(self._attrs) if self.has_identity else None)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise StoreCorruptError(f"memorybank {self.path}: attribute identity or splits malformed ({e!r}): "
                                        f"run `python -m stores verify {self.path}`", path=self.path) from None
        return cache[1]

    def _tag_chunks(self) -> TagChunks:
        ident = self._identity()
        assert ident is not None
        if self._tagc is None or self._tagc.F != len(ident.arrays):
            self._tagc = TagChunks(self._load_tags, self.alignment, len(ident.arrays), self.path, self._tag_file)
        return self._tagc

    def _keys_at(self, rows: np.ndarray) -> np.ndarray:
        """The keys array's key of each of ``rows`` (object (n,), "" where none): for reads that were not asked
        by key (verify, stats). The last keys chunk read is kept."""
        rows = np.asarray(rows, np.int64)
        out = np.full(len(rows), "", dtype=object)
        C = keys_chunk_rows(self.alignment)
        for c in np.unique(rows // C).tolist():
            if self._keys_cache is None or self._keys_cache[0] != c:
                try:
                    self._keys_cache = (c, self._read_keys(c * C, min((c + 1) * C, self._n_rows())))  # type: ignore[attr-defined]
                except (StoreCorruptError, OSError):
                    continue
            sel = rows // C == c
            ks, within = self._keys_cache[1], rows[sel] - c * C
            got = np.full(len(within), "", dtype=object)
            ok = within < len(ks)
            got[ok] = ks[within[ok]]
            out[sel] = got
        return out

    def _read_found(self, fields: Sequence[str], rows: np.ndarray, keys: Sequence[str] | np.ndarray | None = None,
                    views: bool = False) -> dict[str, np.ndarray]:
        """``{field: (len(rows), T, ...)}`` of complete ``rows``: the generation checked first, and (a store with
        identity) every chunk against ``keys`` — the keys asked for, aligned with ``rows`` (None: the keys
        array's). A failed check of a stale handle raises `StoreStaleError`."""
        self._check_generation(rows)
        ident = self._identity()
        salts = None if ident is None else ident.salts(rows, self._keys_at(rows) if keys is None else keys)
        try:
            return self._read_rows(fields, rows, views, salts)      # type: ignore[attr-defined]
        except StoreCorruptError:
            self._check_generation(rows, force=True)
            raise

    def _expected_crcs(self, array: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(expected, untagged)``, (n,) each: the crc32c each of ``rows`` (read as the keys array's keys) must
        have in ``array`` by its identity tag (uint64; >= 2^32: none can), and whether it has no tag (`verify`).
        StoreCorruptError when a tag chunk is damaged."""
        ident, tc = self._identity(), self._tag_chunks()
        assert ident is not None
        rows = np.asarray(rows, np.int64)
        col = ident.columns[array]
        tags = np.array([tc.tag(r, col) for r in rows.tolist()], np.uint64)
        return ident.expected(ident.salts(rows, self._keys_at(rows)), array, tags), tags == 0

    def _tag_rows(self, a: int, b: int, block: Mapping[str, np.ndarray], keys: Sequence[str] | None) -> None:
        """Write the identity tags of rows ``[a, b)`` just written (``block``; their ``keys`` when known) —
        after their data, before their completion flags."""
        ident = self._identity()
        if ident is None or b <= a:
            return
        rows = np.arange(a, b, dtype=np.int64)
        salts = ident.salts(rows, self._keys_at(rows) if keys is None else keys)     # keys chunk kept between writes
        cols = []
        for name in ident.arrays:
            crcs = self._row_crcs(name, a, b, block)
            tags = ident.tags(salts, name, crcs)
            tags[crcs < 0] = 0                       # no chunk, no tag (never the case for a written row)
            cols.append(tags)
        self._write_tags(a, np.stack(cols, 1))
        if getattr(self, "fsync", False):
            self._sync_tags(a, b)                    # on disk before the flags that make the rows complete

    def _write_tags(self, a: int, tags: np.ndarray) -> None:
        """Store ``tags`` (n, F) at rows ``[a, a + n)``: each tag chunk touched read, merged, replaced."""
        S, F, b = self.alignment, tags.shape[1], a + len(tags)
        for c in range(a // S, -(-b // S)):
            lo, hi = max(a, c * S), min(b, (c + 1) * S)
            self._put_tags(c, merge_tags(self._read_tags_fresh(c), S, F, lo - c * S, tags[lo - a:hi - a]))
        if self._tagc is not None:
            self._tagc.clear()

    def _clear_tags(self, a: int, b: int) -> None:
        """Drop the tags of rows ``[a, b)`` (a removed split; its tag chunks are its own: splits are aligned)."""
        if self.has_identity and b > a:
            self._write_tags(a, np.zeros((b - a, len(self._attrs["identity"]["arrays"])), np.uint64))

    # ------------------------------------------------------------------ generation
    def _note_loaded(self) -> None:
        """The key index was (re)built from the current attributes: they are this handle's generation."""
        self._index_entries = {k: dict(v) for k, v in self._attrs.get("splits", {}).items()}
        self._stale = {}
        self._gen_checked = time.monotonic()        # the signature was just read (open, refresh)
        self._keys_cache = None
        if self._tagc is not None:
            self._tagc.clear()                      # writers replace tag chunks by rename: map them again

    def _check_generation(self, rows: np.ndarray | None = None, force: bool = False) -> None:
        """StoreStaleError when ``rows`` (None: any) lie in a split of the index that was removed or reserved
        anew since (module docstring); one signature comparison when nothing changed."""
        if self._stale:
            self._raise_stale(rows)
        if not force and not self._generation_due():
            return
        sig = self._attrs_signature()
        self._gen_checked = time.monotonic()
        if sig is None or (not force and sig in (self._gen_sig, self._seen_sig)):
            return
        fresh = self._read_attrs_fresh()
        self._stale.update(changed_splits(self._index_entries, None if fresh is None else fresh.get("splits")))
        self._seen_sig = sig
        if self._stale:
            self._raise_stale(rows)

    def _raise_stale(self, rows: np.ndarray | None) -> None:
        hit = []
        for name, why in self._stale.items():
            e = self._index_entries[name]
            s, c = int(e["start"]), int(e["count"])
            if rows is None or bool(((rows >= s) & (rows < s + c)).any()):
                hit.append(f"{name!r} {why}")
        if hit:
            names = [h.split("'")[1] for h in hit]
            raise StoreStaleError(f"memorybank {self.path}: split {', '.join(hit)} by another process since this "
                                  "handle loaded the store; nothing of it is served or written (its rows may now "
                                  "hold another split's data). Open the store again, or call bank.refresh()",
                                  path=self.path, splits=names)

    @contextlib.contextmanager
    def _split_table(self) -> Iterator[None]:
        """Hold the lock (re-entrant per handle) and work on the attributes read inside it."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        with self._exclusive():
            self._lock_depth, self._keys_cache = 1, None          # keys change under the lock: read them again
            try:
                sig = self._attrs_signature()
                if sig is None or sig != self._gen_sig:
                    self._reload_attrs()
                    self._stale.update(changed_splits(self._index_entries, self._attrs.get("splits")))
                yield
                self._gen_sig = self._attrs_signature()        # our own changes are not another's
            except BaseException:
                self._gen_sig = None                           # what is on disk now: read it again next time
                raise
            finally:
                self._lock_depth, self._keys_cache = 0, None
