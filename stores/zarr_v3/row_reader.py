"""Fast random-row reader for Zarr v3 arrays stored one row per (inner) chunk — the memorybank's hot path.

The memorybank writes standard Zarr v3 arrays (zarr-python) whose first axis is the row and whose chunk is
one whole row, usually inside shards of S rows (``sharding_indexed`` codec, index at the end of the shard
file, index codecs ``bytes`` + ``crc32c``; inner chunk codecs ``bytes`` + compressor + ``crc32c``). Reading
a batch of random rows then needs, per row, one slice of one shard file, one checksum and one decode. This
module does exactly that with no async runtime:

* each shard file is checked to be a regular file (``os.stat``; opened with O_NONBLOCK, so a FIFO or device
  in its place is refused, never read), ``mmap``-ed read-only on first use, and its index (S x (offset,
  nbytes) uint64, crc32c checked once) kept;
* each requested inner chunk's crc32c (google_crc32c, hardware accelerated) is checked BEFORE it is
  decompressed, then it is decoded straight into the output array (numcodecs blosc / zstd, ``out=``).

With ``strict=True`` (the memorybank's setting: it only asks for rows marked complete) a missing shard file
or an empty index entry for a requested row is corruption, not fill values. Every failed check raises
`StoreCorruptError` naming the store, the array, the shard file + inner chunk index and the keys of the
rows (via ``keys_of``). Fork safe by construction (no threads; a forked worker maps its own files).

Maps are opened lazily per process and dropped by ``invalidate()``: a writer replaces a shard file by
rename, so a reader must drop its maps after new rows were completed (``MemoryBank.refresh`` does).
"""
from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable, Sequence
from itertools import repeat
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from stores.abc.identity import U64, TagChunks, mismatch_reason
from stores.errors import StoreCorruptError, UnsupportedLayout
from stores.fsio import open_regular, read_json, read_regular

_EMPTY = np.uint64(2**64 - 1)
_EMPTY_INT = 2**64 - 1
_U32 = struct.Struct("<I")     # a chunk's stored crc32c, little-endian
KeysOf = Callable[[Sequence[int]], list[str]]


def chunk_decoder(codecs: list[dict[str, Any]], dtype: np.dtype) -> tuple[Any, bool]:
    """``(decompress(src, dest) or None, crc)`` for a Zarr v3 codec chain ``[bytes, <compressor>?,
    crc32c?]`` (little-endian bytes only): numcodecs' C functions, no per-call wrapper."""
    if not codecs or codecs[0].get("name") != "bytes":
        raise UnsupportedLayout(f"codec chain {codecs} does not start with 'bytes'")
    endian = (codecs[0].get("configuration") or {}).get("endian", "little")
    if dtype.itemsize > 1 and endian != "little":
        raise UnsupportedLayout(f"endian {endian!r}")
    rest = list(codecs[1:])
    crc = bool(rest) and rest[-1].get("name") == "crc32c"
    if crc:
        rest = rest[:-1]
    if not rest:
        return None, crc
    if len(rest) > 1:
        raise UnsupportedLayout(f"more than one compressor: {rest}")
    name, cfg = rest[0]["name"], rest[0].get("configuration", {})
    # numcodecs codecs are imported lazily: only the compressor a store actually uses is loaded
    if name == "blosc":
        from numcodecs import blosc
        return blosc.decompress, crc   # blosc frames are self-describing (cname, shuffle, typesize in the header)
    if name == "zstd":
        from numcodecs import zstd
        return zstd.decompress, crc
    raise UnsupportedLayout(f"codec {name!r} ({cfg})")


