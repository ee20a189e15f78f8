"""Bulk encoder of whole Zarr v3 shards (one row per inner chunk) — the memorybank's write path.

zarr-python encodes a shard one inner chunk at a time through its async codec pipeline (~0.5 ms of overhead
per row). Writers of a memorybank write whole, aligned shards (`stores.layout.check_alignment`), so the Zarr
back end encodes each shard here instead, in one pass, and writes it with one crash-safe file write:

* each row's bytes (``bytes`` codec: C order, little endian) are compressed by the same numcodecs C function
  zarr-python calls, with the same parameters (blosc: cname, clevel, shuffle, blocksize, typesize; zstd:
  level, checksum), and followed by their crc32c (google_crc32c, little endian) — the ``crc32c`` codec;
* the chunks are laid out in row order (zarr's morton order of a (S, 1, ..., 1) chunk grid), rows equal to
  the fill value everywhere are left out (``write_empty_chunks=False``), and the shard index
  (S x (offset, nbytes) uint64 little endian, 2^64-1 for an absent chunk) follows them with its own crc32c;
* rows of the shard outside the block written keep their stored chunk bytes (copied, not re-encoded, as
  zarr-python does; the old shard's index is checked first: `stores.zarr_v3.row_reader.RowChunkReader.read_shard`).

So a shard written here is byte-identical to the one zarr-python writes for the same rows and codecs
(``tests/test_store_bulk_write.py``), and zarr-python, dask, xarray, ``verify`` and the row reader read it
unchanged. `write_file` puts a shard in place: temporary name next to it (``*.partial``, like zarr-python's),
fsync when asked, rename. Layouts it does not handle raise `UnsupportedLayout` at construction (the bank then
writes through zarr-python).
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import google_crc32c
import numpy as np
from numcodecs import blosc, zstd

from stores.errors import UnsupportedLayout
from stores.fsio import remove_path, write_atomic

EMPTY = 2**64 - 1                        # shard index entry of an absent inner chunk
_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}
Chunk = bytes | memoryview
_MIN_THREAD_BYTES = 4 * 2**20           # raw bytes per thread below which one thread encodes (start-up cost)


def encode_threads() -> int:
    """Threads a writer compresses shards on: the CPUs this process may use, at most 8 (zarr-python's own
    write path encoded on a thread pool too)."""
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:                  # no sched_getaffinity (macOS)
        return max(1, min(8, os.cpu_count() or 1))


def _little(codec: dict[str, Any], dtype: np.dtype, what: str) -> None:
    if codec.get("name") != "bytes":
        raise UnsupportedLayout(f"{what} codec chain does not start with 'bytes': {codec}")
    endian = (codec.get("configuration") or {}).get("endian", "little")
    if dtype.itemsize > 1 and endian != "little":
        raise UnsupportedLayout(f"{what} endian {endian!r}")


def _compressor(codec: dict[str, Any] | None) -> Callable[[Any], bytes] | None:
    """The numcodecs C function zarr-python's codec ``codec`` calls, bound to its configuration."""
    if codec is None:
        return None
    name, cfg = codec.get("name"), codec.get("configuration") or {}
    if name == "blosc":
        cname = str(cfg["cname"]).encode()
        clevel, shuffle = int(cfg["clevel"]), _SHUFFLE[str(cfg["shuffle"])]
        blocksize, typesize = int(cfg.get("blocksize", 0)), int(cfg["typesize"])   # zarr v3 always records it
        return lambda buf: blosc.compress(buf, cname, clevel, shuffle, blocksize, typesize)
    if name == "zstd":
        level, checksum = int(cfg.get("level", 0)), bool(cfg.get("checksum", False))
        return lambda buf: zstd.compress(buf, level, checksum)
    raise UnsupportedLayout(f"codec {name!r} ({cfg})")


