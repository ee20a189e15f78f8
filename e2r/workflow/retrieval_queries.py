"""Query vectors of the retrieval KD (``e2r.workflow.retrieval_kd``): one builder per query kind, each giving
(B, D) float32 rows whose cosine similarity means "the same situation".

``state`` - the window's control history: speed (T,) and previous steering (T,), each standardised with the
statistics of the indexed windows, plus a constant 1 (so that a window at the mean still has a direction).

``pose`` - where the car is on which track: random Fourier features (Rahimi & Recht 2007) of
``u = (x / sigma_xy, y / sigma_xy, cos(yaw) / sigma_yaw, sin(yaw) / sigma_yaw)``::

    phi(u) = [cos(W u + b_map), sin(W u + b_map)] / sqrt(M)          W (M, 4) ~ N(0, 1), b_map (M,) ~ U(0, 2 pi)

``|phi(u)| = 1`` exactly, and for two poses on the same map ``phi(u) . phi(u') = mean_i cos(w_i . (u - u'))``,
a Monte-Carlo estimate (standard error about ``1 / sqrt(2 M)``) of the Gaussian kernel
``exp(-|u - u'|^2 / 2) = exp(-d^2 / (2 sigma_xy^2)) * exp(-(1 - cos(dyaw)) / sigma_yaw^2)``: 1 at the same
place and heading, ~0.61 at ``d = sigma_xy``, ~0 facing the other way (dyaw = 180 deg: exp(-2 / sigma_yaw^2)).
It is a product, so a window must be close in place *and* heading. Only the same map may match: the phases
``b_map`` are drawn from a generator seeded by the map's identity (crc32 of its name), so for two maps the
sum runs over independent uniform phase differences and the similarity is ~0 (mean 0, standard deviation
``1 / sqrt(2 M)``, 0.06 at the default M = 128) wherever the cars are - the tracks' coordinate frames may
overlap, which a concatenated "track code" block could not undo (it would leave the pose block's
similarity in place). With ``frames`` n > 1 the features of the window's last n poses are concatenated, each
scaled by ``1 / sqrt(n)``: the similarity is the mean of the per-frame kernels (a short trajectory, frame
by frame). Default n = 1: the pose at the decision time (the window's last frame).

The map of a segment (:func:`segment_map`): ``meta/track.json``'s ``"map"`` when given (real data: name the
map per segment), else its ``"track_fingerprint"`` (the synthetic world writes it), else ``""`` - without any
map identity all segments are assumed to be on one map.

``student`` - the student's own ``bev_vec`` against the teacher's stored ``bev_vec`` rows, both (T, D)
averaged over the window's T frames (:func:`student_vectors`); meaningful once KD on the paired windows (or a
warm-up) has aligned the two embedding spaces. The query exists only after the student's forward pass, so
this kind is retrieved in the training step, not in the data loader.
"""
from __future__ import annotations

import json
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from e2r.data.layout import SegmentTable
from stores.keys import parse_key

__all__ = ["QUERY_KINDS", "POSE_DEFAULTS", "state_vectors", "pose_vectors", "student_vectors", "segment_map",
           "window_poses"]

QUERY_KINDS = ("state", "pose", "student")
#: pose query parameters (recorded in the index meta; a query is built with the index's own)
POSE_DEFAULTS: dict[str, Any] = {"sigma_xy": 3.0, "sigma_yaw": 0.5, "features": 128, "frames": 1, "seed": 0}


def state_vectors(speed: Tensor, steering: Tensor, stats: Mapping[str, float]) -> Tensor:
    """``state`` query vectors: speed (B, T) m/s, steering (B, T) deg -> (B, 2T + 1) float32 = standardised
    speed, standardised steering, 1."""
    v = (speed.float() - stats["speed_mean"]) / stats["speed_std"]
    s = (steering.float() - stats["steering_mean"]) / stats["steering_std"]
    return torch.cat([v, s, torch.ones(v.shape[0], 1)], dim=1)


