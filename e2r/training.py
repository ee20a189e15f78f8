"""Training plumbing shared by the teacher and student trainers.

Device choice, seeding and RNG state capture/restore (for exact resume), DDP setup for ``torchrun`` with a
DistributedSampler (also used single-process, so shuffling depends only on seed and epoch), action
normalisation statistics of the training split, a TensorBoard writer on rank 0, a generic epoch loop, and
the setup and per-epoch bookkeeping both trainers share (optimizer/schedule, init, resume, DDP wrap,
best-metric/history/checkpoint/TensorBoard updates).
"""
from __future__ import annotations

import argparse
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from e2r.checkpoints import CheckpointError, load_init_weights, save_checkpoint

__all__ = ["resolve_device", "seed_everything", "capture_rng_state", "restore_rng_state", "DistContext",
           "setup_distributed", "teardown_distributed", "make_loader", "ActionNormalizer",
           "make_summary_writer", "run_epoch", "unwrap", "plain_args", "init_model", "build_optimizer",
           "restore_training_state", "wrap_ddp", "prepare_training", "train_valid_epoch",
           "finish_epoch"]


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
    import torch.distributed as dist

    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(True, dist.get_rank(), dist.get_world_size(), local_rank)


def teardown_distributed(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int,
                collate_fn: Callable | None, ctx: DistContext, drop_last: bool = False
                ) -> tuple[DataLoader, DistributedSampler]:
    """DataLoader over this rank's shard; call ``sampler.set_epoch(epoch)`` before each epoch."""
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle,
                                 seed=seed, drop_last=drop_last)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_fn, pin_memory=torch.cuda.is_available(),
                        persistent_workers=False)
    return loader, sampler


class ActionNormalizer:
    """Mean/std (A,) of ``[wheel_angle, velocity]`` over all frames of the training split."""

    def __init__(self, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).clone()
        self.std = torch.as_tensor(std, dtype=torch.float32).clone()
        if self.mean.shape != self.std.shape or not (self.std > 0).all():
            raise ValueError(f"bad action stats: mean {self.mean.tolist()}, std {self.std.tolist()}")

    @classmethod
    def from_frame_actions(cls, frame_actions: np.ndarray, min_std: float = 1e-3) -> "ActionNormalizer":
        """Statistics of (F, A) per-frame actions; a (near-)constant column gets std 1 (only centred)."""
        data = np.asarray(frame_actions, dtype=np.float64)
        if data.ndim != 2 or data.shape[0] == 0:
            raise ValueError(f"cannot compute action statistics from an array of shape {data.shape}")
        std = data.std(axis=0)
        return cls(data.mean(axis=0), np.where(std < min_std, 1.0, std))

    @classmethod
    def from_dataset(cls, dataset: Any) -> "ActionNormalizer":
        """Statistics over every frame of every segment of a sequence dataset, from its per-segment
        velocity / wheel_angle arrays (``dataset.frame_actions()``; no point cloud or image is read)."""
        return cls.from_frame_actions(dataset.frame_actions())

    def normalize(self, actions: Tensor) -> Tensor:
        return (actions - self.mean.to(actions.device)) / self.std.to(actions.device)

    def denormalize(self, actions: Tensor) -> Tensor:
        return actions * self.std.to(actions.device) + self.mean.to(actions.device)


def make_summary_writer(log_dir: str | None, ctx: DistContext):
    """A TensorBoard SummaryWriter on rank 0 when ``log_dir`` is given, else None."""
    if not log_dir or not ctx.is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=log_dir)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def run_epoch(loader: Iterable, step: Callable[[Any], tuple[Tensor, int]], optimizer: torch.optim.Optimizer | None,
              params: Iterable[Tensor] = (), grad_clip: float = 0.0, desc: str = "", ctx: DistContext | None = None,
              show_progress: bool = True) -> float:
    """One pass over ``loader``; ``step(batch) -> (mean loss, batch size)`` (``None``
    batches, all-bad windows, are skipped). Trains when ``optimizer`` is
    given (backward, optional gradient clipping, step), else runs under ``torch.no_grad``.
    Returns the sample-weighted mean loss over all ranks."""
    ctx = ctx or DistContext()
    total, count = 0.0, 0
    params = list(params)
    bar = tqdm(loader, desc=desc, leave=False, disable=not (show_progress and ctx.is_main), dynamic_ncols=True)
    with torch.set_grad_enabled(optimizer is not None):
        for batch in bar:
            if batch is None:  # every window of the batch was a skipped bad one
                continue
            loss, n = step(batch)
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"{desc}: loss became {value}; lower --lr or check the data")
            total += value * n
            count += n
            bar.set_postfix(loss=f"{total / count:.4f}")
    if ctx.enabled:
        import torch.distributed as dist

        dev = torch.device("cuda", ctx.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor([total, float(count)], dtype=torch.float64, device=dev)
        dist.all_reduce(t)
        total, count = float(t[0]), int(t[1])
    return total / max(count, 1)


def plain_args(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags with plain values (str/int/float/bool/None), as stored in a checkpoint's ``train_args``."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool)) or v is None}


def init_model(model: Any, train_ds: Any, init_path: str | None, skip_output_layer: bool, ctx: DistContext) -> None:
    """Set ``model``'s action statistics from ``train_ds`` and, with ``init_path``, load its weights (transfer;
    the statistics are kept). Prints what was loaded on rank 0."""
    norm = ActionNormalizer.from_dataset(train_ds)
    model.set_action_stats(norm.mean, norm.std)
    if init_path:
        report = load_init_weights(model, init_path, skip_output_layer, model.output_layer_prefix,
                                   keep_prefixes=("action_mean", "action_std"))
        if ctx.is_main:
            print(f"init from {init_path}: {len(report['loaded'])} tensors loaded, skipped {report['skipped']}")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, epochs: int
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with a cosine schedule over ``epochs`` (down to 5 % of ``lr``)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1), eta_min=lr * 0.05)
    return opt, sched


