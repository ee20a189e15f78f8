"""Open and create memorybanks: the one place that picks a back end for a path.

    from stores import create_memorybank, open_memorybank
    bank = create_memorybank("mb.zarr", schema, provenance)      # or open + check an existing one
    bank = open_memorybank("mb.zarr", mode="r")

``*.h5`` / ``*.hdf5`` -> `HDF5MemoryBank`; anything else (a directory, ``*.zarr``) -> `ZarrMemoryBank`; a URL
of object storage (``s3://bucket/mb.zarr``, any fsspec protocol but ``file``) -> `RemoteZarrMemoryBank`, with
``storage_options`` (fsspec's arguments: endpoint, credentials; else the usual environment variables) and an
optional local ``cache_dir`` (size-capped at ``cache_bytes``). All implement the abstract
`stores.abc.MemoryBank`, which is the type to annotate with.
"""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Any

import h5py

from stores.abc import MemoryBank
from stores.errors import NotAMemoryBankError, StoreError
from stores.fsio import file_kind, json_object, read_json, regular_size
from stores.hdf5_store import ATTR, HDF5MemoryBank
from stores.layout import FORMAT_NAME
from stores.remote.objstore import ObjectFiles, is_remote
from stores.remote.store import RemoteZarrMemoryBank
from stores.schema import Provenance, StoreSchema
from stores.zarr_v3.store import ZarrMemoryBank

__all__ = ["backend_for", "open_memorybank", "create_memorybank", "memorybank_exists", "is_memorybank",
           "remove_memorybank", "stored_bytes"]

HDF5_SUFFIXES = (".h5", ".hdf5")


def backend_for(path: str | os.PathLike) -> type[MemoryBank]:
    """ZarrMemoryBank for directories / ``*.zarr``, HDF5MemoryBank for ``*.h5`` / ``*.hdf5`` files,
    RemoteZarrMemoryBank for URLs of object storage (ValueError for an HDF5 file there)."""
    hdf5 = str(path).rstrip("/").endswith(HDF5_SUFFIXES)
    if is_remote(path):
        if hdf5:
            raise ValueError(f"{path}: HDF5 stores are read from local files only; copy it to a local disk, or "
                             "convert it to Zarr (`python -m stores convert A.h5 B.zarr`) and upload that")
        return RemoteZarrMemoryBank
    return HDF5MemoryBank if hdf5 else ZarrMemoryBank


def _remote_kw(path: str | os.PathLike, storage_options: dict[str, Any] | None, cache_dir: str | os.PathLike | None,
               cache_bytes: int | None) -> dict[str, Any]:
    """The object-store arguments for a URL; none for a local path (they do not apply to it)."""
    if not is_remote(path):
        return {}
    return {"storage_options": storage_options, "cache_dir": cache_dir, "cache_bytes": cache_bytes}


