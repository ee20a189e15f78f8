"""Exact DDP sharding: the sampler alone (every index once per epoch over all ranks, the same number of
batches on every rank, resume), then 2 gloo ranks x 2 DataLoader workers through the trainers' loader and
``run_epoch`` (reads, order, loss weighting, mid-epoch resume)."""
from __future__ import annotations

import multiprocessing
import os
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset, get_worker_info

from e2r.data.sampler import EpochBatchSampler, training_sampler
from tests.fixtures import free_port, run_ranks

N, BATCH, WORLD, SEED = 17, 4, 2, 7      # 17 = 2 * (2 * 4) + 1: the last step has fewer samples than ranks


def _plan(n: int, batch: int, world: int, epoch: int = 0, **kw) -> list[list[list[int]]]:
    """Every rank's batches of one epoch (exact mode)."""
    out = []
    for rank in range(world):
        s = EpochBatchSampler(n, batch, seed=SEED, rank=rank, world_size=world, exact=True, **kw)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize("n,batch,world", [(17, 4, 2), (21, 4, 2), (16, 4, 2), (50, 4, 3), (1, 4, 2), (3, 2, 5),
                                           (7, 1, 3), (0, 4, 2), (9, 3, 4), (64, 8, 4), (13, 5, 1)])
def test_exact_sampler_reads_every_index_once_in_equal_step_counts(n, batch, world):
    for epoch in (0, 1):
        plan = _plan(n, batch, world, epoch)
        flat = [i for rank in plan for b in rank for i in b]
        assert sorted(flat) == list(range(n))                              # once each, no padding
        steps = -(-n // (batch * world))
        assert [len(rank) for rank in plan] == [steps] * world             # DDP: the same steps on every rank
        assert all(len(b) <= batch for rank in plan for b in rank)
        empty = any(len(b) == 0 for rank in plan for b in rank)
        assert empty == EpochBatchSampler(n, batch, rank=0, world_size=world, exact=True).has_empty_batches()
        assert empty == (0 < n < world or (batch == 1 and n % world != 0))
        padded = [EpochBatchSampler(n, batch, seed=SEED, rank=r, world_size=world) for r in range(world)]
        for s in padded:
            s.set_epoch(epoch)
        padded_plan = [list(s) for s in padded]
        for k in range(steps - 2):   # the steps before the last two are full: the padded mode's batches
            assert [plan[r][k] for r in range(world)] == [padded_plan[r][k] for r in range(world)]


def test_exact_sampler_lends_a_sample_to_a_rank_left_without_one():
    plan = _plan(N, BATCH, WORLD)
    assert [[len(b) for b in rank] for rank in plan] == [[4, 4, 1], [4, 3, 1]]
    assert [[len(b) for b in rank] for rank in _plan(21, 4, 2)] == [[4, 4, 3], [4, 4, 2]]
    assert [[len(b) for b in rank] for rank in _plan(1, 4, 2)] == [[1], [0]]      # fewer samples than ranks


def test_one_rank_exact_equals_padded_and_epochs_differ():
    for n, batch in ((0, 3), (1, 1), (17, 4), (23, 5), (40, 8)):
        for shuffle in (True, False):
            a = EpochBatchSampler(n, batch, shuffle, seed=3, rank=0, world_size=1, exact=True)
            b = EpochBatchSampler(n, batch, shuffle, seed=3, rank=0, world_size=1)
            for epoch in (0, 4):
                a.set_epoch(epoch)
                b.set_epoch(epoch)
                assert list(a) == list(b) and len(a) == len(b)
    assert _plan(N, BATCH, WORLD, 0) != _plan(N, BATCH, WORLD, 1)


def test_exact_sampler_resume_and_state_dict_round_trip():
    s = EpochBatchSampler(N, BATCH, seed=SEED, rank=1, world_size=WORLD, exact=True)
    s.set_epoch(3)
    whole = list(s)
    for start in range(len(whole) + 2):
        s.set_epoch(3, start_batch=start)
        assert list(s) == whole[start:] and len(s) == len(whole[start:])
    s.set_epoch(3, start_batch=2)
    t = EpochBatchSampler(N, BATCH, seed=0, rank=1, world_size=WORLD, exact=True)
    t.load_state_dict(s.state_dict())
    assert list(t) == whole[2:] and t.state_dict() == s.state_dict()
    with pytest.raises(ValueError, match="exact=True"):
        EpochBatchSampler(N, BATCH, rank=1, world_size=WORLD).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="start_batch"):
        s.set_epoch(0, start_batch=-1)
    for start, stop in ((0, 2), (1, 3), (2, 2), (0, len(whole) + 5)):     # an epoch cut short (--steps)
        s.set_epoch(3, start_batch=start, stop_batch=stop)
        assert list(s) == whole[start:stop] and len(s) == len(whole[start:stop])