@lru_cache(maxsize=256)
def _map_phases(map_id: str, features: int, seed: int) -> Tensor:
    """(M,) phases of a map, U(0, 2 pi) from a generator seeded by crc32(map id) and the index seed."""
    g = torch.Generator().manual_seed(zlib.crc32(map_id.encode()) * 1009 + int(seed))
    return torch.rand(features, generator=g, dtype=torch.float64) * (2 * np.pi)


@lru_cache(maxsize=8)
def _frequencies(features: int, seed: int) -> Tensor:
    """(M, 4) frequencies W ~ N(0, 1), the same for every map."""
    return torch.randn(features, 4, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)


def pose_vectors(pose: Tensor, maps: Sequence[str], params: Mapping[str, Any]) -> Tensor:
    """``pose`` query vectors: pose (B, T, 3) = x m, y m, yaw rad per frame of the window (or (B, 3): one
    pose), ``maps`` (B,) map identities -> (B, 2 M n) float32 unit rows, n = ``params["frames"]`` last frames
    (module docstring; ``params``: :data:`POSE_DEFAULTS`' keys)."""
    p = pose.double() if pose.dim() == 3 else pose.double()[:, None]
    n, M = int(params["frames"]), int(params["features"])
    if p.shape[1] < n:
        raise ValueError(f"pose query of {n} frames from windows of {p.shape[1]}")
    p = p[:, -n:]
    sxy, syaw = float(params["sigma_xy"]), float(params["sigma_yaw"])
    u = torch.stack([p[..., 0] / sxy, p[..., 1] / sxy, torch.cos(p[..., 2]) / syaw, torch.sin(p[..., 2]) / syaw],
                    dim=-1)                                                            # (B, n, 4)
    b = torch.stack([_map_phases(str(m), M, int(params["seed"])) for m in maps])        # (B, M)
    arg = u @ _frequencies(M, int(params["seed"])).T + b[:, None, :]                    # (B, n, M)
    phi = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1) / np.sqrt(M * n)
    return phi.reshape(len(p), -1).float()


def student_vectors(bev_vec: Tensor) -> Tensor:
    """``student`` query (and index) vectors: bev_vec (B, T, D) -> (B, D) float32, the mean over the T frames
    (a (B, D) input is returned as float32)."""
    return (bev_vec.float().mean(dim=1) if bev_vec.dim() == 3 else bev_vec.float())


@lru_cache(maxsize=4096)
def _map_of_dir(directory: str) -> str:
    path = Path(directory) / "meta" / "track.json"
    if not path.is_file():
        return ""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable as JSON ({e})") from None
    return str(info.get("map") or info.get("track_fingerprint") or "")


def segment_map(table: SegmentTable) -> str:
    """The map identity of a segment: ``meta/track.json``'s ``"map"``, else its ``"track_fingerprint"``, else
    ``""`` (one map for every segment without one). Cached per folder."""
    return _map_of_dir(str(table.directory))


def window_poses(tables: Mapping[str, SegmentTable], keys: Sequence[str], seq_len: int
                 ) -> tuple[Tensor, list[str]]:
    """Poses and maps of windows by key: ``tables`` {segment: table} of the keys' split(s) (or {(split,
    segment): table}) -> ``(pose (B, T, 3) float32, maps [B])``. ValueError naming the csv of a segment
    without pose columns (x, y, yaw), or a key whose window the tables lack."""
    poses, maps = np.zeros((len(keys), seq_len, 3), np.float32), []
    for i, key in enumerate(keys):
        k = parse_key(key)
        table = tables.get((k.split, k.segment)) or tables.get(k.segment)  # type: ignore[call-overload]
        if table is None or k.start + seq_len > table.num_frames:
            raise ValueError(f"pose query: no window of {seq_len} frames for key {key!r} in the dataset")
        if table.pose is None:
            raise ValueError(f"pose query: {table.csv_path} has no pose columns (x, y, yaw): rebuild the data "
                             f"with poses or use --query state")
        poses[i] = table.pose[k.start:k.start + seq_len]
        maps.append(segment_map(table))
    return torch.from_numpy(poses), maps
