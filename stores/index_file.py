"""The on-disk key index of one split (schema_version 4, Zarr back end): ``<store>/keys/index/<split>.idx``.

Written once, by ``reserve_split``, before the split's entry: under a temporary name, fsync-ed, renamed into
place (`write_index`), so it exists whole or not at all and a crash leaves at most an unused file. Never
changed afterwards (``remove_split`` deletes it after the split's entry). Readers map it read-only
(`map_index`): DataLoader workers and ranks share its pages through the page cache, and a process only
touches the pages its lookups land on. It sits inside the ``keys`` array's directory, where Zarr tools do
not look (a sibling of the arrays would be reported by zarr-python as an unknown node).

Layout (little-endian)::

    [0, 4096)    header: b"E2RKIDX1", u32 length, JSON {split, start, count, keys_crc32c, width, block,
                 offsets, crc_table_crc32c}, zero padding; its last 4 bytes = crc32c of the 4092 before
    keys         count x width bytes: the split's keys in ASCII, NUL padded to the longest, sorted ascending
    positions    count x u4: the split position of each sorted key
    crc table    nblocks x 2 x u4: crc32c of the key bytes and of the position bytes of each block of
                 ``block`` entries

Mapping checks the header and the crc table (a few KiB); each block is checked the first time a lookup
lands in it (`stores.index.SplitIndex`). ``keys_crc32c`` ties the file to its split entry: a file left over
from a replaced split is refused, never used.
"""
from __future__ import annotations

import json
import mmap
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import google_crc32c
import numpy as np

from stores.keys import MAX_KEY_LEN
from stores.errors import StoreCorruptError
from stores.fsio import fsync_files, json_object, open_regular, remove_stale_temps, write_atomic

MAGIC = b"E2RKIDX1"
HEADER_BYTES = 4096
BLOCK = 512                   # entries per checksummed block (~12 KiB of keys of ~24 characters)
SUFFIX = ".idx"
INDEX_DIR = ("keys", "index")
MAX_COUNT = 2**32 - 1         # positions are u4


class MappedIndex(NamedTuple):
    """A mapped index file: the sorted keys (S<width>), their positions (u4), the (nblocks, 2) crc table."""

    keys: np.ndarray
    pos: np.ndarray
    crcs: np.ndarray
    block: int


def index_dir(store: str | os.PathLike) -> Path:
    return Path(store).joinpath(*INDEX_DIR)


def index_path(store: str | os.PathLike, split: str) -> Path:
    return index_dir(store) / f"{split}{SUFFIX}"


def index_files(store: str | os.PathLike) -> dict[str, Path]:
    """``{split: path}`` of the index files present (temporary files of a writer are not listed)."""
    try:
        names = [e.name for e in os.scandir(index_dir(store))]
    except FileNotFoundError:
        return {}
    return {n[:-len(SUFFIX)]: index_dir(store) / n for n in names if n.endswith(SUFFIX) and not n.startswith(".")}


