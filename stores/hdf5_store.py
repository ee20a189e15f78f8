"""HDF5 back end of the abstract `stores.abc.MemoryBank` (h5py): the same datasets and attributes as the
Zarr layout, in one file.

``keys`` (N,) vlen utf-8, ``complete`` (N,) uint8, ``actions``/``bev_vec``/``gru_out`` (N, T, X) chunked one
row per chunk with gzip level 1 + shuffle, ``bev_feat/bev_feat`` (N, T, C, H, W) chunked one frame per chunk.
Every numeric chunk carries a fletcher32 checksum (HDF5 allows no filter on vlen strings: the keys of each
split are checked against the ``keys_crc32c`` recorded in its split entry). Group attributes are one JSON
string under ``e2r_memorybank``. Stores made since identity tags (`stores.abc.identity`) have a dataset
``identity`` (N, F) uint64 (F = the fields, chunks of ``shard_rows`` rows, fletcher32): each row's tag binds
the crc32c of its decoded bytes to its key, row, split reservation, store and teacher, so rows swapped or
copied (their fletcher32 recomputed by HDF5) are refused. HDF5 allows ONE writer process at a time (the
library's file lock; it also keeps ``rm-split`` out while a reader has the file open) and a writer killed
mid-write can corrupt the file: use it for exchange and read-mostly copies; build stores with the Zarr back
end (crash safe, concurrent writers). Handles are reopened in each process (fork safe).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from stores.abc import MemoryBank
from stores.abc.identity import IDENTITY, encode_tags, row_crc32c
from stores.errors import StoreCorruptError, StoreReadOnlyError
from stores.fsio import json_object, regular_size
from stores.schema import BEV_FEAT, DEPTH, DIM_NAMES, GROUP_FIELDS, LIGHT_FIELDS, StoreSchema
from stores.validate import ArrayInfo, check_store

ATTR = "e2r_memorybank"
NAMES = ("keys", "complete", *LIGHT_FIELDS, BEV_FEAT, DEPTH)


def _dset_path(name: str) -> str:
    return f"{name}/{name}" if name in GROUP_FIELDS else name


class HDF5MemoryBank(MemoryBank):
    """`MemoryBank` over an HDF5 file."""

    backend = "hdf5"

    def __init__(self, path: str, mode: str, fsync: bool = True) -> None:
        super().__init__(path, mode, fsync)
        self._file: h5py.File | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_file"], d["_pid"], d["_tagc"], d["_keys_cache"] = None, None, None, None
        return d

    @staticmethod
    def exists(path: str) -> bool:
        return os.path.lexists(path)

    def _f(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            if regular_size(self.path, self.path) is None:
                raise FileNotFoundError(f"no HDF5 memorybank at {self.path}")
            try:
                self._file = h5py.File(self.path, "r" if self.mode == "r" else "r+")
            except PermissionError as e:
                raise StoreReadOnlyError(f"cannot open memorybank {self.path} for writing: {e}. The file is "
                                         "read-only or on a read-only file system") from None
            except OSError as e:
                raise StoreCorruptError(f"memorybank {self.path}: HDF5 cannot open the file ({e}); it is truncated "
                                        "or damaged. Restore it, or convert it again from its Zarr original",
                                        path=self.path) from None
            self._pid = os.getpid()
        return self._file

    def _open_existing(self) -> dict[str, Any]:
        if not self.exists(self.path):
            raise FileNotFoundError(f"no HDF5 memorybank at {self.path}")
        f = self._f()
        if ATTR not in f.attrs:
            raise self._not_a_bank(f"an HDF5 file without the '{ATTR}' attribute")
        raw = f.attrs[ATTR]
        attrs = json_object(raw.encode() if isinstance(raw, str) else bytes(raw), f"{self.path}: attribute "
                            f"'{ATTR}'", self.path)       # StoreCorruptError: not JSON, nested too deep, no object
        self._check_version(attrs)
        infos: dict[str, ArrayInfo | None] = {}
        for name in NAMES:
            d = f.get(_dset_path(name))
            if not isinstance(d, h5py.Dataset):
                infos[name] = None
                continue
            chunks = d.chunks or (0,)
            dtype = "" if d.dtype.kind == "O" else str(d.dtype)
            infos[name] = ArrayInfo(tuple(d.shape), dtype, chunks[0], chunks[0] if name not in ("keys", "complete")
                                    else 0, bool(d.fletcher32) or name == "keys")
        problems, _ = check_store(attrs, infos, "hdf5", legacy=self._legacy)
        if problems:
            raise StoreCorruptError(f"memorybank {self.path}: its attributes and datasets disagree: "
                                    + "; ".join(problems) + f". Run `python -m stores verify {self.path}`",
                                    path=self.path)
        return attrs

    @classmethod
    def abandoned(cls, path: str) -> bool:
        """An HDF5 file left by a creation killed in place: no attribute, only our datasets, all empty."""
        try:
            if regular_size(path) is None:
                return False
            with h5py.File(path, "r") as f:
                if ATTR in f.attrs:
                    return False
                found: list[h5py.Dataset] = []
                f.visititems(lambda n, o: found.append(o) if isinstance(o, h5py.Dataset) else None)
                return all(d.name.lstrip("/") in map(_dset_path, NAMES) and d.shape[0] == 0 for d in found)
        except (OSError, StoreCorruptError):
            return False

    @staticmethod
    def _discard(path: str) -> None:
        os.unlink(path)

    def _create_new(self, schema: StoreSchema) -> None:
        f = h5py.File(self.path, "w-")
        self._file, self._pid = f, os.getpid()
        S = int(self._attrs["shard_rows"])
        f.create_dataset("keys", shape=(0,), maxshape=(None,), chunks=(S,), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("complete", shape=(0,), maxshape=(None,), chunks=(S,), dtype="uint8", fillvalue=0,
                         fletcher32=True)
        for name in schema.fields:
            shp = schema.row_shape(name)
            chunk = (1, *shp) if name != BEV_FEAT else (1, 1, *shp[1:])
            d = f.create_dataset(_dset_path(name), shape=(0, *shp), maxshape=(None, *shp), chunks=chunk,
                                 dtype=schema.field_dtype(name), compression="gzip", compression_opts=1, shuffle=True,
                                 fletcher32=True, fillvalue=0)
            d.attrs["dimension_names"] = json.dumps(DIM_NAMES[name])
        if self.has_identity:
            F = len(self._identity_arrays())
            f.create_dataset(IDENTITY, shape=(0, F), maxshape=(None, F), chunks=(S, F), dtype="<u8", fillvalue=0,
                             fletcher32=True)
        f.flush()

    def _write_attrs(self, attrs: dict[str, Any]) -> None:
        self._f().attrs[ATTR] = json.dumps(attrs)
        self._f().flush()

    def _n_rows(self) -> int:
        return int(self._f()["keys"].shape[0])

    def _resize(self, n: int) -> None:
        f = self._f()
        for name in [*self.schema.fields, *([IDENTITY] if self.has_identity else []), "complete", "keys"]:  # keys last
            f[_dset_path(name)].resize(n, axis=0)

    def _read(self, name: str, sel: Any, rows: Sequence[int]) -> np.ndarray:
        try:
            return self._f()[_dset_path(name)][sel]
        except OSError as e:
            keys = self._keys_of(rows)
            raise StoreCorruptError(f"memorybank {self.path}: dataset {_dset_path(name)!r} rows {rows[0]}..{rows[-1]} "
                                    f"do not read ({e}; a fletcher32 checksum failed or the file is damaged)",
                                    path=self.path, array=name, chunk=f"{_dset_path(name)} rows {rows[0]}..{rows[-1]}",
                                    keys=keys[:16]) from None

    def _read_keys(self, a: int, b: int) -> np.ndarray:
        if b <= a:
            return np.zeros(0, object)
        try:
            return np.array(self._f()["keys"].asstr()[a:b], dtype=object)
        except (OSError, UnicodeDecodeError) as e:
            raise StoreCorruptError(f"memorybank {self.path}: keys rows [{a}, {b}) do not read ({e})",
                                    path=self.path, array="keys") from None

    def _write_keys(self, a: int, keys: np.ndarray) -> None:
        self._f()["keys"][a:a + len(keys)] = np.asarray(keys, dtype=object)
        self._f().flush()

    def _read_flags(self, a: int, b: int) -> np.ndarray:
        if b <= a:
            return np.zeros(0, np.uint8)
        return np.asarray(self._read("complete", slice(a, b), [a, b - 1]), np.uint8)

    def _write_flags(self, a: int, b: int, value: int) -> None:
        if b > a:
            self._f()["complete"][a:b] = np.uint8(value)
            self._f().flush()

    def _write_field(self, name: str, a: int, data: np.ndarray) -> None:
        self._f()[_dset_path(name)][a:a + len(data)] = data
        self._f().flush()

    def _read_rows(self, fields: Sequence[str], rows: np.ndarray, views: bool = False,
                   salts: np.ndarray | None = None) -> dict[str, np.ndarray]:
        uniq, first, inv = np.unique(rows, return_index=True, return_inverse=True)   # h5py reads increasing rows
        ident = self._identity() if salts is not None else None
        tags = self._read(IDENTITY, uniq, uniq.tolist()) if ident is not None and len(uniq) else None
        out = {}
        for name in fields:
            try:
                d = self._f()[_dset_path(name)][uniq]
            except OSError:             # find the row that fails, name it and its key
                for r in uniq.tolist():
                    self._read(name, r, [r])
                raise
            if ident is not None and tags is not None:
                self._check_identity(name, uniq, d, ident.expected(salts[first], name, tags[:, ident.columns[name]]))
            out[name] = d if len(uniq) == len(rows) and (inv == np.arange(len(rows))).all() else d[inv]
        return out

    def _rows_with_data(self, a: int, b: int) -> np.ndarray:
        """(b - a,) bool: rows whose chunks read back through their fletcher32 checksums (a resume redoes the
        others instead of skipping them), 256 rows at a time, a failing block narrowed down row by row."""
        ok = np.ones(max(0, b - a), bool)
        for name in self.schema.fields:
            d = self._f()[_dset_path(name)]
            for s in range(a, b, 256):
                try:
                    d[s:min(b, s + 256)]
                except OSError:
                    for r in range(s, min(b, s + 256)):
                        try:
                            d[r]
                        except OSError:
                            ok[r - a] = False
        return ok

    def _check_identity(self, name: str, rows: np.ndarray, data: np.ndarray, expected: np.ndarray) -> None:
        """StoreCorruptError naming the file, dataset, row and key of the first of ``rows`` whose decoded bytes
        (``data``) do not have the crc32c their identity tag gives (``expected``)."""
        bad = np.flatnonzero(row_crc32c(data).astype(np.uint64) != expected)
        if len(bad):
            r = int(rows[bad[0]])
            keys = self._keys_of([r])
            raise StoreCorruptError(f"memorybank {self.path}: dataset {_dset_path(name)!r} row {r} (key "
                                    f"{keys[0] if keys else '?'!r}) failed its identity check: it is not the row "
                                    "written for this key at this row of this split in this store (rows swapped "
                                    f"or copied, a lost tag, or another store's); {len(bad)} row(s) of this read. "
                                    f"Run `python -m stores verify {self.path}`", path=self.path, array=name,
                                    chunk=f"{_dset_path(name)} row {r}", keys=keys)

    # ------------------------------------------------------------------ identity, generation
    def _identity_arrays(self) -> list[str]:
        return list(self.schema.fields)

    def _identity_problems(self) -> list[str]:
        out = super()._identity_problems()
        d = self._f().get(IDENTITY) if self.has_identity and not out else None
        if self.has_identity and not out and (not isinstance(d, h5py.Dataset) or d.dtype != np.uint64 or
                                              d.ndim != 2 or d.shape[1] != len(self._identity_arrays()) or
                                              d.shape[0] < self._n_rows() or not d.fletcher32):
            out.append(f"dataset {IDENTITY!r} (the rows' identity tags) is missing or not (>= {self._n_rows()}, "
                       f"{len(self._identity_arrays())}) uint64 with fletcher32")
        return out

    def _row_crcs(self, array: str, a: int, b: int, block: Any) -> np.ndarray:
        return row_crc32c(block[array])

    def _write_tags(self, a: int, tags: np.ndarray) -> None:
        if len(tags):
            self._f()[IDENTITY][a:a + len(tags)] = tags
            self._f().flush()

    def _load_tags(self, c: int) -> bytes | None:
        S, d = self.alignment, self._f()[IDENTITY]
        tags = np.zeros((S, d.shape[1]), np.uint64)
        got = self._read(IDENTITY, slice(c * S, min(d.shape[0], (c + 1) * S)), [c * S, (c + 1) * S - 1])
        tags[:len(got)] = got
        return encode_tags(tags)

    def _attrs_signature(self) -> Any:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return ("gone",)
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _read_attrs_fresh(self) -> dict[str, Any] | None:
        if self.mode == "r":
            self.close()                 # another process wrote the file: HDF5 caches what this handle read
        try:
            return dict(json.loads(self._f().attrs[ATTR]))
        except (OSError, KeyError, ValueError, TypeError, StoreCorruptError, FileNotFoundError):
            return None

    def _reload_attrs(self) -> None:
        self.close()
        self._attrs = self._open_existing()

    def _clear_rows(self, a: int, b: int) -> None:
        self._write_complete(a, b, False)
        f = self._f()
        for name in self.schema.fields:
            d = f[_dset_path(name)]
            for s in range(a, b, 256):
                d[s:min(b, s + 256)] = 0
        f["keys"][a:b] = np.array([""] * (b - a), dtype=object)
        f.flush()

    def _sync_rows(self, names: Sequence[str], a: int, b: int) -> None:
        f = self._f()
        f.flush()
        os.fsync(f.id.get_vfd_handle())

    def _sync_meta(self) -> None:
        self._sync_rows((), 0, 0)

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
            codecs = [c for c in (d.compression, "shuffle" if d.shuffle else None,
                                  "fletcher32" if d.fletcher32 else None) if c]
            out.append({"name": _dset_path(name), "shape": tuple(d.shape), "dtype": str(d.dtype),
                        "chunks": d.chunks, "shards": None, "codecs": codecs,
                        "stored_bytes": int(d.id.get_storage_size()), "raw_bytes": raw})
        return out

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

