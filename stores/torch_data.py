"""PyTorch access to a memorybank: a fork-safe batch reader and a batch-reading Dataset.

    reader = TeacherRowReader("mb.zarr", fields=("actions", "bev_vec"))
    batch = reader.read(keys)   # {"keys": list[B], "actions": (B, T, A) float32, "bev_vec": ..., "found": (B,)}

    ds = MemoryBankDataset("mb.zarr", split="train", fields=("actions", "bev_vec"))
    sampler = EpochBatchSampler(len(ds), batch_size=64, shuffle=True)   # e2r.data.sampler; rank/world from DDP
    loader = make_loader(ds, sampler, num_workers=2)
    for batch in loader:  # {"keys": list[B], "actions": (B, T, A) float32, "bev_vec": (B, T, D), "found": (B,)}
        ...

Each sampler item is a whole batch of indices; the DataLoader hands each batch to one worker, which does a
single vectorised ``get_batch_into`` (one read of the needed rows for all fields). The bank is opened
lazily in every process that reads, so workers never share handles or async state with the parent.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from stores.abc import MemoryBank
from stores.factory import open_memorybank
from stores.schema import DEPTH, StoreSchema


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


class TeacherRowReader:
    """Reads batches of teacher rows by key from the store at ``path``, in any process.

    ``read(keys)`` -> `PackedBatch` ``{"keys": list[B], field: float32 tensor (B, T, ...) (depth: uint8 bins
    (B, T, Ncam, h, w)), "found": bool tensor (B,)}`` with ONE ``get_batch_into`` into one buffer; rows of absent keys are zeros with
    ``found=False``. ``fields``: the fields to read (default: all stored). The store is opened read-only on
    first use in a process; pickling drops the handle (a spawned DataLoader worker opens its own; a forked
    one keeps the parent's, which is fork safe: no threads, shard files are mapped lazily; on object
    storage the fsspec filesystem is created again in the worker). ``storage_options`` / ``cache_dir`` /
    ``cache_bytes``: for a store URL (``s3://...``), as `stores.open_memorybank`.
    """

    def __init__(self, path: str, fields: Sequence[str] | None = None, *,
                 storage_options: dict[str, Any] | None = None, cache_dir: str | None = None,
                 cache_bytes: int | None = None) -> None:
        self.path = str(path)
        self.open_kw = {"storage_options": storage_options, "cache_dir": cache_dir, "cache_bytes": cache_bytes}
        self._fields = tuple(fields) if fields is not None else None
        self._bank: MemoryBank | None = None
        self._schema: StoreSchema | None = None

    @property
    def bank(self) -> MemoryBank:
        """The read-only store handle of this process (opened on first use)."""
        if self._bank is None:
            self._bank = open_memorybank(self.path, mode="r", **self.open_kw)
        return self._bank

    @property
    def schema(self) -> StoreSchema:
        if self._schema is None:
            self._schema = self.bank.schema
        return self._schema

    @property
    def fields(self) -> tuple[str, ...]:
        return self._fields if self._fields is not None else self.schema.fields

    def dtype(self, name: str) -> torch.dtype:
        """The tensor dtype ``read`` gives field ``name``: uint8 for the depth bins, float32 otherwise."""
        return torch.uint8 if name == DEPTH else torch.float32

    def zeros(self, name: str, rows: int) -> torch.Tensor:
        """(rows, T, ...) zeros of field ``name`` in the dtype ``read`` gives it (rows of absent keys)."""
        return torch.zeros((rows, *self.schema.row_shape(name)), dtype=self.dtype(name))

    def read(self, keys: Sequence[str]) -> PackedBatch:
        keys = list(keys)
        B = len(keys)
        schema, fields = self.schema, self.fields
        layout, off = {}, 0
        for f in fields:
            shp, dtype = (B, *schema.row_shape(f)), self.dtype(f)
            layout[f] = (off, shp, dtype)
            off += -(-dtype.itemsize * math.prod(shp) // 4) * 4       # the next view starts 4-byte aligned
        layout["found"] = (off, (B,), torch.bool)
        buf = torch.empty(off + B, dtype=torch.uint8)
        batch = PackedBatch(buf, layout, keys)
        batch["found"].numpy()[:] = self.bank.get_batch_into(keys, {f: batch[f].numpy() for f in fields})
        return batch

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_bank"] = None        # each (spawned) process opens its own handle
        return d


class MemoryBankDataset(Dataset):
    """Map-style dataset whose item is a *batch*: ``ds[[i, j, ...]]`` reads those keys in one call.

    ``keys``: the keys to serve (e.g. a camera dataset's ``.keys``; absent ones come back with
    ``found=False`` and zeros), or all complete keys of ``split`` (or of the whole store) when None.
    Returns ``{"keys": list[B], field: float32 tensor (B, T, ...), "found": bool tensor (B,)}`` (a
    `TeacherRowReader` batch). ``open_kw``: `TeacherRowReader`'s object-store arguments.
    """

    def __init__(self, path: str, keys: Sequence[str] | None = None, split: str | None = None,
                 fields: Sequence[str] | None = None, **open_kw: Any) -> None:
        self.path = str(path)
        self.reader = TeacherRowReader(self.path, fields, **open_kw)
        self.schema = self.reader.schema        # opens the store: index only; rows are read lazily per process
        self.fields = self.reader.fields
        self.keys = list(keys) if keys is not None else self.reader.bank.keys(split)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, indices: int | Sequence[int]) -> dict[str, Any]:
        idx = [indices] if isinstance(indices, (int, np.integer)) else list(indices)
        return self.reader.read([self.keys[i] for i in idx])


def make_loader(dataset: Dataset, sampler: Sampler[list[int]], num_workers: int = 2,
                **kwargs: Any) -> DataLoader:
    """A DataLoader that fetches one whole batch per worker call (``batch_size=None``). Any start method
    works (the local row reader has no threads or async state; each worker maps the shard files it reads;
    on object storage each worker creates its own fsspec filesystem), so the default (fork on Linux) is used
    unless ``multiprocessing_context`` is given."""
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers, **kwargs)
