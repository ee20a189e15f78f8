"""File-system safety of the memorybank: regular-file checks that never block, fsync, crash-proof creation
(build under a temporary sibling name, then rename into place) and clear errors for failed writes.

Nothing here opens a path for reading before ``os.stat`` says it is a regular file, and opens use
``O_NONBLOCK``: a FIFO, a device (or a symlink to one) or a directory where a chunk is expected is refused
with `StoreCorruptError`, never read (reading a FIFO blocks forever, ``/dev/zero`` reads as zeros).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
import socket
import stat
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stores.errors import StoreCorruptError, StoreError, StoreReadOnlyError

MAX_JSON_BYTES = 16 * 2**20          # a zarr.json / attribute file larger than this is not ours
MAX_JSON_DEPTH = 64                  # arrays/objects nested deeper than this in metadata are not ours
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPENERS, _CLOSERS = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)
_TMP_TAG = ".e2r-tmp-"


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def regular_size(path: str | os.PathLike, store: str = "", array: str = "") -> int | None:
    """Size of the regular file ``path`` (symlinks followed), None when it does not exist; StoreCorruptError
    when it is anything else (FIFO, device, directory, dangling or looping symlink)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise StoreCorruptError(f"{path} is a dangling symlink where a chunk file is expected",
                                    path=store, array=array, chunk=str(path)) from None
        return None
    except OSError as e:
        raise StoreCorruptError(f"{path}: cannot stat ({e.strerror})", path=store, array=array,
                                chunk=str(path)) from None
    if not stat.S_ISREG(st.st_mode):
        raise StoreCorruptError(f"{path} is {file_kind(st.st_mode)}, not a regular file: refusing to read it "
                                "(a store holds only regular files; restore or delete it)",
                                path=store, array=array, chunk=str(path))
    return st.st_size


def open_regular(path: str | os.PathLike, store: str = "", array: str = "") -> tuple[int, int] | None:
    """``(fd, size)`` of the regular file ``path`` opened read-only with O_NONBLOCK (checked again with
    fstat on the descriptor), None when it does not exist. The caller closes ``fd``."""
    if regular_size(path, store, array) is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreCorruptError(f"{path}: cannot open ({e.strerror})", path=store, array=array,
                                chunk=str(path)) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):          # replaced between stat and open
        os.close(fd)
        raise StoreCorruptError(f"{path} is {file_kind(st.st_mode)}, not a regular file", path=store,
                                array=array, chunk=str(path))
    return fd, st.st_size


def read_regular(path: str | os.PathLike, store: str = "", array: str = "",
                 max_bytes: int | None = None) -> bytes | None:
    """The bytes of the regular file ``path`` (`open_regular`; at most ``max_bytes`` when given), None when
    it does not exist; StoreCorruptError when it is not a regular file or shrank while read."""
    opened = open_regular(path, store, array)
    if opened is None:
        return None
    fd, size = opened
    want = size if max_bytes is None else min(size, max_bytes)
    try:
        raw = os.pread(fd, want, 0)
    finally:
        os.close(fd)
    if len(raw) != want:
        raise StoreCorruptError(f"{path}: read {len(raw)} of {want} bytes (file changed while read)", path=store,
                                array=array, chunk=str(path))
    return raw


def read_json(path: str | os.PathLike, store: str = "") -> dict[str, Any] | None:
    """A small JSON object file (zarr.json) read safely: None when absent, StoreCorruptError when it is not
    a regular file, too big, or not a JSON object."""
    got = open_regular(path, store)
    if got is None:
        return None
    fd, size = got
    try:
        if size > MAX_JSON_BYTES:
            raise StoreCorruptError(f"{path} is {size} bytes: too large for a metadata file", path=store,
                                    chunk=str(path))
        raw = os.read(fd, size + 1)
    finally:
        os.close(fd)
    return json_object(raw, path, store)


