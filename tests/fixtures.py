"""Shared helpers of the tests: the tiny fake dataset writers (from ``e2r.sim.tiny``) and a csv reader.

``write_tiny_dataset(tmp_path)`` gives ``<root>/<split>/segment_XXXX/{meta/data.csv, lidar/*.bin,
camera/*.png, camera/calib.json}`` (see e2r/sim/tiny.py). Deterministic for a given seed.
"""
from __future__ import annotations

import csv
import socket
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.multiprocessing as mp

from e2r.sim.tiny import FRONT_CAM2EGO, make_points, write_calib, write_pcd, write_points_bin, write_tiny_dataset

__all__ = ["make_points", "write_points_bin", "write_pcd", "write_calib", "write_tiny_dataset",
           "read_csv_rows", "FRONT_CAM2EGO", "Hang", "free_port", "run_ranks"]


def read_csv_rows(csv_path: Path) -> list[dict[str, str]]:
    """The rows of a data.csv as dicts of strings (for tests comparing against dataset items)."""
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a test's process-group rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(fn: Callable[..., None], args: tuple[Any, ...], nprocs: int, timeout_s: float) -> None:
    """``fn(rank, *args)`` in ``nprocs`` spawned processes, as torchrun would; the test fails (and the ranks are
    killed) if they have not all finished within ``timeout_s``."""
    procs = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not procs.join(timeout=1):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail(f"the {nprocs} ranks did not finish in {timeout_s:.0f} s")


class Hang(BaseException):     # BaseException: a reader's ``except Exception`` must not turn it into a DataError
    """A read or command ran past its time limit (raised by a test's alarm)."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Per-step batches are tiny: on a busy 2-core machine torch's thread pool costs 50x (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
