"""The retrieval index of a memorybank, so that camera windows without a paired LiDAR row can be distilled from
the teacher's most similar situations (``python -m pipelines.train_student --kd_retrieval NAME``): its one
command line.

    python -m pipelines.retrieval_index build --store runs/mb.zarr --data_root data/synth [--query state|pose]
        [--name NAME] [--kind exact|faiss-ivf|faiss-hnsw] [--replace]
        [--pose_sigma_xy 3] [--pose_sigma_yaw 0.5] [--pose_features 128] [--pose_frames 1]
    python -m pipelines.retrieval_index build --store runs/mb.zarr --query student     # no dataset needed
    python -m pipelines.retrieval_index build --store runs/mb.zarr --name mine --vectors v.npy [--keys k.txt]
        [--append]                                                                   # vectors of your own
    python -m pipelines.retrieval_index query --store runs/mb.zarr --key train/segment_0001:40 [--name state]
    python -m pipelines.retrieval_index verify --store runs/mb.zarr

Query kinds (vectors: e2r/workflow/retrieval_queries.py; the index name defaults to the kind):
  state    each window's measured speed and previous steering over T frames, standardised with the statistics
           of the indexed windows (recorded in the index) plus a constant; from the data root's data.csv.
  pose     the car's place and heading at the window's last frame (--pose_frames n: its last n frames), from
           data.csv's x, y, yaw: random Fourier features whose cosine is a Gaussian kernel of the distance
           (sigma --pose_sigma_xy m) and heading difference (--pose_sigma_yaw), ~0 between different maps (the
           map: meta/track.json's "map" or "track_fingerprint"; none = one map for all segments).
  student  the teacher's stored bev_vec rows (mean over T), queried with the student's bev_vec in the
           training step: useful once KD on paired windows has aligned the two embeddings.
The index lives inside the store (``<store>/retrieval/<name>/``, every byte checksummed, `stores.retrieval`);
``faiss-*`` kinds need ``pip install 'e2r-kd[retrieval]'``. Exit status 0 done (verify: no problem), 1 failed
or problems found, 2 usage.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from e2r.cli_config import parse_config, subcommand_parser
from e2r.errors import ConfigError, E2RError
from e2r.workflow.retrieval_index import RetrievalIndexConfig, build_retrieval_index, query_index, verify_index
from stores import StoreError
from stores.keys import parse_key

#: the run config: one flag per field (``command`` is the sub-command)
CONFIG = RetrievalIndexConfig
_HELP = {"build": "build (or --append to, --replace) a retrieval index inside a memorybank",
         "query": "print the neighbours of --key (its own stored vector is the query)",
         "verify": "read and check every byte of the store's retrieval indexes"}


def build_parser() -> argparse.ArgumentParser:
    return subcommand_parser(CONFIG, "python -m pipelines.retrieval_index", __doc__, _HELP)


def main(argv: Optional[Sequence[str]] = None) -> int:
    t0 = time.perf_counter()
    try:
        cfg = parse_config(CONFIG, build_parser(), argv)
    except ConfigError as e:
        print(f"retrieval_index: error: {e}", file=sys.stderr)
        return 2
    try:
        if cfg.command == "build":
            index = build_retrieval_index(cfg)
            what = f"from {cfg.vectors}" if cfg.vectors else f"query {cfg.query}"
            print(f"retrieval index {cfg.index_name!r} ({what}, {index.kind}): {'appended to' if cfg.append else 'built'}"
                  f", {len(index)} rows of dimension {index.dim} in {time.perf_counter() - t0:.1f} s -> {index.dir}")
        elif cfg.command == "query":
            index, keys, sims, T = query_index(cfg)
            for i, (key, sim) in enumerate(zip(keys, sims), 1):
                print(f"{i:>4}  {sim:+.4f}  {key or '(none)'}")
            print(f"query {cfg.key}: {int((keys != '').sum())} neighbours from retrieval index {cfg.index_name!r} "
                  f"({index.kind}{', exact search' if cfg.exact else ''}, {len(index)} keys, D={index.dim}), rows of "
                  f"segment {parse_key(str(cfg.key)).segment} within +-{T} frames excluded, "
                  f"{1e3 * (time.perf_counter() - t0):.0f} ms")
        else:
            names, problems = verify_index(cfg)
            for msg in problems:
                print("PROBLEM:", msg)
            print(f"verified {len(names)} retrieval index(es) of {cfg.store} ({', '.join(names) or 'none'}): "
                  f"{len(problems)} problem(s)")
            return 1 if problems else 0
    except (E2RError, StoreError, ValueError, FileExistsError, FileNotFoundError, OSError, ImportError) as e:
        print(f"retrieval_index {cfg.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
