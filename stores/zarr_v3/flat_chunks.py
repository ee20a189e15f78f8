"""Whole chunks of the small arrays (``complete`` flags, ``keys``) read and written without zarr-python.

`FlatChunkReader.chunk(c)` reads chunk ``c`` (a regular file, or through ``read(c)``: an object store's bytes),
checks its crc32c BEFORE the one decode and returns the whole chunk (C,) (edge chunks are stored padded to C),
or (C, W) for an array of rows of W numbers chunked whole along its second axis (the key bytes of
`stores.zarr_v3.key_array`: chunk file ``c/<c>/0``).
`encode_flat_chunk` is its inverse, byte-identical to zarr-python's encoding (codecs ``bytes`` | ``vlen-utf8``,
then ``zstd``, then ``crc32c``), for writers that put whole chunk objects (`stores.remote.writes`).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
from numcodecs import Zstd
from numcodecs.vlen import VLenUTF8

from stores.errors import UnsupportedLayout
from stores.fsio import read_regular
from stores.zarr_v3.row_reader import chunk_decoder

ReadChunk = Callable[[int], "bytes | None"]


class FlatChunkReader:
    """Reads whole chunks of an unsharded Zarr v3 array of numbers (the ``complete`` flags; key bytes (N, W)
    chunked (C, W)) or of vlen-utf8 strings (``keys`` of older stores): regular-file check (or ``read(c)``),
    crc32c checked before the one decode. ``chunk(c)`` -> (C,) or (C, W) array, or None when the chunk is
    absent; StoreCorruptError when it is not a regular file; ValueError naming the problem when its checksum
    fails or it does not decode."""

    def __init__(self, array_dir: str | os.PathLike, meta: dict[str, Any], *, store: str = "", name: str = "",
                 read: ReadChunk | None = None) -> None:
        self.dir, self.store, self.name = Path(array_dir), str(store), name or Path(array_dir).name
        try:
            codecs = list(meta["codecs"])
            self.vlen = bool(codecs) and codecs[0].get("name") == "vlen-utf8"
            self.dtype = np.dtype(object) if self.vlen else np.dtype(meta["data_type"])
            grid = [int(x) for x in meta["chunk_grid"]["configuration"]["chunk_shape"]]
            shape = [int(x) for x in meta["shape"]]
            self.rows, self.row_shape = grid[0], tuple(shape[1:])
            enc = meta.get("chunk_key_encoding", {})
            if (len(shape) not in (1, 2) or grid[1:] != shape[1:] or (self.vlen and len(shape) != 1)
                    or enc.get("name") != "default" or self.dtype.kind not in "biufO"):
                raise UnsupportedLayout(f"{self.dir}: not a 1-D numeric or string array, or rows of numbers chunked "
                                        "whole, with default chunk keys")
            if self.vlen:
                codecs[0] = {"name": "bytes"}
            self._decompress, self.crc = chunk_decoder(codecs, np.dtype("u1") if self.vlen else self.dtype)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise UnsupportedLayout(f"{self.dir}: unexpected array metadata ({type(e).__name__}: {e})") from None
        self._prefix = f"{self.dir}{os.sep}c{os.sep}"
        self._tail = f"{os.sep}0" * len(self.row_shape)      # chunk file c/<c>/0 of a 2-D array
        self._read = read
        self._same: dict[bytes, np.ndarray] = {}       # chunk bytes (checked) -> decoded: identical bytes decode alike

    def chunk(self, c: int) -> np.ndarray | None:
        """Chunk ``c`` (read-only array), None when it is absent."""
        raw = (read_regular(f"{self._prefix}{c}{self._tail}", self.store, self.name) if self._read is None
               else self._read(c))
        if raw is None:
            return None
        tail = 4 if self.crc else 0
        if len(raw) < tail or (tail and google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little")):
            raise ValueError("crc32c checksum mismatch (chunk corrupted)")
        out = self._same.get(raw)             # a finished split's flag chunks are all the same few bytes
        if out is not None:
            return out
        body = memoryview(raw)[:len(raw) - tail]
        if self.vlen:
            out = VLenUTF8().decode(body if self._decompress is None else self._decompress(body))
            if len(out) != self.rows:
                raise ValueError(f"{len(out)} strings, expected {self.rows}")
        else:
            out = np.empty((self.rows, *self.row_shape), self.dtype)
            if self._decompress is None:
                if len(body) != out.nbytes:
                    raise ValueError(f"{len(body)} bytes, expected {out.nbytes}")
                out[...] = np.frombuffer(body, self.dtype).reshape(out.shape)
            else:
                self._decompress(body, out)
        out.flags.writeable = False
        if len(raw) <= 256 and len(self._same) < 64:
            self._same[raw] = out
        return out


def encode_flat_chunk(meta: dict[str, Any], values: np.ndarray) -> bytes:
    """The stored bytes of one whole chunk ``values`` (C,) or (C, W) of the array described by ``meta`` (its
    zarr.json): ``bytes`` (little-endian) or ``vlen-utf8``, then an optional ``zstd``, then ``crc32c``. The
    same bytes zarr-python writes. UnsupportedLayout for other codec chains."""
    codecs = [c.get("name") for c in meta["codecs"]]
    if codecs[-1:] != ["crc32c"] or codecs[1:-1] not in ([], ["zstd"]) or codecs[0] not in ("bytes", "vlen-utf8"):
        raise UnsupportedLayout(f"codec chain {codecs}: chunks are written only as bytes|vlen-utf8 [+ zstd] + crc32c")
    if codecs[0] == "vlen-utf8":
        raw = VLenUTF8().encode(np.asarray(values, dtype=object))
    else:
        raw = np.ascontiguousarray(values, dtype=np.dtype(meta["data_type"]).newbyteorder("<")).tobytes()
    if codecs[1:-1] == ["zstd"]:
        cfg = meta["codecs"][1].get("configuration") or {}
        raw = Zstd(level=int(cfg.get("level", 0)), checksum=bool(cfg.get("checksum", False))).encode(raw)
    raw = bytes(raw)
    return raw + google_crc32c.value(raw).to_bytes(4, "little")