def restore_training_state(resume: dict[str, Any] | None, model: nn.Module, opt: torch.optim.Optimizer,
                           sched: Any, path: str | None, pipeline_name: str) -> tuple[int, float, list[dict]]:
    """Load model/optimizer/scheduler/RNG state from a resume checkpoint -> ``(start_epoch, best, history)``;
    ``(0, inf, [])`` without one. CheckpointError naming ``path`` and ``pipeline_name`` when it does not fit."""
    if not resume:
        return 0, float("inf"), []
    try:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        start_epoch, best = int(resume["epoch"]) + 1, float(resume["best_metric"])
        history = list(resume.get("history", []))
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot resume from it ({type(e).__name__}: {e}); "
                              f"resume needs a --checkpoint_path file of {pipeline_name}") from None
    restore_rng_state(resume["rng_state"])
    return start_epoch, best, history


def wrap_ddp(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel under ``torchrun``, else ``model`` itself."""
    if not ctx.enabled:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                     else None)


def prepare_training(model: nn.Module, train_ds: Any, resume: dict[str, Any] | None, *, init_path: str | None,
                     skip_output_layer: bool, lr: float, weight_decay: float, epochs: int, resume_path: str | None,
                     pipeline_name: str, ctx: DistContext, device: torch.device
                     ) -> tuple[nn.Module, torch.optim.Optimizer, Any, int, float, list[dict]]:
    """Action statistics and init weights (:func:`init_model`; no init when resuming), move to ``device``,
    optimizer/schedule, resume state, DDP wrap -> ``(net, opt, sched, start_epoch, best, history)``."""
    init_model(model, train_ds, None if resume else init_path, skip_output_layer, ctx)
    model.to(device)
    opt, sched = build_optimizer(model, lr, weight_decay, epochs)
    start_epoch, best, history = restore_training_state(resume, model, opt, sched, resume_path, pipeline_name)
    return wrap_ddp(model, ctx, device), opt, sched, start_epoch, best, history


def train_valid_epoch(epoch: int, epochs: int, *, net: nn.Module, model: nn.Module, train_loader: Iterable,
                      train_sampler: DistributedSampler, train_step: Callable[[Any], tuple[Tensor, int]],
                      valid_loader: Iterable | None, valid_step: Callable[[Any], tuple[Tensor, int]],
                      opt: torch.optim.Optimizer, sched: Any, grad_clip: float, ctx: DistContext,
                      show_progress: bool) -> tuple[float, float, float]:
    """One training pass, one validation pass (if ``valid_loader``), one scheduler step ->
    ``(train_loss, valid_loss (NaN without validation), metric)``; the metric is the validation loss, else
    the training loss."""
    train_sampler.set_epoch(epoch)
    net.train()
    train_loss = run_epoch(train_loader, train_step, opt, model.parameters(), grad_clip,
                           f"epoch {epoch + 1}/{epochs} train", ctx, show_progress)
    valid_loss = float("nan")
    if valid_loader is not None:
        net.eval()
        valid_loss = run_epoch(valid_loader, valid_step, None, desc=f"epoch {epoch + 1}/{epochs} valid", ctx=ctx,
                               show_progress=show_progress)
    sched.step()
    return train_loss, valid_loss, valid_loss if valid_loader is not None else train_loss


def finish_epoch(epoch: int, entry: dict[str, Any], metric: float, best: float, history: list[dict], *,
                 ctx: DistContext, kind: str, net: nn.Module, config: dict[str, Any], opt: torch.optim.Optimizer,
                 sched: Any, train_args: dict[str, Any], save_path: str | None, checkpoint_path: str | None,
                 writer: Any, scalars: dict[str, float],
                 extra_state: Callable[[list[dict]], dict[str, Any]] | None = None) -> tuple[bool, float]:
    """End-of-epoch bookkeeping -> ``(improved, best)``: append ``entry`` to ``history``; on rank 0 write the
    full training state to ``checkpoint_path`` (and to ``save_path`` when ``metric`` improved on ``best``) and
    ``scalars`` to the TensorBoard ``writer`` (if any). ``extra_state(history)`` adds keys after ``history``."""
    improved = metric < best
    best = min(best, metric)
    history.append(entry)
    if ctx.is_main:
        state = {"model": unwrap(net).state_dict(), "config": config, "epoch": epoch, "best_metric": best,
                 "history": history, **(extra_state(history) if extra_state else {}), "train_args": train_args,
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng_state": capture_rng_state()}
        if improved and save_path:
            save_checkpoint(save_path, state, kind=kind)
        if checkpoint_path:
            save_checkpoint(checkpoint_path, state, kind=kind)
        if writer is not None:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, epoch)
    return improved, best