class ShardCodec:
    """Encodes the shards of one sharded Zarr v3 array whose inner chunk is one whole row, from its
    ``zarr.json`` ``meta``; UnsupportedLayout for any other layout or codec chain."""

    def __init__(self, meta: dict[str, Any]) -> None:
        try:
            self._parse(meta)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise UnsupportedLayout(f"unexpected array metadata ({type(e).__name__}: {e})") from None

    def _parse(self, meta: dict[str, Any]) -> None:
        shape = [int(x) for x in meta["shape"]]
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        codecs = meta["codecs"]
        if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
            raise UnsupportedLayout("not a sharded array")
        cfg = codecs[0]["configuration"]
        grid = [int(x) for x in meta["chunk_grid"]["configuration"]["chunk_shape"]]
        inner = [int(x) for x in cfg["chunk_shape"]]
        if inner != [1, *shape[1:]] or grid[1:] != shape[1:] or grid[0] < 1:
            raise UnsupportedLayout(f"inner chunk {inner} in shard {grid} is not one whole row of {shape}")
        if cfg.get("index_location", "end") != "end":
            raise UnsupportedLayout(f"shard index at the {cfg.get('index_location')}")
        index_codecs = cfg.get("index_codecs", [])
        if [c.get("name") for c in index_codecs] != ["bytes", "crc32c"]:
            raise UnsupportedLayout(f"shard index codecs {index_codecs}")
        _little(index_codecs[0], np.dtype("u8"), "shard index")
        chain = list(cfg["codecs"])
        _little(chain[0], self.dtype, "inner chunk")
        if chain[-1].get("name") != "crc32c" or len(chain) > 3:
            raise UnsupportedLayout(f"inner chunk codecs {chain} (expected bytes, a compressor, crc32c)")
        self._compress = _compressor(chain[1] if len(chain) == 3 else None)
        fill = meta.get("fill_value")
        self.fill = float("nan") if fill == "NaN" else fill
        self.rows_per_shard = grid[0]
        self.row_shape = tuple(shape[1:])

    # ------------------------------------------------------------------ encoding
    def _empty_rows(self, flat: np.ndarray) -> np.ndarray:
        """(n,) bool: rows equal to the fill value everywhere (zarr-python stores no chunk for them). Only rows
        whose first value is the fill value are compared whole (a finite block costs one column)."""
        out = np.zeros(len(flat), bool)
        if self.fill is None or not flat.size:
            return out
        nan = isinstance(self.fill, float) and np.isnan(self.fill)
        if nan and self.dtype.kind != "f":
            return out
        fill = None if nan else np.asarray(self.fill).astype(self.dtype)
        first = np.isnan(flat[:, 0]) if nan else flat[:, 0] == fill
        for j in np.flatnonzero(first).tolist():
            out[j] = bool(np.isnan(flat[j]).all()) if nan else bool((flat[j] == fill).all())
        return out

    def encode_rows(self, rows: np.ndarray, threads: int = 1) -> list[bytes | None]:
        """Each row of ``rows`` (n, *row_shape) as its stored inner chunk (compressed bytes + crc32c), None for
        a row equal to the fill value everywhere. ``threads`` > 1 compresses contiguous row ranges on that many
        threads (the numcodecs compressors release the GIL; the threads end before this returns, so nothing
        outlives the call — fork safe); the bytes do not depend on it."""
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        if data.shape[1:] != self.row_shape:
            raise ValueError(f"rows of shape {data.shape[1:]}, expected {self.row_shape}")
        flat = data.reshape(len(data), -1)
        skip = self._empty_rows(flat).tolist()
        view, nb = memoryview(flat.reshape(-1).view(np.uint8)), flat.shape[1] * self.dtype.itemsize

        def encode(lo: int, hi: int) -> list[bytes | None]:
            compress, crc, out = self._compress, google_crc32c.value, []
            for j in range(lo, hi):
                if skip[j]:
                    out.append(None)
                    continue
                row = view[j * nb:(j + 1) * nb]
                c = compress(row) if compress is not None else bytes(row)
                out.append(c + crc(c).to_bytes(4, "little"))
            return out
        n = len(flat)
        k = max(1, min(int(threads), n * nb // _MIN_THREAD_BYTES))
        if k == 1:
            return encode(0, n)
        step = -(-n // k)
        with ThreadPoolExecutor(k) as ex:
            parts = list(ex.map(lambda lo: encode(lo, min(n, lo + step)), range(0, n, step)))
        return [c for part in parts for c in part]

    def build(self, chunks: Sequence[Chunk | None]) -> list[Chunk] | None:
        """The shard file holding ``chunks`` (S entries: stored inner chunk bytes or None) in row order, then
        its index and the index's crc32c, as the list of its parts in file order (joined by `write_file`
        without a copy); None when no chunk is present (zarr-python deletes the file)."""
        S = self.rows_per_shard
        if len(chunks) != S:
            raise ValueError(f"{len(chunks)} chunks for a shard of {S} rows")
        lens = np.fromiter((len(c) if c is not None else 0 for c in chunks), np.uint64, count=S)
        present = lens > 0
        if not present.any():
            return None
        index = np.full((S, 2), EMPTY, dtype="<u8")
        index[present, 0] = (np.cumsum(lens) - lens)[present]
        index[present, 1] = lens[present]
        raw = index.tobytes()
        return [*(c for c in chunks if c is not None and len(c)), raw, google_crc32c.value(raw).to_bytes(4, "little")]

    def shard(self, rows: np.ndarray, first: int, old: tuple[bytes, np.ndarray] | None = None,
              threads: int = 1) -> list[Chunk] | None:
        """The parts (`build`) of the shard whose inner chunks ``first .. first + len(rows)`` are ``rows``
        (encoded on ``threads``) and whose other chunks are those of ``old`` = ``(file bytes, checked index
        (S, 2))`` (copied), or absent."""
        S = self.rows_per_shard
        if first < 0 or first + len(rows) > S:
            raise ValueError(f"rows [{first}, {first + len(rows)}) outside a shard of {S} rows")
        chunks: list[Chunk | None] = [None] * S
        if old is not None and (first > 0 or first + len(rows) < S):
            raw, index = old
            view = memoryview(raw)
            for k in np.flatnonzero(index[:, 0] != np.uint64(EMPTY)).tolist():
                if not first <= k < first + len(rows):
                    off, nb = int(index[k, 0]), int(index[k, 1])
                    chunks[k] = view[off:off + nb]
        chunks[first:first + len(rows)] = self.encode_rows(rows, threads)
        return self.build(chunks)


def write_file(path: str, parts: Sequence[Chunk] | None, fsync: bool) -> None:
    """Put the concatenation of ``parts`` at ``path`` crash-safely (`stores.fsio.write_atomic`, under the
    temporary name ``<name>.<hex>.partial``, like zarr-python's); ``None`` deletes ``path``. The caller fsyncs
    the directories (`stores.fsio.fsync_files`)."""
    if parts is None:
        remove_path(path)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, parts, fsync, tmp=f"{path}.{uuid.uuid4().hex}.partial")
