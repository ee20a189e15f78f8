"""Teacher targets read in the training process, ahead of the step (``--kd_targets main``, the default).

With ``--kd_targets worker`` each DataLoader worker reads its batch's teacher rows beside the camera windows
and sends them to the main process through shared memory; that hand-over, not the store, bounds the rate
(``bench/bench_streaming.py``: a float32 memmap read the same way delivers about the same). Here
the workers deliver the camera windows and their keys only, and one thread of the main process fills each
batch's targets by key (`TeacherTargets.attach`: one ``get_batch_into`` at the store's in-process
rate, plus pairing / retrieval) for up to ``depth`` batches ahead while the step of the current one runs.

    loader = TargetsAhead(dataloader, targets.attach)           # what make_kd_loader returns
    for batch in loader: ...                                    # batches in the DataLoader's order, targets in

The batches, their order and their contents equal the worker path's (tested), so a run is the same run
either way. The thread uses no global RNG and no collective; it starts after ``iter(dataloader)`` (the
workers are forked before it exists) and stops when the iterator is exhausted, closed or dropped. An error
in a worker or in a store read is raised in the training loop, at the batch where it happened.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

__all__ = ["TargetsAhead"]

_END = object()


class TargetsAhead:
    """Iterable over ``loader``'s batches, each passed through ``fill(batch)`` (in place) in a thread of this
    process, up to ``depth`` batches ahead of the consumer. ``None`` batches (all windows bad) pass through.
    ``pin``: the filled teacher tensors are copied to pinned memory (for a CUDA step)."""

    def __init__(self, loader: Iterable, fill: Callable[[dict[str, Any]], None], depth: int = 2,
                 pin: bool = False) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.loader, self.fill, self.depth, self.pin = loader, fill, int(depth), bool(pin)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        return _AheadIterator(iter(self.loader), self._fill, self.depth)   # iter() first: workers fork here

    def _fill(self, batch: dict[str, Any]) -> None:
        self.fill(batch)
        if self.pin:
            batch["teacher"] = {k: v.pin_memory() for k, v in batch["teacher"].items()}


def _put(q: queue.Queue, stop: threading.Event, item: Any) -> bool:
    """Queue ``item`` unless the consumer has gone (-> False)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _feed(source: Iterator[Any], fill: Callable[[Any], None], q: queue.Queue, stop: threading.Event) -> None:
    """The thread: each batch of ``source`` filled and queued, then the end (or the error) marker. It holds no
    reference to the consumer's iterator, so dropping that iterator stops it."""
    try:
        with torch.no_grad():
            for batch in source:
                if batch is not None:
                    fill(batch)
                if not _put(q, stop, (None, batch)):
                    return
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
        _put(q, stop, (e, _END))
        return
    _put(q, stop, (None, _END))


class _AheadIterator:
    """The consumer's side: ``next()`` takes the thread's next filled batch (or re-raises its error)."""

    def __init__(self, source: Iterator[Any], fill: Callable[[Any], None], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=_feed, args=(source, fill, self._queue, self._stop),
                                        name="kd-targets-ahead", daemon=True)
        self._thread.start()

    def __iter__(self) -> "_AheadIterator":
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        error, batch = self._queue.get()
        if batch is _END:
            self._finished = True
            self._thread.join()
            if error is not None:
                raise error
            raise StopIteration
        return batch

    def close(self) -> None:
        """Stop the thread (it finishes the batch it is reading) and wait for it."""
        self._finished = True
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __del__(self) -> None:          # the consumer dropped it mid-epoch (an error in the step): stop the thread
        self._stop.set()
