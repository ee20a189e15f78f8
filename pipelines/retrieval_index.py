"""Build a retrieval index of a memorybank, so that camera windows without a paired LiDAR row can be distilled
from the teacher's most similar situations (``python -m pipelines.train_student --kd_retrieval NAME``).

    python -m pipelines.retrieval_index --store runs/mb.zarr --data_root data/synth [--query state|pose]
        [--name NAME] [--kind exact|faiss-ivf|faiss-hnsw] [--replace]
        [--pose_sigma_xy 3] [--pose_sigma_yaw 0.5] [--pose_features 128] [--pose_frames 1]
    python -m pipelines.retrieval_index --store runs/mb.zarr --query student      # no dataset needed

Query kinds (vectors: e2r/workflow/retrieval_queries.py; the index name defaults to the kind):
  state    each window's measured speed and previous steering over T frames, standardised with the statistics
           of the indexed windows (recorded in the index) plus a constant; from the data root's data.csv.
  pose     the car's place and heading at the window's last frame (--pose_frames n: its last n frames), from
           data.csv's x, y, yaw: random Fourier features whose cosine is a Gaussian kernel of the distance
           (sigma --pose_sigma_xy m) and heading difference (--pose_sigma_yaw), ~0 between different maps (the
           map: meta/track.json's "map" or "track_fingerprint"; none = one map for all segments).
  student  the teacher's stored bev_vec rows (mean over T), queried with the student's bev_vec in the
           training step: useful once KD on paired windows has aligned the two embeddings.
The index lives inside the store (``<store>/retrieval/<name>/``, every byte checksummed; ``python -m
stores.retrieval verify STORE``); ``faiss-*`` kinds need ``pip install 'e2r-kd[retrieval]'``. Look up a key's
neighbours with ``python -m stores.retrieval query STORE KEY --name state --k 8``.
"""
from __future__ import annotations

import argparse
import sys
import time

from e2r.cli_config import config_parser, parse_config
from e2r.errors import E2RError
from e2r.workflow.retrieval_kd import RetrievalBuild, build_retrieval_index
from stores import StoreError

#: the run config: one flag per field
CONFIG = RetrievalBuild


def build_parser() -> argparse.ArgumentParser:
    return config_parser(CONFIG, "python -m pipelines.retrieval_index", __doc__)


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    try:
        cfg = parse_config(CONFIG, build_parser(), argv)
        index = build_retrieval_index(cfg)
    except (E2RError, StoreError, ValueError, FileExistsError, FileNotFoundError, ImportError) as e:
        print(f"retrieval_index: error: {e}", file=sys.stderr)
        return 1
    print(f"retrieval index {cfg.index_name!r} (query {cfg.query}, {index.kind}): {len(index)} rows of dimension "
          f"{index.dim} in {time.perf_counter() - t0:.1f} s -> {index.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
