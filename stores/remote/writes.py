"""Writing a memorybank on object storage: whole objects only (a mixin of `stores.remote.store.RemoteZarrMemoryBank`).

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

import numpy as np

from stores.errors import StoreError, StoreMismatchError
from stores.zarr_v3.flat_chunks import encode_flat_chunk
from stores.index_file import INDEX_DIR, SUFFIX, write_index
from stores.layout import COMPLETE_UNSET, new_store_attrs
from stores.remote.objstore import ObjectFiles
from stores.schema import BEV_FEAT, LIGHT_ARRAY, LIGHT_FIELDS, Provenance, StoreSchema, check_compatible
from stores.zarr_v3.shard_codec import encode_threads
from stores.zarr_v3.checks import field_path
from stores.zarr_v3.store import ZarrMemoryBank

ROOT = "zarr.json"
CREATE_WAIT_S = 60.0        # how long a creator that met another creator's objects waits for that store's root


def empty_store_objects(schema: StoreSchema, provenance: Provenance, shard_rows: int | None) -> dict[str, bytes]:
    """``{name: bytes}`` of a new empty store, built locally by the local store's code: the arrays' objects in
    name order, then the root ``zarr.json`` (its attributes make it a memorybank) last."""
    with tempfile.TemporaryDirectory(prefix="e2r-mb-") as tmp:
        local = ZarrMemoryBank(os.path.join(tmp, "s.zarr"), "r+", False)
        local._attrs = new_store_attrs(schema, provenance, shard_rows)
        local._create_new(schema)
        local._write_attrs(local._attrs)
        local.close()
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


class RemoteWrites:
    """Mixin: the write primitives of `RemoteZarrMemoryBank` (see the module docstring)."""

    files: ObjectFiles
    path: str
    _metas: dict[str, dict[str, Any]]
    _readers: dict[str, Any]
    _attrs: dict[str, Any]
    disk_index: bool
    alignment: int
    splits: dict[str, tuple[int, int]]
    _codec: Any
    _flat_reader: Any
    _arrays_on_disk: Any
    _chunk_rows: Any
    write_threads: int | None
    open: Any
    _staged: dict[tuple[str, int], dict[str, Any]]     # (array, shard) -> rows given, not yet put
    _stored: list[tuple[int, int]]                      # light shards put since the last flags write

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, path: str | os.PathLike, schema: StoreSchema, provenance: Provenance, *,
               shard_rows: int | None = None, exist_ok: bool = True, fsync: bool = True,
               storage_options: dict[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
               cache_bytes: int | None = None) -> Any:
        """Create the store at the URL ``path`` (uploaded whole, root metadata last, each object only if absent),
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

    # ------------------------------------------------------------------ metadata, keys, flags
    def _write_attrs(self, attrs: dict[str, Any]) -> None:
        self.files.put(ROOT, json.dumps({"attributes": attrs, "zarr_format": 3, "node_type": "group"},
                                               indent=2).encode())

    def _resize(self, n: int) -> None:
        """Grow every array to ``n`` rows (their zarr.json objects, the keys array last)."""
        for name in [*self._arrays_on_disk(), "complete", "keys"]:
            path = field_path(name)
            meta = self._metas[path]
            if int(meta["shape"][0]) > n:
                raise StoreError(f"{self.path}: arrays of an object store only grow ({path} has {meta['shape'][0]} "
                                 f"rows, asked {n})")
            if int(meta["shape"][0]) != n:
                meta = {**meta, "shape": [n, *meta["shape"][1:]]}
                self.files.put(f"{path}/zarr.json", json.dumps(meta, indent=2).encode())
                self._metas[path] = meta
        self._readers.clear()

    def _put_flat(self, name: str, a: int, values: np.ndarray, fill: Any) -> None:
        """Rows ``[a, a + len(values))`` of ``keys`` / ``complete``: each chunk they touch written whole (the
        rest of a partly covered chunk read first; a damaged or absent one counts as fill); an all-fill
        chunk is deleted (as zarr-python does)."""
        C, b = self._chunk_rows(name), a + len(values)
        for c in range(a // C, -(-b // C)):
            lo, hi = max(a, c * C), min(b, (c + 1) * C)
            if lo == c * C and hi == (c + 1) * C:
                chunk = np.asarray(values[lo - a:hi - a])
            else:
                try:
                    old = self._flat_reader(name).chunk(c)
                except ValueError:
                    old = None                             # damaged: its rows are lost anyway (redo / re-reserve)
                chunk = np.full(C, fill, dtype=object if name == "keys" else np.uint8) if old is None else old.copy()
                chunk[lo - c * C:hi - c * C] = values[lo - a:hi - a]
            rel = f"{name}/c/{c}"
            if (chunk == fill).all():
                self.files.delete([rel])
            else:
                self.files.put(rel, encode_flat_chunk(self._metas[name], chunk))

    def _write_keys(self, a: int, keys: np.ndarray) -> None:
        self._put_flat("keys", a, np.asarray(keys, dtype=object), "")

    def _write_flags(self, a: int, b: int, value: int) -> None:
        if b > a:
            self._put_flat("complete", a, np.full(b - a, value, np.uint8), COMPLETE_UNSET)

    def _write_split_index(self, split: str, start: int, keys: list[str], crc: int) -> None:
        if self.disk_index:
            with tempfile.TemporaryDirectory(prefix="e2r-idx-") as tmp:
                local = Path(tmp).joinpath(*INDEX_DIR, f"{split}{SUFFIX}")
                write_index(local, split, start, crc, keys, fsync=False)
                self.files.put("/".join([*INDEX_DIR, f"{split}{SUFFIX}"]), local.read_bytes())

    def _remove_split_index(self, split: str) -> None:
        self.files.delete(["/".join([*INDEX_DIR, f"{split}{SUFFIX}"])])

    def reindex(self) -> list[str]:
        raise StoreError(f"{self.path}: `reindex` rewrites a store in place; run it on a local copy and upload the "
                         "`keys/index` objects it writes (or re-export)")

    # ------------------------------------------------------------------ data: whole shards
    def _write_fields(self, a: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Stage rows ``[a, a + n)`` of every data array; put each shard object whose rows are all given."""
        n = len(next(iter(arrays.values())))
        light = [arrays[f] for f in LIGHT_FIELDS if f in arrays]
        if len(light) != len(LIGHT_FIELDS):
            raise ValueError(f"{self.path}: the packed light array needs all of {LIGHT_FIELDS} in one write")
        data = {LIGHT_ARRAY: np.concatenate(light, axis=-1)}
        if BEV_FEAT in arrays:
            data[BEV_FEAT] = np.asarray(arrays[BEV_FEAT])
        end = next((s + c for s, c in self.splits.values() if s <= a < s + c), a + n)
        staged = self._staged
        for name, block in data.items():
            R = self._codec(field_path(name)).rows_per_shard
            for i in range(a // R, -(-(a + n) // R)):
                lo, hi = max(a, i * R), min(a + n, (i + 1) * R)
                st = staged.get((name, i))
                if st is None:
                    if lo != i * R:
                        raise StoreError(
                            f"memorybank {self.path}: write_rows starts at row {lo}, inside shard {i} of {field_path(name)!r} "
                            f"(rows [{i * R}, {(i + 1) * R})) that this handle did not start: an object store cannot "
                            "rewrite part of a shard object (no partial writes). Write the whole shard from its first "
                            "row, e.g. re-export the split (--overwrite)")
                    st = staged[(name, i)] = {"first": lo, "next": lo, "end": min((i + 1) * R, end), "blocks": []}
                if lo != st["next"]:
                    raise StoreError(f"memorybank {self.path}: rows of shard {i} of {field_path(name)!r} must be written in "
                                     f"order by one handle: expected row {st['next']}, got {lo}")
                st["blocks"].append(block[lo - a:hi - a])
                st["next"] = hi
                if hi >= st["end"]:
                    self._put_shard(name, i, np.concatenate(st.pop("blocks")))
                    del staged[(name, i)]
                    if name == LIGHT_ARRAY:
                        self._stored.append((i * R, hi))
        self._readers.clear()

    def _put_shard(self, name: str, i: int, rows: np.ndarray) -> None:
        path = field_path(name)
        codec = self._codec(path)
        parts = codec.shard(rows, 0, None, threads=self.write_threads or encode_threads())
        rel = f"{path}/c/{i}" + "/0" * (rows.ndim - 1)
        if parts is None:
            self.files.delete([rel])
        else:
            self.files.put(rel, b"".join(bytes(p) for p in parts))

    def _write_complete(self, a: int, b: int, flag: bool) -> None:
        """Flags of the rows whose shards were just put (``write_rows`` calls this after `_write_fields`)."""
        if not flag:
            self._write_flags(a, b, 0)
            return
        stored, self._stored = self._stored, []
        for lo, hi in stored:
            self._write_flags(lo, hi, 1)

    def _write_field(self, name: str, a: int, data: np.ndarray) -> None:
        raise StoreError(f"{self.path}: one field alone cannot be written to an object store (whole shards only)")

    def _clear_rows(self, a: int, b: int) -> None:
        """remove_split: the rows' flags, then their shard objects, then their keys."""
        self._write_flags(a, b, COMPLETE_UNSET)
        for name in self._arrays_on_disk():
            R = self._codec(field_path(name)).rows_per_shard
            tail = "/0" * (len(self._metas[field_path(name)]["shape"]) - 1)
            self.files.delete([f"{field_path(name)}/c/{i}{tail}" for i in range(a // R, -(-b // R))])
        self._put_flat("keys", a, np.full(b - a, "", dtype=object), "")
        self._readers.clear()

    # ------------------------------------------------------------------ no local files to sync or check
    def _sync_rows(self, names: Any, a: int, b: int) -> None:
        """A PUT that returned is durable: nothing to sync."""

    def _sync_meta(self) -> None:
        """A PUT that returned is durable: nothing to sync."""

    def _check_files(self, names: Any, a: int, b: int) -> None:
        """Objects are never special files: nothing to check."""

    def pending_rows(self) -> list[tuple[str, int, int]]:
        """``[(array, first, next)]`` of rows given to ``write_rows`` but not stored yet (partial shards)."""
        return [(field_path(n), st["first"], st["next"]) for (n, _), st in self._staged.items()]

    def close(self) -> None:
        """StoreError when rows given to ``write_rows`` are still staged (their shard was never completed):
        they were not stored; write the rest of their shards first."""
        pending = self.pending_rows()
        self._staged.clear()
        super().close()        # type: ignore[misc]
        if pending:
            raise StoreError(f"memorybank {self.path}: rows were given to write_rows but NOT stored, because their "
                             "shards were never completed (an object store takes whole shards only): "
                             + ", ".join(f"{n} rows [{x}, {y})" for n, x, y in pending)
                             + ". Write every row of a shard (up to the split's end) before closing; a resume redoes them")

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is not None:
            self._staged.clear()               # the exception in flight explains why; do not mask it
        self.close()
