"""The one training loop, used by the teacher and the student (nanoGPT-style: read it top to bottom).

    trainer = Trainer(cfg, "teacher", model, train_ds, resume, ctx, device)   # stats, init, optimizer, resume, DDP
    task = MyTask(trainer.net, ...)                                            # what differs: the batch and loss
    result = trainer.fit(task, train_loader, train_sampler, valid_loader, model_config)

:class:`Trainer` owns the network (DDP-wrapped under ``torchrun``), the AdamW optimizer with its
:class:`LRSchedule` (linear warm-up, then cosine decay per epoch or, trained by ``--steps``, per step), the
history, the validation (after every epoch, or every ``valid_every_steps`` optimizer steps and at the end),
the checkpoints (latest state every epoch and validation to ``checkpoint_path``, best to ``save_path``, picked
by the validation loss or by :meth:`TrainTask.selection_metric`), the all-reduce of losses over ranks,
TensorBoard and resume (model, optimizer, scheduler, epoch, best metric, RNG state). A :class:`TrainTask`
supplies the per-batch loss and any extra per-epoch statistics. :func:`make_window_loader` is the DataLoader
of a per-window dataset with the project's one sampler
(``e2r.data.sampler.training_sampler``: order depends only on seed and epoch; under ``torchrun`` every sample
is read once per epoch over all ranks, every rank has the same number of steps, and each step's gradient and
the epoch's losses weigh every sample equally, whatever the ranks' batch sizes).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from e2r.checkpoints import CheckpointError, load_init_weights, save_checkpoint
from e2r.data.sampler import EpochBatchSampler, training_sampler
from e2r.data.window_union import WindowUnion
from e2r.errors import ConfigError
from e2r.runtime import DistContext, all_reduce_sums, capture_rng_state, die_with_parent, restore_rng_state
from e2r.workflow.configs import TrainConfig, plain_dict

__all__ = ["ActionNormalizer", "LRSchedule", "make_window_loader", "run_epoch", "rank_loss_weight", "unwrap", "TrainTask",
           "Trainer", "train_valid_datasets"]


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
        """Statistics over every frame of every segment of a sequence dataset (``dataset.frame_actions()``;
        no point cloud or image is read)."""
        return cls.from_frame_actions(dataset.frame_actions())

    def normalize(self, actions: Tensor) -> Tensor:
        return (actions - self.mean.to(actions.device)) / self.std.to(actions.device)

    def denormalize(self, actions: Tensor) -> Tensor:
        return actions * self.std.to(actions.device) + self.mean.to(actions.device)


class LRSchedule:
    """The learning rate of every optimizer step, as a factor of the base rate: a linear warm-up over the first
    ``warmup_steps`` steps (factor ``(step + 1) / warmup_steps``), times a cosine decay from 1 to ``floor``,
    either per epoch (constant within an epoch, ``epoch / epochs`` of the way down: a run trained by epochs)
    or per step (``step / total_steps``: a run trained by ``--steps``)."""

    def __init__(self, epochs: int, warmup_steps: int = 0, total_steps: int | None = None,
                 floor: float = 0.05) -> None:
        self.epochs, self.warmup_steps, self.total_steps, self.floor = max(epochs, 1), warmup_steps, total_steps, floor

    def factor(self, step: int, epoch: int) -> float:
        """Factor of optimizer step ``step`` (0-based, over the whole run) taken in epoch ``epoch``."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        progress = step / self.total_steps if self.total_steps else epoch / self.epochs
        return warm * (self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def make_window_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int,
                       collate_fn: Callable | None, ctx: DistContext) -> tuple[DataLoader, EpochBatchSampler]:
    """DataLoader over this rank's batches of a per-window dataset; call ``sampler.set_epoch(epoch)``
    before each epoch."""
    sampler = training_sampler(len(dataset), batch_size, shuffle, seed, ctx.rank, ctx.world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
                        pin_memory=torch.cuda.is_available(), worker_init_fn=die_with_parent if num_workers else None)
    return loader, sampler


