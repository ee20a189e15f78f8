"""Back-end independent layout rules of a memorybank: shard sizes, the root attributes of a new store,
validation of a block of rows before it is written, and row-range helpers.

Used by the abstract `stores.abc.MemoryBank` (and the CLI / converter for `ranges_of`); knows nothing of
Zarr or HDF5.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import google_crc32c
import numpy as np

from stores.schema import DEPTH, DEPTH_NONE, SCHEMA_VERSION, Provenance, StoreSchema, json_attrs, now_iso

FORMAT_NAME = "e2r-memorybank"          # root attribute ``format`` of every store
_SHARD_TARGET_BYTES = 256 * 2**20


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(np.floor(np.log2(max(x, 1)))))


def default_shard_rows(schema: StoreSchema) -> int:
    """Rows per shard (= writers' alignment unit): 4096, or fewer (a power of two, at least 256) when a
    packed light row is so wide that a shard would exceed 256 MiB raw. Read speed does not depend on it
    (one row per inner chunk); 4096 keeps the store at <= 1 file per 1000 keys (a light shard and a
    ``complete`` chunk per S rows, docs/STORE.md) while a partial block re-writes at most S rows."""
    widest = schema.row_nbytes("light")
    return int(min(4096, max(256, _pow2_floor(_SHARD_TARGET_BYTES / widest))))


def bev_feat_shard_rows(schema: StoreSchema, shard_rows: int) -> int:
    """Rows per bev_feat shard: a power of two dividing ``shard_rows``, shard at most 256 MiB raw."""
    return int(min(shard_rows, _pow2_floor(_SHARD_TARGET_BYTES / schema.row_nbytes("bev_feat"))))


def ranges_of(mask: np.ndarray) -> list[tuple[int, int]]:
    """[a, b) runs where ``mask`` is True."""
    m = np.concatenate([[False], np.asarray(mask, bool), [False]])
    d = np.flatnonzero(m[1:] != m[:-1])
    return [(int(a), int(b)) for a, b in zip(d[::2], d[1::2])]


def new_store_attrs(schema: StoreSchema, provenance: Provenance, shard_rows: int | None) -> dict[str, Any]:
    """Root attributes of a new store (JSON-able). ``shard_rows`` (a power of two) defaults to
    `default_shard_rows`; ValueError otherwise."""
    S = default_shard_rows(schema) if shard_rows is None else check_shard_rows(shard_rows)
    t = now_iso()
    attrs = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, **schema.to_dict(),
             "field_dtypes": {f: schema.field_dtype(f) for f in schema.fields}, **provenance.to_dict(),
             "shard_rows": S, "splits": {}, "created": t, "updated": t}
    if schema.store_bev_feat:
        attrs["bev_feat_shard_rows"] = bev_feat_shard_rows(schema, S)
    return json_attrs(attrs)


def _all_finite(a: np.ndarray) -> bool:
    """No NaN or infinity in ``a``. float16 is tested on its bits (exponent all ones = not finite): numpy's
    isfinite converts every float16 to float32 first, 3x slower on a write's block."""
    if a.dtype == np.float16:
        return not bool(((a.view(np.uint16) & 0x7C00) == 0x7C00).any())
    return bool(np.isfinite(a).all())


def invalid_rows(schema: StoreSchema, name: str, a: np.ndarray) -> np.ndarray:
    """(n,) bool: rows of field ``name``'s block ``a`` (n, T, ...) (in its stored dtype) holding a value the store
    must not keep: a non-finite float, or a depth byte that is neither a bin below ``n_bins`` nor ``DEPTH_NONE``."""
    flat = a.reshape(len(a), -1)
    if name == DEPTH:
        n_bins = int((schema.depth_grid or {}).get("n_bins", 0))
        return ((flat >= n_bins) & (flat != DEPTH_NONE)).any(1)
    if a.dtype.kind != "f" or _all_finite(a):
        return np.zeros(len(a), bool)
    return ~np.isfinite(flat).all(1)


def check_block(schema: StoreSchema, block: Mapping[str, np.ndarray], split: str, offset: int,
                path: str) -> tuple[dict[str, np.ndarray], int]:
    """Validate a ``write_rows`` block ``{field: (n, T, ...)}`` against ``schema``: exactly the stored
    fields, the right shapes, finite values after the cast to the store dtype (depth: uint8 bins, `invalid_rows`). Returns the cast arrays and
    ``n``; ValueError says what is wrong (``split``/``offset``/``path`` only name the write in messages)."""
    extra = set(block) - set(schema.fields)
    if extra:
        raise ValueError(f"write_rows: fields {sorted(extra)} are not stored in {path} "
                         f"(store fields {schema.fields}; bev_feat needs store_bev_feat=True at creation)")
    lack = [f for f in schema.fields if f not in block]
    if lack:
        raise ValueError(f"write_rows: block lacks fields {lack} (store {path} needs {schema.fields})")
    n = None
    arrays = {}
    for f in schema.fields:
        a = np.asarray(block[f])
        if n is None:
            n = a.shape[0] if a.ndim else -1
        want = (n, *schema.row_shape(f))
        if a.shape != want:
            raise ValueError(f"write_rows({split!r}, offset={offset}): field {f!r} has shape {a.shape}, "
                             f"expected {want}")
        dtype = schema.field_dtype(f)
        if f == DEPTH and a.dtype != dtype:
            raise ValueError(f"write_rows({split!r}): field {f!r} must be {dtype} depth bins, got {a.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):     # an overflow is refused just below, by name
            a = a.astype(dtype, copy=False)
        bad_rows = invalid_rows(schema, f, a)
        if bad_rows.any():
            bad = int(np.flatnonzero(bad_rows)[0])
            what = (f"values that are no depth bin (< n_bins or {DEPTH_NONE})" if f == DEPTH
                    else f"non-finite values (after cast to {dtype})")
            raise ValueError(f"write_rows({split!r}): field {f!r} of split position {offset + bad} has {what}")
        arrays[f] = a
    assert n is not None
    return arrays, n


KEYS_CHUNK_ROWS = 65536                 # keys chunk = max(shard_rows, this) rows
MAX_SHARD_ROWS = 2**20                  # shard_rows above this is not a store we wrote (attribute edit)


def check_shard_rows(shard_rows: Any) -> int:
    """``shard_rows`` as an int; ValueError unless it is a power of two in [1, `MAX_SHARD_ROWS`] (0 is no
    default here: callers pass None for the default)."""
    S = int(shard_rows)
    if S != shard_rows or S <= 0 or S & (S - 1) or S > MAX_SHARD_ROWS:
        raise ValueError(f"shard_rows must be a power of two in [1, {MAX_SHARD_ROWS}], got {shard_rows!r}")
    return S


MAX_ROW_BYTES = {"light": 64 * 2**20, "bev_feat": 2**30, DEPTH: 2**30}   # sanity caps before anything is allocated
COMPLETE_UNSET = 255                    # fill value of ``complete``: no chunk there (0 = reserved, 1 = complete)


def keys_chunk_rows(shard_rows: int) -> int:
    return max(int(shard_rows), KEYS_CHUNK_ROWS)


def check_alignment(split: str, offset: int, n: int, alignment: int, owned: set[int],
                    earlier_complete: Callable[[int, int], bool]) -> None:
    """The alignment rule of ``write_rows`` (docs/STORE.md). A write of split positions ``[offset, offset +
    n)`` may start inside a shard (a block of ``alignment`` positions) only when this handle already wrote
    into that shard (it is filling it), or when every earlier position of the shard is complete (a resumed
    writer continues where the shard's writer stopped). Otherwise ValueError naming the rule. ``owned`` (the
    shards this handle wrote into) is updated; ``earlier_complete(lo, hi)`` reads fresh completion flags."""
    if n <= 0:
        return
    S = int(alignment)
    first = offset // S
    lo = first * S
    if offset != lo and first not in owned and not earlier_complete(lo, offset):
        raise ValueError(
            f"write_rows({split!r}, offset={offset}, n={n}) breaks the alignment rule: positions [{lo}, {offset}) "
            f"of shard [{lo}, {lo + S}) are not complete and this handle has not written into that shard. "
            f"Concurrent writers must own split positions [a, b) with a and b multiples of bank.alignment "
            f"(= {S}; b may be the split's end) - cut tasks with bank.task_ranges(split) - and a write may start "
            f"inside a shard only to continue a shard this handle is filling, or to resume a shard whose earlier "
            f"rows are all complete (bank.incomplete_ranges). Writing inside another writer's shard loses rows")
    owned.update(range(first, (offset + n - 1) // S + 1))


def keys_crc32c(keys: Sequence[str] | np.ndarray) -> int:
    """crc32c of a split's keys joined by newlines (recorded in its split entry; checked at every open)."""
    return int(google_crc32c.value("\n".join(str(k) for k in keys).encode()))