def json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in the JSON text ``raw`` (strings skipped), without parsing it."""
    bare = _JSON_STRING.sub(b"", raw)
    if not bare:
        return 0
    t = np.frombuffer(bare, np.uint8)
    step = np.isin(t, _OPENERS).astype(np.int32) - np.isin(t, _CLOSERS).astype(np.int32)
    return int(np.cumsum(step).max(initial=0))


def json_object(raw: bytes, path: str | os.PathLike, store: str = "") -> dict[str, Any]:
    """The JSON object in ``raw`` (the bytes of the metadata file ``path``); StoreCorruptError when it is
    too big, nested deeper than `MAX_JSON_DEPTH` (checked before parsing: Python's parser and every walk of
    the attributes recurse per level), not JSON, or not an object."""
    if len(raw) > MAX_JSON_BYTES:
        raise StoreCorruptError(f"{path} is {len(raw)} bytes: too large for a metadata file", path=store,
                                chunk=str(path))
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise StoreCorruptError(f"{path}: its JSON nests {depth} levels deep (at most {MAX_JSON_DEPTH} in a metadata "
                                "file): not metadata this code wrote; restore the file or the store",
                                path=store, chunk=str(path))
    try:
        d = json.loads(raw)
    except RecursionError:
        raise StoreCorruptError(f"{path}: its JSON nests too deep to parse", path=store, chunk=str(path)) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreCorruptError(f"{path} is not valid JSON ({e})", path=store, chunk=str(path)) from None
    if not isinstance(d, dict):
        raise StoreCorruptError(f"{path} does not hold a JSON object", path=store, chunk=str(path))
    return d


def check_tree_regular(root: str | os.PathLike, store: str = "") -> None:
    """StoreCorruptError naming the first entry under ``root`` that is neither a directory nor a regular file
    (following symlinks); lstat/stat only, nothing is opened."""
    for bad in special_files(root):
        raise StoreCorruptError(f"{bad[0]} is {bad[1]}, not a regular file: refusing to read the store",
                                path=store, chunk=bad[0])


def special_files(root: str | os.PathLike) -> list[tuple[str, str]]:
    """``[(path, kind)]`` of entries under ``root`` that are not directories or regular files."""
    out: list[tuple[str, str]] = []
    stack = [str(root)]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError as e:
            out.append((d, f"unreadable ({e.strerror})"))
            continue
        for e in entries:
            try:
                st = os.stat(e.path)
            except OSError:
                out.append((e.path, "a dangling symlink"))
                continue
            if stat.S_ISDIR(st.st_mode) and not e.is_symlink():
                stack.append(e.path)
            elif not stat.S_ISREG(st.st_mode):
                out.append((e.path, file_kind(st.st_mode) + (" (via a symlink)" if e.is_symlink() else "")))
    return out


# ---------------------------------------------------------------------------------------------- fsync
def fsync_path(path: str | os.PathLike) -> None:
    """fsync a regular file or a directory (missing paths are skipped: a chunk may have been deleted)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(paths: Iterable[str | os.PathLike], root: str | os.PathLike, synced: Iterable[str] = (),
                durable: dict[str, tuple[int, int, int]] | None = None) -> None:
    """fsync each file, then every directory from the files' parents up to ``root`` (each once), so that
    the files and the renames that put them in place are on disk.

    ``synced``: files whose data the caller already fsync-ed (`write_atomic`): only their directories are
    synced. ``durable`` (a dict the caller keeps between calls, path -> (st_dev, st_ino, st_ctime_ns)):
    directories whose own entry in their parent is known to be on disk; the climb stops at one that is
    unchanged since, and every directory whose parent this call syncs is recorded. A directory removed and
    made again (even with a reused inode number) or changed since has another ctime, so its parent is synced
    again."""
    root = os.path.abspath(root)
    synced = {os.path.abspath(p) for p in synced}
    dirs: set[str] = set()
    entries: list[str] = []             # directories whose entry becomes durable with this call
    for p in paths:
        p = os.path.abspath(p)
        if p not in synced:
            fsync_path(p)
        d = os.path.dirname(p)
        while d not in dirs:
            dirs.add(d)
            if d == root or len(d) <= len(root) or (durable is not None and _same_dir(durable.get(d), d)):
                break
            entries.append(d)
            d = os.path.dirname(d)
    for d in sorted(dirs, key=len, reverse=True):
        fsync_path(d)
    if durable is not None:
        for d in entries:
            try:
                st = os.stat(d)
            except FileNotFoundError:
                continue
            durable[d] = (st.st_dev, st.st_ino, st.st_ctime_ns)


