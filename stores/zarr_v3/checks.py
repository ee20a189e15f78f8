"""Integrity and durability primitives of the Zarr back end (a mixin of `stores.zarr_v3.store.ZarrMemoryBank`):
checked reads of ``keys`` / ``complete`` through zarr-python, fsync of the files a write touched, which rows
have data, which data files complete rows lack, and the remains of an interrupted creation.

``keys`` and ``complete`` chunks are read only after ``os.stat`` says they are regular files (``complete``
chunks directly, `stores.zarr_v3.flat_chunks.FlatChunkReader`: opening a store of 1e7 rows reads 2 500 of them); a
chunk that fails its crc32c checksum raises `StoreCorruptError` on a read-only handle. A writable handle (or ``verify``)
records it in ``damage`` and reads it as lost (keys "", flags 255 = redo its rows); a writer then deletes the
damaged chunk before it writes into it, so a resumed export repairs a damaged completion chunk.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stores.errors import StoreCorruptError
from stores.fsio import fsync_files, read_json, regular_size, remove_path, temp_sibling
from stores.zarr_v3.flat_chunks import FlatChunkReader
from stores.layout import COMPLETE_UNSET
from stores.schema import BEV_FEAT, LIGHT_ARRAY, LIGHT_FIELDS

ARRAY_NAMES = ("keys", "complete", LIGHT_ARRAY, BEV_FEAT)


def field_path(name: str) -> str:
    """Array path of a field inside the group: light fields live in ``light``, bev_feat in its own group."""
    if name in LIGHT_FIELDS:
        return LIGHT_ARRAY
    return f"{BEV_FEAT}/{BEV_FEAT}" if name == BEV_FEAT else name


def _reason(e: BaseException) -> str:
    msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return "crc32c checksum mismatch (chunk corrupted)" if "checksum" in msg.lower() else f"{type(e).__name__}: {msg}"


class ZarrIntegrity:
    """Mixin: see the module docstring. Uses ``path``, ``mode``, ``_arr``, ``_reader``, ``_keys_of`` of the bank."""

    path: str
    mode: str
    _lenient: bool
    _legacy: bool
    _arr: Any
    _reader: Any
    _arrays_on_disk: Any
    _keys_of: Any
    _meta: Any
    _metas: dict[str, dict[str, Any]]
    _synced: set[str]                        # files write_atomic fsync-ed, not yet covered by _sync_rows
    _durable: dict[str, tuple[int, int, int]]     # directories whose own entry is on disk (fsio.fsync_files)
    _flat: dict[str, FlatChunkReader]

    @classmethod
    def abandoned(cls, path: str) -> bool:
        """True when the directory ``path`` holds only the start of a creation killed in place by an older
        version (a group without attributes and empty arrays, no chunk; or only temporary files): safe to
        replace, nothing was stored."""
        if not os.path.isdir(path) or os.path.islink(path):
            return False
        try:
            root = read_json(Path(path) / "zarr.json")
        except StoreCorruptError:
            return False
        if root is None:             # killed before the group was written: only temporary files, if any
            return all(f.endswith(".partial") for _, _, files in os.walk(path) for f in files)
        if root.get("node_type") != "group" or (root.get("attributes") or {}):
            return False
        for e in os.scandir(path):
            if e.name == "zarr.json" or e.name.endswith(".partial"):
                continue
            if e.name not in ARRAY_NAMES or not e.is_dir(follow_symlinks=False):
                return False
            for d, _, files in os.walk(e.path):
                for f in files:
                    if f.endswith(".partial"):
                        continue
                    if f != "zarr.json":
                        return False                # a chunk: data were written
                    try:
                        m = read_json(Path(d) / f)
                    except StoreCorruptError:
                        return False
                    if m is None or (m.get("node_type") == "array" and list(m.get("shape") or [0])[:1] != [0]):
                        return False
        return True

    def _zread(self, name: str, a: int, b: int) -> np.ndarray:
        """``name[a:b]`` after checking its chunk files are regular (``complete``: read directly, chunk by
        chunk; ``keys``: through zarr-python). A chunk that fails its checksum or decode raises
        StoreCorruptError naming it (read-only handle), or is read as its fill value and recorded in
        ``_read_damage`` / ``_bad_chunks`` (writable handle, verify)."""
        C = self._chunk_rows(name)
        flat = self._flat_reader(name)
        if flat is None:
            arr = self._arr(name)
            for c in range(a // C, -(-b // C)):
                regular_size(self._chunk_path(name, c), self.path, name)
            try:
                return np.asarray(arr[a:b])
            except Exception:  # noqa: BLE001 - narrowed down to each chunk below
                pass
        out = np.full(b - a, "", dtype=object) if name == "keys" else np.full(b - a, COMPLETE_UNSET, np.uint8)
        for c in range(a // C, -(-b // C)):
            lo, hi = max(a, c * C), min(b, (c + 1) * C)
            try:
                if flat is None:
                    out[lo - a:hi - a] = np.asarray(self._arr(name)[lo:hi])
                elif (got := flat.chunk(c)) is not None:
                    out[lo - a:hi - a] = got[lo - c * C:hi - c * C]
            except StoreCorruptError:
                raise                          # not a regular file: never tolerated
            except Exception as e:  # noqa: BLE001 - any decode/IO error of a chunk is corruption
                msg = (f"array {name!r}, chunk {name}/c/{c} (rows [{c * C}, {(c + 1) * C})) does not decode: "
                       f"{_reason(e)}")
                if self.mode == "r+" or self._lenient:
                    self._bad_chunks.add((name, c))
                    if msg not in self._read_damage:
                        self._read_damage.append(msg)
                    continue
                keys = self._keys_of(range(lo, hi)) if name != "keys" else []
                fix = ("delete the file and resume the export (its rows are redone)" if name == "complete" else
                       "restore the file, or re-export the split (python -m stores rm-split, then export)")
                raise StoreCorruptError(f"memorybank {self.path}: {msg}. Run `python -m stores verify {self.path}`; "
                                        f"{fix}", path=self.path, array=name, chunk=f"{name}/c/{c}",
                                        keys=keys) from None
        return out

    def _flat_reader(self, name: str) -> FlatChunkReader | None:
        """The direct chunk reader of ``complete`` (None for ``keys``: variable-length strings)."""
        if name != "complete":
            return None
        if name not in self._flat:
            self._flat[name] = FlatChunkReader(Path(self.path) / name, self._metas.get(name) or self._meta(name),
                                               store=self.path, name=name)
        return self._flat[name]

    def _keys_present(self, a: int, b: int) -> np.ndarray:
        """(b - a,) bool: rows whose ``keys`` chunk file exists (stat only; a special file raises)."""
        C = self._chunk_rows("keys")
        out = np.zeros(max(0, b - a), bool)
        for c in range(a // C, -(-b // C)):
            if self._file_size(self._chunk_path("keys", c), "keys") is not None:
                out[max(a, c * C) - a:min(b, (c + 1) * C) - a] = True
        return out

    def _chunk_rows(self, name: str) -> int:
        """Rows per chunk of the unsharded array ``name`` (keys, complete)."""
        return int(self._arr(name).chunks[0])

    def _file_size(self, path: str | os.PathLike, name: str) -> int | None:
        """Size of the store file ``path`` of array ``name``, None when absent; StoreCorruptError when it is
        not a regular file (`stores.fsio.regular_size`)."""
        return regular_size(path, self.path, name)

    def _chunk_path(self, name: str, c: int) -> Path:
        return Path(self.path) / field_path(name) / "c" / str(c)

    def _drop_bad_chunks(self, name: str, a: int, b: int) -> None:
        """Delete the damaged chunks of ``name`` that a write of rows ``[a, b)`` touches (already lost)."""
        if not self._bad_chunks:
            return
        C = int(self._arr(name).chunks[0])
        for c in range(a // C, -(-b // C)):
            if (name, c) in self._bad_chunks:
                remove_path(self._chunk_path(name, c))
                self._bad_chunks.discard((name, c))

    # ------------------------------------------------------------------ durability, integrity
    def _files_of(self, name: str, a: int, b: int) -> list[Path]:
        arr = self._arr(name)
        rows = int((arr.shards or arr.chunks)[0])
        tail = ["0"] * (len(arr.shape) - 1)
        root = Path(self.path) / field_path(name) / "c"
        return [root.joinpath(str(i), *tail) for i in range(a // rows, -(-b // rows))] if b > a else []

    def _check_files(self, names: Sequence[str], a: int, b: int) -> None:
        """StoreCorruptError when a file holding rows ``[a, b)`` of ``names`` is not a regular file."""
        for name in names:
            for p in self._files_of(name, a, b):
                regular_size(p, self.path, name)

    def _sync_rows(self, names: Sequence[str], a: int, b: int) -> None:
        files = [p for n in names for p in self._files_of(n, a, b)]
        fsync_files(files, self.path, synced=self._synced, durable=self._durable)
        self._synced.clear()

    def _sync_meta(self) -> None:
        root = Path(self.path)
        metas = [root / "zarr.json"] + [root / field_path(n) / "zarr.json" for n in
                                        ["keys", "complete", *self._arrays_on_disk()]]
        fsync_files(metas, self.path)

    def _rows_with_data(self, a: int, b: int) -> np.ndarray:
        ok = np.ones(max(0, b - a), bool)
        for name in self._arrays_on_disk():
            r = self._reader(name)
            if r is not None:
                ok &= r.present(a, b)
        return ok

    def _missing_data(self, complete: np.ndarray) -> list[str]:
        """Data files (shards) that the rows flagged in ``complete`` need and that are absent (non-regular
        files raise): one stat per shard holding a complete row."""
        if self._legacy or not len(complete):     # older versions dropped all-zero chunks: absence is not loss
            return []
        out = []
        for name in self._arrays_on_disk():
            r = self._reader(name)
            if r is None:
                continue
            F = r.rows_per_file
            held = np.pad(complete, (0, -len(complete) % F)).reshape(-1, F).any(axis=1)
            for i in np.flatnonzero(held).tolist():
                if self._file_size(r.file_str(i), name) is None:
                    rows = i * F + np.flatnonzero(complete[i * F:(i + 1) * F])
                    keys = self._keys_of(rows[:4].tolist())
                    out.append(f"{r.chunk_name(i)} is missing but holds {len(rows)} complete row(s) "
                               f"(keys {', '.join(map(repr, keys))}{' ...' if len(rows) > 4 else ''})")
        return out

    def _flags_extent(self) -> int:
        """Rows covered by the ``complete`` chunk files present (a bound for scans of an edited shape)."""
        try:
            ids = [int(e.name) for e in os.scandir(Path(self.path) / "complete" / "c") if e.name.isdigit()]
        except FileNotFoundError:
            return 0
        return (max(ids) + 1) * int(self._arr("complete").chunks[0]) if ids else 0

    @staticmethod
    def _discard(path: str) -> None:
        """Remove a store directory (an abandoned creation) by renaming it aside first."""
        tmp = temp_sibling(path)
        os.rename(path, tmp)
        remove_path(tmp)
