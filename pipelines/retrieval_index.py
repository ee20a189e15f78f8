"""Build the retrieval index of a memorybank from the dataset it was exported from, so that camera windows
without a paired LiDAR row can be distilled from the teacher's most similar situations
(``python -m pipelines.train_student --kd_retrieval state``).

    python -m pipelines.retrieval_index --store runs/mb.zarr --data_root data/synth [--query state]
        [--kind exact|faiss-ivf|faiss-hnsw] [--replace]

Query ``state``: each window's measured speed and previous steering over T frames, standardised with the
statistics of the indexed windows (recorded in the index) plus a constant; cosine similarity. The index
lives inside the store (``<store>/retrieval/<query>/``, every byte checksummed; ``python -m stores.retrieval
verify STORE``); ``faiss-*`` kinds need ``pip install 'e2r-kd[retrieval]'``. Look up a key's neighbours with
``python -m stores.retrieval query STORE KEY --name state --k 8``.
"""
from __future__ import annotations

import argparse
import sys
import time

from e2r.errors import E2RError
from e2r.workflow.configs import config_from_namespace
from e2r.workflow.retrieval_kd import QUERY_KINDS, RetrievalBuild, build_retrieval_index
from stores import StoreError
from stores.retrieval import KINDS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.retrieval_index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="memorybank written by pipelines.export (a Zarr directory)")
    p.add_argument("--data_root", required=True, help="the dataset the store was exported from")
    p.add_argument("--query", choices=QUERY_KINDS, default="state", help="what is compared (default state)")
    p.add_argument("--kind", choices=KINDS, default="exact",
                   help="exact (chunked torch.topk; default) or an approximate faiss index for large stores")
    p.add_argument("--replace", action="store_true", help="rebuild an existing index of this query")
    return p


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    try:
        cfg = config_from_namespace(RetrievalBuild, build_parser().parse_args(argv))
        index = build_retrieval_index(cfg)
    except (E2RError, StoreError, ValueError, FileExistsError, FileNotFoundError, ImportError) as e:
        print(f"retrieval_index: error: {e}", file=sys.stderr)
        return 1
    print(f"retrieval index {cfg.query!r} ({index.kind}): {len(index)} rows of dimension {index.dim} in "
          f"{time.perf_counter() - t0:.1f} s -> {index.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
