"""The retrieval index of a memorybank, built, queried and verified: the one command line of an index,
``python -m pipelines.retrieval_index build|query|verify`` (its config :class:`RetrievalIndexConfig`, one
field per flag, ``command`` the sub-command).

    build_retrieval_index(RetrievalIndexConfig(store="mb.zarr", data_root="data/synth", query="pose"))
    index, keys, sims, T = query_index(RetrievalIndexConfig(command="query", store="mb.zarr", key=KEY, k=8))
    names, problems = verify_index(RetrievalIndexConfig(command="verify", store="mb.zarr"))

A build indexes every complete row of the store by its window's ``query`` vector (``state``, ``pose`` from the
dataset's data.csv; ``student`` from the store's own bev_vec rows; ``e2r.workflow.retrieval_queries``), or by
caller-made vectors (``vectors``: a .npy (N, D) matrix and optionally a keys file; ``append`` adds rows). The
index itself (format, back ends, exclusion, checksums) is ``stores.retrieval``; what trains from it is
``e2r.workflow.retrieval_kd``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from e2r.cli_config import option
from e2r.data.datasets import LidarSequenceDataset, window_controls
from e2r.data.layout import SegmentTable
from e2r.errors import ConfigError, check_positive
from e2r.workflow.retrieval_queries import (POSE_DEFAULTS, QUERY_KINDS, pose_vectors, state_vectors,
                                            student_vectors, window_poses)
from stores import open_memorybank
from stores.keys import parse_key
from stores.retrieval import (KINDS, RetrievalIndex, append_index, build_index, list_indexes, load_inputs,
                              verify_indexes)
from stores.torch_data import TeacherRowReader

__all__ = ["COMMANDS", "FAISS_PARAMS", "RetrievalIndexConfig", "build_retrieval_index", "query_index",
           "verify_index"]

#: the sub-commands of ``python -m pipelines.retrieval_index``
COMMANDS = ("build", "query", "verify")
#: parameters of the approximate (faiss) back ends, passed to ``stores.retrieval.build_index``
FAISS_PARAMS = ("nlist", "nprobe", "codec", "coarse", "candidates", "hnsw_m", "ef_construction", "ef_search")
_READ_CHUNK = 4096        # store rows read at once when indexing bev_vec
_BUILD: dict = {"build": {}}
_FAISS_HELP = "faiss parameter (default: measured, docs/STORE.md)"


@dataclass(kw_only=True)
class RetrievalIndexConfig:
    """``python -m pipelines.retrieval_index build|query|verify`` (field names equal the flags)."""

    command: str = "build"          # the sub-command (COMMANDS)
    store: str = option(help="memorybank written by pipelines.export (a Zarr directory)")
    # ---- build
    data_root: Optional[str] = option(None, commands=_BUILD, help="the dataset the store was exported from (needed "
                                                                  "by --query state and pose)")
    query: str = option("state", choices=QUERY_KINDS, commands=_BUILD, help="what is compared (default %(default)s)")
    vectors: Optional[str] = option(None, commands=_BUILD, help="index these vectors instead of --query ones: a .npy "
                                                                "(N, D) float matrix, one row per key (--name needed)")
    keys: Optional[str] = option(None, commands=_BUILD, help="with --vectors: a text file of the N keys, one per line "
                                                             "in row order (default: the store's complete keys)")
    append: bool = option(False, commands=_BUILD, help="with --vectors and --keys: add these rows to the existing "
                                                       "index (a new part)")
    name: Optional[str] = option(None, commands={"build": {}, "query": {"help": "index name (default state)"}},
                                 help="index name inside the store (default: the query kind, e.g. state, pose, "
                                      "student)")
    kind: str = option("exact", choices=KINDS, commands=_BUILD, help="exact (chunked torch.topk; default) or an "
                                                                     "approximate faiss index for large stores")
    replace: bool = option(False, commands=_BUILD, help="rebuild an existing index of this name")
    pose_sigma_xy: float = option(float(POSE_DEFAULTS["sigma_xy"]), commands=_BUILD,
                                  help="pose: distance scale in metres (similarity exp(-d^2 / 2 sigma^2); default "
                                       "%(default)s)")
    pose_sigma_yaw: float = option(float(POSE_DEFAULTS["sigma_yaw"]), commands=_BUILD,
                                   help="pose: heading scale (similarity exp(-(1 - cos dyaw) / sigma^2); default "
                                        "%(default)s)")
    pose_features: int = option(int(POSE_DEFAULTS["features"]), commands=_BUILD,
                                help="pose: random Fourier frequencies M (vector 2 M per frame; default %(default)s)")
    pose_frames: int = option(int(POSE_DEFAULTS["frames"]), commands=_BUILD,
                              help="pose: the window's last n frames compared frame by frame (default %(default)s: "
                                   "the decision time only)")
    nlist: Optional[int] = option(None, commands=_BUILD, group="faiss", help=_FAISS_HELP + ": IVF lists")
    nprobe: Optional[int] = option(None, commands=_BUILD, group="faiss", help=_FAISS_HELP + ": IVF lists searched")
    codec: Optional[str] = option(None, commands=_BUILD, group="faiss",
                                  help=_FAISS_HELP + ": the IVF codes, a faiss factory suffix (SQ8, PQ64x4fsr)")
    coarse: Optional[str] = option(None, commands=_BUILD, group="faiss",
                                   help=_FAISS_HELP + ": the IVF coarse quantizer (flat, HNSW32, PQ128x4fs)")
    candidates: Optional[int] = option(None, commands=_BUILD, group="faiss",
                                       help=_FAISS_HELP + ": candidates re-scored exactly per query")
    hnsw_m: Optional[int] = option(None, commands=_BUILD, group="faiss", help=_FAISS_HELP + ": HNSW links per node")
    ef_construction: Optional[int] = option(None, commands=_BUILD, group="faiss",
                                            help=_FAISS_HELP + ": HNSW build breadth")
    ef_search: Optional[int] = option(None, commands=_BUILD, group="faiss", help=_FAISS_HELP + ": HNSW search "
                                                                                            "breadth")
    # ---- build and query
    exclude_frames: Optional[int] = option(None, commands={"build": {}, "query": {}},
                                           help="T: rows of the query key's segment within +-T frames are excluded "
                                                "(build: the index's default, else the store's seq_len; query: "
                                                "default the index's)")
    # ---- query
    key: Optional[str] = option(None, commands={"query": {"required": True}},
                                help="an indexed key whose neighbours to print (its own vector is the query), e.g. "
                                     "train/segment_0001:123")
    k: int = option(8, commands={"query": {}}, help="neighbours to print (default %(default)s)")
    exact: bool = option(False, commands={"query": {}}, help="exact search on an approximate index")

    def check(self) -> None:
        """ConfigError naming the flag for values that cannot work."""
        if self.command not in COMMANDS:
            raise ConfigError(f"command {self.command!r}: choose from {', '.join(COMMANDS)}")
        if self.query not in QUERY_KINDS:
            raise ConfigError(f"--query {self.query!r}: choose from {', '.join(QUERY_KINDS)}")
        if self.kind not in KINDS:
            raise ConfigError(f"--kind {self.kind!r}: choose from {', '.join(KINDS)}")
        check_positive(self, ("pose_features", "pose_frames", "k"))
        for name in ("pose_sigma_xy", "pose_sigma_yaw"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.exclude_frames is not None and self.exclude_frames < 0:
            raise ConfigError(f"--exclude_frames must be >= 0, got {self.exclude_frames}")
        if self.command == "query" and not self.key:
            raise ConfigError("query needs --key (an indexed key, e.g. train/segment_0001:123)")
        if self.command != "build":
            return
        if self.vectors is None:
            if self.keys or self.append:
                raise ConfigError("--keys and --append go with --vectors (caller-made vectors)")
            if self.query != "student" and not self.data_root:
                raise ConfigError(f"--query {self.query} needs --data_root (the dataset the store was exported from)")
        else:
            if not self.name:
                raise ConfigError("--vectors needs --name (what the vectors are is yours to name)")
            if self.append and (self.keys is None or self.replace):
                raise ConfigError("--append needs --keys (the new rows' keys) and excludes --replace")

    @property
    def index_name(self) -> str:
        return self.name or ("state" if self.command == "query" else self.query)

    def pose_params(self) -> dict[str, Any]:
        return {"sigma_xy": self.pose_sigma_xy, "sigma_yaw": self.pose_sigma_yaw, "features": self.pose_features,
                "frames": self.pose_frames, "seed": int(POSE_DEFAULTS["seed"])}

    def faiss_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FAISS_PARAMS}


def _store_tables(cfg: RetrievalIndexConfig, keys: Sequence[str], T: int) -> dict[tuple[str, str], SegmentTable]:
    """{(split, segment): table} of the data root for the store's keys (ValueError naming a missing window)."""
    tables: dict[tuple[str, str], SegmentTable] = {}
    for split in sorted({parse_key(k).split for k in keys}):
        ds = LidarSequenceDataset(str(cfg.data_root), split, seq_len=T)
        tables.update({(split, seg): table for seg, table in ds.tables.items()})
    for key in keys:
        k = parse_key(key)
        table = tables.get((k.split, k.segment))
        if table is None or k.start + T > table.num_frames:
            raise ValueError(f"store key {key!r} has no window of {T} frames in {cfg.data_root} (is it the dataset "
                             f"the store was exported from?)")
    return tables


