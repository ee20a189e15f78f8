"""What the Zarr back end (`stores.zarr_v3.store.ZarrMemoryBank`) checks: the arrays' paths, which data files
complete rows lack, the remains of an interrupted creation; how its checked reads of ``keys`` / ``complete``
name a damaged chunk.

``keys`` and ``complete`` chunks are read only after ``os.stat`` says they are regular files (``complete``
chunks directly, `stores.zarr_v3.flat_chunks.FlatChunkReader`: opening a store of 1e7 rows reads 2 500 of them); a
chunk that fails its crc32c checksum raises `StoreCorruptError` on a read-only handle. A writable handle (or ``verify``)
records it in ``damage`` and reads it as lost (keys "", flags 255 = redo its rows); a writer then deletes the
damaged chunk before it writes into it, so a resumed export repairs a damaged completion chunk.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stores.errors import StoreCorruptError
from stores.fsio import read_json, remove_path, temp_sibling
from stores.schema import BEV_FEAT, DEPTH, GROUP_FIELDS, LIGHT_ARRAY, LIGHT_FIELDS

ARRAY_NAMES = ("keys", "complete", LIGHT_ARRAY, BEV_FEAT, DEPTH)


def field_path(name: str) -> str:
    """Array path of a field inside the group: light fields live in ``light``, bev_feat and depth each in its
    own group (``<name>/<name>``)."""
    if name in LIGHT_FIELDS:
        return LIGHT_ARRAY
    return f"{name}/{name}" if name in GROUP_FIELDS else name


def chunk_failure(e: BaseException) -> str:
    """Why a chunk did not decode, in one line."""
    msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return "crc32c checksum mismatch (chunk corrupted)" if "checksum" in msg.lower() else f"{type(e).__name__}: {msg}"


def small_chunk_error(store: str, name: str, c: int, msg: str, keys: Sequence[str]) -> StoreCorruptError:
    """The error of a read-only handle for chunk ``c`` of ``keys`` / ``complete`` that failed its check (``msg``
    says how), with what to do."""
    fix = ("delete the file and resume the export (its rows are redone)" if name == "complete" else
           "restore the file, or re-export the split (python -m stores rm-split, then export)")
    return StoreCorruptError(f"memorybank {store}: {msg}. Run `python -m stores verify {store}`; {fix}", path=store,
                             array=name, chunk=f"{name}/c/{c}", keys=keys)


def abandoned_dir(path: str) -> bool:
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


def discard_dir(path: str) -> None:
    """Remove a store directory (an abandoned creation) by renaming it aside first."""
    tmp = temp_sibling(path)
    os.rename(path, tmp)
    remove_path(tmp)


def missing_data(readers: Sequence[tuple[str, Any]], complete: np.ndarray,
                 file_size: Callable[[str, str], int | None], keys_of: Callable[[Any], list[str]]) -> list[str]:
    """Data files (shards) that the rows flagged in ``complete`` need and that are absent: one ``file_size``
    call (None: absent; a non-regular file raises) per shard of each ``(array, row reader)`` holding a
    complete row."""
    out = []
    for name, r in readers:
        F = r.rows_per_file
        held = np.pad(complete, (0, -len(complete) % F)).reshape(-1, F).any(axis=1)
        for i in np.flatnonzero(held).tolist():
            if file_size(r.file_str(i), name) is None:
                rows = i * F + np.flatnonzero(complete[i * F:(i + 1) * F])
                keys = keys_of(rows[:4].tolist())
                out.append(f"{r.chunk_name(i)} is missing but holds {len(rows)} complete row(s) "
                           f"(keys {', '.join(map(repr, keys))}{' ...' if len(rows) > 4 else ''})")
    return out