def _same_dir(known: tuple[int, int, int] | None, d: str) -> bool:
    """Whether directory ``d`` is still, unchanged, the one recorded as ``known`` (device, inode, ctime)."""
    if known is None:
        return False
    try:
        st = os.stat(d)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino, st.st_ctime_ns) == known


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under ``root`` (bottom-up), and ``root`` itself."""
    root = str(root)
    if os.path.isfile(root):
        fsync_path(root)
        return
    for d, _, files in os.walk(root, topdown=False):
        for f in files:
            fsync_path(os.path.join(d, f))
        fsync_path(d)


# ---------------------------------------------------------------------------------------------- creation
def temp_sibling(path: str | os.PathLike) -> str:
    """A fresh temporary name next to ``path`` (same directory, so a rename is atomic):
    ``.<name>.e2r-tmp-<host>-<pid>-<random>``."""
    p = Path(os.path.abspath(path))
    host = socket.gethostname().replace("-", "_")[:32] or "host"
    return str(p.parent / f".{p.name}{_TMP_TAG}{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_stale_temps(path: str | os.PathLike) -> list[str]:
    """Delete temporary siblings of ``path`` left by creators on this host that no longer run (a kill or a
    full disk during creation), and the temporaries of a creation inside such a temporary (`stores.convert`
    creates its store under a temporary name, and the creation uses one of its own:
    ``..<name>.e2r-tmp-<host>-<pid>-<r>.e2r-tmp-...``). Others' live temporaries and other hosts' are left
    alone. Returns the paths deleted."""
    p = Path(os.path.abspath(path))
    host = socket.gethostname().replace("-", "_")[:32] or "host"
    removed: list[str] = []
    prefix = f".{p.name}{_TMP_TAG}"
    try:
        entries = list(p.parent.glob(f"{prefix}*")) + list(p.parent.glob(f".{prefix}*"))
    except OSError:
        return removed
    for e in entries:
        name = e.name[1:] if e.name.startswith("." + prefix) else e.name      # nested: its outer creator's
        tail = name[len(prefix):].split(_TMP_TAG)[0].split("-")
        if len(tail) != 3 or tail[0] != host or not tail[1].isdigit():
            continue
        pid = int(tail[1])
        if pid != os.getpid() and _alive(pid):
            continue
        remove_path(e)
        removed.append(str(e))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_path(p: str | os.PathLike, settle_s: float = 0.0) -> None:
    """Remove a file, symlink or directory tree; missing is fine. ``settle_s`` > 0 (after a failed zarr
    operation, whose other writes may still be landing from zarr's I/O thread): keep watching for that long
    and remove whatever appears again."""
    p = str(p)
    deadline = time.monotonic() + settle_s
    while True:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        if time.monotonic() >= deadline and not os.path.lexists(p):
            return
        if time.monotonic() >= deadline + 5.0:      # something keeps writing there: give up, it is a temp name
            return
        time.sleep(0.05)


def write_atomic(path: str | os.PathLike, parts: Sequence[Any], fsync: bool, tmp: str | None = None) -> None:
    """Put the concatenation of ``parts`` (bytes-like buffers) at ``path`` crash-safely: write the temporary
    file ``tmp`` (default `temp_sibling`) with gathered writes (no joined copy), fsync it when ``fsync``,
    rename it over ``path`` (readers see the old or the new file, whole); the temporary is removed on any
    failure. The caller fsyncs the directories (`fsync_files`, `fsync_path`)."""
    tmp = temp_sibling(path) if tmp is None else tmp
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            _write_all(fd, parts)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        remove_path(tmp)


def _write_all(fd: int, parts: Sequence[Any]) -> None:
    """Write every byte of ``parts`` to ``fd`` in order (``os.writev`` of up to 1024 buffers; short writes
    continued)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    i = 0
    while i < len(views):
        batch = views[i:i + 1024]
        done = os.writev(fd, batch)
        for v in batch:                    # advance past what was written; a short write resumes mid-buffer
            if done >= len(v):
                done -= len(v)
                i += 1
            else:
                views[i] = v[done:]
                break


def publish(tmp: str, path: str) -> bool:
    """Move the finished store ``tmp`` to ``path`` atomically without replacing an existing store.
    True when this call put it there; False when ``path`` already existed (another creator won)."""
    path = os.path.abspath(path)
    if os.path.isdir(tmp):
        try:
            os.rename(tmp, path)          # a directory over a non-empty directory fails: no replace
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            raise
    else:
        try:
            os.link(tmp, path)            # a file: link() never replaces
        except FileExistsError:
            return False
        os.unlink(tmp)
    fsync_path(os.path.dirname(path))
    return True


@contextlib.contextmanager
def writing(what: str, path: str) -> Iterator[None]:
    """Turn OS errors of a store write into clear StoreErrors naming the store and what to do."""
    try:
        yield
    except StoreError:
        raise
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise StoreReadOnlyError(f"cannot {what} in memorybank {path}: {e.strerror}{where}. The store is on a "
                                     "read-only file system or not writable by this user; nothing was changed "
                                     "by this step - make it writable, or work on a copy") from None
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreError(f"cannot {what} in memorybank {path}: {e.strerror}{where}. Free disk space and "
                             "run again (completed rows are kept; the interrupted block is redone)") from None
        raise StoreError(f"cannot {what} in memorybank {path}: {type(e).__name__}: {e}") from None