def train_valid_datasets(cfg: TrainConfig, make: Callable[[str, Any], Any]) -> tuple[Any, Any]:
    """``(train_ds, valid_ds or None)`` from ``make(split, segments)`` (the training split restricted to
    ``cfg.train_segments``, joined by the whole ``cfg.extra_train_splits`` as a `WindowUnion`; the valid split
    whole); refuses a training set with no window."""
    train_ds = make(cfg.train_split, cfg.train_segments)
    extra = [make(split, None) for split in cfg.extra_train_splits or []]
    if cfg.extra_keep_fraction < 1:
        for ds in extra:
            keep_most_disagreed(ds, cfg.extra_keep_fraction)
    if cfg.oversample_braking > 1:
        for ds in [train_ds] + extra:
            oversample_braking(ds, cfg.oversample_braking)
    if extra:
        train_ds = WindowUnion([train_ds] + extra)
    if len(train_ds) == 0:
        raise ValueError(f"{cfg.data_root}/{cfg.train_split}: no windows of seq_len={cfg.seq_len}")
    return train_ds, (make(cfg.valid_split, None) if cfg.valid_split else None)


BRAKING_MARGIN = 1.0      # m/s: a window "brakes" where a frame's speed label is this far below the measured speed


def oversample_braking(ds: Any, factor: int) -> None:
    """Each window of ``ds`` whose labels brake (``window_braking``; recorded drives only where expert-labelled) kept
    ``factor`` times, the others once, in order (the action statistics come from the frames: unchanged)."""
    braking = ds.window_braking(BRAKING_MARGIN)
    ds.keep_windows([i for i, b in enumerate(braking) for _ in range(factor if b else 1)])


def keep_most_disagreed(ds: Any, fraction: float) -> None:
    """Keep the ``ceil(fraction * len(ds))`` windows of a recorded split where student and teacher disagreed most
    (``window_disagreement``, the DAgger aggregation rule that keeps the frames worth a label), in their order."""
    score = ds.window_disagreement()
    n = int(np.ceil(fraction * len(score)))
    ds.keep_windows(sorted(np.argsort(-score, kind="stable")[:n].tolist()))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def run_epoch(loader: Iterable, step: Callable[[Any], tuple[Tensor, int]], optimizer: torch.optim.Optimizer | None,
              params: Iterable[Tensor] = (), grad_clip: float = 0.0, desc: str = "", ctx: DistContext | None = None,
              show_progress: bool = True, sums: tuple[float, int] = (0.0, 0),
              on_start: Callable[[], None] | None = None,
              after_batch: Callable[[float, int], None] | None = None,
              before_step: Callable[[], None] | None = None) -> float:
    """One pass over ``loader``; ``step(batch) -> (mean loss, batch size)`` (``None`` batches, all-bad
    windows, are skipped). Trains when ``optimizer`` is given (backward, optional gradient clipping, step),
    else runs under ``torch.no_grad``. Returns the sample-weighted mean loss over all ranks.

    Mid-epoch resume: ``sums`` = the (loss total, sample count) of the batches already done; ``on_start()``
    runs once the loader's iterator exists (it draws its seeds from the global RNG: a resumed run restores
    its RNG state after that); ``after_batch(total, count)`` after every batch (a checkpoint hook);
    ``before_step()`` right before every ``optimizer.step()`` (the learning-rate schedule).

    Under DDP (``ctx.enabled``) each rank's mean loss is scaled by :func:`rank_loss_weight` before backward,
    so the step's averaged gradient is the mean over all the step's samples even when the ranks' batches
    differ in size; a rank with no usable window in a training batch raises (DDP needs it in the step)."""
    ctx = ctx or DistContext()
    total, count = float(sums[0]), int(sums[1])
    params = list(params)
    iterator = iter(loader)
    if on_start is not None:
        on_start()
    bar = tqdm(iterator, total=len(loader), desc=desc, leave=False, disable=not (show_progress and ctx.is_main),
               dynamic_ncols=True)
    with torch.set_grad_enabled(optimizer is not None):
        for batch in bar:
            if batch is None:  # every window of the batch was a skipped bad one
                if ctx.enabled and optimizer is not None:
                    raise RuntimeError(f"{desc}: rank {ctx.rank} has a batch with no usable window; under torchrun "
                                       f"every rank must take part in every step: remove the bad windows")
                if after_batch is not None:
                    after_batch(total, count)
                continue
            loss, n = step(batch)
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                (loss * rank_loss_weight(n, ctx) if ctx.enabled else loss).backward()
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                if before_step is not None:
                    before_step()
                optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"{desc}: loss became {value}; lower --lr or check the data")
            total += value * n
            count += n
            bar.set_postfix(loss=f"{total / count:.4f}")
            if after_batch is not None:
                after_batch(total, count)
    sums = all_reduce_sums({"total": total, "count": float(count)}, ctx)
    return sums["total"] / max(int(sums["count"]), 1)


