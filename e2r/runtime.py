"""Where and how a run executes: device choice, seeding and RNG state (for exact resume), and the
``torchrun`` process group with its one all-reduce.

    device = resolve_device("auto")                 # cuda when present, else cpu
    seed_everything(0)
    ctx = setup_distributed("auto")                 # DistContext(enabled=False) outside torchrun
    sums = all_reduce_sums({"loss": 3.0, "n": 8.0}, ctx)
    result = in_process_group("auto", train)        # train(ctx) in the group, left once train's objects are freed
"""
from __future__ import annotations

import ctypes
import gc
import os
import random
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["usable_cores", "resolve_device", "seed_everything", "capture_rng_state", "restore_rng_state", "DistContext",
           "setup_distributed", "teardown_distributed", "in_process_group", "all_reduce_sums", "die_with_parent"]

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1


def die_with_parent(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: on Linux, ask the kernel to SIGKILL this worker when the process
    that started it dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``), so a killed run (SIGKILL, OOM) leaves no
    orphaned workers behind. Touches no random state and changes no result; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:   # the parent died before the request was made: the kernel will not signal us
        os._exit(0)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> CUDA (``cuda:<local_rank>``) when available else CPU; ``"cpu"``; ``"cuda"``/``"cuda:N"``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """All RNG states as weights-only-serialisable values (tensors, lists, ints)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]),
                   "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class DistContext:
    """Process-group facts; ``enabled`` is False for a plain single-process run."""

    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str = "auto") -> DistContext:
    """Join the process group when launched by ``torchrun`` (env WORLD_SIZE > 1): NCCL on CUDA, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(True, dist.get_rank(), dist.get_world_size(), local_rank)


def teardown_distributed(ctx: DistContext) -> None:
    """Leave the process group. Anything still holding it (a DDP wrapper) must be gone first: a gloo group
    freed after ``destroy_process_group`` can block forever in its destructor."""
    if ctx.enabled and dist.is_initialized():
        gc.collect()             # a DDP wrapper sits in reference cycles (its hooks): free it while the group lives
        dist.destroy_process_group()


def in_process_group(device_name: str, body: Callable[[DistContext], T]) -> T:
    """``body(ctx)`` inside the process group (see ``setup_distributed``), which is left after ``body``'s
    locals (models, DDP wrappers, loaders) are freed, on every rank together."""
    ctx = setup_distributed(device_name)
    try:
        result = body(ctx)
        if ctx.enabled:
            dist.barrier()       # no rank leaves while another still runs (not after a failure: that would hang)
        return result
    finally:
        teardown_distributed(ctx)


def all_reduce_sums(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Sum each value over the DDP ranks (float64; identity for a single process)."""
    if not ctx.enabled:
        return dict(values)
    names = sorted(values)
    dev = torch.device("cuda", ctx.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return {n: float(v) for n, v in zip(names, t.tolist())}