def open_memorybank(path: str | os.PathLike, mode: str = "r", *, fsync: bool = True, lenient: bool = False,
                    storage_options: dict[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
                    cache_bytes: int | None = None) -> MemoryBank:
    """Open an existing store; ``mode="r"`` (read-only) or ``"r+"`` (write rows into reserved splits).
    FileNotFoundError when there is none; NotAMemoryBankError when the path holds something else;
    StoreVersionError for an older on-disk format; StoreCorruptError when its attributes contradict its
    arrays or (read-only) rows lost their keys, flags or data. ``fsync=False``: writes skip fsync (faster,
    not power-loss safe; docs/STORE.md). For a URL (``s3://...``): ``storage_options`` for fsspec,
    ``cache_dir`` / ``cache_bytes`` for the local cache of fetched chunks (ignored for local paths).
    ``lenient=True`` (read-only): open a damaged store instead of refusing it, ``damage`` listing what is lost
    (what `stores.verify` does)."""
    cls = backend_for(path)
    if cls is ZarrMemoryBank:                # a Zarr store is a folder: anything else is named, not opened
        try:
            st = os.stat(path)
        except OSError:
            st = None                        # absent (FileNotFoundError from the back end) or unreadable
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise NotAMemoryBankError(f"{path} is {file_kind(st.st_mode)}, not a memorybank (a Zarr memorybank is a "
                                      "folder; an HDF5 one a file named *.h5 or *.hdf5)")
    return cls.open(path, mode=mode, fsync=fsync, lenient=lenient,
                    **_remote_kw(path, storage_options, cache_dir, cache_bytes))


def create_memorybank(path: str | os.PathLike, schema: StoreSchema, provenance: Provenance, *,
                      shard_rows: int | None = None, exist_ok: bool = True, fsync: bool = True,
                      storage_options: dict[str, Any] | None = None) -> MemoryBank:
    """Create a store, or open an existing one for writing after checking that its schema and teacher
    match (StoreMismatchError says what differs; FileExistsError when ``exist_ok=False``). ``shard_rows``
    (a power of two) is the alignment unit; default ``default_shard_rows(schema)``. Creation is atomic
    (temporary name, then rename; on object storage: uploaded, root metadata last); ``fsync`` and
    ``storage_options`` as in `open_memorybank`."""
    return backend_for(path).create(path, schema, provenance, shard_rows=shard_rows, exist_ok=exist_ok,
                                    fsync=fsync, **_remote_kw(path, storage_options, None, None))


def memorybank_exists(path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> bool:
    """True when a store of the path's back end exists there (what `create_memorybank` would reopen)."""
    if is_remote(path):
        return RemoteZarrMemoryBank.exists_at(str(path), storage_options)
    return backend_for(path).exists(str(path))


def is_memorybank(path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> bool:
    """True when ``path`` carries the memorybank marker: root attribute ``format="e2r-memorybank"`` (a Zarr
    group's ``zarr.json``, locally or under a URL; an HDF5 file's ``e2r_memorybank`` attribute). Only the marker is
    read: a damaged store of ours is one; anything unreadable, another Zarr group or array, a plain directory
    or file is not."""
    try:
        if is_remote(path):
            raw = ObjectFiles(str(path).rstrip("/"), storage_options).get("zarr.json")
            root = json_object(raw, f"{path}/zarr.json") if raw is not None else None
        elif backend_for(path) is HDF5MemoryBank:
            if not regular_size(path):
                return False
            with h5py.File(path, "r") as f:
                raw = f.attrs.get(ATTR)
            root = {"attributes": json_object(str(raw).encode(), f"{path}:{ATTR}")} if raw is not None else None
        else:
            root = read_json(Path(path) / "zarr.json")
    except (StoreError, OSError, ValueError):
        return False
    attrs = root.get("attributes") if isinstance(root, dict) else None
    return (root or {}).get("node_type", "group") == "group" and isinstance(attrs, dict) \
        and attrs.get("format") == FORMAT_NAME


def remove_memorybank(path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
    """Delete the store at ``path`` (a directory tree, a file, or every object under a URL); absent is fine.
    NotAMemoryBankError, nothing deleted, when ``path`` holds anything without the memorybank marker
    (`is_memorybank`): another Zarr group or array, a plain directory or file, an unreadable root."""
    exists = (ObjectFiles(str(path).rstrip("/"), storage_options).listing() if is_remote(path)
              else os.path.lexists(path))
    if exists and not is_memorybank(path, storage_options):
        raise NotAMemoryBankError(f"refusing to delete {path}: it is not an e2r memorybank (no root attribute "
                                  f"format={FORMAT_NAME!r}: another Zarr group or array, a plain directory or file, "
                                  "or a store whose root metadata is unreadable). Delete it yourself if it is yours, "
                                  "or choose another path")
    if is_remote(path):
        ObjectFiles(str(path).rstrip("/"), storage_options).delete_tree()
    elif Path(path).is_dir() and not Path(path).is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        Path(path).unlink()


def stored_bytes(path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> int:
    """Bytes the store at ``path`` occupies (its files, or its objects under a URL)."""
    if is_remote(path):
        return sum(e.size for e in ObjectFiles(str(path).rstrip("/"), storage_options).listing().values())
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
