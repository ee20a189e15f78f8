"""Retrieval index of a memorybank: for a camera sample without a paired LiDAR key, find the teacher's most
similar situations (rows of the store) by cosine similarity of caller-built vectors.

    from stores.retrieval import RetrievalIndex, build_index, append_index
    build_index("mb.zarr", "state", vectors, keys, kind="faiss-ivf")     # vectors (N, D), keys (N,) of the store
    index = RetrievalIndex.open("mb.zarr", "state")                      # read-only, cheap: nothing is read yet
    keys, sim = index.retrieve(queries, k=8, exclude=query_keys)         # (B, D) -> (B, k) str, (B, k) float32

An index has a name (``state``, ``pose``, ``student``: what the vectors are is the caller's business) and a
dimension D. It lives inside the store (``<store>/retrieval/<name>/``, format and crash safety in
`stores.retrieval.layout`): unit-normalised float16 rows (N, D) and their keys, every byte checksummed.

Back ends (``kind``): ``exact`` - chunked ``torch.topk`` over the memory-mapped matrix (memory bounded by one
chunk of `default_chunk_rows` rows in float32 plus (B, chunk) similarities); ``faiss-ivf`` (IVF; 4-bit
fast-scan PQ codes and a fast-scan coarse quantizer by default, parameters in `stores.retrieval.faiss_index`) /
``faiss-hnsw`` - faiss (optional: ``pip install 'e2r-kd[retrieval]'``) returns ``max(RERANK * k, candidates)``
candidates, re-scored exactly from the stored float16 rows: both back ends give the same similarity for the
same row, and quantization errors cost no ranking inside the candidates.

**Exclusion.** ``exclude[b]`` (a key, a `SampleKey`, a ``(segment, start)`` pair, or None) stops query b from
retrieving any row of the same segment (by segment name, whatever the split) whose start is within
``+-exclude_frames`` (default: the store's seq_len at build, recorded in the index). The approximate back end
over-fetches ``(2T + 1) * S`` more candidates (T = exclude_frames, S = the most splits one segment name occurs
in, 1 in a usual dataset): at most that many rows can be excluded, so k remain whenever faiss returns its
candidates (beyond `MAX_CANDIDATES` the exact back end answers). Missing results (an index smaller than k
plus the exclusions) come back as key "" and similarity -inf.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from stores.keys import InvalidKeyError, SampleKey, parse_key, validate_part
from stores.errors import StoreError
from stores.fsio import publish, remove_path, remove_stale_temps, temp_sibling
from stores.retrieval.faiss_index import LEGACY, faiss_blob, faiss_params, load_faiss, search_candidates
from stores.retrieval.layout import (FORMAT, VERSION, add_faiss, add_part, blob_array, check_in_store, corrupt,
                                    default_chunk_rows, ensure_root, index_dir, list_indexes, open_bank_keys,
                                    part_arrays, prepare_rows, read_manifest, splits_per_segment, write_manifest)
from stores.schema import now_iso

__all__ = ["KINDS", "RetrievalIndex", "build_index", "append_index", "verify_indexes", "list_indexes"]
KINDS = ("exact", "faiss-ivf", "faiss-hnsw")
Exclude = Union[str, SampleKey, tuple[str, int], None]
RERANK = 2                # an approximate search fetches RERANK * k candidates (+ the exclusion over-fetch)
MAX_CANDIDATES = 1024     # an approximate search needing more candidates than this is answered exactly


class RetrievalIndex:
    """A read-only retrieval index (open with `RetrievalIndex.open`). ``len(index)`` rows of dimension ``dim``.
    Chunk files are mapped and checked (crc32c) the first time a search touches them, the faiss index is
    loaded (memory-mapped) at the first approximate search: opening starts no thread and reads only the
    metadata, so an index may be opened before DataLoader workers fork; it pickles without its maps."""

    def __init__(self, store: str, name: str, attrs: dict[str, Any]) -> None:
        self.store, self.name, self.attrs = str(store), name, attrs
        self.dir = index_dir(store, name)
        try:
            self.dim, self.kind = int(attrs["dim"]), str(attrs["kind"])
            self.exclude_frames, C = int(attrs["exclude_frames"]), int(attrs["chunk_rows"])
            self._parts = [part_arrays(self.dir, store, p, self.dim, C) for p in attrs["parts"]]
        except (KeyError, TypeError, ValueError) as e:
            raise corrupt(self.store, self.dir / "zarr.json", f"manifest incomplete ({type(e).__name__}: {e})") from None
        self._off = np.cumsum([0] + [int(p["rows"]) for p in attrs["parts"]])
        self._tables: tuple[list[np.ndarray], list[np.ndarray]] | None = None
        self._faiss: Any = None
        self._local: threading.local | None = None       # per-thread re-scoring buffers (not pickled)

    @classmethod
    def open(cls, store: str | os.PathLike, name: str) -> "RetrievalIndex":
        """FileNotFoundError when the store has no index ``name``; StoreCorruptError naming the file when its
        metadata is damaged (data chunks are checked when first used, or all by `verify`)."""
        return cls(str(store), name, read_manifest(str(store), name))

    def __len__(self) -> int:
        return int(self._off[-1])

    def __repr__(self) -> str:
        return f"RetrievalIndex({self.store!r}, {self.name!r}, kind={self.kind}, rows={len(self)}, dim={self.dim})"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_faiss": None, "_tables": None, "_local": None}

    # ------------------------------------------------------------------ rows, keys, segments
    def _gather(self, name: str, rows: np.ndarray, out: np.ndarray | None = None,
                scratch: np.ndarray | None = None) -> np.ndarray:
        """``name`` values of global ``rows`` (int64, >= 0), across parts (into ``out`` when given)."""
        if len(self._parts) == 1:
            return self._parts[0][name].take(rows, out, scratch)
        P = self._parts[0][name]
        out = np.empty((len(rows), *P.shape[1:]), P.dtype) if out is None else out
        part = np.searchsorted(self._off, rows, side="right") - 1
        for p in np.unique(part).tolist():
            sel = part == p
            out[sel] = self._parts[p][name].take(rows[sel] - self._off[p])
        return out

    def _load_tables(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per part: its "<split>/<segment>" strings (m,) and their global segment-name ids (m,) int64."""
        if self._tables is None:
            heads, gids, ids = [], [], {}
            for P in self._parts:
                h = np.array([bytes(r).rstrip(b"\0").decode("ascii", "replace") for r in P["segments"].read()], object)
                try:
                    g = [ids.setdefault(parse_key(f"{x}:0").segment, len(ids)) for x in h]
                except InvalidKeyError as e:
                    raise corrupt(self.store, P["segments"].dir, f"not a key prefix ({e})") from None
                heads.append(h)
                gids.append(np.array(g, np.int64))
            self._tables, self._seg_ids = (heads, gids), ids
        return self._tables

    def keys_of(self, rows: np.ndarray) -> np.ndarray:
        """Keys (str array) of global ``rows`` (int64); "" where a row is -1."""
        rows = np.asarray(rows, np.int64).ravel()
        out = np.full(len(rows), "", object)
        ok = rows >= 0
        if ok.any():
            heads = self._load_tables()[0]
            seg, start = self._gather("segment", rows[ok]), self._gather("start", rows[ok])
            part = np.searchsorted(self._off, rows[ok], side="right") - 1
            out[ok] = [f"{heads[p][s]}:{t}" for p, s, t in zip(part.tolist(), seg.tolist(), start.tolist())]
        return out.astype(str)

    def row_of(self, key: str) -> int | None:
        """Global row of ``key`` (None when not indexed); InvalidKeyError for a malformed key. O(N): for a few keys."""
        hit = np.flatnonzero(self.keys_of(np.arange(len(self))) == str(parse_key(key)))
        return int(hit[0]) if len(hit) else None

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """(n, D) float32 stored (unit, float16-rounded) vectors of global ``rows``."""
        return self._gather("vectors", np.asarray(rows, np.int64)).astype(np.float32)

    # ------------------------------------------------------------------ search
    def retrieve(self, queries: torch.Tensor | np.ndarray, k: int, exclude: Sequence[Exclude] | None = None, *,
                 exclude_frames: int | None = None, exact: bool | None = None, nprobe: int | None = None,
                 ef_search: int | None = None, candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar rows of each query (cosine, descending).

        queries (B, D) float (normalised here); exclude: None or B entries (see the module docstring);
        exact: True forces the exact back end on an approximate index. nprobe / ef_search / candidates override
        the faiss search parameters. Returns keys (B, k) str and similarity (B, k) float32."""
        q = torch.as_tensor(queries).detach().to("cpu", torch.float32).numpy()
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (B, {self.dim}) for retrieval index {self.name!r}, got {tuple(q.shape)}")
        norm = np.linalg.norm(q, axis=1, keepdims=True)
        if not (np.isfinite(norm).all() and (norm > 0).all()):
            raise ValueError(f"query rows {np.flatnonzero(~(np.isfinite(norm[:, 0]) & (norm[:, 0] > 0)))[:8].tolist()} "
                             "are zero or not finite: no direction to search")
        T = self.exclude_frames if exclude_frames is None else int(exclude_frames)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or T < 0:
            raise ValueError(f"k must be a positive integer and exclude_frames >= 0, got {k!r} and {T}")
        qg, qs = self._exclusions(exclude, len(q))
        q = np.ascontiguousarray(q / norm, np.float32)
        over = (2 * T + 1) * int(self.attrs["max_splits_per_segment"]) if (qg != -1).any() else 0
        f = self.attrs.get("faiss") or {}
        kp = max(RERANK * int(k), int(candidates if candidates is not None else f.get("candidates", LEGACY["candidates"])))
        if exact or (exact is None and (self.kind == "exact" or kp + over > MAX_CANDIDATES)):
            rows, sims = self._search_exact(q, int(k), qg, qs, T)
        else:
            rows, sims = self._search_faiss(q, int(k), kp + over, qg, qs, T, nprobe, ef_search)
        return self.keys_of(rows).reshape(rows.shape), sims

    def _exclusions(self, exclude: Sequence[Exclude] | None, B: int) -> tuple[np.ndarray, np.ndarray]:
        """Per query: the global segment-name id to exclude (-1: none, -2: a segment not in the index) and start."""
        qg, qs = np.full(B, -1, np.int64), np.zeros(B, np.int64)
        if exclude is None:
            return qg, qs
        if len(exclude) != B:
            raise ValueError(f"exclude has {len(exclude)} entries for {B} queries")
        self._load_tables()
        for b, e in enumerate(exclude):
            if e is None:
                continue
            if isinstance(e, str):
                e = parse_key(e)
            seg, start = (e.segment, e.start) if isinstance(e, SampleKey) else e
            validate_part(seg, "segment")
            if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
                raise ValueError(f"exclude[{b}]: start must be a non-negative integer, got {start!r}")
            qg[b], qs[b] = self._seg_ids.get(seg, -2), int(start)
        return qg, qs

    def _excluded(self, rows: np.ndarray, qg: np.ndarray, qs: np.ndarray, T: int) -> np.ndarray:
        """(B, n) bool: row ``rows[b, j]`` (global, >= 0) is in query b's segment within +-T frames."""
        flat = rows.ravel()
        gids = self._load_tables()[1]
        part = np.searchsorted(self._off, flat, side="right") - 1
        g = np.empty(len(flat), np.int64)
        seg = self._gather("segment", flat)
        for p in np.unique(part).tolist():
            g[part == p] = gids[p][seg[part == p]]
        g, s = g.reshape(rows.shape), self._gather("start", flat).reshape(rows.shape)
        return (g == qg[:, None]) & (np.abs(s - qs[:, None]) <= T)

    def _search_exact(self, q: np.ndarray, k: int, qg: np.ndarray, qs: np.ndarray, T: int
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Chunk by chunk: (B, C) similarities, excluded rows -inf, top k merged with the best so far."""
        B, qt = len(q), torch.from_numpy(q)
        best_s, best_r = torch.full((B, k), -np.inf), torch.full((B, k), -1, dtype=torch.int64)
        excl = qg >= 0
        for p, P in enumerate(self._parts):
            V, n = P["vectors"], P["vectors"].shape[0]
            for c in range(V.n_chunks):
                a, m = c * V.chunk_rows, min(V.chunk_rows, n - c * V.chunk_rows)
                s = qt @ torch.from_numpy(V.chunk(c)[:m].astype(np.float32)).T            # (B, m)
                if excl.any():
                    seg = self._load_tables()[1][p][P["segment"].chunk(c)[:m]]
                    cols = np.flatnonzero(np.isin(seg, qg[excl]))
                    if len(cols):
                        rows = np.broadcast_to(self._off[p] + a + cols, (B, len(cols)))
                        bi, ci = np.nonzero(self._excluded(rows, qg, qs, T))
                        s[torch.from_numpy(bi), torch.from_numpy(cols[ci])] = -np.inf
                vals, idx = torch.topk(s, min(k, m), dim=1)
                best_s, j = torch.topk(torch.cat([best_s, vals], 1), k, dim=1)
                best_r = torch.gather(torch.cat([best_r, idx + int(self._off[p] + a)], 1), 1, j)
        best_r[torch.isinf(best_s)] = -1
        return best_r.numpy(), best_s.numpy().astype(np.float32)

    def _faiss_index(self) -> Any:
        if self._faiss is None:
            f = self.attrs["faiss"]
            path = blob_array(self.dir, self.store, f["node"], int(f["bytes"])).blob_path()    # crc32c checked
            self._faiss = load_faiss(path, self.store, len(self), self.dim)
        return self._faiss

    def _buffers(self, n: int) -> tuple[np.ndarray, ...]:
        """This thread's (n, D) float16, float16 and float32 scratch rows for re-scoring (reused: no page faults)."""
        if self._local is None:
            self._local = threading.local()
        have = getattr(self._local, "bufs", None)
        if have is None or len(have[0]) < n:
            have = self._local.bufs = tuple(np.empty((n, self.dim), t) for t in (np.float16, np.float16, np.float32))
        return tuple(b[:n] for b in have)

    def _search_faiss(self, q: np.ndarray, k: int, kp: int, qg: np.ndarray, qs: np.ndarray, T: int,
                      nprobe: int | None, ef_search: int | None) -> tuple[np.ndarray, np.ndarray]:
        """kp faiss candidates (-1 beyond its rows), re-scored from the stored rows, exclusions dropped, top k."""
        cand = search_candidates(self._faiss_index(), self.kind, self.attrs["faiss"], q, kp, nprobe, ef_search)
        valid = cand >= 0
        safe = np.where(valid, cand, 0)
        v16, scratch, v32 = self._buffers(safe.size)
        self._gather("vectors", safe.ravel(), out=v16, scratch=scratch)
        torch.from_numpy(v32).copy_(torch.from_numpy(v16))          # float16 -> float32, vectorised
        sims = np.matmul(v32.reshape(*cand.shape, self.dim), q[:, :, None])[:, :, 0]
        sims[~valid] = -np.inf
        if (qg >= 0).any():
            sims[self._excluded(safe, qg, qs, T)] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < kp else np.broadcast_to(np.arange(kp), (len(q), kp))
        order = np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, 1), axis=1, kind="stable"), 1)
        rows, best = np.take_along_axis(safe, order, 1), np.take_along_axis(sims, order, 1).astype(np.float32)
        rows[np.isinf(best)] = -1
        return rows, best

    # ------------------------------------------------------------------ integrity
    def verify(self) -> list[str]:
        """Every problem found reading every byte of the index (chunk checksums, faiss file); [] = sound."""
        f = self.attrs.get("faiss")
        problems: list[str] = []
        for A in [A for P in self._parts for A in P.values()] + ([blob_array(self.dir, self.store, f["node"],
                                                                             int(f["bytes"]))] if f else []):
            try:
                A.check_all()
            except StoreError as e:
                problems.append(str(e))
        if not problems:                   # the key tables parse (StoreCorruptError otherwise)
            self._tables = None
            self._load_tables()
        return problems


