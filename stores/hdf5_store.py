"""HDF5 back end of the abstract `stores.abc.MemoryBank` (h5py): the same datasets and attributes as the
Zarr layout, in one file.

``keys`` (N,) vlen utf-8, ``complete`` (N,) uint8, ``actions``/``bev_vec``/``gru_out`` (N, T, X) chunked one
row per chunk with gzip level 1 + shuffle, ``bev_feat/bev_feat`` (N, T, C, H, W) chunked one frame per chunk.
Group attributes are one JSON string under ``e2r_memorybank``. HDF5 allows ONE writer process at a time and
a writer killed mid-write can corrupt the file: use it for exchange and read-mostly copies; build stores with
the Zarr back end (crash safe, concurrent writers). Handles are reopened in each process (fork safe).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stores.abc import MemoryBank
from stores.errors import NotAMemoryBankError
from stores.schema import BEV_FEAT, DIM_NAMES, LIGHT_FIELDS, StoreSchema

ATTR = "e2r_memorybank"


def _dset_path(name: str) -> str:
    return f"{BEV_FEAT}/{BEV_FEAT}" if name == BEV_FEAT else name


class HDF5MemoryBank(MemoryBank):
    """`MemoryBank` over an HDF5 file."""

    backend = "hdf5"

    def __init__(self, path: str, mode: str) -> None:
        super().__init__(path, mode)
        self._file: h5py.File | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_file"], d["_pid"] = None, None
        return d

    @staticmethod
    def exists(path: str) -> bool:
        return Path(path).is_file()

    def _f(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r" if self.mode == "r" else "r+")
            self._pid = os.getpid()
        return self._file

    def _open_existing(self) -> None:
        if not self.exists(self.path):
            raise FileNotFoundError(f"no HDF5 memorybank at {self.path}")
        if ATTR not in self._f().attrs:
            raise NotAMemoryBankError(f"{self.path} is an HDF5 file but not an e2r memorybank (no '{ATTR}' attribute)")

    def _create_new(self, schema: StoreSchema) -> None:
        f = h5py.File(self.path, "w-")
        self._file, self._pid = f, os.getpid()
        S = int(self._attrs["shard_rows"])
        f.create_dataset("keys", shape=(0,), maxshape=(None,), chunks=(S,), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("complete", shape=(0,), maxshape=(None,), chunks=(S,), dtype="uint8", fillvalue=0)
        fields = list(LIGHT_FIELDS) + ([BEV_FEAT] if schema.store_bev_feat else [])
        for name in fields:
            shp = schema.row_shape(name)
            chunk = (1, *shp) if name != BEV_FEAT else (1, 1, *shp[1:])
            d = f.create_dataset(_dset_path(name), shape=(0, *shp), maxshape=(None, *shp), chunks=chunk,
                                 dtype=schema.dtype, compression="gzip", compression_opts=1, shuffle=True,
                                 fillvalue=0)
            d.attrs["dimension_names"] = json.dumps(DIM_NAMES[name])
        f.flush()

    def _read_attrs(self) -> dict[str, Any]:
        return json.loads(self._f().attrs[ATTR])

    def _write_attrs(self, attrs: dict[str, Any]) -> None:
        self._f().attrs[ATTR] = json.dumps(attrs)
        self._f().flush()

    def _n_rows(self) -> int:
        return int(self._f()["keys"].shape[0])

    def _resize(self, n: int) -> None:
        f = self._f()
        for name in ["keys", "complete", *self.schema.fields]:
            f[_dset_path(name)].resize(n, axis=0)

    def _read_keys(self, a: int, b: int) -> np.ndarray:
        if b <= a:
            return np.zeros(0, object)
        return np.array(self._f()["keys"].asstr()[a:b], dtype=object)

    def _write_keys(self, a: int, keys: np.ndarray) -> None:
        self._f()["keys"][a:a + len(keys)] = np.asarray(keys, dtype=object)
        self._f().flush()

    def _read_complete(self, a: int, b: int) -> np.ndarray:
        return self._f()["complete"][a:b].astype(bool) if b > a else np.zeros(0, bool)

    def _write_complete(self, a: int, b: int, flag: bool) -> None:
        self._f()["complete"][a:b] = np.uint8(flag)
        self._f().flush()

    def _write_field(self, name: str, a: int, data: np.ndarray) -> None:
        self._f()[_dset_path(name)][a:a + len(data)] = data
        self._f().flush()

    def _read_rows(self, fields: Sequence[str], rows: np.ndarray) -> dict[str, np.ndarray]:
        f = self._f()
        return {name: f[_dset_path(name)][rows] for name in fields}

    def _clear_rows(self, a: int, b: int) -> None:
        self._write_complete(a, b, False)
        f = self._f()
        for name in self.schema.fields:
            d = f[_dset_path(name)]
            for s in range(a, b, 256):
                d[s:min(b, s + 256)] = 0
        f["keys"][a:b] = np.array([""] * (b - a), dtype=object)
        f.flush()

    def dask_array(self, name: str) -> Any:
        import dask.array as da      # lazy: dask is only needed for this out-of-core view
        d = self._f()[_dset_path(name)]
        rows = max(1, min(d.shape[0] or 1, 1024 if name != BEV_FEAT else 8))
        return da.from_array(d, chunks=(rows, *d.shape[1:]), lock=True)

    def describe(self) -> list[dict[str, Any]]:
        """Per dataset: name, shape, dtype, chunks, codecs, stored bytes, raw bytes."""
        out = []
        for name in ["keys", "complete", *self.schema.fields]:
            d = self._f()[_dset_path(name)]
            raw = int(np.prod(d.shape)) * (d.dtype.itemsize if d.dtype.kind in "fiub" else 0)
            codecs = [c for c in (d.compression, "shuffle" if d.shuffle else None) if c]
            out.append({"name": _dset_path(name), "shape": tuple(d.shape), "dtype": str(d.dtype),
                        "chunks": d.chunks, "shards": None, "codecs": codecs,
                        "stored_bytes": int(d.id.get_storage_size()), "raw_bytes": raw})
        return out

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