class RowChunkReader:
    """Reads rows of one Zarr v3 array at ``array_dir`` whose chunk (or inner chunk of a shard) is one row.

    ``read(rows)`` -> array (len(rows), *row_shape) for sorted ``rows`` (int64). ``store`` / ``name`` /
    ``keys_of(rows) -> keys`` only make error messages precise. Raises UnsupportedLayout at construction
    for other layouts, and StoreCorruptError for a damaged shard or chunk.
    """

    def __init__(self, array_dir: str | os.PathLike, *, store: str = "", name: str = "", strict: bool = False,
                 keys_of: KeysOf | None = None, meta: dict[str, Any] | None = None,
                 fields: Sequence[str] = ()) -> None:
        self.dir = Path(array_dir)
        self._label = f"array {name or self.dir.name!r}" + (f" (fields {', '.join(fields)})" if fields else "")
        self.store, self.name, self.strict, self._keys_of = str(store), name or self.dir.name, strict, keys_of
        if meta is None:
            meta = read_json(self.dir / "zarr.json", self.store)
            if meta is None:
                raise StoreCorruptError(f"{self.dir / 'zarr.json'} is missing", path=self.store, array=self.name)
        try:
            self._parse(meta)
        except (KeyError, TypeError, ValueError) as e:
            raise UnsupportedLayout(f"{self.dir}: unexpected array metadata ({type(e).__name__}: {e})") from None
        self._files: dict[int, tuple[Any, np.ndarray | None, np.ndarray | None]] = {}
        self._views: dict[int, memoryview] = {}
        self.tags: TagChunks | None = None      # the store's identity tags (set by the bank), column tag_col
        self.tag_col = 0

    def _parse(self, meta: dict[str, Any]) -> None:
        self.shape = tuple(int(x) for x in meta["shape"])
        self.dtype = np.dtype(meta["data_type"])
        grid = [int(x) for x in meta["chunk_grid"]["configuration"]["chunk_shape"]]
        enc = meta.get("chunk_key_encoding", {})
        if enc.get("name") != "default" or enc.get("configuration", {}).get("separator", "/") != "/":
            raise UnsupportedLayout(f"chunk key encoding {enc}")
        codecs = meta["codecs"]
        if codecs and codecs[0]["name"] == "sharding_indexed":
            cfg = codecs[0]["configuration"]
            inner = [int(x) for x in cfg["chunk_shape"]]
            idx_codecs = [c["name"] for c in cfg.get("index_codecs", [])]
            if cfg.get("index_location", "end") != "end" or idx_codecs not in (["bytes"], ["bytes", "crc32c"]):
                raise UnsupportedLayout(f"shard index {cfg.get('index_location')} {idx_codecs}")
            self.rows_per_file, self.sharded = grid[0], True
            self._index_crc = "crc32c" in idx_codecs
            codecs = cfg["codecs"]
        else:
            inner, self.rows_per_file, self.sharded, self._index_crc = grid, 1, False, False
        if inner[0] != 1 or list(inner[1:]) != list(self.shape[1:]) or list(grid[1:]) != list(self.shape[1:]):
            raise UnsupportedLayout(f"chunk {inner} in shard {grid} is not one whole row of {self.shape}")
        if self.rows_per_file <= 0:
            raise UnsupportedLayout(f"shard of {self.rows_per_file} rows")
        self._decompress, self.crc = chunk_decoder(codecs, self.dtype)
        fill = meta.get("fill_value", 0)
        self.fill = 0 if fill is None else (np.nan if fill == "NaN" else fill)
        self.row_shape = self.shape[1:]
        self.row_items = int(np.prod(self.row_shape))
        self.row_nbytes = self.row_items * self.dtype.itemsize
        self._tail = len(self.shape) - 1
        chunk_cap = self.row_nbytes + self.row_nbytes // 8 + 1024      # any codec's worst case, with room to spare
        self.max_file_bytes = self.rows_per_file * chunk_cap + 16 * self.rows_per_file + 4

    def invalidate(self) -> None:
        """Forget every mapped file (call after rows were written by anyone)."""
        self._files.clear()
        self._views.clear()

    # ------------------------------------------------------------------ files
    def file_path(self, i: int) -> Path:
        return Path(self.file_str(i))

    def file_str(self, i: int) -> str:
        """`file_path` as a string (cheap: one per shard at every open)."""
        return f"{self.dir}{os.sep}c{os.sep}{i}" + f"{os.sep}0" * self._tail

    def chunk_name(self, i: int, k: int | None = None) -> str:
        rel = self.file_path(i)
        try:
            rel = rel.relative_to(self.store) if self.store else rel
        except ValueError:
            pass
        return f"{rel}" + (f" inner chunk {k}" if k is not None and self.sharded else "")

    def _corrupt(self, msg: str, i: int, rows: Sequence[int] = (), k: int | None = None) -> StoreCorruptError:
        keys = self._keys_of(list(rows)) if self._keys_of is not None and len(rows) else []
        where = f"memorybank {self.store}: " if self.store else ""
        return StoreCorruptError(f"{where}{self._label}, {self.chunk_name(i, k)}: {msg}", path=self.store,
                                 array=self.name, chunk=self.chunk_name(i, k), keys=keys)

    def _open(self, i: int) -> tuple[Any, np.ndarray | None, np.ndarray | None]:
        """``(mmap or None when the file is absent, index (S, 2) or None, uint8 view)`` of file ``i``."""
        got = self._files.get(i)
        if got is not None:
            return got
        p = self.file_path(i)
        first = i * self.rows_per_file
        span = range(first, first + self.rows_per_file)
        try:
            opened = open_regular(p, self.store, self.name)
        except StoreCorruptError as e:
            raise self._corrupt(str(e), i, span) from None
        if opened is None:
            got = (None, None, None)
            self._files[i] = got
            return got
        fd, size = opened
        try:
            if size == 0:
                raise self._corrupt("empty file (truncated)", i, span)
            self.check_size(i, size)
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        index = self._index_of(i, mm, len(mm)) if self.sharded else None
        got = (mm, index, np.frombuffer(mm, np.uint8))
        self._views[i] = memoryview(mm)      # before _files: a thread that finds _files[i] finds its view
        self._files[i] = got
        return got

    def check_size(self, i: int, size: int) -> None:
        """StoreCorruptError when file ``i`` of ``size`` bytes is larger than its rows can make it (checked
        before it is mapped or read: a sparse 8 GiB file is refused by its size, never allocated)."""
        if size > self.max_file_bytes:
            first = i * self.rows_per_file
            raise self._corrupt(f"{size} bytes, more than {self.rows_per_file} row(s) of {self.row_nbytes} bytes "
                                f"can encode to (at most {self.max_file_bytes}): not read", i,
                                range(first, first + self.rows_per_file))

    def _index_of(self, i: int, buf: Any, size: int) -> np.ndarray:
        """The checked shard index (S, 2) of file ``i`` from ``buf`` (its mmap, or its last bytes)."""
        n = self.rows_per_file
        nidx = 16 * n + (4 if self._index_crc else 0)
        if size < nidx:
            raise self._corrupt(f"{size} bytes, shorter than its {nidx}-byte index (truncated)", i)
        raw = bytes(buf[len(buf) - nidx:])
        if self._index_crc and google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise self._corrupt("shard index checksum (crc32c) mismatch - file corrupted", i)
        index = np.frombuffer(raw, "<u8", count=2 * n).reshape(n, 2)
        full = index[:, 0] != _EMPTY
        if full.any() and int((index[full, 0] + index[full, 1]).max()) > size - nidx:
            raise self._corrupt("shard index points past the end of the data - file corrupted", i)
        if self.crc and full.any() and int(index[full, 1].min()) < 4:
            raise self._corrupt("an inner chunk is shorter than its checksum - file corrupted", i)
        return index

    def _fresh_index(self, i: int) -> np.ndarray | None:
        """File ``i``'s index read now from disk (not cached; None when the file is absent); all-present
        for unsharded files."""
        p = self.file_path(i)
        try:
            opened = open_regular(p, self.store, self.name)
        except StoreCorruptError as e:
            raise self._corrupt(str(e), i) from None
        if opened is None:
            return None
        fd, size = opened
        try:
            if not self.sharded:
                if size == 0:
                    raise self._corrupt("empty file (truncated)", i)
                return np.zeros((1, 2), np.uint64)
            nidx = 16 * self.rows_per_file + (4 if self._index_crc else 0)
            tail = os.pread(fd, nidx, max(0, size - nidx))
        finally:
            os.close(fd)
        return self._index_of(i, tail, size)

    def read_shard(self, i: int) -> tuple[bytes, np.ndarray] | None:
        """``(bytes, checked index (S, 2))`` of shard file ``i`` read now from disk (not the cached map; a
        writer merging rows into it), None when it is absent; StoreCorruptError when it is damaged."""
        if not self.sharded:
            raise UnsupportedLayout(f"{self.dir} is not sharded")
        try:
            raw = read_regular(self.file_path(i), self.store, self.name, max_bytes=self.max_file_bytes + 1)
        except StoreCorruptError as e:
            raise self._corrupt(str(e), i) from None
        if raw is None:
            return None
        if len(raw) > self.max_file_bytes:
            self.check_size(i, os.stat(self.file_path(i)).st_size)
        return raw, self._index_of(i, raw, len(raw))

    # ------------------------------------------------------------------ reading
    def read(self, rows: Sequence[int] | np.ndarray, salts: np.ndarray | None = None) -> np.ndarray:
        """Rows ``rows`` (in-range, any order, repeats allowed) as an array (len(rows), *row_shape) of the
        array's dtype, in the order asked: each row is decoded straight into its place (files are visited in
        row order). ``salts`` ((len(rows),) uint64, `RowIdentity.array_salts`): each chunk's identity tag is
        checked too (``tags`` must be set; per file vectorised when the rows lie in few files, else per row)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.row_shape), self.dtype)
        if not len(rows):
            return out
        flat = out.reshape(len(rows), self.row_items)
        S = self.rows_per_file
        tags = self.tags if salts is not None else None
        groups = self.by_file(rows)
        few = tags is not None and len(groups) <= 8
        if tags is not None and not few:
            toff, sl, tag_of = tags.offsets(rows, self.tag_col), salts.tolist(), U64.unpack_from   # type: ignore[union-attr]
        for i, group in groups:
            mm, index, _ = self._open(i)
            if mm is None:
                if self.strict:
                    raise self.missing_file(i, rows[group])
                flat[group] = self.fill
                continue
            rg, positions = rows[group], group.tolist()
            spans = [[0, len(mm)]] * len(group) if index is None else index[rg % S].tolist()
            expect = None                              # tag ^ salt of each row: vectorised per file, or per row
            if few:
                expect = tags.expected(i * S // tags.S, rg, salts[group], self.tag_col)  # type: ignore[union-attr,index]
            elif tags is not None:
                raw = tags.raw(i * S // tags.S)
                expect = [tag_of(raw, toff[j])[0] ^ sl[j] for j in positions]
            self._decode_group(i, positions, spans, rows, flat, expect)
        return out

    def by_file(self, rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """``[(file i, positions in rows of the rows it holds)]`` in file order (rows: int64 (n,), any order)."""
        pos = np.argsort(rows, kind="stable") if (rows[1:] < rows[:-1]).any() else np.arange(len(rows))
        files = rows[pos] // self.rows_per_file
        cuts = [0, *(np.flatnonzero(files[1:] != files[:-1]) + 1).tolist(), len(pos)]
        return [(int(files[a]), pos[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]

    def missing_file(self, i: int, rows: Sequence[int]) -> StoreCorruptError:
        return self._corrupt("shard file is missing, but rows it holds are marked complete (deleted or lost; "
                             "resume the export to recompute them)", i, rows)

    def missing_chunk(self, i: int, row: int) -> StoreCorruptError:
        return self._corrupt("inner chunk is missing from the shard, but its row is marked complete (lost by a "
                             "writer that broke the alignment rule?)", i, [row], row % self.rows_per_file)

    def foreign(self, i: int, row: int, tag: int) -> StoreCorruptError:
        """The chunk of ``row`` (file ``i``) failed its identity check (stored ``tag``)."""
        key = self._keys_of([row]) if self._keys_of is not None else []
        return self._corrupt(f"row {row}{f' (key {key[0]!r})' if key else ''} failed its identity check: "
                             f"{mismatch_reason(tag)}", i, [row], row % self.rows_per_file)

    def bad_checksum(self, i: int, row: int) -> StoreCorruptError:
        return self._corrupt(f"row {row} does not decode: crc32c checksum mismatch (chunk data corrupted)", i, [row],
                             row % self.rows_per_file)

    def _decode_group(self, i: int, positions: list[int], spans: list[list[int]], rows: np.ndarray,
                      flat: np.ndarray, expect: list[int] | None = None) -> None:
        """Check and decode the chunks ``spans`` [(offset, nbytes)] of mapped file ``i`` into
        ``flat[positions]`` (``rows[positions]`` name them in errors). Per row: the crc32c of the chunk's bytes
        against the 4 stored after them, BEFORE anything is decoded; with ``expect`` (tag ^ salt of each row,
        aligned with ``positions``), the identity tag too; then the decode of `decode_into`, inlined here (this
        loop is the store's hot path: a call per row cost ~6 % of ``get_batch``)."""
        mm, _, u8 = self._files[i]
        view, value, tail = self._views[i], google_crc32c.value, 4 if self.crc else 0
        dest = memoryview(flat.reshape(-1).view(np.uint8))
        nbytes, decompress, stored_crc = self.row_nbytes, self._decompress, _U32.unpack_from
        j = -1
        try:
            for j, (off, nb), e in zip(positions, spans, expect if expect is not None else repeat(None)):
                if off == _EMPTY_INT:
                    if self.strict:
                        raise self.missing_chunk(i, int(rows[j]))
                    flat[j] = self.fill
                    continue
                end = off + nb - tail
                if tail:
                    crc = value(u8[off:end])     # value() needs a read-only buffer without a release hook: the
                    if crc != stored_crc(mm, end)[0]:                # numpy view of the map, not the memoryview
                        raise self.bad_checksum(i, int(rows[j]))
                    if e is not None and e != crc:
                        raise self.foreign(i, int(rows[j]), self.tags.tag(int(rows[j]), self.tag_col))  # type: ignore[union-attr]
                got = view[off:end] if decompress is None else decompress(view[off:end])
                if len(got) != nbytes:
                    raise ValueError(f"{len(got)} bytes, expected {nbytes}")
                dest[j * nbytes:(j + 1) * nbytes] = got
        except StoreCorruptError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder error means a corrupt chunk
            raise self._corrupt(f"row {int(rows[j])} does not decode ({type(e).__name__}: {e})", i, [int(rows[j])],
                                int(rows[j]) % self.rows_per_file) from None

    def decode_into(self, i: int, src: Any, dest: memoryview, j: int, row: int) -> None:
        """Decode the checked chunk bytes ``src`` (without their checksum) of ``row`` (file ``i``) into slot
        ``j`` of ``dest`` (the output's bytes). Without ``dest=`` numcodecs allocates the output in C; with one
        it runs Python checks on it that cost more than the copy. The decoded length must be one row."""
        nbytes = self.row_nbytes
        try:
            got = src if self._decompress is None else self._decompress(src)
            if len(got) != nbytes:
                raise ValueError(f"{len(got)} bytes, expected {nbytes}")
            dest[j * nbytes:(j + 1) * nbytes] = got
        except Exception as e:  # noqa: BLE001 - any decoder error means a corrupt chunk
            raise self._corrupt(f"row {row} does not decode ({type(e).__name__}: {e})", i, [row],
                                row % self.rows_per_file) from None

    # ------------------------------------------------------------------ integrity (writers, verify)
    def present(self, a: int, b: int) -> np.ndarray:
        """(b - a,) bool: rows ``[a, b)`` whose chunk exists (file present, index entry non-empty), read fresh
        from disk (shard indexes only, nothing cached); a damaged shard raises StoreCorruptError."""
        out = np.zeros(max(0, b - a), bool)
        S = self.rows_per_file
        for i in range(a // S, -(-b // S)):
            index = self._fresh_index(i)
            if index is None:
                continue
            lo, hi = max(a, i * S), min(b, (i + 1) * S)
            out[lo - a:hi - a] = index[lo - i * S:hi - i * S, 0] != _EMPTY if self.sharded else True
        return out

    def scan(self, i: int, check: Callable[[int, np.ndarray], str | None] | None = None,
             expect: dict[int, tuple[int, bool]] | None = None) -> tuple[np.ndarray, list[tuple[int, str]]]:
        """Check every chunk of file ``i`` (verify): ``(present (S,) bool, [(row, problem)])``; a whole-file
        problem is reported with row -1. Every present chunk's checksum is checked and it is decoded;
        ``check(row, values)`` may report a problem with the decoded values; ``expect`` ``{row: (crc32c its
        identity tag says, untagged)}`` has the identity of those rows checked."""
        S = self.rows_per_file
        present = np.zeros(S, bool)
        try:
            mm, index, _ = self._open(i)
        except StoreCorruptError as e:
            return present, [(-1, str(e))]
        if mm is None:
            return present, []
        spans = [[0, len(mm)]] if index is None else index.tolist()
        present[:] = index[:, 0] != _EMPTY if index is not None else True
        problems: list[tuple[int, str]] = []
        scratch = np.empty((1, self.row_items), self.dtype)
        for k in np.flatnonzero(present).tolist():
            row = i * S + k
            try:
                self._decode_group(i, [0], [spans[k]], np.array([row]), scratch)
            except StoreCorruptError as e:
                problems.append((row, str(e)))
                continue
            if expect is not None and row in expect and self.crc and \
                    _U32.unpack_from(mm, spans[k][0] + spans[k][1] - 4)[0] != expect[row][0]:
                problems.append((row, str(self.foreign(i, row, 0 if expect[row][1] else 1))))
            if check is not None:
                msg = check(row, scratch[0].reshape(self.row_shape))
                if msg:
                    problems.append((row, msg))
        return present, problems

    def files_present(self) -> list[int]:
        """Indices of the files (shards) present under ``c/`` (directory listing only)."""
        try:
            return sorted(int(e.name) for e in os.scandir(self.dir / "c") if e.name.isdigit())
        except FileNotFoundError:
            return []