def test_training_sampler_is_exact_unless_a_batch_would_be_empty():
    assert training_sampler(N, BATCH, True, SEED, 1, WORLD).exact
    with pytest.warns(UserWarning, match="padding the epoch"):
        fallback = training_sampler(1, BATCH, True, SEED, 1, WORLD)
    assert not fallback.exact and list(fallback) == [[0]]                  # padded: rank 1 re-reads index 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert training_sampler(5, 1, True, SEED, 0, 1).exact              # one rank never needs padding


# ---- 2 gloo ranks x 2 DataLoader workers -------------------------------------------------------------


class _LoggedItems(Dataset):
    """Item ``i`` -> ``(i, worker id)``; every read appends ``"<tag> <i>"`` to a per-process log file."""

    def __init__(self, n: int, log_dir: str) -> None:
        self.n, self.log_dir, self.tag = n, log_dir, ""

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, int]:
        with open(os.path.join(self.log_dir, f"reads-{os.getpid()}.log"), "a") as f:
            f.write(f"{self.tag} {i}\n")
        info = get_worker_info()
        return int(i), -1 if info is None else info.id


def _collate(items: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return list(items)


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(N, generator=g)
    torch.manual_seed(0)
    return x, y, torch.nn.Linear(3, 1)


class _MSETask:
    """A TrainTask-like task: mean squared error of a linear model; counts the samples it trained on."""

    def __init__(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.net, self.x, self.y, self.sums = net, x, y, {"seen": 0.0}

    def train_step(self, batch: list[tuple[int, int]]) -> tuple[torch.Tensor, int]:
        idx = torch.tensor([i for i, _ in batch])
        self.sums["seen"] += len(idx)
        return ((self.net(self.x[idx]).squeeze(1) - self.y[idx]) ** 2).mean(), len(idx)

    def running_state(self) -> dict[str, float]:
        return dict(self.sums)

    def load_running_state(self, state: dict[str, float]) -> None:
        self.sums = dict(state)


def _rank_main(rank: int, port: int, out: str) -> None:
    """One torchrun-like rank: joins the gloo group through ``setup_distributed`` and writes what it saw."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    multiprocessing.set_start_method("fork", force=True)   # as under torchrun (mp.spawn children inherit spawn)
    from e2r.checkpoints import load_checkpoint
    from e2r.runtime import all_reduce_sums, setup_distributed, teardown_distributed
    from e2r.workflow.trainer import Trainer, make_window_loader, run_epoch, unwrap

    ctx = setup_distributed("cpu")
    try:
        ds = _LoggedItems(N, out)
        seen = {}
        for workers in (0, 2):                  # what the trainers' loader hands this rank
            loader, sampler = make_window_loader(ds, BATCH, True, SEED, workers, _collate, ctx)
            for epoch in (0, 1):
                sampler.set_epoch(epoch)
                ds.tag = f"w{workers}e{epoch}"
                seen[ds.tag] = [list(b) for b in loader]
        ds.tag = "train"
        x, y, model = _data()
        net = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(net.parameters(), lr=0.2)
        task = _MSETask(net, x, y)
        loader, sampler = make_window_loader(ds, BATCH, True, SEED, 2, _collate, ctx)
        ckpt = os.path.join(out, "mid.pt")
        fake = SimpleNamespace(cfg=SimpleNamespace(checkpoint_every_steps=1, checkpoint_path=ckpt), ctx=ctx,
                               kind="teacher", _state=lambda *a: {"model": unwrap(net).state_dict(), "config": {}})
        losses = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            task.sums = {"seen": 0.0}
            hooks = Trainer._mid_epoch_hooks(fake, task, epoch, None, sampler, {}) if epoch == 1 else {}
            losses.append(run_epoch(loader, task.train_step, opt, net.parameters(), ctx=ctx, show_progress=False,
                                    **hooks))
        seen_1 = all_reduce_sums(task.sums, ctx)["seen"]
        weights = [p.detach().clone() for p in net.parameters()]
        valid = run_epoch(make_window_loader(ds, BATCH, False, SEED, 0, _collate, ctx)[0],
                          torch.no_grad()(task.train_step), None, ctx=ctx, show_progress=False)
        # resume epoch 1 from the last mid-epoch checkpoint rank 0 wrote (after its 2nd of 3 steps)
        state = load_checkpoint(ckpt)
        unwrap(net).load_state_dict(state["model"])
        mid = state["position"]
        sampler.set_epoch(1, mid["batches"])
        task.sums = {"seen": 0.0}
        resumed = run_epoch(loader, task.train_step, opt, net.parameters(), ctx=ctx, show_progress=False,
                            **Trainer._mid_epoch_hooks(fake, task, 1, mid, sampler, {}))
        torch.save({"seen": seen, "losses": losses, "valid": valid, "weights": weights, "seen_1": seen_1,
                    "resumed": resumed, "resumed_seen": all_reduce_sums(task.sums, ctx)["seen"],
                    "resumed_weights": [p.detach().clone() for p in net.parameters()], "mid": mid["batches"]},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        teardown_distributed(ctx)


def _reference(plans: list[list[list[list[int]]]]) -> tuple[list[float], list[torch.Tensor], float]:
    """One process doing the same global steps (the union of the ranks' batches), plain mean losses."""
    x, y, model = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    losses = []
    for plan in plans:
        total = 0.0
        for k in range(len(plan[0])):
            idx = torch.tensor([i for rank in plan for i in rank[k]])
            loss = ((model(x[idx]).squeeze(1) - y[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / N)
    with torch.no_grad():
        valid = float(((model(x).squeeze(1) - y) ** 2).mean())
    return losses, [p.detach().clone() for p in model.parameters()], valid


def test_two_gloo_ranks_two_workers_read_every_key_once_and_train_on_exact_means(tmp_path):
    run_ranks(_rank_main, (free_port(), str(tmp_path)), nprocs=WORLD, timeout_s=120)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    reads = Counter()
    for log in Path(tmp_path).glob("reads-*.log"):
        reads.update(tuple(line.split()) for line in log.read_text().splitlines())
    for epoch in (0, 1):
        plan = _plan(N, BATCH, WORLD, epoch)
        for workers in (0, 2):
            tag = f"w{workers}e{epoch}"
            assert {(t, int(i)): c for (t, i), c in reads.items() if t == tag} == {(tag, i): 1 for i in range(N)}
            for rank in range(WORLD):
                batches = got[rank]["seen"][tag]
                assert [[i for i, _ in b] for b in batches] == plan[rank]          # order: (seed, epoch) only
                wanted = [-1] * len(batches) if workers == 0 else [k % 2 for k in range(len(batches))]
                assert [b[0][1] if b else None for b in batches] == wanted        # workers take turns
    # training: the gradient of every step is the mean over the step's samples, whatever the split
    ref_losses, ref_weights, ref_valid = _reference([_plan(N, BATCH, WORLD, e) for e in (0, 1)])
    for r in range(WORLD):
        assert got[r]["losses"] == pytest.approx(ref_losses, rel=1e-5)
        assert got[r]["valid"] == pytest.approx(ref_valid, rel=1e-5)
        assert got[r]["seen_1"] == N
        for a, b in zip(got[r]["weights"], ref_weights):
            torch.testing.assert_close(a, b)
        # mid-epoch resume: the rest of epoch 1 gives the same weights and the same epoch averages
        assert got[r]["mid"] == 2 and got[r]["resumed_seen"] == N
        assert got[r]["resumed"] == pytest.approx(got[r]["losses"][1], rel=1e-6)
        for a, b in zip(got[r]["resumed_weights"], got[r]["weights"]):
            torch.testing.assert_close(a, b)


def test_the_group_is_left_after_what_the_body_built_is_freed(monkeypatch):
    """``in_process_group`` frees the body's objects (a cyclic one, like a DDP wrapper with its hooks) before
    ``destroy_process_group``: a gloo group freed after it can block forever (seen in CI, one run in two)."""
    import weakref

    import torch.distributed as dist

    import e2r.runtime as runtime

    def one_rank_group(device_name):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        return runtime.DistContext(True, 0, 1, 0)

    refs, alive_at_destroy, destroy = [], [], dist.destroy_process_group

    def records_destroy(*a, **kw):
        alive_at_destroy.append(refs[0]() is not None)
        destroy(*a, **kw)

    class Wrapper:
        def __init__(self):
            self.hook = lambda: self          # a reference cycle: freed by the collector only

    def body(ctx):
        wrapper = Wrapper()
        refs.append(weakref.ref(wrapper))
        return ctx.world_size

    monkeypatch.setattr(runtime, "setup_distributed", one_rank_group)
    monkeypatch.setattr(dist, "destroy_process_group", records_destroy)
    assert runtime.in_process_group("cpu", body) == 1
    assert alive_at_destroy == [False] and not dist.is_initialized()
