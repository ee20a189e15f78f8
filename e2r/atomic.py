"""The core's file helpers. Crash-safe file writes (checkpoints, calib.json, study results): a reader sees the
old file or the new one, whole, never a half-written one; a file's sha256 (:func:`file_sha256`: which
checkpoint made a memorybank, which file a released model is). The memorybank has its own writes
(``stores.fsio.write_atomic``: the store layer does not import the core's I/O helpers beyond the key grammar).

    with replacing("runs/teacher.pt") as tmp:   # write tmp any way you like
        torch.save(state, tmp)
    write_text_atomic("result.json", text)

Output folders are created by :func:`make_dirs` (here and wherever the core creates one): a folder that
cannot be made (a regular file in its way, ``/proc`` or another virtual or read-only file system, no
permission) is a :class:`~e2r.errors.ConfigError` naming the path and why, not an OSError traceback.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path
from typing import Iterator

from e2r.errors import ConfigError

__all__ = ["replacing", "write_text_atomic", "make_dirs", "file_sha256"]


def _unwritable(path: Path, error: OSError) -> ConfigError:
    """The ConfigError for an output ``path`` that ``error`` kept from being created: names the regular file
    in its way, or the nearest existing folder and the system's reason."""
    chain = [path, *path.parents]
    blocker = next((p for p in chain[1:] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return ConfigError(f"output path {path} cannot be created: {blocker} is a file, not a folder")
    if path.is_dir():
        return ConfigError(f"output path {path} is a directory, not a file to write")
    existing = next((p for p in chain[1:] if p.is_dir()), None)
    return ConfigError(f"output path {path} cannot be created in {existing}: {error.strerror or error} (a "
                       f"read-only or virtual file system such as /proc, or no permission); choose another path")


def make_dirs(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` and its parents (existing is fine) -> ``Path(path)``; ConfigError naming it
    and why when it cannot be created (see the module docstring)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(path, e) from None
    return path


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (its folder is created); when the block ends normally the file
    is fsync-ed and renamed over ``path``, then the folder is fsync-ed; on an exception it is removed and
    ``path`` is left as it was."""
    path = Path(path)
    make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:                          # created before the caller writes: an unwritable place is named here
            tmp.touch(exist_ok=False)
        except OSError as e:
            raise _unwritable(path, e) from None
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):      # not every file system lets a folder be opened and fsync-ed
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` crash-safely (:func:`replacing`); the file is readable by all (0644
    before the umask), like a plain ``open(path, "w")``."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()
