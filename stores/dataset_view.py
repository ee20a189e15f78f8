"""A memorybank as an ``xarray.Dataset``, for data scientists: named dimensions, the sample key as coordinate,
only complete rows, lazy (dask) and read through the store's own checked read path.

    import stores
    ds = stores.open_dataset("teacher_mb.zarr")
    ds.actions.sel(key="train/segment_0001:123").values       # (t, action)
    ds.bev_vec.mean("key").compute()

Variables: ``actions (key, t, action)``, ``bev_vec (key, t, bev_channel)``, ``gru_out (key, t, gru_channel)``
and, when the store holds it, ``bev_feat (key, t, feat_channel, y, x)``; coordinates ``key`` (the sample keys,
strings, in row order) and ``row`` (the store row of each key). Attributes: the schema and provenance.

Each dask chunk is the complete rows of one shard (``shard_rows`` rows of the light fields,
``bev_feat_shard_rows`` of bev_feat), read by ONE ``MemoryBank.get_batch`` of that shard's keys, so every byte
served has passed the store's crc32c checks: a damaged chunk raises `StoreCorruptError` when computed, never
zeros or NaN. The three light fields are one packed array on disk: computed together, each chunk is read and
decoded once. The store is opened read-only (a damaged store is refused at open, as by `open_memorybank`).
``xarray.open_zarr`` on the store still works, but shows the raw layout (one packed ``light`` array with
padded rows, no key coordinate).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from stores.abc import MemoryBank
from stores.errors import StoreError
from stores.factory import open_memorybank
from stores.schema import BEV_FEAT, DEPTH, LIGHT_FIELDS

#: dimensions of each variable after ``key``
DIMS: dict[str, tuple[str, ...]] = {"actions": ("t", "action"), "bev_vec": ("t", "bev_channel"),
                                    "gru_out": ("t", "gru_channel"), BEV_FEAT: ("t", "feat_channel", "y", "x"),
                                    DEPTH: ("t", "cam", "v", "u")}
EXTRA = "e2r-kd[dev]"          # the extra of this package that installs xarray (dask is a dependency)


class ShardReader:
    """Reads one dask chunk (the complete rows of one shard) of ``fields`` through ``bank.get_batch``; the light
    fields come back packed on the last axis in ``fields`` order. Picklable (the bank reopens its files in
    another process)."""

    def __init__(self, bank: MemoryBank, fields: Sequence[str], chunk_keys: list[np.ndarray]) -> None:
        self.bank, self.fields, self.chunk_keys = bank, tuple(fields), chunk_keys

    def __call__(self, chunk: np.ndarray) -> np.ndarray:
        keys = self.chunk_keys[int(chunk[0])].tolist()       # chunk: this chunk's number, (1,)
        out, missing = self.bank.get_batch(keys, self.fields)
        if missing:
            raise StoreError(f"memorybank {self.bank.path}: keys {missing[:3]} were complete when the dataset was "
                             "opened and are gone now (split removed or replaced?); open the dataset again")
        if len(self.fields) == 1:
            return out[self.fields[0]]
        return np.concatenate([out[f] for f in self.fields], axis=-1)


def _imports() -> tuple[Any, Any]:
    try:
        import dask.array as da       # lazy: optional heavy dependencies, needed only for this view
        import xarray as xr
    except ImportError as e:
        raise ImportError(f"stores.open_dataset needs xarray and dask ({e.name} is not installed): "
                          f"pip install '{EXTRA}' (or: pip install xarray 'dask[array]')") from e
    return xr, da


def _chunked(da: Any, bank: MemoryBank, fields: Sequence[str], rows: np.ndarray, keys: np.ndarray,
             rows_per_shard: int, row_shape: tuple[int, ...], name: str) -> Any:
    """A dask array (len(rows), *row_shape) with one chunk per shard holding a complete row."""
    dtype = np.dtype(bank.schema.field_dtype(fields[0]))
    meta = np.empty((0,) * (1 + len(row_shape)), dtype)
    if not len(rows):
        return da.from_array(meta.reshape(0, *row_shape), meta=meta)
    cuts = np.flatnonzero(np.diff(rows // rows_per_shard)) + 1
    chunk_keys = np.split(keys, cuts)
    sizes = tuple(len(k) for k in chunk_keys)
    ids = da.arange(len(sizes), chunks=1)
    return da.map_blocks(ShardReader(bank, fields, chunk_keys), ids, chunks=(sizes, *((n,) for n in row_shape)),
                         new_axis=list(range(1, 1 + len(row_shape))), dtype=dtype, meta=meta, name=name)


def open_dataset(path: str | os.PathLike, **open_kw: Any) -> Any:
    """The store at ``path`` as a lazy ``xarray.Dataset`` (see the module docstring). Raises what
    `open_memorybank(path, mode="r")` raises, and ImportError naming the extra when xarray is missing.
    ``open_kw``: `open_memorybank`'s object-store arguments for a URL (storage_options, cache_dir, ...)."""
    xr, da = _imports()
    bank = open_memorybank(path, mode="r", **open_kw)
    schema = bank.schema
    keys = np.array(bank.keys(), dtype=object)
    rows = bank.complete_rows()
    if len(keys) != len(rows):
        raise StoreError(f"memorybank {bank.path}: {len(rows)} complete rows but {len(keys)} readable keys; run "
                         f"`python -m stores verify {bank.path}`")
    tag = hashlib.sha1(f"{os.path.abspath(bank.path)} {bank.attrs.get('updated')} {len(rows)}".encode()).hexdigest()
    ch = schema.light_channels()
    width = ch[LIGHT_FIELDS[-1]][1]
    light = _chunked(da, bank, LIGHT_FIELDS, rows, keys, bank.alignment, (schema.seq_len, width),
                     f"e2r-light-{tag}")
    data = {f: (("key", *DIMS[f]), light[..., ch[f][0]:ch[f][1]]) for f in LIGHT_FIELDS}
    if schema.store_bev_feat:
        bev = _chunked(da, bank, (BEV_FEAT,), rows, keys, int(bank.attrs["bev_feat_shard_rows"]),
                       schema.row_shape(BEV_FEAT), f"e2r-bev_feat-{tag}")
        data[BEV_FEAT] = (("key", *DIMS[BEV_FEAT]), bev)
    if schema.store_depth:
        depth = _chunked(da, bank, (DEPTH,), rows, keys, bank.alignment, schema.row_shape(DEPTH), f"e2r-depth-{tag}")
        data[DEPTH] = (("key", *DIMS[DEPTH]), depth)
    attrs = {k: v for k, v in bank.attrs.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)}
    attrs.update(memorybank=bank.path, store_bev_feat=int(schema.store_bev_feat), store_depth=int(schema.store_depth))
    ds = xr.Dataset(data, coords={"key": ("key", keys), "row": ("key", rows)}, attrs=attrs)
    ds.set_close(bank.close)
    return ds
