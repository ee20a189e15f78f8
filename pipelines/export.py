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
import sys
from typing import Optional

from e2r.errors import ConfigError, E2RError
from e2r.workflow.configs import ExportConfig, config_from_namespace
from e2r.workflow.export_run import export_memorybank, print_export_summary
from e2r.workflow.retrieval_kd import RetrievalBuild, build_retrieval_index
from e2r.workflow.retrieval_queries import QUERY_KINDS
from pipelines._common import num_features
from stores import StoreError

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
                   help="torch threads per process (default: all cores; cores // N with --workers N; with --scheduler "
                        "each task takes its worker machine's cores // the worker's --nthreads). "
                        "Results are bit-identical across runs only with equal --threads, batch sizes and device")
    p.add_argument("--rows_per_task", type=int, default=0,
                   help="rows per task (rounded up to whole shards; default one shard)")
    p.add_argument("--shard_rows", type=int, default=0,
                   help="rows per shard when creating a store (power of two; default: the store's choice)")
    p.add_argument("--lidar_num_features", default="auto", type=num_features,
                   help="auto | 4 | 5 | 8 columns of .bin files")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a store made with another schema/teacher, or rewrite the named splits")
    p.add_argument("--append", action="store_true",
                   help="add the named splits to an existing local Zarr store and check that every chunk file and "
                        "key of its earlier splits is byte-identical afterwards (e.g. a DAgger round's drives)")
    p.add_argument("--no_fsync", action="store_true",
                   help="skip fsync of written data before rows are flagged complete (faster; a power loss may then "
                        "lose recent rows, which verify reports and a re-run redoes)")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    p.add_argument("--storage_options", default=None,
                   help="--store on object storage (s3://bucket/mb.zarr): fsspec options as JSON, e.g. "
                        "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}' (default: the AWS_* environment variables)")
    p.add_argument("--retrieval_index", nargs="+", default=[], choices=QUERY_KINDS, metavar="QUERY",
                   help=f"after the export, (re)build the store's retrieval index of each query kind "
                        f"({', '.join(QUERY_KINDS)}; default none) with its default settings, as "
                        f"`python -m pipelines.retrieval_index --query QUERY --replace` would")
    return p


def parse_config(argv: Optional[list[str]] = None) -> ExportConfig:
    """The run config of the command line (ConfigError naming the flag for values that cannot work)."""
    return config_from_namespace(ExportConfig, build_parser().parse_args(argv))


def main(argv: Optional[list[str]] = None) -> int:
    """Run the export; returns the exit status (0 ok, 1 failure, 2 usage)."""
    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if not cfg.teacher_ckpt:
        print(HOW_TO_GET_A_TEACHER, file=sys.stderr)
        return 2
    try:
        result = export_memorybank(cfg)
    except (E2RError, StoreError, ValueError, KeyError, OSError, RuntimeError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    print_export_summary(cfg, result)
    for query in cfg.retrieval_index:
        try:
            index = build_retrieval_index(RetrievalBuild(store=cfg.store, data_root=cfg.data_root, query=query,
                                                         replace=True))
        except (E2RError, StoreError, ValueError, OSError) as e:
            print(f"export: the rows are stored, but the {query!r} retrieval index failed: {e}", file=sys.stderr)
            return 1
        print(f"retrieval index {query!r} ({index.kind}): {len(index)} rows of dimension {index.dim} in "
              f"{cfg.store}/retrieval/{query}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
