"""A whole export from an :class:`~e2r.workflow.configs.ExportConfig`: teacher -> store schema -> store
(created, resumed, appended or replaced) -> each split's shard-aligned tasks, in process or on dask.

    result = export_memorybank(ExportConfig(data_root="data", split=["train"], store="mb.zarr",
                                            teacher_ckpt="runs/teacher.pt"))
    print_export_summary(cfg, result)

The store's schema is built once from the config by :func:`store_schema` (seq_len, dtype, bev_feat and its
pooling, the depth targets' grid); an existing store with another schema or teacher is refused unless
``overwrite``. Every task then reads what to store from the store (``e2r.workflow.export``).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import dask
import torch
from distributed import Client, LocalCluster, as_completed
from tqdm import tqdm

from e2r.checkpoints import checkpoint_path, file_sha256
from e2r.data.datasets import ACTION_SEMANTICS, LidarSequenceDataset
from e2r.depth import depth_grid
from e2r.models.config import TeacherConfig
from e2r.models.student_config import StudentConfig
from e2r.models.teacher import load_teacher
from e2r.runtime import resolve_device, usable_cores
from e2r.workflow.export_config import ExportConfig
from e2r.workflow.export import (WORKER_THREADS, ExportContext, ExportOptions, TaskStats, export_rows, load_context,
                                 run_export_task)
from e2r.workflow.export_plan import split_rigs
from stores import (MemoryBank, NotAMemoryBankError, Provenance, StoreCorruptError, StoreMismatchError, StoreSchema,
                    StoreVersionError, create_memorybank, open_memorybank, remove_memorybank, stored_bytes)
from stores.remote.objstore import is_remote, parse_storage_options

__all__ = ["store_schema", "lidar_extrinsics", "export_memorybank", "print_export_summary", "SplitResult", "ExportResult"]


def store_schema(cfg: ExportConfig, teacher_cfg: TeacherConfig) -> tuple[StoreSchema, Provenance]:
    """The store's schema and provenance: the one place the options that shape the store become its schema."""
    pool = None
    feat_shape = None
    if cfg.save_bev_feat:
        C, H, W = teacher_cfg.bev_feat_shape
        K = cfg.bev_feat_pool
        if H // K < 1 or W // K < 1:
            raise ValueError(f"--bev_feat_pool {K} is larger than the teacher's bev_feat grid {H}x{W}")
        feat_shape = (C, H // K, W // K)
        pool = {"kind": "avg", "factor": K, "source_shape": [C, H, W]}
    schema = StoreSchema(seq_len=cfg.seq_len, action_dim=teacher_cfg.action_dim, bev_dim=teacher_cfg.bev_dim,
                         gru_hidden=teacher_cfg.gru_hidden, bev_feat_shape=feat_shape, store_bev_feat=cfg.save_bev_feat,
                         dtype=cfg.dtype, bev_feat_pool=pool, action_semantics=ACTION_SEMANTICS,
                         **(depth_schema(cfg, teacher_cfg) if cfg.store_depth else {}))
    prov = Provenance(teacher_sha256=file_sha256(checkpoint_path(cfg.teacher_ckpt)), model_config=teacher_cfg.to_dict(),
                      dataset_root=str(Path(cfg.data_root).resolve()), lidar2ego=lidar_extrinsics(cfg))
    return schema, prov


def depth_schema(cfg: ExportConfig, teacher_cfg: TeacherConfig) -> dict[str, Any]:
    """The schema fields of ``--store_depth``: the targets are for the ``--depth_preset`` student on this teacher
    (its input size, feature map and depth bins) and for the cameras of the exported splits' segments (all with
    cameras must have as many; LiDAR-only segments get no target). ValueError when the counts differ."""
    student = StudentConfig.from_teacher(teacher_cfg, cfg.depth_preset)
    counts = {f"{split}/{seg}": len(cams) for split in dict.fromkeys(cfg.split)
              for seg, cams in split_rigs(cfg.data_root, split).items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"--store_depth: the segments' camera rigs differ in size ({counts}); one store holds one "
                         f"depth shape: export them to separate stores")
    n_cam = next(iter(counts.values()), 1)
    return {"store_depth": True, "depth_shape": (n_cam, *student.feat_hw), "depth_grid": depth_grid(student)}


def lidar_extrinsics(cfg: ExportConfig) -> dict[str, list[list[float]]]:
    """``{"<split>/<segment>": lidar2ego 4x4}`` of the exported segments whose LiDAR is not at the ego frame
    (calib.json's lidar2ego, applied on read): recorded in the store's provenance (data.csv and calib only)."""
    out = {}
    for split in cfg.split:
        ds = LidarSequenceDataset(cfg.data_root, split, cfg.seq_len, cfg.stride, cfg.lidar_num_features)
        out.update({f"{split}/{seg}": t.lidar2ego.tolist() for seg, t in ds.tables.items() if t.lidar2ego is not None})
    return out


def _open_store(cfg: ExportConfig, schema: StoreSchema, prov: Provenance) -> MemoryBank:
    """Create the store, or reopen it to resume/append; ``overwrite`` replaces a memorybank made with another
    schema or teacher, an older format, or a damaged one. Whatever lacks the memorybank marker (another Zarr
    group or array, a directory, a file) is never deleted, with or without ``overwrite``."""
    kw: dict[str, Any] = {"shard_rows": cfg.shard_rows} if cfg.shard_rows else {}
    kw["storage_options"] = parse_storage_options(cfg.storage_options)
    try:
        return create_memorybank(cfg.store, schema, prov, fsync=not cfg.no_fsync, **kw)
    except StoreMismatchError as e:
        if not cfg.overwrite:
            raise StoreMismatchError(f"{e}. Refusing to mix teachers/schemas in one store: export to another "
                                     f"--store, or pass --overwrite to delete {cfg.store} and start again") from None
        why = "made with another schema or teacher"
    except NotAMemoryBankError as e:
        raise NotAMemoryBankError(f"{e}. --store {cfg.store}: export never deletes what is not a memorybank, even "
                                  "with --overwrite") from None
    except (StoreVersionError, StoreCorruptError) as e:
        if not cfg.overwrite:
            raise type(e)(f"{e}. Pass --overwrite to delete {cfg.store} and export again") from None
        why = type(e).__name__
    print(f"--overwrite: deleting {cfg.store} ({why})", file=sys.stderr)
    remove_memorybank(cfg.store, kw.get("storage_options"))      # NotAMemoryBankError without the marker
    return create_memorybank(cfg.store, schema, prov, fsync=not cfg.no_fsync, **kw)


@dataclass
class _Snapshot:
    """What an ``--append`` must leave as it was: the digest of every row-data file of the store and the keys of
    every split it does not write."""
    digests: dict[str, str]
    keys: dict[str, list[str]]


def _row_files(store: str) -> dict[str, str]:
    """``{relative path: sha256}`` of the store's row-data files: every file but the metadata (``zarr.json``)
    and the key array with its indexes (``keys/``), which an append extends."""
    root = Path(store)
    return {str(p.relative_to(root)): file_sha256(str(p)) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "zarr.json" and p.relative_to(root).parts[0] != "keys"}


def _append_snapshot(cfg: ExportConfig) -> _Snapshot:
    """The state an ``--append`` starts from: the digests of every row-data file except those of the splits
    being written (present when an earlier run of the same append was cut short), the earlier splits' keys
    (StoreError / FileNotFoundError when there is no store to append to)."""
    if not Path(cfg.store).exists():
        raise FileNotFoundError(f"--append: {cfg.store} does not exist (export without --append to create it)")
    if not Path(cfg.store).is_dir():
        raise ValueError(f"--append: {cfg.store} is not a Zarr directory store; the byte-identity check of the "
                         f"earlier splits needs one (convert it with python -m stores convert)")
    bank = open_memorybank(cfg.store, mode="r")
    keys = {split: bank.split_keys(split) for split in bank.splits if split not in cfg.split}
    files_of = bank.inspect().files_of_rows
    if files_of is None:
        raise ValueError(f"--append: {cfg.store} is not a local Zarr store; the byte-identity check of the earlier "
                         f"splits needs one (convert it with python -m stores convert)")
    own = {f for split in cfg.split if split in bank.splits      # an append cut short: its own files may change
           for f in files_of(bank.splits[split][0], sum(bank.splits[split]))}
    bank.close()
    return _Snapshot({f: d for f, d in _row_files(cfg.store).items() if f not in own}, keys)


def _check_append(cfg: ExportConfig, before: _Snapshot, bank: MemoryBank) -> None:
    """StoreCorruptError naming the file when an ``--append`` changed a row-data file or another split's keys."""
    after = _row_files(cfg.store)
    changed = [name for name, digest in before.digests.items() if after.get(name) != digest]
    changed += [f"keys of split {s}" for s, keys in before.keys.items() if bank.split_keys(s) != keys]
    if changed:
        raise StoreCorruptError(f"--append {cfg.store}: an existing chunk changed ({', '.join(changed[:5])}); "
                                f"the earlier splits must stay byte-identical: run python -m stores verify")
    print(f"--append: {len(before.digests)} existing chunk file(s) and the keys of {len(before.keys)} earlier "
          f"split(s) unchanged (sha256 before and after)")


def _reserve(bank: MemoryBank, split: str, keys: list[str], overwrite: bool) -> str:
    """Reserve ``split`` (new), keep it (same keys: resume) or replace it (--overwrite). Returns the action."""
    if split not in bank.splits:
        bank.reserve_split(split, keys)
        return "new"
    if overwrite:
        bank.reserve_split(split, keys, replace=True)
        return "replaced"
    have = bank.split_keys(split)
    if have != keys:
        diff = next((i for i, (x, y) in enumerate(zip(have, keys)) if x != y), min(len(have), len(keys)))
        raise ValueError(f"split {split!r} of {bank.path} holds {len(have)} keys that differ from the dataset's "
                         f"{len(keys)} (first difference at position {diff}: store "
                         f"{have[diff] if diff < len(have) else None!r}, dataset "
                         f"{keys[diff] if diff < len(keys) else None!r}); the data or --stride changed. "
                         f"Pass --overwrite to rewrite this split")
    return "resume"


def _run_split(cfg: ExportConfig, bank: MemoryBank, opts: ExportOptions, ctx: ExportContext,
               client: Optional[Client], total_rows: int) -> TaskStats:
    stats = TaskStats(opts.split, 0, total_rows)
    tasks = bank.task_ranges(opts.split, cfg.rows_per_task or None)
    incomplete = bank.incomplete_ranges(opts.split)
    busy = [(a, b) for a, b in tasks if any(x < b and y > a for x, y in incomplete)]
    stats.rows_skipped = total_rows - sum(min(y, total_rows) - x for x, y in incomplete)
    bar = tqdm(total=sum(b - a for a, b in busy), desc=f"export {opts.split}", unit="win",
               disable=cfg.no_progress, dynamic_ncols=True)
    frames_seen = [0]
    t0 = time.perf_counter()

    def progress(frames: int, windows: int) -> None:
        frames_seen[0] += frames
        bar.update(windows)
        dt = max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix_str(f"{frames_seen[0] / dt:.1f} frames/s, {bar.n / dt:.1f} windows/s", refresh=False)

    try:
        if client is None:
            for a, b in busy:
                s = export_rows(ctx, bank, a, b, opts, progress)
                s.rows_skipped = 0
                stats.add(s)
        else:
            futures = [client.submit(run_export_task, opts, a, b, pure=False) for a, b in busy]
            for fut in as_completed(futures):
                s = fut.result()
                s.rows_skipped = 0
                stats.add(s)
                progress(s.frames_encoded, s.windows_computed)
    finally:
        bar.close()
    stats.wall_s = time.perf_counter() - t0
    return stats


def _start_dask(cfg: ExportConfig) -> tuple[Optional[Client], Optional[LocalCluster]]:
    if not cfg.workers and not cfg.scheduler:
        return None, None
    if cfg.scheduler:
        return Client(cfg.scheduler), None
    with dask.config.set({"distributed.worker.daemon": False}):   # workers may start DataLoader processes
        cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
    return Client(cluster), cluster


def _absolute(path: str) -> str:
    """A local path made absolute (URLs as they are): tasks may run in dask workers with another working
    directory, on machines that mount the shared filesystem at the same path."""
    return str(path) if is_remote(path) else str(Path(path).resolve())


@dataclass
class SplitResult:
    split: str
    action: str          # new | resume | replaced
    stats: TaskStats
    num_frames: int


@dataclass
class ExportResult:
    bank: MemoryBank
    splits: list[SplitResult]
    seconds: float


def export_memorybank(cfg: ExportConfig) -> ExportResult:
    """Run the export of ``cfg`` (see the module docstring); raises on bad input, nothing half-written."""
    if not cfg.teacher_ckpt:
        raise ValueError("export needs a trained teacher: pass --teacher_ckpt PATH")
    client = cluster = None
    threads_before = torch.get_num_threads()
    try:
        device = resolve_device(cfg.device)
        if cfg.amp and device.type != "cuda":
            raise ValueError(f"--amp {cfg.amp} needs a CUDA device (got --device {cfg.device} -> {device})")
        teacher, _ = load_teacher(cfg.teacher_ckpt, device)
        schema, prov = store_schema(cfg, teacher.cfg)
        before = _append_snapshot(cfg) if cfg.append else None
        bank = _open_store(cfg, schema, prov)
        if (cfg.workers or cfg.scheduler) and bank.backend != "zarr":
            raise ValueError(f"--workers/--scheduler need a Zarr store (concurrent writers); {cfg.store} is "
                             f"{bank.backend}: export to a .zarr path and convert with `python -m stores convert`")
        client, cluster = _start_dask(cfg)
        if cfg.threads:
            threads = cfg.threads
        elif cfg.scheduler:             # the workers' machines, not this one: each task decides where it runs
            threads = WORKER_THREADS
        else:
            threads = 0 if client is None else max(1, usable_cores() // max(cfg.workers, 1))
        if client is None and threads:
            torch.set_num_threads(threads)
        results = []
        t_all = time.perf_counter()
        for split in dict.fromkeys(cfg.split):
            opts = ExportOptions(data_root=_absolute(cfg.data_root), split=split,
                                 teacher_ckpt=_absolute(str(checkpoint_path(cfg.teacher_ckpt))), store=_absolute(cfg.store),
                                 stride=cfg.stride, batch_size=cfg.batch_size,
                                 window_batch=min(cfg.window_batch, bank.alignment), write_rows=cfg.write_rows,
                                 num_workers=cfg.num_workers, device=str(device), amp=cfg.amp, torch_threads=threads,
                                 lidar_num_features=cfg.lidar_num_features,
                                 storage_options=parse_storage_options(cfg.storage_options))
            ctx = load_context(opts, bank.schema.seq_len, teacher, schema=bank.schema)
            if client is not None:          # workers check that they see the same dataset
                opts = replace(opts, plan_digest=ctx.plan.digest())
            if not ctx.plan.keys:
                raise ValueError(f"split {split!r} under {cfg.data_root} has no windows of {cfg.seq_len} frames")
            action = _reserve(bank, split, ctx.plan.keys, cfg.overwrite)
            stats = _run_split(cfg, bank, opts, ctx, client, len(ctx.plan.keys))
            results.append(SplitResult(split, action, stats, ctx.plan.num_frames))
        bank.refresh()
        if before is not None:
            _check_append(cfg, before, bank)
        return ExportResult(bank, results, time.perf_counter() - t_all)
    finally:
        torch.set_num_threads(threads_before)
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()


def print_export_summary(cfg: ExportConfig, result: ExportResult) -> None:
    """The table the export pipeline prints at the end: per split rows, frames, throughput; store size."""
    bank = result.bank
    schema = bank.schema
    where = cfg.store if is_remote(cfg.store) else Path(cfg.store).resolve()
    print(f"\nmemorybank {where}  ({type(bank).__name__}, {bank.schema.dtype}, "
          f"seq_len {schema.seq_len}, shard rows {bank.alignment})")
    print(f"{'split':<12}{'action':<10}{'rows':>8}{'written':>9}{'skipped':>9}{'frames':>8}{'enc.':>7}"
          f"{'seconds':>9}{'win/s':>9}{'frames/s':>10}")
    for r in result.splits:
        s = r.stats
        dt = max(s.wall_s, 1e-9)
        print(f"{r.split:<12}{r.action:<10}{s.b:>8}{s.rows_written:>9}{s.rows_skipped:>9}{r.num_frames:>8}"
              f"{s.frames_encoded:>7}{s.wall_s:>9.2f}{s.windows_computed / dt:>9.1f}{s.frames_encoded / dt:>10.1f}")
    per_row = sum(schema.row_nbytes(f) for f in schema.fields)
    light = sum(schema.row_nbytes(f) for f in schema.fields if f in ("actions", "bev_vec", "gru_out"))
    print(f"complete rows in store: {len(bank)}; raw bytes per sample {per_row:,} (light fields {light:,})")
    if schema.store_bev_feat:
        print(f"bev_feat per sample: shape {schema.row_shape('bev_feat')} {schema.dtype} = "
              f"{schema.row_nbytes('bev_feat'):,} bytes raw; pool {schema.bev_feat_pool}")
    if schema.store_depth:
        print(f"depth targets per sample: shape {schema.row_shape('depth')} uint8 = {schema.row_nbytes('depth'):,} "
              f"bytes raw; grid {schema.depth_grid}")
    print(f"bytes stored: {stored_bytes(cfg.store, parse_storage_options(cfg.storage_options)):,}; total {result.seconds:.2f} s")
