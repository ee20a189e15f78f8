"""Crash-safe file writes of the core (checkpoints, calib.json, study results): a reader sees the old file or
the new one, whole, never a half-written one. The memorybank has its own (``stores.fsio.write_atomic``: the
store layer does not import the core's I/O helpers beyond the key grammar).

    with replacing("runs/teacher.pt") as tmp:   # write tmp any way you like
        torch.save(state, tmp)
    write_text_atomic("result.json", text)
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator

__all__ = ["replacing", "write_text_atomic"]


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (its folder is created); when the block ends normally the file
    is fsync-ed and renamed over ``path``, then the folder is fsync-ed; on an exception it is removed and
    ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
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
