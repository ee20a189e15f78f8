"""The export engine: teacher outputs of a split's windows into a memorybank, each frame encoded once.

One *task* fills the split positions ``[a, b)`` of a memorybank (a multiple of the store's shard rows, so
concurrent tasks never share a shard). For the task's incomplete rows it

1. encodes the needed frames in fixed batch cells (see :mod:`e2r.workflow.export_plan`): point clouds are read and
   voxelised by DataLoader workers, the PointPillars encoder runs once per frame -> ``bev_vec (D,)`` and,
   when stored, ``bev_feat (C, H, W)`` average-pooled by ``e2r.kd.pool_bev_feat``, and the frame's LiDAR depth
   targets ``depth (Ncam, h, w)`` uint8 (``e2r.depth``, computed by the DataLoader workers);
2. as soon as a GRU cell's frames are all encoded, stacks their ``bev_vec`` into ``(n, T, D)`` and runs the
   teacher's ``temporal`` from a zero state (exactly as ``forward`` does) -> actions, gru_out;
3. writes finished rows in blocks through ``MemoryBank.write_rows`` (data first, then completion flags),
   dropping frames no later window needs.

``run_export_task`` is the picklable entry point a dask worker runs; it keeps the loaded teacher and plan
between tasks, reloading them when the store's teacher or the client's plan differ (a checkpoint or
dataset rewritten at the same path between exports on long-lived workers). What is stored (seq_len, dtype,
bev_feat and its pooling) is read from the store's schema, the one source of truth; :class:`ExportOptions`
holds only how to compute it. The whole export of a ``ExportConfig`` (store creation, splits, dask,
summary) is :mod:`e2r.workflow.export_run`.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from e2r.checkpoints import checkpoint_path, file_sha256
from e2r.data.datasets import LidarFrameDataset, LidarSequenceDataset
from e2r.kd import pool_bev_feat
from e2r.models.teacher import LiDARBEVTeacher, load_teacher
from e2r.runtime import die_with_parent, resolve_device, usable_cores
from e2r.workflow.export_plan import (DepthSpec, SplitPlan, VoxelizedFrames, build_split_plan, collate_voxels,
                                      rows_to_frames, split_rigs)
from stores import MemoryBank, StoreSchema, open_memorybank

__all__ = ["ExportOptions", "ExportContext", "TaskStats", "encode_voxel_batch", "export_rows",
           "load_context", "run_export_task", "AMP_DTYPES"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExportOptions:
    """How a task computes its rows, besides its row range (plain values: it travels to dask workers). What
    it stores comes from the store's schema."""

    data_root: str
    split: str
    teacher_ckpt: str
    store: str
    stride: int = 1
    batch_size: int = 16          # frames per encoder batch (a batch cell)
    window_batch: int = 64        # windows per GRU batch (a cell; must divide the store's shard rows)
    write_rows: int = 1024        # rows per write_rows call (at most; bev_feat shards may cap it)
    num_workers: int = 2          # DataLoader workers reading + voxelising point clouds
    device: str = "cpu"
    amp: Optional[str] = None     # None | "bf16" | "fp16" (CUDA only)
    torch_threads: int = 0        # 0: leave torch's default; WORKER_THREADS: the worker's cores / its dask threads
    lidar_num_features: Any = "auto"
    storage_options: Optional[dict] = None    # a store URL's fsspec options (endpoint, credentials)
    plan_digest: str = ""         # the client's SplitPlan.digest(): a task refuses a dataset that differs


WORKER_THREADS = -1              # torch_threads decided where the task runs (a dask worker on another machine)


