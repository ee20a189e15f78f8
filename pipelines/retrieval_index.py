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

from e2r.errors import E2RError
from e2r.workflow.configs import config_from_namespace
from e2r.workflow.retrieval_kd import QUERY_KINDS, RetrievalBuild, build_retrieval_index
from e2r.workflow.retrieval_queries import POSE_DEFAULTS
from stores import StoreError
from stores.retrieval import KINDS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.retrieval_index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="memorybank written by pipelines.export (a Zarr directory)")
    p.add_argument("--data_root", default=None,
                   help="the dataset the store was exported from (needed by --query state and pose)")
    p.add_argument("--query", choices=QUERY_KINDS, default="state", help="what is compared (default state)")
    p.add_argument("--name", default=None, help="index name inside the store (default: the query kind)")
    p.add_argument("--kind", choices=KINDS, default="exact",
                   help="exact (chunked torch.topk; default) or an approximate faiss index for large stores")
    p.add_argument("--replace", action="store_true", help="rebuild an existing index of this name")
    p.add_argument("--pose_sigma_xy", type=float, default=POSE_DEFAULTS["sigma_xy"],
                   help="pose: distance scale in metres (similarity exp(-d^2 / 2 sigma^2); default %(default)s)")
    p.add_argument("--pose_sigma_yaw", type=float, default=POSE_DEFAULTS["sigma_yaw"],
                   help="pose: heading scale (similarity exp(-(1 - cos dyaw) / sigma^2); default %(default)s)")
    p.add_argument("--pose_features", type=int, default=POSE_DEFAULTS["features"],
                   help="pose: random Fourier frequencies M (vector 2 M per frame; default %(default)s)")
    p.add_argument("--pose_frames", type=int, default=POSE_DEFAULTS["frames"],
                   help="pose: the window's last n frames compared frame by frame (default %(default)s: the "
                        "decision time only)")
    return p


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    try:
        cfg = config_from_namespace(RetrievalBuild, build_parser().parse_args(argv))
        index = build_retrieval_index(cfg)
    except (E2RError, StoreError, ValueError, FileExistsError, FileNotFoundError, ImportError) as e:
        print(f"retrieval_index: error: {e}", file=sys.stderr)
        return 1
    print(f"retrieval index {cfg.index_name!r} (query {cfg.query}, {index.kind}): {len(index)} rows of dimension "
          f"{index.dim} in {time.perf_counter() - t0:.1f} s -> {index.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
