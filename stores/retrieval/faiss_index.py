"""The faiss side of a retrieval index (`stores.retrieval`): index parameters, building, loading, candidate search.

faiss is optional (``pip install 'e2r-kd[retrieval]'``); only the approximate kinds import it. An approximate
search returns candidates that `stores.retrieval` re-scores exactly from the stored float16 rows, so the faiss
codes only have to rank the true neighbours among the candidates, not exactly.

``faiss-ivf`` parameters (recorded in the manifest, defaults measured by bench/bench_retrieval.py):

* ``nlist`` - inverted lists (~4 sqrt(N), each >= 39 rows);
* ``codec`` - the codes in the lists, a faiss factory suffix: ``PQ<M>x4fsr`` (4-bit product quantizer, fast
  scan: M/2 bytes per row, searched with SIMD look-ups; ``r``: residuals of the list centre), ``SQ8`` (D bytes);
* ``coarse`` - how a query finds its lists: ``flat`` (every centroid, B x nlist x D multiply-adds), ``HNSW<M>``
  (a graph over the centroids), ``PQ<M>x4fs`` (a fast-scan product quantizer over the centroids, its best
  `COARSE_K_FACTOR` x nprobe re-scored exactly: much cheaper than flat for nlist in the thousands);
* ``nprobe`` - lists scanned per query; ``candidates`` - faiss results re-scored per query (at least 2 k;
  96 for fast-scan codes: recall@8 0.955 at 1e6 x 256, 128: 0.967 for ~1.3 ms more per batch of 64).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from stores.errors import StoreCorruptError, StoreError

BLOCK = 65536                     # rows converted to float32 at a time (faiss add)
COARSE_K_FACTOR = 8               # a PQ coarse quantizer re-scores its best COARSE_K_FACTOR * nprobe centroids
COARSE_PQ_MIN_NLIST = 1024        # below this many lists the default coarse quantizer is flat
# the faiss-ivf parameters of an index built before they existed (its faiss file is what it is)
LEGACY = {"coarse": "flat", "candidates": 0}


def faiss_module() -> Any:
    try:
        import faiss  # optional heavy dependency (extra "retrieval"): only the approximate back end imports it
    except ImportError as e:
        raise ImportError("the approximate retrieval back end (faiss-ivf, faiss-hnsw) needs faiss: pip install "
                          "'e2r-kd[retrieval]' (or pip install faiss-cpu)") from e
    return faiss


def faiss_params(kind: str, n: int, given: dict[str, Any] | None = None, dim: int = 0) -> dict[str, Any]:
    """Index parameters of an approximate kind for n rows of dimension ``dim``: the defaults measured in
    bench/bench_retrieval.py (docs/STORE.md), overridden by the non-None entries of ``given`` (ValueError for
    one the kind has not)."""
    if kind == "faiss-ivf":           # ~4 sqrt(N) lists of >= 39 rows
        nlist = int(max(1, min(2 ** round(np.log2(4 * np.sqrt(n))), 2 ** int(np.log2(max(1, n // 39))))))
        fast = dim >= 8 and dim % 4 == 0
        p: dict[str, Any] = {"nlist": nlist, "nprobe": 16, "codec": f"PQ{dim // 4}x4fsr" if fast else "SQ8",
                             "coarse": f"PQ{dim // 2}x4fs" if fast and nlist >= COARSE_PQ_MIN_NLIST else "flat",
                             "candidates": 96 if fast else 0}
    elif kind == "faiss-hnsw":
        p = {"hnsw_m": 32, "ef_construction": 80, "ef_search": 64}
    elif kind == "exact":
        p = {}
    else:
        raise ValueError(f"kind must be exact, faiss-ivf or faiss-hnsw, got {kind!r}")
    for k, v in (given or {}).items():
        if v is not None and k not in p:
            raise ValueError(f"parameter {k}={v!r} does not apply to {kind} (its parameters: {', '.join(p)})")
        if v is not None:
            p[k] = type(p[k])(v)
    if kind == "faiss-ivf" and not re.fullmatch(r"flat|HNSW\d+|PQ\d+x4fs", p["coarse"]):
        raise ValueError(f"coarse must be flat, HNSW<M> or PQ<M>x4fs, got {p['coarse']!r}")
    if kind == "faiss-ivf" and (given or {}).get("candidates") is None and "fs" not in p["codec"]:
        p["candidates"] = 0               # accurate codes (SQ8): 2 k candidates are enough
    return p


def _coarse(faiss: Any, spec: str, centroids: np.ndarray) -> Any:
    """A coarse quantizer ``spec`` (HNSW<M> or PQ<M>x4fs) holding ``centroids`` (nlist, D), list i = centroid i."""
    d = centroids.shape[1]
    if spec.startswith("HNSW"):
        q = faiss.IndexHNSWFlat(d, int(spec[4:]), faiss.METRIC_INNER_PRODUCT)
        q.hnsw.efConstruction, q.hnsw.efSearch = 200, 64
        q.add(centroids)
        return q
    m = int(spec[2:].split("x")[0])
    if d % m:
        raise ValueError(f"coarse {spec}: {m} sub-quantizers do not divide the dimension {d}")
    pq = faiss.IndexPQFastScan(d, m, 4, faiss.METRIC_INNER_PRODUCT)
    pq.train(centroids)
    q = faiss.IndexRefineFlat(pq)
    pq.this.disown()
    q.own_fields, q.k_factor = True, float(COARSE_K_FACTOR)
    q.add(centroids)
    return q


def faiss_blob(kind: str, rows: np.ndarray, params: dict[str, Any], base: Path | None = None) -> np.ndarray:
    """A serialized faiss index (uint8) over ``rows`` (N, D) float16: a new one (an IVF trained on a sample of
    up to 40 rows per list), or the checked index file ``base`` with ``rows`` added after its own."""
    faiss = faiss_module()
    if base is not None:
        index = faiss.read_index(str(base))
    elif kind == "faiss-ivf":
        try:
            index = faiss.index_factory(rows.shape[1], f"IVF{params['nlist']},{params['codec']}", faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"faiss cannot make an IVF index with codec {params['codec']!r}: {e}") from None
        pick = np.sort(np.random.default_rng(0).choice(len(rows), min(len(rows), 40 * params["nlist"]), replace=False))
        index.train(rows[pick].astype(np.float32))          # k-means (flat) + the codes' training
        if params["coarse"] != "flat":                       # the same centroids, found faster
            ivf = faiss.extract_index_ivf(index)
            flat = ivf.quantizer
            quantizer = _coarse(faiss, params["coarse"], flat.reconstruct_n(0, flat.ntotal))
            quantizer.this.disown()
            ivf.quantizer, ivf.own_fields = quantizer, True
            flat.this.own(True)                              # the flat one is freed with its Python proxy
    else:
        index = faiss.index_factory(rows.shape[1], f"HNSW{params['hnsw_m']},Flat", faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
    for a in range(0, len(rows), BLOCK):
        index.add(rows[a:a + BLOCK].astype(np.float32))
    return faiss.serialize_index(index)


def corrupt(store: str, path: Path | str, what: str) -> StoreCorruptError:
    return StoreCorruptError(f"retrieval index file {path}: {what}. The index is not used; rebuild it "
                             f"(`python -m pipelines.retrieval_index build --store {store} --name NAME ... --replace`)",
                             path=store, array=str(Path(path).parent), chunk=str(path))


def load_faiss(path: Path, store: str, n: int, dim: int) -> Any:
    """The faiss index in the checked file ``path``, memory-mapped read-only when faiss can (>= 1.10; the
    lists of a fast-scan IVF are read into memory: M/2 bytes per row)."""
    faiss = faiss_module()
    try:
        index = faiss.read_index(str(path), getattr(faiss, "IO_FLAG_MMAP_IFC", 0) | getattr(faiss, "IO_FLAG_READ_ONLY", 0))
    except RuntimeError as e:
        raise StoreError(f"retrieval index file {path}: faiss {faiss.__version__} cannot read it ({e}); rebuild the "
                         "index (build ... --replace)") from None
    if index.ntotal != n or index.d != dim:
        raise corrupt(store, path, f"a faiss index of {index.ntotal} x {index.d}, the manifest says {n} x {dim}")
    return index


def search_candidates(index: Any, kind: str, f: dict[str, Any], q: np.ndarray, kp: int, nprobe: int | None,
                      ef_search: int | None) -> np.ndarray:
    """(B, kp) int64 candidate rows of the unit queries ``q`` (B, D) float32, -1 where faiss has none.
    ``f``: the manifest's faiss parameters; nprobe / ef_search override them."""
    faiss = faiss_module()
    if kind == "faiss-ivf":
        npb = int(nprobe or f["nprobe"])
        params = faiss.SearchParametersIVF(nprobe=npb)
        if str(f.get("coarse", "flat")).startswith("HNSW"):
            qp = faiss.SearchParametersHNSW(efSearch=max(64, 2 * npb))
            params.quantizer_params = qp
    else:
        params = faiss.SearchParametersHNSW(efSearch=max(kp, int(ef_search or f["ef_search"])))
    _, cand = index.search(q, kp, params=params)
    return cand
