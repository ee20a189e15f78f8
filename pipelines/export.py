"""Build or grow the memorybank: batched teacher inference over whole splits, each frame encoded once.

    python -m pipelines.export --data_root data --split train --split valid --seq_len 5 \\
        --teacher_ckpt runs/teacher/best.pt --store mb.zarr [--save_bev_feat --bev_feat_pool 4 --dtype float16]
        [--store_depth --depth_preset tiny]     # + each window's LiDAR depth targets (docs/STORE.md)

Re-running the same command resumes (complete rows are skipped, incomplete ones redone). A split not yet in
the store is appended. A store made with another schema or teacher is refused; ``--overwrite`` replaces it
(or, when it matches, rewrites the named splits). ``--workers N`` runs shard-aligned row-range tasks on a
local dask cluster of N processes, ``--scheduler tcp://HOST:PORT`` on a running one.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from e2r.cli_config import config_parser, parse_config as parse
from e2r.errors import ConfigError, E2RError
from e2r.workflow.export_config import ExportConfig
from e2r.workflow.export_run import export_memorybank, print_export_summary
from e2r.workflow.retrieval_index import RetrievalIndexConfig, build_retrieval_index
from stores import StoreError

#: the run config: one flag per field
CONFIG = ExportConfig

HOW_TO_GET_A_TEACHER = (
    "export needs a trained teacher: pass --teacher_ckpt PATH. Train one with\n"
    "  python -m pipelines.train_teacher --data_root DATA --preset tiny --save_path runs/teacher_best.pt\n"
    "(see python -m pipelines.train_teacher --help) and pass --teacher_ckpt runs/teacher_best.pt.")


def build_parser() -> argparse.ArgumentParser:
    return config_parser(CONFIG, "python -m pipelines.export", __doc__)


def parse_config(argv: Optional[list[str]] = None) -> ExportConfig:
    """The run config of the command line (ConfigError naming the flag for values that cannot work)."""
    return parse(CONFIG, build_parser(), argv)


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
            index = build_retrieval_index(RetrievalIndexConfig(store=cfg.store, data_root=cfg.data_root, query=query,
                                                               replace=True))
        except (E2RError, StoreError, ValueError, OSError) as e:
            print(f"export: the rows are stored, but the {query!r} retrieval index failed: {e}", file=sys.stderr)
            return 1
        print(f"retrieval index {query!r} ({index.kind}): {len(index)} rows of dimension {index.dim} in "
              f"{cfg.store}/retrieval/{query}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