def _query_vectors(cfg: RetrievalIndexConfig, keys: list[str], T: int) -> tuple[torch.Tensor, dict[str, Any], str]:
    """(vectors (N, D), meta, source) of ``cfg.query`` for the store's complete ``keys``."""
    meta: dict[str, Any] = {"query": cfg.query, "seq_len": T}
    if cfg.query == "student":
        reader = TeacherRowReader(cfg.store, ("bev_vec",))
        vectors = torch.cat([student_vectors(reader.read(keys[i:i + _READ_CHUNK])["bev_vec"])
                             for i in range(0, len(keys), _READ_CHUNK)])
        meta["reduce"] = "mean over T"
        return vectors, meta, f"{cfg.store} (bev_vec of {len(keys)} rows)"
    tables = _store_tables(cfg, keys, T)
    source = f"{cfg.data_root} ({cfg.query} of {len(keys)} windows)"
    if cfg.query == "pose":
        if cfg.pose_frames > T:
            raise ConfigError(f"--pose_frames {cfg.pose_frames} exceeds the store's seq_len {T}")
        pose, maps = window_poses(tables, keys, T)
        meta["pose"] = cfg.pose_params()
        meta["maps"] = len(set(maps))
        return pose_vectors(pose, maps, meta["pose"]), meta, source
    speed, steering = np.zeros((len(keys), T), np.float32), np.zeros((len(keys), T), np.float32)
    for i, key in enumerate(keys):
        k = parse_key(key)
        w = window_controls(tables[(k.split, k.segment)], k.start, T)
        speed[i], steering[i] = w["speed"].numpy(), w["steering"].numpy()
    meta["stats"] = {"speed_mean": float(speed.mean()), "speed_std": float(max(speed.std(), 1e-3)),
                     "steering_mean": float(steering.mean()), "steering_std": float(max(steering.std(), 1e-3))}
    return state_vectors(torch.from_numpy(speed), torch.from_numpy(steering), meta["stats"]), meta, source


