"""The one batch sampler of the project: rank-sharded, shuffled batches whose order depends only on
``(seed, epoch)``.

    sampler = EpochBatchSampler(len(ds), batch_size=8, shuffle=True, seed=0)   # rank/world from torch.distributed
    loader = DataLoader(ds, batch_sampler=sampler, ...)       # or sampler=..., batch_size=None for batch datasets
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        ...

Order (the same as ``torch.utils.data.DistributedSampler`` followed by consecutive batching, so results are
unchanged from the trainers that used it): a permutation of ``range(n)`` drawn from a generator seeded with
``seed + epoch`` (or ``range(n)`` unshuffled), padded by wrapping around to a multiple of ``world_size``
(or cut, with ``drop_last``), rank ``r`` takes positions ``r, r + world, ...`` and cuts them into batches of
``batch_size`` (the last one may be short). DataLoader workers then take a rank's batches in turn, so the
order of batches a rank sees does not depend on the number of workers. ``state_dict()`` holds everything
the order depends on, and the position in the epoch (``set_epoch(epoch, start_batch)``: a resumed run skips
the batches it already trained on).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["EpochBatchSampler", "dist_rank_world"]


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised torch.distributed group, else ``(0, 1)``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices for one DDP rank; ``len()`` = batches per epoch on this rank."""

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        r, w = dist_rank_world()
        rank = r if rank is None else int(rank)
        world_size = w if world_size is None else int(world_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.n, self.batch_size, self.shuffle, self.seed = int(n), int(batch_size), bool(shuffle), int(seed)
        self.drop_last, self.rank, self.world_size, self.epoch = bool(drop_last), rank, world_size, 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; ``start_batch`` > 0 skips that many of its batches (a mid-epoch resume: the
        rest of the epoch comes in the same order as in an uninterrupted run)."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "batch_size": self.batch_size, "shuffle": self.shuffle, "seed": self.seed,
                "drop_last": self.drop_last, "world_size": self.world_size, "epoch": self.epoch,
                "start_batch": self.start_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the epoch, position and seed; refuses a state made for another dataset size, batch or
        world size."""
        for name in ("n", "batch_size", "shuffle", "drop_last", "world_size"):
            if name in state and state[name] != getattr(self, name):
                raise ValueError(f"sampler state has {name}={state[name]!r}, this sampler {getattr(self, name)!r}")
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self.start_batch = int(state.get("start_batch", 0))

    def _samples_per_rank(self) -> int:
        if self.drop_last:
            return self.n // self.world_size
        return math.ceil(self.n / self.world_size)

    def rank_indices(self) -> list[int]:
        """This rank's indices for the current epoch, in order (before batching)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self._samples_per_rank() * self.world_size
        if total > len(order) and order:
            pad = total - len(order)
            order += (order * math.ceil(pad / len(order)))[:pad]
        order = order[:total]
        return order[self.rank:total:self.world_size]

    def batches_per_epoch(self) -> int:
        """Batches of a whole epoch on this rank (``len()`` is what remains after ``start_batch``)."""
        return math.ceil(self._samples_per_rank() / self.batch_size)

    def __len__(self) -> int:
        return max(self.batches_per_epoch() - self.start_batch, 0)

    def __iter__(self) -> Iterator[list[int]]:
        idx = self.rank_indices()
        for i in range(self.start_batch * self.batch_size, len(idx), self.batch_size):
            yield idx[i:i + self.batch_size]
