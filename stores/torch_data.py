"""PyTorch access to a memorybank: a batch-reading Dataset and a rank/worker-aware batch Sampler.

    ds = MemoryBankDataset("mb.zarr", split="train", fields=("actions", "bev_vec"))
    sampler = KeyBatchSampler(len(ds), batch_size=64, shuffle=True)      # rank/world from torch.distributed
    loader = make_loader(ds, sampler, num_workers=2)
    for batch in loader:  # {"keys": list[B], "actions": (B, T, A) float32, "bev_vec": (B, T, D), "found": (B,)}
        ...

Each sampler item is a whole batch of indices; the DataLoader hands each batch to one worker, which does a
single vectorised ``get_batch`` (one read per field). The bank is opened lazily in every process that reads,
so workers never share handles or async state with the parent.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from stores.base import MemoryBank


class MemoryBankDataset(Dataset):
    """Map-style dataset whose item is a *batch*: ``ds[[i, j, ...]]`` reads those keys in one call.

    ``keys``: the keys to serve (e.g. a camera dataset's ``.keys``; absent ones come back with
    ``found=False`` and zeros), or all complete keys of ``split`` (or of the whole store) when None.
    Returns ``{"keys": list[B], field: float32 tensor (B, T, ...), "found": bool tensor (B,)}``.
    """

    def __init__(self, path: str, keys: Sequence[str] | None = None, split: str | None = None,
                 fields: Sequence[str] | None = None) -> None:
        self.path = str(path)
        bank = MemoryBank.open(self.path, mode="r")   # index only; rows are read lazily per process
        self.schema = bank.schema
        self.fields = tuple(fields) if fields is not None else self.schema.fields
        self.keys = list(keys) if keys is not None else bank.keys(split)
        self._bank: MemoryBank | None = bank

    def __len__(self) -> int:
        return len(self.keys)

    def _get_bank(self) -> MemoryBank:
        if self._bank is None:
            self._bank = MemoryBank.open(self.path, mode="r")
        return self._bank

    def __getitem__(self, indices: int | Sequence[int]) -> dict[str, Any]:
        idx = [indices] if isinstance(indices, (int, np.integer)) else list(indices)
        keys = [self.keys[i] for i in idx]
        B = len(keys)
        # every field AND the found mask are contiguous tensors in ONE byte storage: a worker hands the
        # batch to the main process through one shared-memory segment instead of one per tensor
        shapes = {f: (B, *self.schema.row_shape(f)) for f in self.fields}
        nbytes = 4 * sum(math.prod(s) for s in shapes.values())
        buf = torch.empty(nbytes + B, dtype=torch.uint8)
        views, off = {}, 0
        for f, shp in shapes.items():
            n = 4 * math.prod(shp)
            views[f] = buf[off:off + n].view(torch.float32).view(shp)
            off += n
        found = buf[off:off + B].view(torch.bool)
        found.numpy()[:] = self._get_bank().get_batch_into(keys, {f: v.numpy() for f, v in views.items()})
        return {"keys": keys, **views, "found": found}

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_bank"] = None        # each (spawned) worker opens its own handle
        return d


class KeyBatchSampler(Sampler[list[int]]):
    """Yields batches of dataset indices, sharded across DDP ranks (rank r takes every world-th batch of a
    common permutation). DataLoader workers then split a rank's batches between them.

    ``rank``/``world_size`` default to torch.distributed's when it is initialised, else 0/1. With
    ``drop_last=False`` the permutation is padded (wrapping around) so every rank gets the same number of
    batches. Call ``set_epoch(e)`` each epoch for a new shuffle.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        dist = torch.distributed
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size, self.epoch = drop_last, rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _num_batches_total(self) -> int:
        per = self.batch_size * self.world_size
        return (self.n // per if self.drop_last else math.ceil(self.n / per)) * self.world_size

    def __len__(self) -> int:
        return self._num_batches_total() // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        if self.n == 0:
            return
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).numpy()
        else:
            order = np.arange(self.n)
        total = self._num_batches_total() * self.batch_size
        if total > self.n:
            order = np.resize(order, total)   # wrap around to pad
        order = order[:total]
        batches = order.reshape(-1, self.batch_size)
        for b in batches[self.rank::self.world_size]:
            yield b.tolist()


def make_loader(dataset: MemoryBankDataset, sampler: KeyBatchSampler, num_workers: int = 2,
                **kwargs: Any) -> DataLoader:
    """A DataLoader that fetches one whole batch per worker call (``batch_size=None``). Any start method
    works (the row reader has no threads or async state; each worker maps the shard files it reads), so
    the default (fork on Linux) is used unless ``multiprocessing_context`` is given."""
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers, **kwargs)
