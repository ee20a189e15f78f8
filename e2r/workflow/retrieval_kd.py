"""KD from retrieved teacher situations (MemDistill v2): a camera window whose key has no row in the memorybank
(camera and LiDAR not recorded together, other laps, other tracks) is distilled from the teacher rows of the
most similar situations, found in the store's retrieval index (``stores.retrieval``), mixed by
``softmax(similarity / tau)`` and used only when the best similarity reaches ``min_similarity``.

    build_retrieval_index(RetrievalBuild(store="mb.zarr", data_root="data/synth"))   # once, after the export
    retriever = Retriever("mb.zarr", "state", k=8, tau=0.05, min_similarity=0.9)
    mixed, best = retriever.targets(reader, speed, steering, exclude_keys)          # rows (B, ...), (B,)

Query kinds (:data:`QUERY_KINDS`): ``state`` - the window's control history, available for any recording:
measured speed (T,) and previous steering (T,), each standardised with the statistics of the indexed windows
(recorded in the index), plus a constant 1 (so a window at the mean still has a direction); cosine
similarity compares the shapes of the two histories. A retrieved row never comes from the query's own
segment within +-T frames (``stores.retrieval`` exclusion), so a sample cannot retrieve its own pair.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from e2r.data.datasets import LidarSequenceDataset, window_controls
from e2r.errors import ConfigError, check_positive
from e2r.keys import parse_key
from e2r.metrics import ActionErrorAccumulator
from stores import open_memorybank
from stores.retrieval import KINDS, RetrievalIndex, build_index
from stores.torch_data import TeacherRowReader

__all__ = ["QUERY_KINDS", "RetrievalBuild", "state_vectors", "build_retrieval_index", "Retriever", "RetrievalCheck"]

QUERY_KINDS = ("state",)
_WHOLE = 10 ** 9          # exclude_frames that covers any segment


def state_vectors(speed: Tensor, steering: Tensor, stats: dict[str, float]) -> Tensor:
    """``state`` query vectors: speed (B, T) m/s, steering (B, T) deg -> (B, 2T + 1) float32 = standardised
    speed, standardised steering, 1."""
    v = (speed.float() - stats["speed_mean"]) / stats["speed_std"]
    s = (steering.float() - stats["steering_mean"]) / stats["steering_std"]
    return torch.cat([v, s, torch.ones(v.shape[0], 1)], dim=1)


@dataclass(kw_only=True)
class RetrievalBuild:
    """``python -m pipelines.retrieval_index`` (field names equal the flags)."""

    store: str
    data_root: str
    query: str = "state"
    kind: str = "exact"
    replace: bool = False

    def check(self) -> None:
        if self.query not in QUERY_KINDS:
            raise ConfigError(f"--query {self.query!r}: choose from {', '.join(QUERY_KINDS)}")
        if self.kind not in KINDS:
            raise ConfigError(f"--kind {self.kind!r}: choose from {', '.join(KINDS)}")


def build_retrieval_index(cfg: RetrievalBuild) -> RetrievalIndex:
    """Index every complete row of ``cfg.store`` by its window's query vector, computed from the dataset at
    ``cfg.data_root`` (data.csv only; ValueError naming a store key whose segment the dataset lacks)."""
    cfg.check()
    bank = open_memorybank(cfg.store, mode="r")
    keys, T = list(bank.keys()), bank.schema.seq_len
    if not keys:
        raise ValueError(f"{cfg.store}: no complete row to index")
    tables: dict[tuple[str, str], Any] = {}
    speed, steering = np.zeros((len(keys), T), np.float32), np.zeros((len(keys), T), np.float32)
    for split in sorted({parse_key(k).split for k in keys}):
        ds = LidarSequenceDataset(cfg.data_root, split, seq_len=T)
        tables.update({(split, seg): table for seg, table in ds.tables.items()})
    for i, key in enumerate(keys):
        k = parse_key(key)
        table = tables.get((k.split, k.segment))
        if table is None or k.start + T > table.num_frames:
            raise ValueError(f"store key {key!r} has no window of {T} frames in {cfg.data_root} (is it the dataset "
                             f"the store was exported from?)")
        w = window_controls(table, k.start, T)
        speed[i], steering[i] = w["speed"].numpy(), w["steering"].numpy()
    stats = {"speed_mean": float(speed.mean()), "speed_std": float(max(speed.std(), 1e-3)),
             "steering_mean": float(steering.mean()), "steering_std": float(max(steering.std(), 1e-3))}
    vectors = state_vectors(torch.from_numpy(speed), torch.from_numpy(steering), stats)
    return build_index(cfg.store, cfg.query, vectors, keys, kind=cfg.kind, replace=cfg.replace,
                       source=f"{cfg.data_root} ({cfg.query} of {len(keys)} windows)",
                       meta={"query": cfg.query, "seq_len": T, "stats": stats})


class Retriever:
    """Teacher targets for unpaired windows from index ``name`` of ``store``: the ``k`` most similar rows,
    mixed by ``softmax(similarity / tau)``; a window whose best similarity is below ``min_similarity`` gets
    none. ``whole_segment``: never retrieve from the query's own segment at all (the unpaired experiment:
    its own drive's LiDAR rows do not exist). Opens the index lazily (fork-safe, like the row reader)."""

    def __init__(self, store: str, name: str = "state", k: int = 8, tau: float = 0.05,
                 min_similarity: float = 0.9, whole_segment: bool = False) -> None:
        self.store, self.name, self.k = str(store), name, int(k)
        self.tau, self.min_similarity = float(tau), float(min_similarity)
        self.whole_segment = bool(whole_segment)     # exclude the query's whole segment, not only +-T frames
        check_positive(self, ("k",))
        if not self.tau > 0:
            raise ConfigError(f"--kd_retrieval_tau must be > 0, got {self.tau}")
        self._index: RetrievalIndex | None = None

    @property
    def index(self) -> RetrievalIndex:
        if self._index is None:
            try:
                self._index = RetrievalIndex.open(self.store, self.name)
            except FileNotFoundError as e:
                raise ConfigError(f"--kd_retrieval {self.name}: {e}. For the state query: python -m "
                                  f"pipelines.retrieval_index --store {self.store} --data_root DATA") from None
            meta = self._index.attrs.get("meta") or {}
            if meta.get("query") not in QUERY_KINDS:
                raise ValueError(f"retrieval index {self.name!r} of {self.store} was not built by "
                                 f"pipelines.retrieval_index (no query recorded): rebuild it with that command")
        return self._index

    def check(self, seq_len: int) -> None:
        """ValueError when the index cannot serve windows of ``seq_len`` frames."""
        meta = self.index.attrs["meta"]
        if int(meta["seq_len"]) != int(seq_len):
            raise ValueError(f"retrieval index {self.name!r} of {self.store} holds windows of {meta['seq_len']} "
                             f"frames, the dataset --seq_len {seq_len}")

    def query(self, speed: Tensor, steering: Tensor) -> Tensor:
        """(B, D) query vectors of windows: speed, steering (B, T)."""
        return state_vectors(speed, steering, self.index.attrs["meta"]["stats"])

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_index"] = None
        return d

    def targets(self, reader: TeacherRowReader, speed: Tensor, steering: Tensor, exclude: Sequence[str]
                ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """For B windows (speed, steering (B, T); ``exclude``: their keys, so that their own segment within
        +-T frames is never retrieved): ``(rows {field: (B, T, ...)} mixed targets, used (B,) bool,
        best (B,) float32 best similarity)``. Rows of unused windows are zeros."""
        keys, sims = self.index.retrieve(self.query(speed, steering), self.k, exclude=list(exclude),
                                         exclude_frames=_WHOLE if self.whole_segment else None)
        B, k = keys.shape
        found = keys != ""
        best = torch.from_numpy(np.where(found[:, 0], sims[:, 0], -np.inf).astype(np.float32))
        used = best >= self.min_similarity
        flat = found.reshape(-1)
        got = reader.read([str(x) for x in keys.reshape(-1)[flat]]) if flat.any() else None
        sim = torch.from_numpy(np.where(found, sims, -np.inf).astype(np.float32))
        weight = torch.nan_to_num(torch.softmax(sim / self.tau, dim=1), nan=0.0) * used[:, None]
        out: dict[str, Tensor] = {}
        for field in reader.fields:
            r = torch.zeros((B * k, *reader.schema.row_shape(field)))
            if got is not None:
                r[torch.from_numpy(flat)] = got[field]
            r = r.reshape(B, k, *r.shape[1:])
            out[field] = (r * weight.reshape(B, k, *([1] * (r.dim() - 2)))).sum(dim=1)
        return out, used, best


class RetrievalCheck:
    """Offline check of retrieval (eval_student): the best-similarity distribution of the windows that were
    retrieved for, and, for windows that do have their own row (a true pair, held out from their own
    retrieval by the +-T exclusion), how close the retrieved targets are to the true ones.
    ``update(retriever, reader, batch)`` per batch, then ``compute()``."""

    def __init__(self, overall_weights: Sequence[float]) -> None:
        self.tried: list[Tensor] = []
        self.pair_best: list[Tensor] = []
        self.actions = ActionErrorAccumulator(overall_weights)
        self.cos_sum, self.cos_n, self.used = 0.0, 0, 0

    def update(self, retriever: Retriever, reader: TeacherRowReader, batch: dict[str, Any]) -> None:
        sim = batch["retrieval_similarity"]
        self.tried.append(sim[~torch.isnan(sim)])
        idx = torch.nonzero(batch["has_kd"] & ~batch["retrieved"]).flatten().cpu()
        if len(idx) == 0:
            return
        rows, used, best = retriever.targets(reader, batch["speed"][idx].cpu(), batch["steering"][idx].cpu(),
                                             [batch["keys"][i] for i in idx.tolist()])
        self.pair_best.append(best)
        if used.any():
            true = {k: v[idx][used].cpu() for k, v in batch["teacher"].items()}
            self.actions.update(rows["actions"][used], true["actions"])
            cos = torch.nn.functional.cosine_similarity(rows["bev_vec"][used], true["bev_vec"], dim=-1)
            self.cos_sum += float(cos.double().sum())
            self.cos_n += cos.numel()
            self.used += int(used.sum())

    def compute(self) -> dict[str, float]:
        def q(values: list[Tensor], p: float) -> float:
            v = torch.cat(values) if values else torch.empty(0)
            v = v[torch.isfinite(v)]
            return float(torch.quantile(v, p)) if len(v) else float("nan")
        pairs = int(sum(len(b) for b in self.pair_best))
        out = {"retrieved_n": float(sum(len(t) for t in self.tried)), "similarity_p10": q(self.tried, 0.1),
               "similarity_p50": q(self.tried, 0.5), "similarity_p90": q(self.tried, 0.9),
               "pairs_n": float(pairs), "pairs_used": float(self.used), "pairs_similarity_p50": q(self.pair_best, 0.5)}
        a = self.actions.compute() if self.used else {}
        out["pairs_action_overall_mse"] = a.get("overall_weighted_mse", float("nan"))
        out["pairs_bev_vec_cosine"] = self.cos_sum / self.cos_n if self.cos_n else float("nan")
        return out
