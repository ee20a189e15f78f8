"""Running segment writers of the synthetic world in this process or a process pool, with one progress bar.

A job is ``(fn, args)``: a module-level function called as ``fn(*args, progress)`` that writes one segment and
returns its summary dict; ``progress`` is None in this process, or a shared counter (a multiprocessing Value)
that the writer increments once per frame written.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from typing import Any, Callable

from tqdm import tqdm

__all__ = ["run_jobs"]

_PROGRESS = None


def _init_worker(counter) -> None:
    global _PROGRESS
    _PROGRESS = counter


def _worker(job: tuple[Callable[..., dict[str, Any]], tuple]) -> dict[str, Any]:
    fn, args = job
    return fn(*args, _PROGRESS)


def run_jobs(jobs: list[tuple[Callable[..., dict[str, Any]], tuple]], frames: list[int], workers: int | None,
             progress: bool) -> tuple[list[dict[str, Any]], int]:
    """Run segment writers ``fn(*args, progress_counter)`` (module-level functions, e.g. :func:`generate_segment`)
    in this process or a pool, with one progress bar over ``frames`` (frames each job writes); returns (their
    summaries in job order, workers used)."""
    n_workers = min(os.cpu_count() or 1, len(jobs)) if workers is None else max(1, min(workers, len(jobs)))
    total = int(sum(frames))
    bar = tqdm(total=total, unit="frame", desc="synthetic dataset", disable=not progress)
    if n_workers == 1:
        segments = []
        for (fn, args), n in zip(jobs, frames):
            segments.append(fn(*args, None))
            bar.update(n)
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        counter = ctx.Value("i", 0)
        with ctx.Pool(n_workers, initializer=_init_worker, initargs=(counter,)) as pool:
            result = pool.map_async(_worker, jobs, chunksize=1)
            while not result.ready():
                result.wait(0.25)
                bar.update(counter.value - bar.n)
            segments = result.get()
        bar.update(total - bar.n)
    bar.close()
    return segments, n_workers
