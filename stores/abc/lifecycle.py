"""Creating and recognising memorybanks, for every back end: the format/version check of an opened store,
and crash-proof creation.

Creation builds the whole new store under a temporary sibling name (``.<name>.e2r-tmp-<host>-<pid>-<rand>``),
fsyncs it, and renames it into place without replacing anything (`stores.fsio.publish`). So a store exists
whole or not at all: a kill or a full disk during creation leaves at most a temporary sibling, which the
next creation on this host removes; of two processes creating the same store at once, one publishes and the
other opens the winner's store (StoreMismatchError if its schema or teacher differ). The remains of a
creation killed in place by an older version (a group without attributes and empty arrays) are replaced.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from stores.abc.identity import new_identity
from stores.errors import NotAMemoryBankError, StoreError, StoreVersionError
from stores.fsio import fsync_tree, publish, remove_path, remove_stale_temps, temp_sibling, writing
from stores.layout import FORMAT_NAME, new_store_attrs
from stores.paths import check_new_path
from stores.schema import (INDEXED_SCHEMA_VERSIONS, INDEXLESS_SCHEMA_VERSIONS, LEGACY_SCHEMA_VERSIONS,
                           SCHEMA_VERSION, Provenance, StoreSchema, check_compatible)

if TYPE_CHECKING:
    from stores.abc.store import MemoryBank


def not_a_bank(path: str, why: str) -> NotAMemoryBankError:
    return NotAMemoryBankError(f"{why}: {path} is not an e2r memorybank. Choose another path, or delete it if "
                               "it is the remains of something else")


def check_version(path: str, attrs: dict[str, Any], legacy_ok: bool = False) -> None:
    """NotAMemoryBankError when ``attrs`` are not a memorybank's; StoreVersionError for a schema_version this
    code does not read (``legacy_ok``: accept the older versions `python -m stores convert` rewrites)."""
    if attrs.get("format") != FORMAT_NAME:
        raise not_a_bank(path, f"group attribute format={attrs.get('format')!r}")
    v = attrs.get("schema_version")
    if v in INDEXED_SCHEMA_VERSIONS or v in INDEXLESS_SCHEMA_VERSIONS or (legacy_ok and v in LEGACY_SCHEMA_VERSIONS):
        return
    if v in LEGACY_SCHEMA_VERSIONS:
        raise StoreVersionError(
            f"memorybank {path} has schema_version {v}, written before every chunk carried a checksum; this "
            f"version reads schema_version {SCHEMA_VERSION}. Convert it: `python -m stores convert {path} NEW` "
            "(reads the old layout, writes a checksummed copy), or re-export it")
    if v == 1:
        raise StoreVersionError(f"memorybank {path}: schema_version 1 (one array per light field) is not readable "
                                f"by this version ({SCHEMA_VERSION}); re-export it")
    raise StoreVersionError(f"memorybank {path} has schema_version {v!r}; this version reads 3 to {SCHEMA_VERSION} "
                            "(a newer e2r-kd wrote it? upgrade)")


def create_store(cls: type["MemoryBank"], path: str, schema: StoreSchema, provenance: Provenance,
                 shard_rows: int | None, exist_ok: bool, fsync: bool) -> "MemoryBank":
    """`MemoryBank.create` for back end ``cls`` (see the module docstring)."""
    attrs = new_store_attrs(schema, provenance, shard_rows)
    if cls.exists(path) and cls.abandoned(path):
        with writing("remove the remains of an interrupted creation", path):
            cls._discard(path)
    if cls.exists(path):
        return _open_existing(cls, path, schema, provenance, exist_ok, fsync)
    check_new_path(path)              # a file where a folder should be, /proc: named before anything is made
    remove_stale_temps(path)
    tmp = temp_sibling(path)
    try:
        with writing("create the store", path):
            os.makedirs(os.path.dirname(tmp), exist_ok=True)          # its folder (zarr-python makes it too)
            bank = cls(tmp, "r+", fsync)
            bank._attrs = attrs
            if bank._identity_arrays():          # rows carry identity tags (stores.abc.identity)
                attrs["identity"] = new_identity(attrs, bank._identity_arrays())
            bank._create_new(schema)
            bank._write_attrs(bank._attrs)
            bank.close()
            if fsync:
                fsync_tree(tmp)
            won = publish(tmp, path)
    except BaseException:
        remove_path(tmp, settle_s=0.5)      # the failed creation's other writes may still be landing
        raise
    remove_path(tmp)
    if won:
        return cls.open(path, mode="r+", fsync=fsync)
    if not cls.exists(path):
        if cls.abandoned(path):        # killed in place (older version) while we built ours: replace it
            with writing("remove the remains of an interrupted creation", path):
                cls._discard(path)
            return create_store(cls, path, schema, provenance, shard_rows, exist_ok, fsync)
        raise StoreError(f"cannot create memorybank {path}: the path exists and is not a memorybank (a non-empty "
                         "directory or a file). Choose another path, or remove it")
    return _open_existing(cls, path, schema, provenance, exist_ok, fsync)


def _open_existing(cls: type["MemoryBank"], path: str, schema: StoreSchema, provenance: Provenance,
                   exist_ok: bool, fsync: bool) -> "MemoryBank":
    if not exist_ok:
        raise FileExistsError(f"memorybank {path} already exists")
    bank = cls.open(path, mode="r+", fsync=fsync)
    check_compatible(bank.schema, bank.provenance, schema, provenance, path)
    return bank
