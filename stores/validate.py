"""Cheap consistency checks of a memorybank's attributes against its arrays' metadata, run at every open
(and by ``verify``) BEFORE anything is allocated or read: a one-line JSON edit (a field size, ``shard_rows``,
an array's length) gives a clear `StoreCorruptError`, never shifted channels, a ZeroDivisionError or gigabytes
of memory.

`check_store` returns ``(problems, n_rows)``: every problem found (empty = consistent) and the rows the store
holds (the ``keys`` array's length, which is resized last and so never exceeds the other arrays').
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from stores.keys import MAX_KEY_LEN, InvalidKeyError, validate_part
from stores.layout import COMPLETE_UNSET, MAX_ROW_BYTES, MAX_SHARD_ROWS, keys_chunk_rows, ranges_of
from stores.schema import BEV_FEAT, DEPTH, LIGHT_ARRAY, LIGHT_FIELDS, VLEN_KEY_SCHEMA_VERSIONS, StoreSchema


@dataclass
class ArrayInfo:
    """What a check needs of one on-disk array: ``file_rows`` = rows per file (shard or chunk), ``inner_rows``
    = rows per (inner) chunk, ``crc`` = every chunk carries a checksum (and the shard index, if sharded)."""

    shape: tuple[int, ...]
    dtype: str
    file_rows: int
    inner_rows: int
    crc: bool
    fill: Any = None


def zarr_array_info(meta: dict[str, Any]) -> ArrayInfo:
    """From a Zarr v3 array's ``zarr.json``; ValueError when it is not an array's metadata."""
    try:
        if meta.get("node_type") != "array" or meta.get("zarr_format") != 3:
            raise ValueError("not a Zarr v3 array")
        shape = tuple(int(x) for x in meta["shape"])
        grid = [int(x) for x in meta["chunk_grid"]["configuration"]["chunk_shape"]]
        codecs = list(meta["codecs"])
        inner, crc = grid, bool(codecs) and codecs[-1].get("name") == "crc32c"
        if codecs and codecs[0].get("name") == "sharding_indexed":
            cfg = codecs[0]["configuration"]
            inner = [int(x) for x in cfg["chunk_shape"]]
            chain = cfg.get("codecs", [])
            idx = [c.get("name") for c in cfg.get("index_codecs", [])]
            crc = bool(chain) and chain[-1].get("name") == "crc32c" and idx[-1:] == ["crc32c"]
        if len(grid) != len(shape) or len(inner) != len(shape) or min(grid + inner, default=1) <= 0:
            raise ValueError(f"chunk shape {grid} / inner {inner} do not fit shape {shape}")
        dtype = meta["data_type"]
        return ArrayInfo(shape, str(dtype), grid[0], inner[0], crc, meta.get("fill_value"))
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise ValueError(f"malformed array metadata ({type(e).__name__}: {e})") from None


def _posint(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


def _expected_arrays(schema: StoreSchema, backend: str) -> dict[str, tuple[int, ...]]:
    names = [LIGHT_ARRAY] if backend == "zarr" else list(LIGHT_FIELDS)
    out = {n: schema.row_shape(n) for n in names}
    for name in (BEV_FEAT, DEPTH):
        if name in schema.fields:
            out[name] = schema.row_shape(name)
    return out


def check_store(attrs: dict[str, Any], arrays: dict[str, ArrayInfo | None], backend: str,
                legacy: bool = False) -> tuple[list[str], int]:
    """Every inconsistency between the root attributes and the arrays (``{name: ArrayInfo or None when
    missing}`` for ``keys``, ``complete`` and the data arrays), and the store's row count. ``legacy``: a
    store of an older schema_version (no checksums expected)."""
    problems: list[str] = []
    try:
        schema = StoreSchema.from_dict(attrs)
    except (TypeError, ValueError) as e:
        return [f"attributes do not describe a valid schema: {e}"], 0
    S = attrs.get("shard_rows")
    if not _posint(S) or int(S) & (int(S) - 1) or int(S) > MAX_SHARD_ROWS:
        return [f"attribute shard_rows={S!r} is not a power of two in [1, {MAX_SHARD_ROWS}]"], 0
    S = int(S)
    for name, cap in MAX_ROW_BYTES.items():
        if name in (BEV_FEAT, DEPTH) and name not in schema.fields:
            continue
        nb = schema.row_nbytes(name)
        if nb > cap:
            problems.append(f"attributes give a {name} row of {nb} bytes (> {cap}): implausible sizes "
                            f"(seq_len={schema.seq_len}, bev_feat_shape={schema.bev_feat_shape}); refusing to allocate")
    if problems:
        return problems, 0
    fdt = attrs.get("field_dtypes")
    if isinstance(fdt, dict) and any(v != schema.field_dtype(f) for f, v in fdt.items()):
        problems.append(f"attribute field_dtypes={fdt} contradicts dtype={schema.dtype!r}")
    if backend == "zarr":
        want_ch = {f: list(v) for f, v in schema.light_channels().items()}
        if attrs.get("light_channels") != want_ch:
            problems.append(f"attribute light_channels={attrs.get('light_channels')!r} contradicts action_dim/"
                            f"bev_dim/gru_hidden (expected {want_ch})")
    B = S
    if schema.store_bev_feat and backend == "zarr":
        B = attrs.get("bev_feat_shard_rows")
        if not _posint(B) or int(B) & (int(B) - 1) or S % int(B):
            problems.append(f"attribute bev_feat_shard_rows={B!r} is not a power of two dividing shard_rows={S}")
            B = None
    keys_row, keys_dtype = (), ""          # HDF5, and Zarr stores before 5: (N,) strings
    if backend == "zarr" and attrs.get("schema_version") not in VLEN_KEY_SCHEMA_VERSIONS:
        keys_row, keys_dtype = _key_bytes_row(arrays.get("keys")), "uint8"       # key bytes (N, W)
    expect: dict[str, tuple[tuple[int, ...], str, int | None, int]] = {
        "keys": (keys_row, keys_dtype, keys_chunk_rows(S) if backend == "zarr" else S, 0),
        "complete": ((), "uint8", S, 0)}
    for name, row in _expected_arrays(schema, backend).items():
        rows = (int(B) if B else None) if name == BEV_FEAT else (S if backend == "zarr" else 1)
        expect[name] = (row, schema.field_dtype(name), rows, 1)
    lengths: dict[str, int] = {}
    for name, (row, dtype, file_rows, inner) in expect.items():
        a = arrays.get(name)
        if a is None:
            problems.append(f"array {name!r} is missing")
            continue
        if len(a.shape) != 1 + len(row) or tuple(a.shape[1:]) != tuple(row):
            problems.append(f"array 'keys' has shape {a.shape} and dtype {a.dtype}; schema_version "
                            f"{attrs.get('schema_version')} keeps keys as " + ("uint8 rows of key bytes (N, W)" if row
                            else "strings (N,)") if name == "keys" else
                            f"array {name!r} has shape {a.shape}; the attributes (seq_len, action_dim, bev_dim, "
                            f"gru_hidden, bev_feat_shape) say rows of shape {row}")
            continue
        if dtype and a.dtype != dtype:
            problems.append(f"array {name!r} has dtype {a.dtype}, the attributes say {dtype}")
        if file_rows is not None and backend == "zarr" and a.file_rows != file_rows:
            problems.append(f"array {name!r} stores {a.file_rows} rows per file, expected {file_rows} "
                            f"(shard_rows={S})")
        if inner and a.inner_rows != inner:
            problems.append(f"array {name!r} has chunks of {a.inner_rows} rows, expected {inner}")
        if not legacy and not a.crc:
            problems.append(f"array {name!r} has no checksum on its chunks (codec chain without crc32c)")
        lengths[name] = a.shape[0]
    n = lengths.get("keys", 0)
    for name, m in lengths.items():
        if m < n:
            problems.append(f"array 'keys' has {n} rows but {name!r} has {m}: lengths edited or corrupted "
                            "(keys is resized last, so it never exceeds the other arrays)")
    problems += check_splits(attrs.get("splits"), S, n)
    return problems, n


def _key_bytes_row(keys: ArrayInfo | None) -> tuple[int, ...]:
    """The row shape the key bytes of a Zarr store of schema_version 5 must have: (W,) with W its recorded width
    in 1..MAX_KEY_LEN (anything else is reported against the longest key of the grammar)."""
    if keys is not None and len(keys.shape) == 2 and 0 < keys.shape[1] <= MAX_KEY_LEN:
        return (keys.shape[1],)
    return (MAX_KEY_LEN,)


def check_splits(splits: Any, S: int, n: int) -> list[str]:
    """Problems of the ``splits`` attribute: entries ``{start, count}``, starts multiples of S, inside the
    ``n`` rows, not overlapping."""
    if not isinstance(splits, dict):
        return [f"attribute splits={splits!r} is not a mapping"]
    problems, spans = [], []
    for name, v in splits.items():
        try:
            validate_part(name, "split")
        except InvalidKeyError as e:
            problems.append(f"split name {name!r} is invalid: {e}")
        start = v.get("start") if isinstance(v, dict) else None
        count = v.get("count") if isinstance(v, dict) else None
        if not (_posint(start) or start == 0) or not (_posint(count) or count == 0) or isinstance(start, bool):
            problems.append(f"split {name!r}: {v!r} is not {{start, count}} of non-negative integers")
            continue
        if start % S:
            problems.append(f"split {name!r} starts at row {start}, not a multiple of shard_rows={S}")
        if start + count > n:
            problems.append(f"split {name!r} rows [{start}, {start + count}) lie beyond the {n} rows of the "
                            "store's arrays")
        spans.append((start, start + count, name))
    spans.sort()
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            problems.append(f"splits {an!r} [{a0}, {a1}) and {bn!r} [{b0}, {b1}) overlap")
    return problems


def used_rows(splits: dict[str, Any]) -> int:
    """Rows ``[0, used)`` that any split occupies (call after `check_splits` found no problem)."""
    return max((int(v["start"]) + int(v["count"]) for v in splits.values()), default=0)


def split_damage(splits: dict[str, tuple[int, int]], flags: np.ndarray, keys_lost: np.ndarray,
                 keys_of: Callable[[list[int]], list[str]]) -> tuple[np.ndarray, list[str]]:
    """``(complete (N,) bool, problems)`` from the raw completion flags of rows ``[0, N)`` and the rows whose
    keys are lost (``keys_lost``): only rows of a split with their keys count as complete; split rows whose
    keys are lost or whose flag is 255 (their chunk is missing) are problems, named with their keys when
    ``keys_of(rows)`` knows them."""
    in_split = np.zeros(len(flags), bool)
    for s, c in splits.values():
        in_split[s:s + c] = True
    damage = []
    for what, bad in (("lost their keys (a keys chunk is missing)", in_split & keys_lost),
                      ("lost their completion flags (a `complete` chunk is missing)",
                       in_split & (flags == COMPLETE_UNSET))):
        if bad.any():
            spans = ranges_of(bad)
            n_bad = int(np.count_nonzero(bad))
            named = keys_of(np.flatnonzero(bad)[:4].tolist())
            damage.append(f"{n_bad} reserved rows (rows " + ", ".join(f"[{a}, {b})" for a, b in spans[:3])
                          + (" ..." if len(spans) > 3 else "") + f") {what}"
                          + (f" (keys {', '.join(map(repr, named))}{' ...' if n_bad > 4 else ''})" if named else ""))
    return (flags == 1) & in_split & ~keys_lost, damage


def orphan_mask(flags: np.ndarray, splits: dict[str, tuple[int, int]]) -> np.ndarray:
    """(len(flags),) bool: rows flagged complete (1) that lie in no split ``{name: (start, count)}`` — orphans,
    left by an rm-split interrupted after it removed the split's entry (``verify`` lists them, ``reindex`` clears
    them). Rows of no split flagged 0 (reserved by an interrupted reserve_split) are not orphans: the next
    reserve_split writes over them."""
    out = np.asarray(flags) == 1
    for s, c in splits.values():
        out[s:s + c] = False
    return out
