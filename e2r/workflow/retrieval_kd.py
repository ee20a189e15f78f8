"""KD from retrieved teacher situations (MemDistill v2): a camera window whose key has no row in the memorybank
(camera and LiDAR not recorded together, other laps, other tracks) is distilled from the teacher rows of the
most similar situations, found in the store's retrieval index (``stores.retrieval``), mixed by
``softmax(similarity / tau)`` and used only when the best similarity reaches ``min_similarity``.

    python -m pipelines.retrieval_index build --store mb.zarr --data_root data/synth --query pose   # once
    retriever = Retriever("mb.zarr", "pose", k=8, tau=0.05, min_similarity=0.9)   # kind from the index meta
    mixed, used, best = retriever.targets(reader, batch, exclude_keys)            # rows (B, ...), (B,), (B,)

Query kinds (:data:`QUERY_KINDS`, vectors in ``e2r.workflow.retrieval_queries``): ``state`` (speed/steering
history; ``batch`` needs "speed", "steering" (B, T)), ``pose`` (place and heading on the same map; "pose"
(B, T, 3) and "map" [B], from the camera dataset's own data.csv by :meth:`Retriever.window_inputs`) and
``student`` (the student's bev_vec against the teacher's; "bev_vec" (B, T, D): known only after the
student's forward, so ``Retriever.at_load`` is False and :func:`retrieve_for_student` runs in the training
step). An index is built by ``python -m pipelines.retrieval_index build --query KIND``
(``e2r.workflow.retrieval_index``; index name = the kind by default) and records its kind and parameters in
its meta; a query is always built with the index's own. A retrieved row never comes from the query's own
segment within +-T frames (``stores.retrieval`` exclusion), so a sample cannot retrieve its own pair.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from e2r.data.layout import SegmentTable
from e2r.errors import ConfigError, check_positive
from e2r.metrics import ActionErrorAccumulator
from e2r.workflow.retrieval_queries import QUERY_KINDS, pose_vectors, state_vectors, student_vectors, window_poses
from stores.retrieval import RetrievalIndex
from stores.torch_data import TeacherRowReader

__all__ = ["QUERY_KINDS", "state_vectors", "Retriever", "apply_retrieved", "retrieve_for_student", "RetrievalCheck"]

_WHOLE = 10 ** 9          # exclude_frames that covers any segment


class Retriever:
    """Teacher targets for unpaired windows from index ``name`` of ``store``: the ``k`` most similar rows,
    mixed by ``softmax(similarity / tau)``; a window whose best similarity is below ``min_similarity`` gets
    none. ``whole_segment``: never retrieve from the query's own segment at all (the unpaired experiment:
    its own drive's LiDAR rows do not exist). The query kind and its parameters come from the index meta.
    Opens the index lazily (fork-safe, like the row reader)."""

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
                raise ConfigError(f"--kd_retrieval {self.name}: {e}. Build it: python -m pipelines.retrieval_index "
                                  f"build --store {self.store} --query state|pose|student [--data_root DATA] "
                                  f"[--name {self.name}]") from None
            meta = self._index.attrs.get("meta") or {}
            if meta.get("query") not in QUERY_KINDS:
                raise ValueError(f"retrieval index {self.name!r} of {self.store} was not built by "
                                 f"pipelines.retrieval_index (no known query recorded): rebuild it with that command")
        return self._index

    @property
    def meta(self) -> dict[str, Any]:
        return self.index.attrs["meta"]

    @property
    def kind(self) -> str:
        """The query kind of the index: state | pose | student."""
        return str(self.meta["query"])

    @property
    def at_load(self) -> bool:
        """True when the query is known when the window is loaded (state, pose); False for ``student``, whose
        query is the student's own bev_vec: retrieved in the training step (:func:`retrieve_for_student`)."""
        return self.kind != "student"

    def check(self, seq_len: int) -> None:
        """ValueError when the index cannot serve windows of ``seq_len`` frames."""
        if int(self.meta["seq_len"]) != int(seq_len):
            raise ValueError(f"retrieval index {self.name!r} of {self.store} holds windows of {self.meta['seq_len']} "
                             f"frames, the dataset --seq_len {seq_len}")

    def window_inputs(self, tables: Mapping[str, SegmentTable], keys: Sequence[str]) -> dict[str, Any]:
        """What this kind's query needs besides the batch's own tensors, from the windows' segment tables
        (the camera dataset's ``tables`` {segment: table}): ``pose`` -> {"pose" (B, T, 3), "map" [B]} (ValueError
        naming a csv without pose columns); other kinds -> {}."""
        if self.kind != "pose":
            return {}
        pose, maps = window_poses(tables, keys, int(self.meta["seq_len"]))
        return {"pose": pose, "map": maps}

    def query(self, batch: Mapping[str, Any]) -> Tensor:
        """(B, D) query vectors of B windows: ``state`` from "speed", "steering" (B, T); ``pose`` from "pose"
        (B, T, 3) and "map" [B]; ``student`` from "bev_vec" (B, T, D) (the student's)."""
        kind, meta = self.kind, self.meta
        missing = [f for f in {"state": ("speed", "steering"), "pose": ("pose", "map"),
                               "student": ("bev_vec",)}[kind] if f not in batch]
        if missing:
            raise ValueError(f"retrieval index {self.name!r} ({kind} query) needs {missing} in the batch")
        if kind == "state":
            return state_vectors(batch["speed"].cpu(), batch["steering"].cpu(), meta["stats"])
        if kind == "pose":
            return pose_vectors(batch["pose"].cpu(), batch["map"], meta["pose"])
        return student_vectors(batch["bev_vec"].detach().cpu())

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_index"] = None
        return d

    def targets(self, reader: TeacherRowReader, batch: Mapping[str, Any], exclude: Sequence[str]
                ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """For B windows (``batch``: what :meth:`query` needs, (B, ...) each; ``exclude``: their keys, so that
        their own segment within +-T frames is never retrieved): ``(rows {field: (B, T, ...)} mixed targets,
        used (B,) bool, best (B,) float32 best similarity)``, on the CPU. Rows of unused windows are zeros."""
        keys, sims = self.index.retrieve(self.query(batch), self.k, exclude=list(exclude),
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


def apply_retrieved(batch: dict[str, Any], idx: Tensor, rows: Mapping[str, Tensor], used: Tensor,
                    best: Tensor) -> None:
    """Write retrieval results of the windows ``idx`` (n,) into ``batch`` in place (on the batch's device):
    ``teacher`` targets and ``has_kd`` / ``retrieved`` of the used ones, ``retrieval_similarity`` of all n."""
    dev = batch["has_kd"].device
    idx = idx.to(dev)
    batch["retrieval_similarity"][idx] = best.to(batch["retrieval_similarity"].device)
    take = idx[used.to(dev)]
    for name, value in rows.items():
        if name in batch["teacher"]:
            target = batch["teacher"][name]
            target[take] = value[used].to(target.device, target.dtype)
    batch["has_kd"][take] = True
    batch["retrieved"][take] = True


def retrieve_for_student(retriever: Retriever, reader: TeacherRowReader, batch: dict[str, Any],
                         aux: Mapping[str, Tensor]) -> None:
    """``student`` retrieval in the training step (``e2r.kd.student_losses(after_forward=)``): the windows
    without a row (``~has_kd & ~damaged``) query the index with their mean bev_vec from the loss's own forward
    (``aux["bev_vec_seq"]`` (B, T, D), detached); the retrieved targets are written into ``batch`` (on its
    device) by :func:`apply_retrieved` before the KD terms are taken. A no-op for other kinds."""
    if retriever.at_load:
        return
    B = len(batch["keys"])
    batch.setdefault("retrieved", torch.zeros(B, dtype=torch.bool, device=batch["has_kd"].device))
    batch.setdefault("retrieval_similarity", torch.full((B,), float("nan"), device=batch["has_kd"].device))
    idx = torch.nonzero(~batch["has_kd"] & ~batch["damaged"].to(batch["has_kd"].device)).flatten()
    if len(idx) == 0:
        return
    rows, used, best = retriever.targets(reader, {"bev_vec": aux["bev_vec_seq"][idx]},
                                         [batch["keys"][i] for i in idx.tolist()])
    apply_retrieved(batch, idx, rows, used, best)


class RetrievalCheck:
    """Offline check of retrieval (eval_student): the best-similarity distribution of the windows that were
    retrieved for, and, for windows that do have their own row (a true pair, held out from their own
    retrieval by the +-T exclusion), how close the retrieved targets are to the true ones.
    ``update(retriever, reader, batch, aux)`` per batch (``aux``: the student's forward outputs, needed by the
    ``student`` kind), then ``compute()``."""

    def __init__(self, overall_weights: Sequence[float]) -> None:
        self.tried: list[Tensor] = []
        self.pair_best: list[Tensor] = []
        self.actions = ActionErrorAccumulator(overall_weights)
        self.cos_sum, self.cos_n, self.used = 0.0, 0, 0

    def update(self, retriever: Retriever, reader: TeacherRowReader, batch: dict[str, Any],
               aux: Optional[Mapping[str, Tensor]] = None) -> None:
        has_kd = batch["has_kd"].cpu()
        retrieved = batch.get("retrieved", torch.zeros_like(has_kd)).cpu()
        keys = batch["keys"]
        query: dict[str, Any] = {n: batch[n] for n in ("speed", "steering", "pose", "map") if n in batch}
        if aux is not None and "bev_vec_seq" in aux:
            query["bev_vec"] = aux["bev_vec_seq"]
        if not retriever.at_load:       # no load-time retrieval: try it here for the windows without a row
            miss = torch.nonzero(~has_kd & ~batch["damaged"].cpu()).flatten()
            if len(miss):
                sub = {n: (v[miss.to(v.device)] if isinstance(v, Tensor) else [v[i] for i in miss.tolist()])
                       for n, v in query.items()}
                _, _, best = retriever.targets(reader, sub, [keys[i] for i in miss.tolist()])
                self.tried.append(best)
        else:
            sim = batch["retrieval_similarity"].cpu()
            self.tried.append(sim[~torch.isnan(sim)])
        idx = torch.nonzero(has_kd & ~retrieved).flatten()
        if len(idx) == 0:
            return
        sub = {n: (v[idx.to(v.device)] if isinstance(v, Tensor) else [v[i] for i in idx.tolist()])
               for n, v in query.items()}
        rows, used, best = retriever.targets(reader, sub, [keys[i] for i in idx.tolist()])
        self.pair_best.append(best)
        if used.any():
            true = {k: v[idx.to(v.device)][used.to(v.device)].cpu() for k, v in batch["teacher"].items()}
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
