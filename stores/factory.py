"""Open and create memorybanks: the one place that picks a back end for a path.

    from stores import create_memorybank, open_memorybank
    bank = create_memorybank("mb.zarr", schema, provenance)      # or open + check an existing one
    bank = open_memorybank("mb.zarr", mode="r")

``*.h5`` / ``*.hdf5`` -> `HDF5MemoryBank`; anything else (a directory, ``*.zarr``) -> `ZarrMemoryBank`.
Both implement the abstract `stores.abc.MemoryBank`, which is the type to annotate with.
"""
from __future__ import annotations

import os

from stores.abc import MemoryBank
from stores.hdf5_store import HDF5MemoryBank
from stores.schema import Provenance, StoreSchema
from stores.zarr_store import ZarrMemoryBank

__all__ = ["backend_for", "open_memorybank", "create_memorybank", "memorybank_exists"]

HDF5_SUFFIXES = (".h5", ".hdf5")


def backend_for(path: str | os.PathLike) -> type[MemoryBank]:
    """ZarrMemoryBank for directories / ``*.zarr``, HDF5MemoryBank for ``*.h5`` / ``*.hdf5`` files."""
    if str(path).rstrip("/").endswith(HDF5_SUFFIXES):
        return HDF5MemoryBank
    return ZarrMemoryBank


def open_memorybank(path: str | os.PathLike, mode: str = "r", *, fsync: bool = True) -> MemoryBank:
    """Open an existing store; ``mode="r"`` (read-only) or ``"r+"`` (write rows into reserved splits).
    FileNotFoundError when there is none; NotAMemoryBankError when the path holds something else;
    StoreVersionError for an older on-disk format; StoreCorruptError when its attributes contradict its
    arrays or (read-only) rows lost their keys, flags or data. ``fsync=False``: writes skip fsync (faster,
    not power-loss safe; docs/STORE.md)."""
    return backend_for(path).open(path, mode=mode, fsync=fsync)


def create_memorybank(path: str | os.PathLike, schema: StoreSchema, provenance: Provenance, *,
                      shard_rows: int | None = None, exist_ok: bool = True, fsync: bool = True) -> MemoryBank:
    """Create a store, or open an existing one for writing after checking that its schema and teacher
    match (StoreMismatchError says what differs; FileExistsError when ``exist_ok=False``). ``shard_rows``
    (a power of two) is the alignment unit; default ``default_shard_rows(schema)``. Creation is atomic
    (temporary name, then rename); ``fsync`` as in `open_memorybank`."""
    return backend_for(path).create(path, schema, provenance, shard_rows=shard_rows, exist_ok=exist_ok,
                                    fsync=fsync)


def memorybank_exists(path: str | os.PathLike) -> bool:
    """True when a store of the path's back end exists there (what `create_memorybank` would reopen)."""
    return backend_for(path).exists(str(path))