def build_retrieval_index(cfg: RetrievalIndexConfig) -> RetrievalIndex:
    """Build (or with ``append`` add to) index ``cfg.index_name`` of ``cfg.store``: every complete row by its
    window's ``cfg.query`` vector (ValueError naming a store key whose segment the dataset lacks, or for
    ``pose`` the csv without pose columns), or the rows of ``cfg.vectors`` / ``cfg.keys``."""
    cfg.check()
    if cfg.vectors is not None:
        vectors, keys = load_inputs(cfg.vectors, cfg.keys)
        source = cfg.vectors + (f" + {cfg.keys}" if cfg.keys else "")
        if cfg.append:
            return append_index(cfg.store, cfg.index_name, vectors, keys, source=source)
        return build_index(cfg.store, cfg.index_name, vectors, keys, kind=cfg.kind, replace=cfg.replace,
                           source=source, exclude_frames=cfg.exclude_frames, **cfg.faiss_params())
    bank = open_memorybank(cfg.store, mode="r")
    store_keys, T = list(bank.keys()), bank.schema.seq_len
    if not store_keys:
        raise ValueError(f"{cfg.store}: no complete row to index")
    vectors, meta, source = _query_vectors(cfg, store_keys, T)
    return build_index(cfg.store, cfg.index_name, vectors, store_keys, kind=cfg.kind, replace=cfg.replace,
                       source=source, meta=meta, exclude_frames=cfg.exclude_frames, **cfg.faiss_params())


def query_index(cfg: RetrievalIndexConfig) -> tuple[RetrievalIndex, np.ndarray, np.ndarray, int]:
    """(index, neighbour keys (k,) str ("" = none), similarities (k,), frames excluded T) of ``cfg.key``, its own
    stored vector the query; ValueError when the key is not indexed."""
    cfg.check()
    index = RetrievalIndex.open(cfg.store, cfg.index_name)
    row = index.row_of(str(cfg.key))
    if row is None:
        raise ValueError(f"key {cfg.key!r} is not in retrieval index {cfg.index_name!r} of {cfg.store} "
                         f"({len(index)} keys)")
    T = index.exclude_frames if cfg.exclude_frames is None else cfg.exclude_frames
    keys, sims = index.retrieve(index.vectors(np.array([row])), cfg.k, exclude=[cfg.key], exclude_frames=T,
                                exact=cfg.exact or None)
    return index, keys[0], sims[0], T


def verify_index(cfg: RetrievalIndexConfig) -> tuple[list[str], list[str]]:
    """(names of the store's retrieval indexes, problems: [] = every byte sound)."""
    cfg.check()
    return list_indexes(cfg.store), verify_indexes(cfg.store)
