"""Zarr v3 back end of `MemoryBank`: zarr-python creates, writes and inspects; tensorstore reads the hot path.

Layout of ``<path>/`` (a Zarr v3 group; attributes = schema, provenance, splits, times, shard_rows)::

    keys        (N,)            string (vlen-utf8), chunks (S,)          "" for unreserved rows
    complete    (N,)            uint8, chunks (S,)                       1 = row fully written
    actions     (N, T, A)       float32|float16, shards (S, T, A) of inner chunks (1, T, A), blosc-zstd
    bev_vec     (N, T, D)       same
    gru_out     (N, T, H)       same
    bev_feat/bev_feat (N, T, C, H, W)  shards (B, T, C, H, W), inner chunk = one sample (only if stored)

S = ``shard_rows`` (the writers' alignment unit); B divides S. Every array carries ``dimension_names``.
Tensorstore handles are opened lazily in the process that reads (after a DataLoader fork, the worker
opens its own). Tensorstore cannot be used in a process forked from one that already used it; such a
process reads through zarr-python instead (correct, slower) and warns once.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs as zc

from stores.base import MemoryBank
from stores.schema import BEV_FEAT, DIM_NAMES, LIGHT_FIELDS, StoreSchema

_TS_USED_BY_PID: int | None = None   # the process whose tensorstore runtime is live
_WARNED_FALLBACK = False
TS_CACHE_BYTES = 64 * 2**20


def light_compressor(dtype: str) -> zc.BloscCodec:
    """Codec of the light fields: blosc zstd level 3 with byte shuffle (see docs/STORE.md for the measurement)."""
    return zc.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=np.dtype(dtype).itemsize)


def bev_feat_compressor(dtype: str) -> zc.BloscCodec:
    """bev_feat: blosc lz4 + byte shuffle, cheap to decode for the read-heavy dense KD term."""
    return zc.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=np.dtype(dtype).itemsize)


def field_path(name: str) -> str:
    """Array path of a field inside the group (bev_feat lives in its own group)."""
    return f"{BEV_FEAT}/{BEV_FEAT}" if name == BEV_FEAT else name


def _tensorstore_usable() -> bool:
    return _TS_USED_BY_PID is None or _TS_USED_BY_PID == os.getpid()


class ZarrMemoryBank(MemoryBank):
    """`MemoryBank` over a Zarr v3 directory store."""

    backend = "zarr"

    def __init__(self, path: str, mode: str) -> None:
        super().__init__(path, mode)
        self._group: zarr.Group | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._ts: dict[str, Any] = {}
        self._ts_pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_group"], d["_arrays"], d["_ts"], d["_ts_pid"] = None, {}, {}, None
        return d

    @staticmethod
    def exists(path: str) -> bool:
        return (Path(path) / "zarr.json").is_file()

    # ------------------------------------------------------------------ zarr-python side
    def _g(self) -> zarr.Group:
        if self._group is None:
            self._group = zarr.open_group(self.path, mode="r" if self.mode == "r" else "r+", zarr_format=3)
        return self._group

    def _arr(self, name: str) -> zarr.Array:
        a = self._arrays.get(name)
        if a is None:
            a = self._g()[field_path(name)]
            self._arrays[name] = a
        return a

    def _open_existing(self) -> None:
        if not self.exists(self.path):
            raise FileNotFoundError(f"no Zarr memorybank at {self.path} (missing zarr.json)")
        self._g()

    def _create_new(self, schema: StoreSchema) -> None:
        S = int(self._attrs["shard_rows"])
        g = zarr.open_group(self.path, mode="w-", zarr_format=3)
        self._group = g
        g.create_array("keys", shape=(0,), chunks=(S,), dtype=str, fill_value="", dimension_names=["row"])
        g.create_array("complete", shape=(0,), chunks=(S,), dtype="uint8", fill_value=0,
                       compressors=zc.ZstdCodec(level=3), dimension_names=["row"])
        for f in LIGHT_FIELDS:
            shp = schema.row_shape(f)
            g.create_array(f, shape=(0, *shp), chunks=(1, *shp), shards=(S, *shp), dtype=schema.dtype,
                           fill_value=0, compressors=light_compressor(schema.dtype),
                           dimension_names=list(DIM_NAMES[f]))
        if schema.store_bev_feat:
            B = int(self._attrs["bev_feat_shard_rows"])
            shp = schema.row_shape(BEV_FEAT)
            sub = g.create_group(BEV_FEAT, attributes={"pool": schema.bev_feat_pool, "shard_rows": B})
            kw = {"shards": (B, *shp)} if B > 1 else {}
            sub.create_array(BEV_FEAT, shape=(0, *shp), chunks=(1, *shp), dtype=schema.dtype, fill_value=0,
                             compressors=bev_feat_compressor(schema.dtype),
                             dimension_names=list(DIM_NAMES[BEV_FEAT]), **kw)

    def _fields_on_disk(self) -> list[str]:
        return list(self.schema.fields)

    def _read_attrs(self) -> dict[str, Any]:
        return dict(self._g().attrs.asdict())

    def _write_attrs(self, attrs: dict[str, Any]) -> None:
        self._g().attrs.put(attrs)

    def _n_rows(self) -> int:
        return int(self._arr("keys").shape[0])

    def _resize(self, n: int) -> None:
        for name in ["keys", "complete", *self._fields_on_disk()]:
            a = self._arr(name)
            a.resize((n, *a.shape[1:]))
        self._ts.clear()

    def _read_keys(self, a: int, b: int) -> np.ndarray:
        return np.asarray(self._arr("keys")[a:b]).astype(object) if b > a else np.zeros(0, object)

    def _write_keys(self, a: int, keys: np.ndarray) -> None:
        self._arr("keys")[a:a + len(keys)] = np.asarray(keys, dtype=str)

    def _read_complete(self, a: int, b: int) -> np.ndarray:
        return np.asarray(self._arr("complete")[a:b]).astype(bool) if b > a else np.zeros(0, bool)

    def _write_complete(self, a: int, b: int, flag: bool) -> None:
        self._arr("complete")[a:b] = np.uint8(flag)

    def _write_field(self, name: str, a: int, data: np.ndarray) -> None:
        self._arr(name)[a:a + len(data)] = data

    def _clear_rows(self, a: int, b: int) -> None:
        self._write_complete(a, b, False)
        for f in self._fields_on_disk():
            self._arr(f)[a:b] = 0          # all-fill inner chunks/shards are deleted (write_empty_chunks=False)
        self._arr("keys")[a:b] = ""

    def dask_array(self, name: str) -> Any:
        import dask.array as da
        return da.from_zarr(self._arr(name))

    # ------------------------------------------------------------------ tensorstore side (hot path)
    def _ts_handle(self, name: str) -> Any:
        global _TS_USED_BY_PID
        pid = os.getpid()
        if self._ts_pid != pid:
            self._ts, self._ts_pid = {}, pid
        h = self._ts.get(name)
        if h is None:
            import tensorstore as ts
            spec = {"driver": "zarr3",
                    "kvstore": {"driver": "file", "path": str(Path(self.path) / field_path(name))},
                    "recheck_cached_data": False, "recheck_cached_metadata": False,
                    "context": {"cache_pool": {"total_bytes_limit": TS_CACHE_BYTES}}}
            h = ts.open(spec, read=True, open=True).result()
            _TS_USED_BY_PID = pid
            self._ts[name] = h
        return h

    def _read_rows(self, fields: Sequence[str], rows: np.ndarray) -> dict[str, np.ndarray]:
        global _WARNED_FALLBACK
        if not _tensorstore_usable():
            if not _WARNED_FALLBACK:
                warnings.warn("memorybank: tensorstore was used in a parent process before fork(); this "
                              "process reads through zarr-python (slow). Create DataLoader workers before "
                              "reading in the parent, or use multiprocessing_context='forkserver'.",
                              RuntimeWarning, stacklevel=3)
                _WARNED_FALLBACK = True
            return {f: np.asarray(self._arr(f).get_orthogonal_selection((rows,))) for f in fields}
        futures = {f: self._ts_handle(f)[rows].read() for f in fields}
        return {f: fut.result() for f, fut in futures.items()}

    def describe(self) -> list[dict[str, Any]]:
        """Per array: name, shape, dtype, chunks, shards, codecs, stored bytes (files on disk), raw bytes."""
        out = []
        for name in ["keys", "complete", *self.schema.fields]:
            a = self._arr(name)
            root = Path(self.path) / field_path(name)
            stored = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != "zarr.json")
            raw = int(np.prod(a.shape)) * (a.dtype.itemsize if a.dtype.kind in "fiub" else 0)
            out.append({"name": field_path(name), "shape": tuple(a.shape), "dtype": str(a.dtype),
                        "chunks": tuple(a.chunks), "shards": tuple(a.shards) if a.shards else None,
                        "codecs": [type(a.serializer).__name__] + [type(c).__name__ for c in a.compressors],
                        "stored_bytes": stored, "raw_bytes": raw})
        return out

    def close(self) -> None:
        self._ts.clear()
        self._arrays.clear()
        self._group = None


def tensorstore_used_in_this_process() -> bool:
    """True when this process has live tensorstore state (forked children then cannot use tensorstore)."""
    return _TS_USED_BY_PID == os.getpid()
