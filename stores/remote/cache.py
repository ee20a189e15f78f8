"""A size-capped local cache of what a process fetched from a store on object storage (``--cache_dir``).

One sparse file per shard object, ``<cache_dir>/<sha256(url, size, ETag)>.shard``, as large as the object:
each fetched inner chunk (with its crc32c) and the shard index are written at their offsets in the object,
so a later read of the same rows — the next epoch, another DataLoader worker, another run — maps the file and
reads them locally. The name includes the object's size and ETag (from the store's listing): a replaced
object gets a new file, an old one is never served for it.

Nothing in the cache is trusted: every inner chunk is served only after its crc32c matches, and the shard
index only after its own crc32c — a region never written (a hole reads as zeros), a torn write (a crash) or a
damaged byte fails the check and the chunk is fetched again and rewritten. Files are created whole-size
under a temporary name and linked into place, so a file exists with its full size or not at all.

LRU with a cap on the bytes allocated on disk: a file's mtime is its last use (set when a process opens it,
and at most every `TOUCH_S` seconds while it reads it); when the cache exceeds ``max_bytes`` the least
recently used shard files are deleted down to 90 % of the cap. Several processes (DataLoader workers) share
one cache directory: they write identical bytes at identical offsets; one that deleted a file another has
mapped only costs the other a refetch (it notices at its next eviction scan and drops its handle).
Key index files (``*.idx``) are cached next to the shards, written atomically, and not evicted.
"""
from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import stat
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from stores.fsio import temp_sibling, write_atomic

TOUCH_S = 30.0          # refresh a file's last-use time at most this often
SUFFIX = ".shard"


@dataclass
class CachedShard:
    """An open cache file: its map (read-only), a uint8 view of it, and the descriptor writes go through."""

    path: str
    fd: int
    mm: mmap.mmap
    u8: np.ndarray
    ino: int
    touched: float


class ShardCache:
    """Local cache of shard objects under ``root``, at most ``max_bytes`` allocated (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, max_bytes: int) -> None:
        if int(max_bytes) <= 0:
            raise ValueError(f"cache size must be positive, got {max_bytes} bytes")
        self.root, self.max_bytes = os.path.abspath(root), int(max_bytes)
        self._open: dict[str, CachedShard] = {}
        self._added = 0                         # bytes written since the last eviction scan
        self._writable = True
        self.hits = 0                           # chunks served from the cache by this process
        os.makedirs(self.root, exist_ok=True)

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_open"], d["_added"] = {}, 0
        return d

    @staticmethod
    def name_of(url: str, size: int, tag: str, suffix: str = SUFFIX) -> str:
        return hashlib.sha256(f"{url}\n{size}\n{tag}".encode()).hexdigest()[:40] + suffix

    # ------------------------------------------------------------------ shard files
    def shard(self, url: str, size: int, tag: str) -> CachedShard | None:
        """The cache file of the object ``url`` (``size`` bytes, ETag ``tag``), created empty (sparse) when
        absent. None when the object is empty or the cache cannot hold it (the caller reads remotely)."""
        got = self._open.get(url)
        if got is not None:
            if time.monotonic() - got.touched > TOUCH_S:
                self._touch(got)
            return got
        if size <= 0:
            return None
        path = os.path.join(self.root, self.name_of(url, size, tag))
        try:
            got = self._map(path, size) or (self._create(path, size) and self._map(path, size))
        except OSError as e:
            self._no_writes(e)
            return None
        if got is None:
            return None
        self._open[url] = got
        self._touch(got)
        self._added += 1 << 20                   # a new file: count it towards the next eviction scan
        self._maybe_evict()
        return got

    def _map(self, path: str, size: int) -> CachedShard | None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:     # not ours: replace it
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return None
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        return CachedShard(path, fd, mm, np.frombuffer(mm, np.uint8), st.st_ino, 0.0)

    def _create(self, path: str, size: int) -> bool:
        """Create the whole-size (sparse) file under a temporary name, link it into place (never replacing
        a file another process linked first)."""
        tmp = temp_sibling(path)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            os.ftruncate(fd, size)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.close(fd)
            os.unlink(tmp)
        return True

    def write(self, shard: CachedShard, offset: int, data: bytes) -> None:
        """Put ``data`` (checked bytes of the object) at ``offset`` of the cache file. A failed write (disk
        full, read-only) turns cache writes off for this process with one warning; reads go on."""
        if not self._writable:
            return
        try:
            os.pwrite(shard.fd, data, offset)
        except OSError as e:
            self._no_writes(e)
            return
        self._added += len(data)
        self._maybe_evict()

    def _no_writes(self, e: OSError) -> None:
        if self._writable:
            warnings.warn(f"cache {self.root}: {e.strerror or e}; not caching more in this process (reads go on "
                          "from the object store)", RuntimeWarning, stacklevel=3)
        self._writable = False

    def _touch(self, shard: CachedShard) -> None:
        shard.touched = time.monotonic()
        with contextlib.suppress(OSError):
            os.utime(shard.fd)

    # ------------------------------------------------------------------ small whole files (key index)
    def blob_path(self, url: str, size: int, tag: str, suffix: str) -> str:
        """Where the whole object ``url`` is (or would be) cached."""
        return os.path.join(self.root, self.name_of(url, size, tag, suffix))

    def put_blob(self, path: str, data: bytes) -> bool:
        """Write a whole cached object atomically; False when the cache cannot take it."""
        if not self._writable:
            return False
        try:
            write_atomic(path, [data], fsync=False)
        except OSError as e:
            self._no_writes(e)
            return False
        return True

    # ------------------------------------------------------------------ eviction
    def _maybe_evict(self) -> None:
        if self._added >= max(1 << 20, self.max_bytes // 32):
            self.evict()

    def usage(self) -> int:
        """Bytes allocated on disk by the cached shard files."""
        return sum(b for _, b, _ in self._entries())

    def _entries(self) -> list[tuple[float, int, str]]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for e in os.scandir(self.root):
                if e.name.endswith(SUFFIX) and not e.name.startswith("."):
                    with contextlib.suppress(FileNotFoundError):
                        st = e.stat(follow_symlinks=False)
                        out.append((st.st_mtime, st.st_blocks * 512, e.path))
        return out

    def evict(self) -> list[str]:
        """Delete least recently used shard files until the cache holds at most 90 % of ``max_bytes`` (when
        it holds more than ``max_bytes``); drop this process's handles of files deleted by anyone."""
        self._added = 0
        entries = sorted(self._entries())
        total = sum(b for _, b, _ in entries)
        gone = []
        if total > self.max_bytes:
            for _, nbytes, path in entries:
                if total <= 0.9 * self.max_bytes:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                total -= nbytes
                gone.append(path)
        for url, sh in list(self._open.items()):
            try:
                alive = os.stat(sh.path).st_ino == sh.ino
            except FileNotFoundError:
                alive = False
            if not alive:
                self._drop(url)
        return gone

    def _drop(self, url: str) -> None:
        sh = self._open.pop(url, None)
        if sh is not None:
            os.close(sh.fd)       # the map stays valid until no view of it is left (it is only read)

    def close(self) -> None:
        for url in list(self._open):
            self._drop(url)
