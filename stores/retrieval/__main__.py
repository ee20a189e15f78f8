"""The one command line of the retrieval index: ``python -m stores.retrieval build|query|verify``."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np

from stores.keys import parse_key
from stores.retrieval import index as retrieval
from stores.errors import StoreError
from stores.retrieval.index import KINDS, RetrievalIndex, append_index, build_index, verify_indexes
from stores.retrieval.layout import list_indexes, load_inputs

FAISS_ARGS = ("nlist", "nprobe", "codec", "coarse", "candidates", "hnsw_m", "ef_construction", "ef_search")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stores.retrieval", description=retrieval.__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or --append to, --replace) a retrieval index inside a memorybank")
    q = sub.add_parser("query", help="print the neighbours of KEY (its own vector is the query)")
    v = sub.add_parser("verify", help="read and check every byte of the store's retrieval indexes")
    for s in (b, q, v):
        s.add_argument("store", help="the memorybank (a Zarr directory)")
    q.add_argument("key", help="an indexed key, e.g. train/segment_0001:123")
    for s in (b, q):
        s.add_argument("--name", required=True, help="index name, e.g. state, pose, student")
        s.add_argument("--exclude-frames", type=int, help="T: rows of the query key's segment within +-T frames are "
                       "excluded (build: the index's default, else the store's seq_len; query: default the index's)")
    b.add_argument("--vectors", required=True, help=".npy (N, D) float matrix, one row per key")
    b.add_argument("--keys", help="text file, N keys (one per line, row order); default: the store's complete keys")
    b.add_argument("--kind", choices=KINDS, default="exact", help="search back end (faiss kinds need faiss-cpu)")
    b.add_argument("--append", action="store_true", help="add these rows to the existing index (a new part)")
    b.add_argument("--replace", action="store_true", help="rebuild an existing index from these rows")
    for f in FAISS_ARGS:
        b.add_argument(f"--{f.replace('_', '-')}", type=str if f in ("codec", "coarse") else int, help="faiss parameter "
                       "(default: measured, docs/STORE.md); codec: the IVF codes, a faiss factory suffix (SQ8, "
                       "PQ64x4fsr); coarse: flat, HNSW32, PQ128x4fs; candidates: re-scored per query")
    q.add_argument("--k", type=int, default=8, help="neighbours to print")
    q.add_argument("--exact", action="store_true", help="exact search on an approximate index")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        if a.cmd == "build":
            vec, keys = load_inputs(a.vectors, a.keys)
            src = a.vectors + (f" + {a.keys}" if a.keys else "")
            if a.append:
                if keys is None:
                    raise ValueError("--append needs --keys (the new rows' keys)")
                idx = append_index(a.store, a.name, vec, keys, source=src)
            else:
                idx = build_index(a.store, a.name, vec, keys, kind=a.kind, replace=a.replace, source=src,
                                  exclude_frames=a.exclude_frames, **{k: getattr(a, k) for k in FAISS_ARGS})
            print(f"{'appended' if a.append else 'built'} {len(vec)} rows: retrieval index {a.name!r} ({idx.kind}, "
                  f"{len(idx)} keys, D={idx.dim}) at {idx.dir} in {time.perf_counter() - t0:.1f} s")
        elif a.cmd == "query":
            idx = RetrievalIndex.open(a.store, a.name)
            row = idx.row_of(a.key)
            if row is None:
                raise ValueError(f"key {a.key!r} is not in retrieval index {a.name!r} of {a.store} ({len(idx)} keys)")
            T = idx.exclude_frames if a.exclude_frames is None else a.exclude_frames
            keys, sims = idx.retrieve(idx.vectors(np.array([row])), a.k, exclude=[a.key], exclude_frames=T,
                                      exact=a.exact or None)
            for i, (k, s) in enumerate(zip(keys[0], sims[0]), 1):
                print(f"{i:>4}  {s:+.4f}  {k or '(none)'}")
            print(f"query {a.key}: {int((keys[0] != '').sum())} neighbours from retrieval index {a.name!r} ({idx.kind}"
                  f"{', exact search' if a.exact else ''}, {len(idx)} keys, D={idx.dim}), rows of segment "
                  f"{parse_key(a.key).segment} within +-{T} frames excluded, {1e3 * (time.perf_counter() - t0):.0f} ms")
        else:
            names = list_indexes(a.store)
            problems = verify_indexes(a.store)
            for msg in problems:
                print("PROBLEM:", msg)
            print(f"verified {len(names)} retrieval index(es) of {a.store} ({', '.join(names) or 'none'}): "
                  f"{len(problems)} problem(s)")
            return 1 if problems else 0
    except (StoreError, FileNotFoundError, FileExistsError, ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