def rank_loss_weight(n: int, ctx: DistContext) -> float:
    """``n * world_size / N``, ``N`` = the step's samples over all ranks (one all-reduce): DDP averages the
    ranks' gradients, so each rank's mean loss times this weight gives the gradient of the mean loss over
    all ``N`` samples (1.0 when every rank has ``n`` samples). Call it on every rank, once per step."""
    total = all_reduce_sums({"n": float(n)}, ctx)["n"]
    return n * ctx.world_size / max(total, 1.0)


class TrainTask:
    """What differs between trainers; override ``train_step`` (and the rest where needed)."""

    def begin_epoch(self) -> None:
        """Reset per-epoch counters."""

    def train_step(self, batch: Any) -> tuple[Tensor, int]:
        """``(mean loss, batch size)`` of one training batch."""
        raise NotImplementedError

    def valid_step(self, batch: Any) -> tuple[Tensor, int]:
        """``(mean loss, batch size)`` of one validation batch (default: the training loss)."""
        return self.train_step(batch)

    def epoch_stats(self, ctx: DistContext) -> dict[str, Any]:
        """Extra history entries of the epoch (reduced over ranks)."""
        return {}

    def selection_metric(self, entry: dict[str, Any], model_config: dict[str, Any]) -> float | None:
        """The metric that picks the kept checkpoint (lower is better; may add to ``entry``), or None for
        the validation loss (the training loss without a validation split). Same value on every rank."""
        return None

    def scalars(self, entry: dict[str, Any]) -> dict[str, float]:
        """TensorBoard scalars of a history entry."""
        return {"loss/train": entry["train_loss"], "loss/valid": entry["valid_loss"], "lr": entry["lr"]}

    def notes(self, entry: dict[str, Any]) -> tuple[str, str]:
        """Text after the train loss and after the valid loss in the per-epoch line."""
        return "", ""

    def extra_state(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """Keys saved in the checkpoint after ``history``."""
        return {}

    def running_state(self) -> dict[str, float]:
        """The per-epoch counters so far (saved in a mid-epoch checkpoint)."""
        return {}

    def load_running_state(self, state: dict[str, float]) -> None:
        """Restore :meth:`running_state` (after ``begin_epoch``) when resuming mid-epoch."""


class Trainer:
    """Set-up in ``__init__`` (action statistics from ``train_ds``, ``init_path`` weights unless resuming,
    device, optimizer/schedule, ``resume`` state, DDP wrap); the epoch loop in :meth:`fit`."""

    def __init__(self, cfg: TrainConfig, kind: str, model: nn.Module, train_ds: Any, resume: dict[str, Any] | None,
                 ctx: DistContext, device: torch.device) -> None:
        cfg.check()   # ConfigError naming the flag (--epochs 0, --save_path a directory) before any training
        self.cfg, self.kind, self.model, self.ctx = cfg, kind, model, ctx
        self.epochs, lr, self.batch_size = cfg.hparams()
        norm = ActionNormalizer.from_dataset(train_ds)
        model.set_action_stats(norm.mean, norm.std)
        if cfg.init_path and not resume:
            report = load_init_weights(model, cfg.init_path, cfg.init_skip_output_layer, model.output_layer_prefix,
                                       keep_prefixes=("action_mean", "action_std"))
            if ctx.is_main:
                print(f"init from {cfg.init_path}: {len(report['loaded'])} tensors loaded, "
                      f"skipped {report['skipped']}")
        model.to(device)
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        self.base_lrs = [group["lr"] for group in self.opt.param_groups]
        self.schedule = LRSchedule(self.epochs, cfg.warmup_steps, cfg.steps)
        self.steps_done: int | None = 0      # optimizer steps taken (None: an old checkpoint's, set in fit)
        self.clock = time.time()             # when the last validation line was printed (or the epoch began)
        self.start_epoch, self.best, self.history = self._resume(resume)
        self.net = (torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None) if ctx.enabled else model)

    def _resume(self, resume: dict[str, Any] | None) -> tuple[int, float, list[dict]]:
        self.position: dict[str, Any] | None = None
        if not resume:
            return 0, float("inf"), []
        try:
            self.model.load_state_dict(resume["model"])
            self.opt.load_state_dict(resume["optimizer"])
            self.steps_done = resume["scheduler"].get("steps_done")     # absent: a per-epoch cosine's state
            start_epoch, best = int(resume["epoch"]) + 1, float(resume["best_metric"])
            history = list(resume.get("history", []))
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{self.cfg.resume_path}: cannot resume from it ({type(e).__name__}: {e}); "
                                  f"resume needs a --checkpoint_path file of train_{self.kind}") from None
        if resume.get("position"):         # a mid-epoch state: that epoch again from its next batch
            self.position = dict(resume["position"])
            return int(self.position["epoch"]), best, history
        restore_rng_state(resume["rng_state"])
        return start_epoch, best, history

    def fit(self, task: TrainTask, train_loader: Iterable, train_sampler: EpochBatchSampler,
            valid_loader: Iterable | None, model_config: dict[str, Any]) -> dict[str, Any]:
        """Train from ``start_epoch`` to ``epochs`` (or ``stop_after_epoch``; trained by ``steps``: the epochs
        that hold them, the last one cut short), validating after every epoch or, with ``valid_every_steps``,
        every K optimizer steps and at the end of training -> ``{"history", "best_metric", "save_path",
        "checkpoint_path", "config"}``."""
        cfg, ctx = self.cfg, self.ctx
        whole = train_sampler.batches_per_epoch()
        if cfg.steps:
            self.epochs = math.ceil(cfg.steps / max(whole, 1))
        epochs = self.epochs
        if self.steps_done is None:       # resumed from a checkpoint of a per-epoch cosine: whole epochs done
            self.steps_done = self.start_epoch * whole + (int(self.position["batches"]) if self.position else 0)
        if cfg.valid_every_steps and valid_loader is None:
            raise ConfigError(f"--valid_every_steps {cfg.valid_every_steps}: --valid_split {cfg.valid_split!r} has "
                              f"no window of --seq_len {cfg.seq_len} to validate on")
        writer = SummaryWriter(log_dir=cfg.tensorboard_dir) if cfg.tensorboard_dir and ctx.is_main else None
        show = not cfg.no_progress
        stop = epochs if cfg.stop_after_epoch is None else min(epochs, cfg.stop_after_epoch)

        def validate(epoch: int, train_loss: float, position: dict[str, Any] | None = None) -> None:
            entry, metric = self._evaluate(task, epoch, train_loss, valid_loader, model_config)
            self._record(task, epoch, entry, metric, model_config, writer,
                         None if position is None else {**position, "rng_state": capture_rng_state()})

        self.clock = time.time()
        for epoch in range(self.start_epoch, stop):
            if not cfg.valid_every_steps:
                self.clock = time.time()
            task.begin_epoch()
            mid, self.position = self.position, None
            train_sampler.set_epoch(epoch, mid["batches"] if mid else 0,
                                    cfg.steps - epoch * whole if cfg.steps else None)
            self.net.train()
            train_loss = run_epoch(train_loader, task.train_step, self.opt, self.model.parameters(), cfg.grad_clip,
                                   f"epoch {epoch + 1}/{epochs} train", ctx, show,
                                   **self._mid_epoch_hooks(task, epoch, mid, train_sampler, model_config,
                                                           validate if cfg.valid_every_steps else None),
                                   before_step=lambda: self._step_lr(epoch))
            if not cfg.valid_every_steps or self._validation_due(final=epoch == epochs - 1):
                validate(epoch, train_loss)
            elif ctx.is_main and cfg.checkpoint_path:     # no validation now: the state to resume from
                save_checkpoint(cfg.checkpoint_path, self._state(task, epoch, model_config), kind=self.kind)
        if writer is not None:
            writer.close()
        return {"history": self.history, "best_metric": self.best, "save_path": cfg.save_path,
                "checkpoint_path": cfg.checkpoint_path, "config": model_config}

    def _evaluate(self, task: TrainTask, epoch: int, train_loss: float, valid_loader: Iterable | None,
                  model_config: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """``(history entry, metric that picks the kept checkpoint)`` of the weights now: the valid loss, the
        task's statistics and :meth:`TrainTask.selection_metric` (the valid loss, or the train loss without a
        validation split, when it gives None). Runs on every rank (all-reduces)."""
        valid_loss = float("nan")
        if valid_loader is not None:
            self.net.eval()
            valid_loss = run_epoch(valid_loader, task.valid_step, None, desc=f"epoch {epoch + 1}/{self.epochs} valid",
                                   ctx=self.ctx, show_progress=not self.cfg.no_progress)
        entry = {"epoch": epoch, "steps": self.steps_done, "train_loss": train_loss, "valid_loss": valid_loss,
                 "lr": self.opt.param_groups[0]["lr"], **task.epoch_stats(self.ctx)}
        chosen = task.selection_metric(entry, model_config)
        return entry, chosen if chosen is not None else valid_loss if valid_loader is not None else train_loss

    def _validation_due(self, final: bool) -> bool:
        """With ``valid_every_steps`` K: whether the weights are validated now, at ``steps_done`` (a multiple
        of K, or ``final``: the end of training) unless the last history entry already holds this step."""
        every, last = self.cfg.valid_every_steps, self.history[-1].get("steps") if self.history else None
        return bool(every) and self.steps_done != last and ((self.steps_done > 0 and self.steps_done % every == 0)
                                                             or final)

    def _step_lr(self, epoch: int) -> None:
        """Before each optimizer step (taken in ``epoch``): set its learning rate, then count it."""
        factor = self.schedule.factor(self.steps_done, epoch)
        for group, base in zip(self.opt.param_groups, self.base_lrs):
            group["lr"] = base * factor
        self.steps_done += 1

    def _mid_epoch_hooks(self, task: TrainTask, epoch: int, mid: dict[str, Any] | None,
                         sampler: EpochBatchSampler, model_config: dict[str, Any],
                         validate: Callable[[int, float, dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """run_epoch's resume arguments: the sums of a resumed epoch, the RNG / counters restored once the
        iterator exists, and a checkpoint every ``checkpoint_every_steps`` batches (rank 0); with ``validate``
        (``valid_every_steps``), ``validate(epoch, epoch's train loss so far, position)`` when
        :meth:`_validation_due` before the epoch's last batch (it writes the checkpoint, with the position).
        Under DDP the checkpoint holds the sums of all ranks (one all-reduce on every rank): rank 0 resumes from
        them, the other ranks from zero, so the epoch's all-reduced averages count every sample once."""
        done = [int(mid["batches"]) if mid else 0]
        every, whole, ctx = self.cfg.checkpoint_every_steps, sampler.batches_per_epoch(), self.ctx
        end = whole if sampler.stop_batch is None else min(whole, sampler.stop_batch)

        def on_start() -> None:
            if mid:
                restore_rng_state(mid["rng_state"])
                task.load_running_state(mid["task"] if ctx.is_main else {k: 0.0 for k in mid["task"]})

        def after_batch(total: float, count: int) -> None:
            done[0] += 1
            due = validate is not None and done[0] < end and self._validation_due(final=False)
            if not (due or (every and done[0] % every == 0 and done[0] < whole and self.cfg.checkpoint_path)):
                return
            running = task.running_state()
            if ctx.enabled:
                summed = all_reduce_sums({"loss_total": total, "loss_count": float(count),
                                          **{f"task/{k}": v for k, v in running.items()}}, ctx)
                total, count = summed["loss_total"], int(summed["loss_count"])
                running = {k: summed[f"task/{k}"] for k in running}
            position = {"epoch": epoch, "batches": done[0], "loss_total": total, "loss_count": count,
                        "task": running}
            if due:
                validate(epoch, total / max(count, 1), position)
                self.net.train()
            elif ctx.is_main:
                save_checkpoint(self.cfg.checkpoint_path, {**self._state(task, epoch - 1, model_config),
                                                           "position": {**position, "rng_state": capture_rng_state()}},
                                kind=self.kind)

        resumed = (mid["loss_total"], mid["loss_count"]) if mid and ctx.is_main else (0.0, 0)
        return {"sums": resumed, "on_start": on_start, "after_batch": after_batch}

    def _state(self, task: TrainTask, epoch: int, model_config: dict[str, Any]) -> dict[str, Any]:
        """The full training state after ``epoch`` (-1: none finished yet)."""
        return {"model": unwrap(self.net).state_dict(), "config": model_config, "epoch": epoch,
                "best_metric": self.best, "history": self.history, **task.extra_state(self.history),
                "train_args": plain_dict(self.cfg), "optimizer": self.opt.state_dict(),
                "scheduler": {"steps_done": self.steps_done, "warmup_steps": self.schedule.warmup_steps,
                              "total_steps": self.schedule.total_steps, "epochs": self.epochs},
                "rng_state": capture_rng_state()}

    def _record(self, task: TrainTask, epoch: int, entry: dict[str, Any], metric: float,
                model_config: dict[str, Any], writer: SummaryWriter | None, position: dict[str, Any] | None) -> None:
        """Append ``entry`` to the history; on rank 0 write the full state (after ``epoch``, or within it at
        ``position``) to ``checkpoint_path`` (and to ``save_path`` when ``metric`` improved on the best), the
        scalars to TensorBoard (at the epoch, or at the step with ``valid_every_steps``) and one line."""
        improved = metric < self.best
        self.best = min(self.best, metric)
        self.history.append(entry)
        if not self.ctx.is_main:
            return
        state = (self._state(task, epoch, model_config) if position is None
                 else {**self._state(task, epoch - 1, model_config), "position": position})
        if improved and self.cfg.save_path:
            save_checkpoint(self.cfg.save_path, state, kind=self.kind)
        if self.cfg.checkpoint_path:
            save_checkpoint(self.cfg.checkpoint_path, state, kind=self.kind)
        if writer is not None:
            for tag, value in task.scalars(entry).items():
                writer.add_scalar(tag, value, entry["steps"] if self.cfg.valid_every_steps else epoch)
        after_train, after_valid = task.notes(entry)
        at = f" step {entry['steps']}" if self.cfg.valid_every_steps else ""
        print(f"epoch {epoch + 1}/{self.epochs}{at}: train {entry['train_loss']:.4f}{after_train}  valid "
              f"{entry['valid_loss']:.4f}  {after_valid}{'(best) ' if improved else ''}{time.time() - self.clock:.1f}s",
              flush=True)
        self.clock = time.time()