def verify_indexes(store: str | os.PathLike, store_keys: Sequence[str] | None = None) -> list[str]:
    """Problems of every retrieval index of ``store`` ([] = all sound): damaged bytes, and with ``store_keys``
    (the store's complete keys) indexed keys without a complete row (a split removed since the build)."""
    out: list[str] = []
    for name in list_indexes(store):
        try:
            index = RetrievalIndex.open(store, name)
            problems = index.verify()
            out += [f"retrieval index {name!r}: {p}" for p in problems]
            if store_keys is not None and not problems:
                keys = index.keys_of(np.arange(len(index)))
                gone = keys[~np.isin(keys.astype("S"), np.array(list(store_keys), "S"))]
                out += [f"retrieval index {name!r}: {len(gone)} indexed keys have no complete row in the store (first: "
                        f"{gone[:5].tolist()}); rebuild it (build --replace)"] if len(gone) else []
        except StoreError as e:
            out.append(f"retrieval index {name!r}: {e}")
    return out


def build_index(store: str | os.PathLike, name: str, vectors: torch.Tensor | np.ndarray,
                keys: Sequence[str] | None = None, *, kind: str = "exact", exclude_frames: int | None = None,
                replace: bool = False, chunk_rows: int | None = None, source: str = "", fsync: bool = True,
                meta: dict[str, Any] | None = None, **params: int | None) -> RetrievalIndex:
    """Build index ``name`` of ``store`` from ``vectors`` (N, D) of ``keys`` (N keys with complete rows in the
    store; default: the store's complete keys in row order). ``kind`` exact | faiss-ivf | faiss-hnsw;
    ``params`` (nlist, nprobe, codec, coarse, candidates; hnsw_m, ef_construction, ef_search) override
    `stores.retrieval.faiss_index.faiss_params`. ``exclude_frames``:
    the default T of exclusions (default the store's seq_len). ``meta``: the caller's JSON-ready description
    of the vectors (e.g. how queries are built), kept as ``index.attrs["meta"]``. FileExistsError when it
    exists, unless ``replace``. Written under a temporary name and renamed into place. ``source`` names the input in errors."""
    store = str(store)
    validate_part(name, "index name")
    fp = faiss_params(kind, len(vectors), params, dim=int(getattr(vectors, "shape", (0, 0))[-1]))
    final = index_dir(store, name)
    if final.exists() and not replace:
        raise FileExistsError(f"{final} exists: retrieval index {name!r} is built already; append rows (--append) "
                              "or rebuild it (--replace)")
    store_keys, schema = open_bank_keys(store)
    keys = [k.decode() for k in store_keys] if keys is None else list(keys)
    where = f"retrieval index {name!r} of {store}" + (f" from {source}" if source else "")
    rows = prepare_rows(vectors, keys, where)
    check_in_store(keys, store_keys, where, store)
    T = schema.seq_len if exclude_frames is None else int(exclude_frames)
    if T < 0:
        raise ValueError(f"exclude_frames must be >= 0, got {T}")
    ensure_root(store, fsync)
    remove_stale_temps(final)
    attrs: dict[str, Any] = {"format": FORMAT, "version": VERSION, "name": name, "kind": kind, "dim": rows[0].shape[1],
                             "metric": "cosine", "dtype": "float16", "exclude_frames": T, "parts": [], "faiss": None,
                             "chunk_rows": int(chunk_rows or default_chunk_rows(rows[0].shape[1])), "meta_crc32c": {},
                             "max_splits_per_segment": splits_per_segment(rows[3]), "created": now_iso(),
                             "meta": dict(meta or {})}
    tmp, old = Path(temp_sibling(final)), None
    try:
        tmp.mkdir()
        add_part(tmp, attrs, rows, fsync)
        if kind != "exact":
            add_faiss(tmp, attrs, faiss_blob(kind, rows[0], fp), fp, fsync)
        write_manifest(tmp, {**attrs, "updated": attrs["created"]}, fsync)
        if final.exists():
            old = temp_sibling(final)
            os.rename(final, old)
        if not publish(str(tmp), str(final)):
            raise FileExistsError(f"{final} was created by another process meanwhile")
    finally:
        remove_path(tmp)
        if old:
            remove_path(old)
    return RetrievalIndex.open(store, name)


