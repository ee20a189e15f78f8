"""Writing a memorybank on object storage: whole objects only (what `stores.remote.store.RemoteZarrMemoryBank`
follows; the creation of a store is here).

Object stores have no partial writes and no rename: a shard rewritten in place by two tasks loses rows
(zarr-python #3682: 30-50 % silent loss when tasks share a shard), and a half-written object is never
visible (a PUT replaces the whole object or nothing). So:

* ``create`` builds the empty store locally (the same code as a local store) and uploads it, the root
  ``zarr.json`` (the group and its attributes, which make it a memorybank) LAST: a store exists whole or
  not at all. Every object is put only if absent (`ObjectFiles.put_if_absent`: S3's ``If-None-Match: *``),
  so of two concurrent creators exactly one makes the store: the other meets an object it did not write
  (the root, or an array's metadata with other bytes: another schema), stops uploading, waits for the
  winner's root, deletes the objects it put that the winner's store does not have, and then opens the
  store exactly like an existing one: a different schema or teacher raises StoreMismatchError naming both.
  An object of equal bytes already there (a twin creator's, or one left by a creation that crashed) is
  taken as is, so a crashed creation is redone by creating again with the same schema. Where the
  filesystem has no exclusive create (gcs, azure, ...: see `ObjectFiles.put_if_absent`) the puts race as
  before conditional PUTs: the later root upload wins.
* ``write_rows`` stages the rows it is given per data shard in this handle's memory; a shard object is
  encoded (`stores.zarr_v3.shard_codec`, zarr-python's bytes) and put ONCE, when all its rows
  ``[shard start, min(shard end, split end))`` have been given, in order. Only then are the completion flags
  of those rows written (whole ``complete`` chunks of S rows: one chunk per shard of a task). A write that
  would need a stored shard to be merged with new rows (it starts inside a shard this handle did not start)
  is refused with `StoreError`; ``close`` refuses to drop staged rows silently. A crash loses the staged
  rows only: they are not flagged complete, and a resume redoes them.
* ``reserve_split`` / ``remove_split`` (one process, no writer running, as locally) write the keys and
  flag chunks whole (read-modify-write of a chunk shared with another split's keys), the split's key index
  object, then the root attributes last.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stores.errors import StoreError, StoreMismatchError
from stores.remote.objstore import ObjectFiles
from stores.schema import Provenance, StoreSchema, check_compatible
from stores.zarr_v3.store import ZarrMemoryBank

ROOT = "zarr.json"
CREATE_WAIT_S = 60.0        # how long a creator that met another creator's objects waits for that store's root


def empty_store_objects(schema: StoreSchema, provenance: Provenance, shard_rows: int | None) -> dict[str, bytes]:
    """``{name: bytes}`` of a new empty store, built locally by the local store's code: the arrays' objects in
    name order, then the root ``zarr.json`` (its attributes make it a memorybank) last."""
    with tempfile.TemporaryDirectory(prefix="e2r-mb-") as tmp:
        ZarrMemoryBank.create(os.path.join(tmp, "s.zarr"), schema, provenance, shard_rows=shard_rows, exist_ok=False,
                              fsync=False).close()
        root = Path(tmp) / "s.zarr"
        rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        return {rel: (root / rel).read_bytes() for rel in [r for r in rels if r != ROOT] + [ROOT]}


def upload_new(files: ObjectFiles, objects: Mapping[str, bytes]) -> tuple[str | None, list[str]]:
    """Put ``objects`` in order, each only if absent; an object already there with the same bytes is taken as
    is (never for the root). Returns ``(conflict, created)``: the first object found with other bytes (or the
    root found there), None when the whole store was put; and the names this call wrote. It stops at the
    conflict: nothing after it is written."""
    created: list[str] = []
    for rel, data in objects.items():
        if files.put_if_absent(rel, data):
            created.append(rel)
        elif rel == ROOT or files.get(rel) != data:
            return rel, created
    return None, created


def await_root(files: ObjectFiles, conflict: str, wait_s: float) -> None:
    """Wait up to ``wait_s`` for the root ``zarr.json`` of a store another creator is uploading; StoreError
    saying what to do when it does not appear."""
    deadline = time.monotonic() + wait_s
    while files.info(ROOT) is None:
        if time.monotonic() >= deadline:
            raise StoreError(
                f"memorybank {files.url}: another store is being created there (its object {conflict!r} differs from "
                f"this creator's) but its root zarr.json did not appear within {wait_s:.0f} s: another creator is "
                "still uploading, or a creation with another schema crashed. If no other process is creating it, "
                f"delete the partial store (stores.remove_memorybank({files.url!r}), or `aws s3 rm --recursive "
                f"{files.url}`) and create it again")
        time.sleep(0.2)


def remove_strays(files: ObjectFiles, created: list[str]) -> None:
    """After a lost race: delete the objects this creator put (``created``: absent before, so no other creator
    wrote them) that the winner's store does not have (e.g. ``bev_feat`` arrays it does not store)."""
    if not created:
        return
    raw = files.get(ROOT)
    try:
        attrs = json.loads(raw or b"")["attributes"]
        theirs = empty_store_objects(StoreSchema.from_dict(attrs), Provenance.from_dict(attrs), attrs["shard_rows"])
    except (ValueError, KeyError, TypeError):
        return                                   # not a memorybank root: opening it says so
    files.delete([rel for rel in created if rel not in theirs])


def create_remote(cls: Any, path: str | os.PathLike, schema: StoreSchema, provenance: Provenance, *,
           shard_rows: int | None = None, exist_ok: bool = True, fsync: bool = True,
           storage_options: dict[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
           cache_bytes: int | None = None) -> Any:
    """`RemoteZarrMemoryBank.create` (``cls``): create the store at the URL ``path`` (uploaded whole, root metadata last, each object only if absent),
    or open an existing one "r+" after checking its schema and teacher (StoreMismatchError; FileExistsError
    when ``exist_ok=False``). A creator that loses a race to another (see the module docstring) ends as if
    the store had existed when it was called."""
    kw = {"storage_options": storage_options, "cache_dir": cache_dir, "cache_bytes": cache_bytes}
    files = ObjectFiles(str(path).rstrip("/"), storage_options)
    raced = False
    if files.info(ROOT) is None:
        conflict, created = upload_new(files, empty_store_objects(schema, provenance, shard_rows))
        if conflict is None:
            return cls.open(path, mode="r+", fsync=fsync, **kw)
        await_root(files, conflict, CREATE_WAIT_S)
        remove_strays(files, created)
        raced = True
    if not exist_ok:
        raise FileExistsError(f"memorybank {path} already exists" + (" (another process created it just now)"
                                                                     if raced else ""))
    bank = cls.open(path, mode="r+", fsync=fsync, **kw)
    try:
        check_compatible(bank.schema, bank.provenance, schema, provenance, str(path))
    except StoreMismatchError as e:
        bank.close()
        if not raced:
            raise
        raise StoreMismatchError(
            f"{e}. Another process created this store while this one was creating it, with the store's settings "
            "above: write to another URL, or give the store's schema and teacher; delete the store "
            f"(stores.remove_memorybank({str(path)!r})) only if no process writes to it and its rows are not "
            "needed") from None
    return bank