def sort_keys(keys: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(keys as fixed-width ASCII bytes sorted ascending, their positions (u4))``; equal keys keep their
    position order. ``keys`` are valid keys (ASCII by the grammar)."""
    if len(keys) > MAX_COUNT:
        raise ValueError(f"a split holds at most {MAX_COUNT} keys, got {len(keys)}")
    enc = np.array(list(keys), dtype="S") if len(keys) else np.zeros(0, "S1")
    order = np.argsort(enc, kind="stable")
    return enc[order], order.astype("<u4")


def block_crcs(keys: np.ndarray, pos: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """(nblocks, 2) u4: crc32c of the key bytes and of the position bytes of each block of ``block`` entries."""
    n, w = len(keys), keys.dtype.itemsize
    kb, pb = keys.view(np.uint8), pos.view(np.uint8)
    out = np.empty((-(-n // block), 2), "<u4")
    for j in range(len(out)):
        a, b = j * block, min(n, (j + 1) * block)
        out[j] = (google_crc32c.value(kb[a * w:b * w]), google_crc32c.value(pb[4 * a:4 * b]))
    return out


def _layout(count: int, width: int, block: int) -> dict[str, int]:
    keys_offset = HEADER_BYTES
    pos_offset = -(-(keys_offset + count * width) // 8) * 8
    crc_offset = -(-(pos_offset + 4 * count) // 8) * 8
    return {"keys_offset": keys_offset, "pos_offset": pos_offset, "crc_offset": crc_offset,
            "file_bytes": crc_offset + 8 * -(-count // block)}


def write_index(path: Path, split: str, start: int, keys_crc32c: int, keys: Sequence[str],
                fsync: bool = True) -> None:
    """Write the index of a split holding ``keys`` (validated, unique) at rows ``[start, start + len)``:
    temporary file, fsync, rename over ``path``, fsync of the directories up to the store."""
    sorted_keys, pos = sort_keys(keys)
    crcs = block_crcs(sorted_keys, pos)
    width, count = sorted_keys.dtype.itemsize, len(sorted_keys)
    meta: dict[str, Any] = {"format": "e2r-key-index", "version": 1, "split": split, "start": int(start),
                            "count": count, "keys_crc32c": int(keys_crc32c), "width": width, "block": BLOCK,
                            **_layout(count, width, BLOCK), "crc_table_crc32c": google_crc32c.value(crcs.tobytes())}
    body = json.dumps(meta, sort_keys=True).encode()
    head = bytearray(HEADER_BYTES)
    head[:12 + len(body)] = MAGIC + len(body).to_bytes(4, "little") + body
    head[-4:] = google_crc32c.value(bytes(head[:-4])).to_bytes(4, "little")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    parts, end = [], 0
    for part, offset in ((head, 0), (sorted_keys.data, meta["keys_offset"]), (pos.data, meta["pos_offset"]),
                         (crcs.data, meta["crc_offset"])):
        parts += [bytes(offset - end), part]
        end = offset + memoryview(part).nbytes
    write_atomic(path, parts, fsync)
    if fsync:
        fsync_files([path], path.parents[len(INDEX_DIR)])


def _corrupt(store: str, path: Path, what: str) -> StoreCorruptError:
    rel = os.path.relpath(path, store) if store and os.path.isabs(path) else str(path)
    return StoreCorruptError(f"memorybank {store}: key index {rel}: {what}. Nothing is looked up through it; rebuild "
                             f"it from the checksummed keys: `python -m stores reindex {store}`", path=store,
                             array="keys/index", chunk=rel)


def map_index(path: Path, store: str, split: str, start: int, count: int,
              keys_crc32c: int | None) -> MappedIndex | None:
    """Map the index file of a split expected at rows ``[start, start + count)`` with ``keys_crc32c`` (its
    split entry); None when the file is absent. StoreCorruptError when it is damaged, is not a regular file,
    or belongs to other keys (a split replaced since)."""
    opened = open_regular(path, store, "keys/index")
    if opened is None:
        return None
    fd, size = opened
    try:
        width, block, lay, raw = _check_index(lambda n, off: os.pread(fd, n, off), size, store, path,
                                              (split, start, count, keys_crc32c))
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    return _entries(mm, width, block, count, lay, raw)


def index_from_bytes(buf: bytes | mmap.mmap, store: str, path: Path, split: str, start: int, count: int,
                     keys_crc32c: int | None) -> MappedIndex:
    """`map_index` over the bytes of an index file (fetched from an object store, or their `spill` mapping;
    ``path`` names it in errors): the same checks, the entries are views of ``buf``."""
    width, block, lay, raw = _check_index(lambda n, off: bytes(buf[off:off + n]), len(buf), store, path,
                                          (split, start, count, keys_crc32c))
    return _entries(buf, width, block, count, lay, raw)


def spill(buf: bytes) -> mmap.mmap | None:
    """``buf`` written to an unlinked temporary file (`tempfile.TemporaryFile` in `tempfile.gettempdir()`,
    i.e. ``TMPDIR`` or /tmp) and mapped read-only: its pages are then page cache of that file — written back
    and reclaimed under memory pressure, shared with forked children that inherit the map — instead of the
    process's private (anonymous) memory. The file has no name; it is freed when the map is. None when the
    temporary directory cannot take it (not writable, full): the caller keeps ``buf`` in memory.
    (On a tmpfs /tmp the pages stay in memory as shared memory: set TMPDIR to a disk.)"""
    try:
        with tempfile.TemporaryFile(prefix="e2r-key-index-") as fh:
            fh.write(buf)
            fh.flush()
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)   # holds its own duplicate of the fd
    except (OSError, ValueError):                                         # ValueError: an empty buf
        return None


def _check_index(read: Any, size: int, store: str, path: Path, entry: tuple[str, int, int, int | None]
                 ) -> tuple[int, int, dict[str, int], bytes]:
    """``(width, block, layout, crc table bytes)`` of an index file of ``size`` bytes read by ``read(n,
    offset)``, after checking its header against the split ``entry`` (split, start, count, keys_crc32c) and
    its block table; StoreCorruptError naming ``path`` otherwise."""
    split, start, count, keys_crc32c = entry
    try:
        head = read(HEADER_BYTES, 0)
        if len(head) < HEADER_BYTES or head[:8] != MAGIC:
            raise _corrupt(store, path, f"not a key index file ({size} bytes, no header)")
        if google_crc32c.value(head[:-4]) != int.from_bytes(head[-4:], "little"):
            raise _corrupt(store, path, "header checksum (crc32c) mismatch - file corrupted")
        meta = json_object(head[12:12 + int.from_bytes(head[8:12], "little")], path, store)
        got = tuple(meta[k] for k in ("split", "start", "count", "keys_crc32c"))
        if got[:3] != (split, start, count) or (keys_crc32c is not None and got[3] != keys_crc32c):
            raise _corrupt(store, path, f"it indexes other keys (split, start, count, keys_crc32c = {got}) than "
                                        f"the store's split entry holds ({(split, start, count, keys_crc32c)}): "
                                        "left over from a replaced split")
        width, block = int(meta["width"]), int(meta["block"])
        if not 0 < width <= MAX_KEY_LEN or block <= 0:
            raise _corrupt(store, path, f"header {meta} is not a key index's")
        lay = _layout(count, width, block)
        if any(meta[k] != v for k, v in lay.items()) or size != lay["file_bytes"]:
            raise _corrupt(store, path, f"{size} bytes, expected {lay['file_bytes']} (truncated or damaged)")
        raw = read(8 * -(-count // block), lay["crc_offset"])
        if google_crc32c.value(raw) != meta["crc_table_crc32c"]:
            raise _corrupt(store, path, "block checksum table crc32c mismatch - file corrupted")
    except (ValueError, KeyError, TypeError) as e:
        raise _corrupt(store, path, f"unreadable header ({type(e).__name__}: {e})") from None
    return width, block, lay, raw


def _entries(buf: Any, width: int, block: int, count: int, lay: dict[str, int], raw: bytes) -> MappedIndex:
    keys = np.frombuffer(buf, f"S{width}", count=count, offset=lay["keys_offset"])
    pos = np.frombuffer(buf, "<u4", count=count, offset=lay["pos_offset"])
    return MappedIndex(keys, pos, np.frombuffer(raw, "<u4").reshape(-1, 2), block)


def compare_with_keys(index: MappedIndex, keys: np.ndarray) -> list[str]:
    """What disagrees between a (checked) index and the split's keys as read from the ``keys`` array."""
    n = len(keys)
    if len(index.keys) != n:
        return [f"it holds {len(index.keys)} keys, the split {n}"]
    if not n:
        return []
    width = index.keys.dtype.itemsize
    long = [str(k) for k in keys if len(str(k)) > width]
    if long:
        return [f"keys longer than its width {width}: {long[:3]}"]
    enc = np.array([str(k) for k in keys], dtype=f"S{width}")
    problems = []
    if (index.keys[1:] <= index.keys[:-1]).any():
        problems.append("its keys are not strictly ascending (duplicates or out of order)")
    p = index.pos.astype(np.int64)
    if (p >= n).any():
        return problems + [f"positions beyond the split's {n} rows"]
    bad = np.flatnonzero(enc[p] != index.keys)
    if len(bad):
        problems.append(f"{len(bad)} entries name another key than the keys array at their position (first: "
                        f"{index.keys[bad[0]].decode()!r} -> position {int(p[bad[0]])}, which holds "
                        f"{str(keys[p[bad[0]]])!r})")
    return problems