def worker_threads() -> int:
    """Torch threads for a task in this process: its usable cores divided by the dask worker's task threads
    (1 outside a dask worker)."""
    try:
        from distributed import get_worker
        slots = int(get_worker().state.nthreads)
    except (ImportError, ValueError, AttributeError):
        slots = 1
    return max(1, usable_cores() // max(slots, 1))


@dataclass
class TaskStats:
    """What one task did. ``forward_s``: time in the teacher (encoder + GRU, device-synchronised)."""

    split: str
    a: int
    b: int
    rows_written: int = 0
    rows_skipped: int = 0
    frames_encoded: int = 0
    windows_computed: int = 0
    forward_s: float = 0.0
    write_s: float = 0.0
    wall_s: float = 0.0

    def add(self, other: "TaskStats") -> None:
        for f in ("rows_written", "rows_skipped", "frames_encoded", "windows_computed", "forward_s", "write_s",
                  "wall_s"):
            setattr(self, f, getattr(self, f) + getattr(other, f))


@dataclass
class ExportContext:
    """A loaded teacher and one split's plan and frame reader (built once per process)."""

    teacher: LiDARBEVTeacher
    plan: SplitPlan
    frames: VoxelizedFrames
    device: torch.device
    extra: dict[str, Any] = field(default_factory=dict)


def load_context(opts: ExportOptions, seq_len: int, teacher: Optional[LiDARBEVTeacher] = None,
                 schema: Optional[StoreSchema] = None) -> ExportContext:
    """Teacher (from ``opts.teacher_ckpt`` unless given) in eval mode on ``opts.device``, plus the split plan
    of windows of ``seq_len`` frames (the store's ``schema.seq_len``); with the store's ``schema`` when it
    stores depth, the frames also give their LiDAR depth targets (``export_plan.DepthSpec``)."""
    device = resolve_device(opts.device)
    if teacher is None:
        teacher, _ = load_teacher(opts.teacher_ckpt, device)
    teacher = teacher.to(device).eval()
    windows_ds = LidarSequenceDataset(opts.data_root, opts.split, seq_len, opts.stride,
                                      lidar_num_features=opts.lidar_num_features)
    frames_ds = LidarFrameDataset(opts.data_root, opts.split, lidar_num_features=opts.lidar_num_features)
    plan = build_split_plan(windows_ds, frames_ds)
    depth = None
    if schema is not None and schema.store_depth:
        depth = DepthSpec(dict(schema.depth_grid or {}), tuple(schema.depth_shape or ()),
                          split_rigs(opts.data_root, opts.split))
    frames = VoxelizedFrames(opts.data_root, opts.split, plan, teacher.cfg, frames_ds=frames_ds, depth=depth)
    return ExportContext(teacher, plan, frames, device)


def encode_voxel_batch(teacher: LiDARBEVTeacher, batch: dict[str, torch.Tensor], device: torch.device,
                       amp: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's encoder on pre-voxelised frames (``collate_voxels`` output, F frames) ->
    ``bev_vec (F, D)`` float32 and ``bev_feat (F, C, H, W)`` (float32, or the autocast dtype)."""
    enc = teacher.encoder
    nb = device.type == "cuda"
    pillars = batch["pillars"].to(device, non_blocking=nb)
    coords = batch["coords"].to(device, non_blocking=nb)
    counts = batch["counts"].to(device, non_blocking=nb)
    num_frames = int(batch["u"].shape[0])
    ctx = torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp else contextlib.nullcontext()
    with ctx:
        bev_vec, bev_feat = enc.encode_voxels(pillars, counts, coords, num_frames)
    return bev_vec.float(), bev_feat


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cells(positions: np.ndarray, size: int) -> list[np.ndarray]:
    """Whole cells ``[c*size, (c+1)*size)`` touched by ``positions`` (the caller clips them to its range)."""
    return [np.arange(c * size, (c + 1) * size) for c in np.unique(np.asarray(positions) // size)]


def _todo_mask(bank: MemoryBank, split: str, a: int, b: int) -> np.ndarray:
    """(b - a,) bool: which split positions of ``[a, b)`` are not complete yet (read fresh from the store; rows
    flagged complete whose chunks are lost or fail their checksum included: they are redone, not skipped)."""
    todo = np.zeros(b - a, bool)
    for x, y in bank.incomplete_ranges(split, (a, b)):
        lo, hi = max(x, a), min(y, b)
        if lo < hi:
            todo[lo - a:hi - a] = True
    return todo


class _RowsTask:
    """The state of one :func:`export_rows` call: frame caches, GRU cells ready to run, rows awaiting a write."""

    def __init__(self, ctx: ExportContext, bank: MemoryBank, a: int, b: int, opts: ExportOptions, todo: np.ndarray,
                 stats: TaskStats, on_progress: Optional[Callable[[int, int], None]]) -> None:
        self.ctx, self.bank, self.a, self.b, self.opts, self.todo = ctx, bank, a, b, opts, todo
        self.stats, self.on_progress = stats, on_progress
        plan = ctx.plan
        self.win_cells = [c[c < plan.num_windows] for c in _cells(a + np.flatnonzero(todo), int(opts.window_batch))]
        self.write_rows = int(opts.write_rows)
        if "bev_feat_shard_rows" in bank.attrs:
            self.write_rows = min(self.write_rows, int(bank.attrs["bev_feat_shard_rows"]))
        schema = bank.schema                  # what is stored, and how bev_feat is pooled, comes from the store
        self.save_feat = schema.store_bev_feat
        self.pool = int((schema.bev_feat_pool or {}).get("factor", 1))
        self.np_dtype = np.dtype(schema.dtype)
        self.save_depth = schema.store_depth
        self.vec_cache: dict[int, torch.Tensor] = {}
        self.feat_cache: dict[int, np.ndarray] = {}
        self.depth_cache: dict[int, np.ndarray] = {}       # u -> (Ncam, h, w) uint8 LiDAR depth targets
        self.pending: list[tuple[int, dict[str, np.ndarray]]] = []   # (position, row arrays) awaiting a write
        self.cell_i, self.last_u = 0, -1

    def loader(self) -> DataLoader:
        """Voxelised frames of the needed encoder cells, read by DataLoader workers."""
        plan, opts = self.ctx.plan, self.opts
        frames = rows_to_frames(plan, np.concatenate(self.win_cells))
        frame_cells = [c[c < plan.num_frames] for c in _cells(frames, opts.batch_size)]
        workers = int(opts.num_workers)
        if workers > 0 and multiprocessing.current_process().daemon:
            workers = 0  # a daemonic (e.g. dask) process may not start DataLoader workers
        return DataLoader(self.ctx.frames, batch_sampler=[c.tolist() for c in frame_cells], collate_fn=collate_voxels,
                          num_workers=workers, pin_memory=self.ctx.device.type == "cuda",
                          worker_init_fn=die_with_parent if workers else None)

    def encode(self, batch: dict[str, torch.Tensor]) -> None:
        """Encode one cell of frames into the caches, then run every GRU cell whose frames are all there."""
        t0 = time.perf_counter()
        bev_vec, bev_feat = encode_voxel_batch(self.ctx.teacher, batch, self.ctx.device, self.opts.amp)
        vec_cpu = bev_vec.cpu()
        feat_np = (pool_bev_feat(bev_feat.float(), self.pool).cpu().numpy().astype(self.np_dtype)
                   if self.save_feat else None)
        _sync(self.ctx.device)
        self.stats.forward_s += time.perf_counter() - t0
        for i, u in enumerate(batch["u"].tolist()):
            self.vec_cache[u] = vec_cpu[i]
            if feat_np is not None:
                self.feat_cache[u] = feat_np[i]
            if self.save_depth:
                self.depth_cache[u] = batch["depth"][i].numpy()
        self.last_u = int(batch["u"][-1])
        self.stats.frames_encoded += len(batch["u"])
        if self.on_progress:
            self.on_progress(len(batch["u"]), 0)
        self.ready_cells()

    def ready_cells(self) -> None:
        """Run the GRU over each window cell whose frames are all encoded; queue its rows; drop old frames."""
        plan, T = self.ctx.plan, self.ctx.plan.seq_len
        while (self.cell_i < len(self.win_cells)
               and plan.window_u0[self.win_cells[self.cell_i][-1]] + T - 1 <= self.last_u):
            pos = self.win_cells[self.cell_i]
            self.cell_i += 1
            self.run_cell(pos)
            if self.on_progress:
                self.on_progress(0, len(pos))
            if len(self.pending) >= self.write_rows:
                self.flush()
            if self.cell_i < len(self.win_cells):      # drop frames no later window needs
                keep_from = int(plan.window_u0[self.win_cells[self.cell_i][0]])
                for cache in (self.vec_cache, self.feat_cache, self.depth_cache):
                    for x in [x for x in cache if x < keep_from]:
                        del cache[x]

    def run_cell(self, pos: np.ndarray) -> None:
        """The teacher's temporal part over the windows at split positions ``pos`` (n,), from a zero state."""
        plan, device, T = self.ctx.plan, self.ctx.device, self.ctx.plan.seq_len
        u = plan.window_u0[pos][:, None] + np.arange(T)[None, :]                        # (n, T)
        seq = torch.stack([self.vec_cache[int(x)] for x in u.ravel()]).view(len(pos), T, -1).to(device)
        t0 = time.perf_counter()
        actions, gru_out = self.ctx.teacher.temporal(seq, torch.from_numpy(plan.speed[pos]).to(device),
                                                     torch.from_numpy(plan.steering[pos]).to(device))
        rows = {"actions": actions.float().cpu().numpy(), "bev_vec": seq.cpu().numpy(),
                "gru_out": gru_out.float().cpu().numpy()}
        self.stats.forward_s += time.perf_counter() - t0
        self.stats.windows_computed += len(pos)
        for k, p in enumerate(pos):
            if self.a <= p < self.b and self.todo[p - self.a]:
                row = {f: v[k].astype(self.np_dtype, copy=False) for f, v in rows.items()}
                if self.save_feat:
                    row["bev_feat"] = np.stack([self.feat_cache[int(x)] for x in u[k]])
                if self.save_depth:
                    row["depth"] = np.stack([self.depth_cache[int(x)] for x in u[k]])
                self.pending.append((int(p), row))

    def flush(self) -> None:
        """Write the queued rows, one ``write_rows`` call per run of consecutive positions."""
        t0 = time.perf_counter()
        pending, keys = self.pending, self.ctx.plan.keys
        i = 0
        while i < len(pending):
            j = i + 1
            while j < len(pending) and pending[j][0] == pending[j - 1][0] + 1:
                j += 1
            run = pending[i:j]
            block = {f: np.stack([r[f] for _, r in run]) for f in run[0][1]}
            first = run[0][0]
            self.bank.write_rows(self.opts.split, first, block, keys=keys[first:first + len(run)])
            self.stats.rows_written += len(run)
            i = j
        pending.clear()
        self.stats.write_s += time.perf_counter() - t0


def export_rows(ctx: ExportContext, bank: MemoryBank, a: int, b: int, opts: ExportOptions,
                on_progress: Optional[Callable[[int, int], None]] = None) -> TaskStats:
    """Fill the incomplete rows among split positions ``[a, b)`` of ``bank`` (opened "r+", split reserved
    with ``ctx.plan.keys``). ``on_progress(frames, windows)`` is called with increments. ValueError when
    the plan's seq_len is not the store's."""
    t_start = time.perf_counter()
    if ctx.plan.seq_len != bank.schema.seq_len:
        raise ValueError(f"export plan has seq_len {ctx.plan.seq_len}, store {bank.path} has {bank.schema.seq_len}")
    spec = ctx.frames.depth
    if bank.schema.store_depth and (spec is None or (spec.grid, spec.shape) != (bank.schema.depth_grid,
                                                                                 bank.schema.depth_shape)):
        raise ValueError(f"store {bank.path} holds depth targets ({bank.schema.depth_grid}, "
                         f"{bank.schema.depth_shape}); the export context computes {'none' if spec is None else (spec.grid, spec.shape)}: "
                         f"load it with the store's schema (load_context(..., schema=bank.schema))")
    stats = TaskStats(opts.split, a, b)
    todo = _todo_mask(bank, opts.split, a, b)
    stats.rows_skipped = int((~todo).sum())
    if todo.any():
        task = _RowsTask(ctx, bank, a, b, opts, todo, stats, on_progress)
        with torch.inference_mode():
            for batch in task.loader():
                task.encode(batch)
            task.flush()
    stats.wall_s = time.perf_counter() - t_start
    return stats


_CONTEXTS: dict[tuple, ExportContext] = {}


def _task_context(opts: ExportOptions, schema: StoreSchema, teacher_sha256: str) -> ExportContext:
    """This process's context for ``opts``, loaded once and kept between tasks (one at a time). It is keyed by
    the store's teacher hash and the client's plan digest too, so a long-lived worker reloads a checkpoint
    or dataset rewritten at the same path; one that differs from the export's (a worker that sees other
    files) is refused with ValueError."""
    seq_len = schema.seq_len
    key = (opts.teacher_ckpt, teacher_sha256, opts.device, opts.data_root, opts.split, seq_len, opts.stride,
           str(opts.lidar_num_features), opts.plan_digest, repr((schema.depth_grid, schema.depth_shape)))
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        _CONTEXTS.clear()
        sha = file_sha256(checkpoint_path(opts.teacher_ckpt))
        if sha != teacher_sha256:
            raise ValueError(f"teacher checkpoint {opts.teacher_ckpt} has sha256 {sha[:16]}..., the store's teacher "
                             f"{teacher_sha256[:16]}...: every worker must see the checkpoint the export started with")
        ctx = load_context(opts, seq_len, schema=schema)
        if opts.plan_digest and ctx.plan.digest() != opts.plan_digest:
            raise ValueError(f"split {opts.split!r} under {opts.data_root} differs from the one the export started "
                             "with (keys, frames or speed/steering): every worker must see the same dataset")
        _CONTEXTS[key] = ctx
    return ctx


def run_export_task(opts: ExportOptions, a: int, b: int) -> TaskStats:
    """Dask task: open the store "r+", fill split positions ``[a, b)`` (teacher and plan from
    :func:`_task_context`). A task run in the caller's process (threaded scheduler) leaves its torch thread
    count as it found it."""
    threads_before = torch.get_num_threads()
    threads = worker_threads() if opts.torch_threads == WORKER_THREADS else opts.torch_threads
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        with open_memorybank(opts.store, mode="r+", storage_options=opts.storage_options) as bank:
            ctx = _task_context(opts, bank.schema, bank.provenance.teacher_sha256)
            return export_rows(ctx, bank, a, b, opts)
    except Exception as e:  # noqa: BLE001 - some errors (DataError) do not survive pickling; keep the message
        raise RuntimeError(f"export task {opts.split}[{a}:{b}) failed: {type(e).__name__}: {e}") from None
    finally:
        torch.set_num_threads(threads_before)