def append_index(store: str | os.PathLike, name: str, vectors: torch.Tensor | np.ndarray, keys: Sequence[str], *,
                 source: str = "", fsync: bool = True) -> RetrievalIndex:
    """Add rows (a new part) to index ``name``: ``vectors`` (n, D) of n new ``keys`` (complete in the store, not
    indexed yet). A faiss index gets the rows added (an IVF keeps its trained lists: rebuild with ``replace``
    when the new rows are distributed differently). The manifest is replaced atomically last."""
    store = str(store)
    idx = RetrievalIndex.open(store, name)
    store_keys, _ = open_bank_keys(store)
    where = f"retrieval index {name!r} of {store}" + (f" from {source}" if source else "")
    rows = prepare_rows(vectors, keys, where)
    if rows[0].shape[1] != idx.dim:
        raise ValueError(f"{where}: vectors have dimension {rows[0].shape[1]}, the index {idx.dim}")
    check_in_store(keys, store_keys, where, store)
    have = np.flatnonzero(np.isin(np.array(list(keys), "S"), idx.keys_of(np.arange(len(idx))).astype("S")))
    if len(have):
        raise ValueError(f"{where}: {len(have)} keys are indexed already (first: {[keys[i] for i in have[:5]]})")
    attrs = {k: v for k, v in idx.attrs.items() if k != "crc32c"}
    attrs["parts"], attrs["meta_crc32c"] = list(attrs["parts"]), dict(attrs["meta_crc32c"])
    add_part(idx.dir, attrs, rows, fsync)
    old = attrs["faiss"]
    if old:
        base = blob_array(idx.dir, store, old["node"], int(old["bytes"])).blob_path()
        keep = {k: old.get(k, LEGACY.get(k)) for k in faiss_params(idx.kind, 1, dim=idx.dim)}
        add_faiss(idx.dir, attrs, faiss_blob(idx.kind, rows[0], keep, base), keep, fsync)
        attrs["meta_crc32c"] = {k: v for k, v in attrs["meta_crc32c"].items() if not k.startswith(old["node"] + "/")}
    heads = [h for t in idx._load_tables()[0] for h in t] + rows[3]
    write_manifest(idx.dir, {**attrs, "max_splits_per_segment": splits_per_segment(heads), "updated": now_iso()}, fsync)
    if old:
        remove_path(idx.dir / old["node"])
    return RetrievalIndex.open(store, name)
