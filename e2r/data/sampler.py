"""The one batch sampler of the project: rank-sharded, shuffled batches whose order depends only on
``(seed, epoch)``.

    sampler = training_sampler(len(ds), batch_size=8, shuffle=True, seed=0, rank=rank, world_size=world)
    loader = DataLoader(ds, batch_sampler=sampler, ...)       # or sampler=..., batch_size=None for batch datasets
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        ...

Order: a permutation of ``range(n)`` drawn from a generator seeded with ``seed + epoch`` (or ``range(n)``
unshuffled); rank ``r`` reads positions ``r, r + world, r + 2 * world, ...`` of it, cut into batches of
``batch_size``. Two ways to end an epoch whose ``n`` is not a multiple of ``world_size * batch_size``:

* padded (``exact=False``, the default; the same as ``torch.utils.data.DistributedSampler`` followed by
  consecutive batching): the permutation is padded by wrapping around to a multiple of ``world_size`` (or
  cut, with ``drop_last``), so a few samples are read twice per epoch across ranks; the last batch of a
  rank may be short.
* exact (``exact=True``, what training uses): no padding, every index is read exactly once per epoch
  across all ranks. Every rank still has the same number of batches, ``ceil(n / (world_size *
  batch_size))`` (DDP needs the same number of steps on every rank): step ``k`` reads global positions
  ``[k * world * batch, (k + 1) * world * batch)``, split over the ranks by position modulo ``world`` (for
  a full step: the same batches as the padded mode), so the last step may be short and uneven across
  ranks. When that last step has fewer samples than ranks, each rank left without one takes the last
  sample of its previous batch instead (batches ``..., batch - 1, 1``), so no batch is empty unless that is
  impossible: fewer samples than ranks, or ``batch_size`` 1 with ``n`` not a multiple of ``world_size``
  (:meth:`EpochBatchSampler.has_empty_batches`; there the empty batches are ``[]``, and
  :func:`training_sampler` falls back to the padded mode).

With one rank both modes give the same batches (``batch_size`` each, the last one short). The order a rank
reads does not depend on the number of DataLoader workers (they take a rank's batches in turn and the
loader returns them in sampler order). ``state_dict()`` holds everything the order depends on, and the
position in the epoch (``set_epoch(epoch, start_batch)``: a resumed run skips the batches it already
trained on; every rank has the same number of batches, so one count fits all ranks).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["EpochBatchSampler", "dist_rank_world", "training_sampler"]


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised torch.distributed group, else ``(0, 1)``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices for one DDP rank; ``len()`` = batches per epoch on this rank (after
    ``start_batch``). ``exact``: no padding, every index once per epoch over all ranks (module docstring)."""

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None, exact: bool = False) -> None:
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
        self.exact, self.start_batch, self.stop_batch = bool(exact), 0, None

    def set_epoch(self, epoch: int, start_batch: int = 0, stop_batch: int | None = None) -> None:
        """Select the epoch; ``start_batch`` > 0 skips that many of its batches (a mid-epoch resume: the
        rest of the epoch comes in the same order as in an uninterrupted run); ``stop_batch`` ends it before
        that batch (a run trained by steps whose last epoch is partial; None: the whole epoch)."""
        if start_batch < 0 or (stop_batch is not None and stop_batch < 0):
            raise ValueError(f"start_batch and stop_batch must be >= 0, got {start_batch}, {stop_batch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)
        self.stop_batch = None if stop_batch is None else int(stop_batch)

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "batch_size": self.batch_size, "shuffle": self.shuffle, "seed": self.seed,
                "drop_last": self.drop_last, "world_size": self.world_size, "exact": self.exact,
                "epoch": self.epoch, "start_batch": self.start_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the epoch, position and seed; refuses a state made for another dataset size, batch,
        world size or mode (a state without ``exact`` predates the exact mode: padded)."""
        for name in ("n", "batch_size", "shuffle", "drop_last", "world_size", "exact"):
            theirs = state.get(name, False) if name == "exact" else state.get(name, getattr(self, name))
            if theirs != getattr(self, name):
                raise ValueError(f"sampler state has {name}={theirs!r}, this sampler {getattr(self, name)!r}")
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self.start_batch = int(state.get("start_batch", 0))

    def _samples_per_rank(self) -> int:
        """Padded mode: every rank reads this many indices."""
        if self.drop_last:
            return self.n // self.world_size
        return math.ceil(self.n / self.world_size)

    def _total(self) -> int:
        """Exact mode: the epoch reads the first ``_total()`` positions of the permutation (all of them,
        or a multiple of ``world_size`` with ``drop_last``)."""
        return self.n - self.n % self.world_size if self.drop_last else self.n

    def rank_indices(self) -> list[int]:
        """This rank's indices for the current epoch, in order (before batching)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.exact:
            return order[self.rank:self._total():self.world_size]
        total = self._samples_per_rank() * self.world_size
        if total > len(order) and order:
            pad = total - len(order)
            order += (order * math.ceil(pad / len(order)))[:pad]
        order = order[:total]
        return order[self.rank:total:self.world_size]

    def batches_per_epoch(self) -> int:
        """Batches of a whole epoch on this rank (``len()`` is what remains after ``start_batch``); in the
        exact mode the same on every rank."""
        if self.exact:
            return math.ceil(self._total() / (self.batch_size * self.world_size))
        return math.ceil(self._samples_per_rank() / self.batch_size)

    def batch_sizes(self) -> list[int]:
        """Sizes of this rank's batches over the whole epoch (``start_batch`` not applied); they sum to
        ``len(rank_indices())``."""
        b, steps = self.batch_size, self.batches_per_epoch()
        if not self.exact:
            m = self._samples_per_rank()
            return [min(b, m - k * b) for k in range(steps)]
        if steps == 0:
            return []
        mine = len(range(self.rank, self._total(), self.world_size))
        sizes = [b] * (steps - 1) + [mine - (steps - 1) * b]
        if sizes[-1] == 0 and steps >= 2 and b >= 2:     # lend the last sample of the previous batch
            sizes[-2:] = [b - 1, 1]
        return sizes

    def has_empty_batches(self) -> bool:
        """Whether some rank (not only this one) gets an empty batch this epoch: only in the exact mode,
        with fewer samples than ranks or with ``batch_size`` 1 and a sample count not a multiple of
        ``world_size``. The same answer on every rank."""
        total, w = self._total(), self.world_size
        return self.exact and 0 < total and (total < w or (self.batch_size == 1 and total % w != 0))

    def _end(self) -> int:
        whole = self.batches_per_epoch()
        return whole if self.stop_batch is None else min(whole, self.stop_batch)

    def __len__(self) -> int:
        return max(self._end() - self.start_batch, 0)

    def __iter__(self) -> Iterator[list[int]]:
        idx, start, end = self.rank_indices(), 0, self._end()
        for k, size in enumerate(self.batch_sizes()[:end]):
            if k >= self.start_batch:
                yield idx[start:start + size]
            start += size


def training_sampler(n: int, batch_size: int, shuffle: bool, seed: int, rank: int = 0,
                     world_size: int = 1) -> EpochBatchSampler:
    """The trainers' sampler: exact (every sample once per epoch over all ranks) unless that would leave
    some rank an empty batch, which a DDP step cannot take (module docstring); then the padded mode, with
    a warning. With one rank the two are the same."""
    sampler = EpochBatchSampler(n, batch_size, shuffle, seed, rank=rank, world_size=world_size, exact=True)
    if not sampler.has_empty_batches():
        return sampler
    warnings.warn(f"{n} samples in batches of {batch_size} cannot be split over {world_size} ranks without an "
                  f"empty batch: padding the epoch instead (a few samples are read twice)", stacklevel=2)
    return EpochBatchSampler(n, batch_size, shuffle, seed, rank=rank, world_size=world_size, exact=False)
