"""Build or grow the memorybank: batched teacher inference over whole splits, each frame encoded once.

    python -m pipelines.export --data_root data --split train --split valid --seq_len 5 \\
        --teacher_ckpt runs/teacher/best.pt --store mb.zarr [--save_bev_feat --bev_feat_pool 4 --dtype float16]

Re-running the same command resumes (complete rows are skipped, incomplete ones redone). A split not yet in
the store is appended. A store made with another schema or teacher is refused; ``--overwrite`` replaces it
(or, when it matches, rewrites the named splits). ``--workers N`` runs shard-aligned row-range tasks on a
local dask cluster of N processes, ``--scheduler tcp://HOST:PORT`` on a running one.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import dask

from e2r.checkpoints import CheckpointError, file_sha256
from e2r.data.readers import DataError
from e2r.export import ExportOptions, TaskStats, export_rows, load_context, run_export_task
from e2r.keys import InvalidKeyError

HOW_TO_GET_A_TEACHER = (
    "export needs a trained teacher: pass --teacher_ckpt PATH. Train one with\n"
    "  python -m pipelines.train_teacher --data_root DATA --preset tiny --save_path runs/teacher_best.pt\n"
    "(see python -m pipelines.train_teacher --help) and pass --teacher_ckpt runs/teacher_best.pt.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", required=True, help="dataset root: <root>/<split>/<segment>/meta/data.csv")
    p.add_argument("--split", action="append", required=True,
                   help="split to export (repeat for several); each becomes its own row range in the store")
    p.add_argument("--seq_len", type=int, default=5, help="T, frames per window/sample (default 5)")
    p.add_argument("--stride", type=int, default=1, help="frames between window starts (default 1)")
    p.add_argument("--teacher_ckpt", help="teacher checkpoint (from pipelines.train_teacher); required")
    p.add_argument("--store", "--cache_dir", dest="store", required=True,
                   help="memorybank path: a .zarr directory (default back end) or .h5 file; "
                        "--cache_dir is the original's name for it")
    p.add_argument("--save_bev_feat", action="store_true",
                   help="also store the dense bev_feat (T, C, H, W) per sample in its own chunk group")
    p.add_argument("--bev_feat_pool", type=int, default=1,
                   help="average-pool bev_feat by K x K cells before storing (e2r.kd.pool_bev_feat; default 1)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored dtype")
    p.add_argument("--batch_size", type=int, default=16, help="frames per encoder batch (default 16)")
    p.add_argument("--window_batch", type=int, default=64,
                   help="windows per GRU batch, a power of two (capped at the store's shard rows)")
    p.add_argument("--write_rows", type=int, default=1024, help="rows per store write (default 1024)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="autocast the encoder on CUDA")
    p.add_argument("--num_workers", type=int, default=2,
                   help="DataLoader processes reading and voxelising point clouds (default 2; 0 = inline)")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--workers", type=int, default=0,
                       help="start a local dask cluster of N worker processes (1 thread each)")
    scale.add_argument("--scheduler", help="address of a running dask scheduler, e.g. tcp://10.0.0.1:8786")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per process (default: all cores; cores // N with --workers N). "
                        "Results are bit-identical across runs only with equal --threads, batch sizes and device")
    p.add_argument("--rows_per_task", type=int, default=0,
                   help="rows per task (rounded up to whole shards; default one shard)")
    p.add_argument("--shard_rows", type=int, default=0,
                   help="rows per shard when creating a store (power of two; default: the store's choice)")
    p.add_argument("--lidar_num_features", default="auto", help="auto | 4 | 5 | 8 columns of .bin files")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a store made with another schema/teacher, or rewrite the named splits")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    return p


def _store_bytes(path: str) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _schema_and_provenance(args: argparse.Namespace, cfg: Any) -> tuple[Any, Any]:
    from stores import Provenance, StoreSchema

    pool = None
    feat_shape = None
    if args.save_bev_feat:
        C, H, W = cfg.bev_feat_shape
        K = args.bev_feat_pool
        if H // K < 1 or W // K < 1:
            raise ValueError(f"--bev_feat_pool {K} is larger than the teacher's bev_feat grid {H}x{W}")
        feat_shape = (C, H // K, W // K)
        pool = {"kind": "avg", "factor": K, "source_shape": [C, H, W]}
    schema = StoreSchema(seq_len=args.seq_len, action_dim=cfg.action_dim, bev_dim=cfg.bev_dim,
                         gru_hidden=cfg.gru_hidden, bev_feat_shape=feat_shape, store_bev_feat=args.save_bev_feat,
                         dtype=args.dtype, bev_feat_pool=pool)
    prov = Provenance(teacher_sha256=file_sha256(args.teacher_ckpt), model_config=cfg.to_dict(),
                      dataset_root=str(Path(args.data_root).resolve()))
    return schema, prov


def _open_store(args: argparse.Namespace, schema: Any, prov: Any) -> Any:
    from stores import MemoryBank, StoreMismatchError

    impl = MemoryBank.backend_for(args.store)
    kw = {"shard_rows": args.shard_rows} if args.shard_rows else {}
    try:
        return MemoryBank.create(args.store, schema, prov, **kw)
    except StoreMismatchError as e:
        if not args.overwrite:
            raise StoreMismatchError(f"{e}. Refusing to mix teachers/schemas in one store: export to another "
                                     f"--store, or pass --overwrite to delete {args.store} and start again") from None
    print(f"--overwrite: deleting {args.store} (made with another schema or teacher)", file=sys.stderr)
    if impl.exists(args.store) and Path(args.store).is_dir():
        shutil.rmtree(args.store)
    else:
        Path(args.store).unlink()
    return MemoryBank.create(args.store, schema, prov, **kw)


def _reserve(bank: Any, split: str, keys: list[str], overwrite: bool) -> str:
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


def _run_split(args: argparse.Namespace, bank: Any, opts: ExportOptions, ctx: Any, client: Any,
               total_rows: int) -> TaskStats:
    from tqdm import tqdm

    stats = TaskStats(opts.split, 0, total_rows)
    tasks = bank.task_ranges(opts.split, args.rows_per_task or None)
    incomplete = bank.incomplete_ranges(opts.split)
    busy = [(a, b) for a, b in tasks if any(x < b and y > a for x, y in incomplete)]
    stats.rows_skipped = total_rows - sum(min(y, total_rows) - x for x, y in incomplete)
    bar = tqdm(total=sum(b - a for a, b in busy), desc=f"export {opts.split}", unit="win",
               disable=args.no_progress, dynamic_ncols=True)
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
            from distributed import as_completed
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


def _start_dask(args: argparse.Namespace) -> tuple[Any, Any]:
    if not args.workers and not args.scheduler:
        return None, None
    from distributed import Client, LocalCluster
    if args.scheduler:
        return Client(args.scheduler), None
    with dask.config.set({"distributed.worker.daemon": False}):   # workers may start DataLoader processes
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
    return Client(cluster), cluster


def main(argv: Optional[list[str]] = None) -> int:
    """Run the export; returns the exit status (0 ok, 1 failure, 2 usage)."""
    args = build_parser().parse_args(argv)
    if not args.teacher_ckpt:
        print(HOW_TO_GET_A_TEACHER, file=sys.stderr)
        return 2
    for name in ("seq_len", "stride", "batch_size", "window_batch", "write_rows", "bev_feat_pool"):
        if getattr(args, name) < 1:
            print(f"--{name} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.window_batch & (args.window_batch - 1):
        print(f"--window_batch must be a power of two, got {args.window_batch}", file=sys.stderr)
        return 2
    client = cluster = None
    import torch
    threads_before = torch.get_num_threads()
    try:
        from e2r.training import resolve_device
        device = resolve_device(args.device)
        if args.amp and device.type != "cuda":
            raise ValueError(f"--amp {args.amp} needs a CUDA device (got --device {args.device} -> {device})")
        from e2r.models.teacher import load_teacher
        teacher, _ = load_teacher(args.teacher_ckpt, device)
        schema, prov = _schema_and_provenance(args, teacher.cfg)
        bank = _open_store(args, schema, prov)
        if (args.workers or args.scheduler) and bank.backend != "zarr":
            raise ValueError(f"--workers/--scheduler need a Zarr store (concurrent writers); {args.store} is "
                             f"{bank.backend}: export to a .zarr path and convert with `python -m stores convert`")
        client, cluster = _start_dask(args)
        n_procs = max(args.workers, 1)
        threads = args.threads or (0 if client is None else max(1, _cpus() // n_procs))
        if client is None and threads:
            torch.set_num_threads(threads)
        summary = []
        t_all = time.perf_counter()
        for split in dict.fromkeys(args.split):
            opts = ExportOptions(data_root=args.data_root, split=split, teacher_ckpt=args.teacher_ckpt,
                                 store=args.store, seq_len=args.seq_len, stride=args.stride,
                                 batch_size=args.batch_size, window_batch=min(args.window_batch, bank.alignment),
                                 write_rows=args.write_rows, num_workers=args.num_workers, device=str(device),
                                 amp=args.amp, save_bev_feat=args.save_bev_feat, bev_feat_pool=args.bev_feat_pool,
                                 torch_threads=threads,
                                 lidar_num_features=args.lidar_num_features)
            ctx = load_context(opts, teacher)
            if not ctx.plan.keys:
                raise ValueError(f"split {split!r} under {args.data_root} has no windows of {args.seq_len} frames")
            action = _reserve(bank, split, ctx.plan.keys, args.overwrite)
            stats = _run_split(args, bank, opts, ctx, client, len(ctx.plan.keys))
            summary.append((split, action, stats, ctx.plan.num_frames))
        bank.refresh()
        _print_summary(args, bank, summary, time.perf_counter() - t_all)
        return 0
    except (DataError, CheckpointError, InvalidKeyError, ValueError, FileNotFoundError, KeyError,
            PermissionError, OSError, RuntimeError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads_before)
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()


def _cpus() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _print_summary(args: argparse.Namespace, bank: Any, summary: list, seconds: float) -> None:
    schema = bank.schema
    print(f"\nmemorybank {Path(args.store).resolve()}  ({type(bank).__name__}, {bank.schema.dtype}, "
          f"seq_len {schema.seq_len}, shard rows {bank.alignment})")
    print(f"{'split':<12}{'action':<10}{'rows':>8}{'written':>9}{'skipped':>9}{'frames':>8}{'enc.':>7}"
          f"{'seconds':>9}{'win/s':>9}{'frames/s':>10}")
    for split, action, s, n_frames in summary:
        dt = max(s.wall_s, 1e-9)
        print(f"{split:<12}{action:<10}{s.b:>8}{s.rows_written:>9}{s.rows_skipped:>9}{n_frames:>8}"
              f"{s.frames_encoded:>7}{s.wall_s:>9.2f}{s.windows_computed / dt:>9.1f}{s.frames_encoded / dt:>10.1f}")
    per_row = sum(schema.row_nbytes(f) for f in schema.fields)
    print(f"complete rows in store: {len(bank)}; raw bytes per sample {per_row:,} "
          f"(light fields {per_row - (schema.row_nbytes('bev_feat') if schema.store_bev_feat else 0):,})")
    if schema.store_bev_feat:
        print(f"bev_feat per sample: shape {schema.row_shape('bev_feat')} {schema.dtype} = "
              f"{schema.row_nbytes('bev_feat'):,} bytes raw; pool {schema.bev_feat_pool}")
    print(f"bytes stored on disk: {_store_bytes(args.store):,}; total {seconds:.2f} s")


if __name__ == "__main__":
    sys.exit(main())
