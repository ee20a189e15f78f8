"""The ``keys`` array of a Zarr memorybank: sample keys as fixed-width bytes, a Zarr v3 core data type.

Stores of schema_version 5 keep their keys as ``uint8`` of shape (N, W): row i holds the ASCII bytes of its
key (the grammar of `stores.keys` is ASCII without NULs), NUL padded to the width W = ``shape[1]`` (new stores:
`KEY_WIDTH`, the grammar's longest key, 276 bytes); chunks (C, W), codecs ``bytes`` + ``zstd`` + ``crc32c``,
fill value 0, so a row without a key is all zeros and a cleared chunk is deleted. Only core data types:
every Zarr v3 implementation opens it (tensorstore, zarr-python, zarrs, ...), and a key is
``bytes(row).rstrip(b"\\0").decode()``. The array's attribute ``encoding`` says so in words.

Stores of schema_version 3 and 4 keep zarr-python's variable-length ``string`` extension type (codec
``vlen-utf8``), which other implementations cannot open. They are still read and written in that encoding:
`keys_encoding` tells the two apart from the array's own metadata, checked against the store's schema_version
(`stores.validate`), never guessed. ``python -m stores convert OLD NEW`` rewrites such a store in the
portable encoding.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs as zc

from stores.errors import InvalidKeyError
from stores.keys import MAX_KEY_LEN
from stores.zarr_v3.flat_chunks import encode_flat_chunk
from stores.zarr_v3.shard_codec import write_file

KEY_WIDTH = MAX_KEY_LEN           # bytes per key row of new stores: the longest key the grammar allows
BYTES, VLEN = "bytes", "vlen"     # the two encodings of the keys array
ENCODING_NOTE = "ASCII sample keys, NUL padded to the row width (shape[1]); an all-zero row has no key"


def keys_encoding(meta: dict[str, Any] | None) -> str:
    """`BYTES` (uint8 (N, W)) or `VLEN` (zarr-python's vlen-utf8 ``string``) from the keys array's zarr.json;
    ValueError for anything else."""
    meta = meta or {}
    dtype, shape = meta.get("data_type"), meta.get("shape") or []
    names = [c.get("name") for c in meta.get("codecs") or [] if isinstance(c, dict)]
    if dtype == "uint8" and len(shape) == 2 and names[:1] == ["bytes"]:
        return BYTES
    if len(shape) == 1 and names[:1] == ["vlen-utf8"]:
        return VLEN
    raise ValueError(f"keys array of data type {dtype!r}, shape {shape}, codecs {names}: neither uint8 (N, W) key "
                     "bytes nor vlen-utf8 strings")


def create_keys_array(group: zarr.Group, chunk_rows: int, width: int = KEY_WIDTH) -> None:
    """The empty keys array (0, ``width``) uint8 of a new store in ``group``, chunks of ``chunk_rows`` rows."""
    group.create_array("keys", shape=(0, width), chunks=(chunk_rows, width), dtype="uint8", fill_value=0,
                       compressors=[zc.ZstdCodec(level=3), zc.Crc32cCodec()], dimension_names=["row", "byte"],
                       attributes={"encoding": ENCODING_NOTE})


def encode_keys(keys: Sequence[str] | np.ndarray, width: int, where: str = "") -> np.ndarray:
    """(n, ``width``) uint8: each key's ASCII bytes, NUL padded ("" -> all zeros). InvalidKeyError naming the
    key when one is not ASCII or longer than ``width`` (``where`` names the store)."""
    keys = [str(k) for k in keys]
    out = np.zeros((len(keys), width), np.uint8)
    if not keys:
        return out
    w = max(map(len, keys))
    if w > width:
        long = next(k for k in keys if len(k) > width)
        raise InvalidKeyError(f"{where}: key {long[:60]!r}... has {len(long)} characters; this store's keys array "
                              f"holds at most {width} bytes per key")
    try:
        raw = np.array(keys, dtype=f"S{max(w, 1)}")       # numpy encodes as ASCII: anything else raises
    except UnicodeEncodeError as e:
        bad = next(k for k in keys if not k.isascii())
        raise InvalidKeyError(f"{where}: key {bad!r} is not ASCII ({e.reason})") from None
    out[:, :max(w, 1)] = raw.view(np.uint8).reshape(len(keys), max(w, 1))
    return out


def decode_keys(rows: np.ndarray) -> np.ndarray:
    """(n,) object array of str from key bytes (n, W) uint8 (trailing NULs dropped; an all-zero row -> "").
    Bytes are decoded as Latin-1, so a damaged byte gives a key the grammar refuses, never an error here."""
    n = len(rows)
    out = np.empty(n, dtype=object)
    if not n:
        return out
    used = np.flatnonzero(rows.any(axis=0))
    w = int(used[-1]) + 1 if len(used) else 1
    packed = np.ascontiguousarray(rows[:, :w]).view(f"S{w}").reshape(n)
    out[:] = [b.decode("latin-1") for b in packed.tolist()]
    return out


def write_key_rows(array_dir: Path, meta: dict[str, Any], a: int, keys: Sequence[str], fsync: bool,
                   old_chunk: Callable[[int], np.ndarray | None]) -> None:
    """Rows ``[a, a + len(keys))`` of the key bytes array at ``array_dir`` (``meta``: its zarr.json): each chunk
    they touch encoded here (`encode_flat_chunk`: the bytes zarr-python writes) and put in place crash-safely
    (temporary name, fsync when ``fsync``, rename; an all-zero chunk is deleted, as zarr-python does), one
    chunk at a time (bounded memory; zarr-python copied the whole (n, W) block). The other rows of a partly
    covered chunk are read first with ``old_chunk(c)`` (None: absent; ValueError: damaged, its rows count as
    lost, as on a writable handle). The caller fsyncs the directories."""
    C, W = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0]), int(meta["shape"][1])
    b = a + len(keys)
    for c in range(a // C, -(-b // C)):
        lo, hi = max(a, c * C), min(b, (c + 1) * C)
        old = None
        if hi - lo < C:
            try:
                old = old_chunk(c)
            except ValueError:
                old = None
        chunk = np.zeros((C, W), np.uint8) if old is None else np.array(old, np.uint8)
        chunk[lo - c * C:hi - c * C] = encode_keys(keys[lo - a:hi - a], W, str(array_dir.parent))
        write_file(str(array_dir / "c" / str(c) / "0"), [encode_flat_chunk(meta, chunk)] if chunk.any() else None,
                   fsync)
