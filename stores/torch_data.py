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

from stores.abc import MemoryBank
from stores.factory import open_memorybank


def _view(buf: torch.Tensor, off: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return buf[off:off + n].view(dtype).view(shape)


def _rebuild_batch(buf: torch.Tensor, layout: dict[str, Any], rest: dict[str, Any], order: list[str]) -> dict:
    """Unpickle a `PackedBatch`: the tensors named in ``layout`` become views of the one received ``buf``."""
    got = {k: _view(buf, *spec) for k, spec in layout.items()}
    got.update(rest)
    return {k: got[k] for k in order}


class PackedBatch(dict):
    """A batch dict whose tensors are contiguous views of ONE byte buffer (fields float32, ``found`` bool).

    It is a plain ``dict`` to its users. When a DataLoader worker sends it to the main process, it pickles
    the buffer once (one shared-memory file descriptor instead of one per tensor - the fd hand-over is the
    main per-tensor cost of worker -> main transfers) and unpickles as a plain dict of views. Entries that
    were replaced or added after creation are pickled normally.
    """

    def __init__(self, buf: torch.Tensor, layout: dict[str, tuple[int, tuple[int, ...], torch.dtype]],
                 keys: list[str]) -> None:
        super().__init__(keys=keys)
        self._buf, self._layout = buf, layout
        self._views = {k: _view(buf, *spec) for k, spec in layout.items()}
        self.update(self._views)

    def __copy__(self) -> "PackedBatch":      # DataLoader's default_convert copies mappings
        new = PackedBatch.__new__(PackedBatch)
        dict.update(new, self)
        new._buf, new._layout, new._views = self._buf, self._layout, self._views
        return new

    def __reduce__(self) -> tuple:
        packed = {k: spec for k, spec in self._layout.items() if self.get(k) is self._views[k]}
        rest = {k: v for k, v in self.items() if k not in packed}
        if not packed:
            return (dict, (rest,))
        return (_rebuild_batch, (self._buf, packed, rest, list(self)))


class MemoryBankDataset(Dataset):
    """Map-style dataset whose item is a *batch*: ``ds[[i, j, ...]]`` reads those keys in one call.

    ``keys``: the keys to serve (e.g. a camera dataset's ``.keys``; absent ones come back with
    ``found=False`` and zeros), or all complete keys of ``split`` (or of the whole store) when None.
    Returns ``{"keys": list[B], field: float32 tensor (B, T, ...), "found": bool tensor (B,)}``.
    """

    def __init__(self, path: str, keys: Sequence[str] | None = None, split: str | None = None,
                 fields: Sequence[str] | None = None) -> None:
        self.path = str(path)
        bank = open_memorybank(self.path, mode="r")   # index only; rows are read lazily per process
        self.schema = bank.schema
        self.fields = tuple(fields) if fields is not None else self.schema.fields
        self.keys = list(keys) if keys is not None else bank.keys(split)
        self._bank: MemoryBank | None = bank

    def __len__(self) -> int:
        return len(self.keys)

    def _get_bank(self) -> MemoryBank:
        if self._bank is None:
            self._bank = open_memorybank(self.path, mode="r")
        return self._bank

    def __getitem__(self, indices: int | Sequence[int]) -> dict[str, Any]:
        idx = [indices] if isinstance(indices, (int, np.integer)) else list(indices)
        keys = [self.keys[i] for i in idx]
        B = len(keys)
        shapes = {f: (B, *self.schema.row_shape(f)) for f in self.fields}
        layout, off = {}, 0
        for f, shp in shapes.items():
            layout[f] = (off, shp, torch.float32)
            off += 4 * math.prod(shp)
        layout["found"] = (off, (B,), torch.bool)
        buf = torch.empty(off + B, dtype=torch.uint8)
        batch = PackedBatch(buf, layout, keys)
        batch["found"].numpy()[:] = self._get_bank().get_batch_into(
            keys, {f: batch[f].numpy() for f in self.fields})
        return batch

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
