"""Where a new store may go: the checks made before anything is created at a local path (`check_new_path`).

A store is refused, with a `StoreError` naming the path and the reason, when a regular file (or anything but a
folder) stands where one of its folders should be (``--store /etc/passwd/x.zarr``), or when the path lies on
a virtual file system of the kernel (``/proc``, ``/sys``, ...), where files cannot be kept. Without these
checks the creation failed on its temporary name, with a message naming neither.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from stores.errors import StoreError
from stores.fsio import file_kind

#: file systems that hold no files of ours (kernel interfaces): a store is never created there
VIRTUAL_FS = frozenset({"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
                        "securityfs", "pstore", "bpf", "configfs", "mqueue", "hugetlbfs", "fusectl", "binfmt_misc",
                        "efivarfs", "autofs", "rpc_pipefs", "nsfs"})


def check_new_path(path: str | os.PathLike, what: str = "memorybank") -> None:
    """StoreError naming what keeps a store (or another output, ``what``) from being created at the local
    ``path``, before anything is made: a regular file (or anything but a folder) where one of its folders should
    be (``/etc/passwd/x.zarr``), or a virtual file system such as ``/proc`` or ``/sys`` under it. Nothing is
    created. An empty path (it would resolve to the working directory) is refused too."""
    if not str(path).strip():
        raise StoreError(f"cannot create {what}: the path is empty; name the new {what}")
    p = Path(os.path.abspath(path))
    for parent in p.parents:                 # nearest existing ancestor decides
        try:
            st = os.stat(parent)
        except (FileNotFoundError, NotADirectoryError):      # absent, or under a file: look further up
            continue
        except OSError as e:
            raise StoreError(f"cannot create {what} {path}: {parent}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError(f"cannot create {what} {path}: {parent} is {file_kind(st.st_mode)}, not a folder; "
                             "choose another path")
        fs = _fs_type(parent)
        if fs in VIRTUAL_FS:
            raise StoreError(f"cannot create {what} {path}: {parent} is on {fs}, a virtual file system of the "
                             "kernel (like /proc or /sys) that stores no files; choose a path on a disk")
        return


def _fs_type(path: Path) -> str | None:
    """The file system type of the mount holding ``path`` (from /proc/self/mounts; None where unknown)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as fh:
            mounts = [line.split()[1:3] for line in fh if len(line.split()) >= 3]
    except OSError:
        return None
    real = os.path.realpath(path)
    best, kind = "", None
    for point, fs in mounts:
        point = point.replace("\\040", " ")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fs
    return kind
