"""Offline action metrics (teacher and student evaluation): per-action MSE/MAE/RMSE, the weighted overall,
a printable table, CSV rows and a PNG of predicted vs ground-truth steering and speed along one segment.

Metrics are in physical units (degrees, m/s) over every (window, step) of the split. The weighted overall
is the E2R-style ``sum_a w_a * MSE_a`` with ``--overall_weights`` (default 1.0, 0.05).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from e2r.atomic import replacing
from stores.keys import parse_key

__all__ = ["ACTION_NAMES", "parse_overall_weights", "ActionErrorAccumulator", "metrics_table",
           "write_metrics_csv", "segment_series", "plot_segment", "per_segment_metrics"]

ACTION_NAMES = ("steering", "speed")
UNITS = {"steering": "deg", "speed": "m/s"}


def parse_overall_weights(text: str, num_actions: int = 2) -> tuple[float, ...]:
    """``"1.0,0.05"`` -> (1.0, 0.05); raises ValueError naming the text when malformed."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--overall_weights {text!r}: expected {num_actions} comma-separated numbers") from None
    if len(values) != num_actions or any(v < 0 or not np.isfinite(v) for v in values):
        raise ValueError(f"--overall_weights {text!r}: expected {num_actions} comma-separated numbers >= 0")
    return values


class ActionErrorAccumulator:
    """Running sums of errors over batches; ``update(pred (..., A), target (..., A))`` then ``compute()``."""

    def __init__(self, overall_weights: Sequence[float] = (1.0, 0.05), names: Sequence[str] = ACTION_NAMES):
        self.names, self.weights = tuple(names), tuple(float(w) for w in overall_weights)
        if len(self.weights) != len(self.names):
            raise ValueError(f"{len(self.weights)} overall weights for {len(self.names)} actions {self.names}")
        self.sq = np.zeros(len(self.names))
        self.abs = np.zeros(len(self.names))
        self.count = 0

    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.shape != target.shape or pred.shape[-1] != len(self.names):
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must match with last "
                             f"dimension {len(self.names)}")
        err = (pred.detach().double() - target.detach().double()).reshape(-1, len(self.names)).cpu()
        self.sq += (err ** 2).sum(0).numpy()
        self.abs += err.abs().sum(0).numpy()
        self.count += err.shape[0]

    def compute(self) -> dict[str, float]:
        """``{"n", "<name>_mse", "<name>_mae", "<name>_rmse" ..., "overall_weighted_mse"}``."""
        if self.count == 0:
            raise ValueError("no predictions were accumulated (empty split?)")
        out: dict[str, float] = {"n": float(self.count)}
        mse = self.sq / self.count
        for i, name in enumerate(self.names):
            out[f"{name}_mse"] = float(mse[i])
            out[f"{name}_mae"] = float(self.abs[i] / self.count)
            out[f"{name}_rmse"] = float(np.sqrt(mse[i]))
        out["overall_weighted_mse"] = float(sum(w * m for w, m in zip(self.weights, mse)))
        return out


def metrics_table(results: dict[str, dict[str, float]], names: Sequence[str] = ACTION_NAMES) -> str:
    """A fixed-width text table, one row per predictor (e.g. teacher and baselines)."""
    cols = [f"{n}_{m}" for n in names for m in ("mse", "mae", "rmse")] + ["overall_weighted_mse"]
    width = max([len("predictor")] + [len(k) for k in results]) + 2
    lines = ["predictor".ljust(width) + "".join(c.rjust(22) for c in cols)]
    for name, r in results.items():
        lines.append(name.ljust(width) + "".join(f"{r[c]:22.5f}" for c in cols))
    return "\n".join(lines)


def write_metrics_csv(path: str | Path, rows: Sequence[dict[str, object]]) -> Path:
    """Write rows (dicts with the same keys, e.g. predictor, split, metrics...) to a CSV file."""
    if not rows:
        raise ValueError(f"no metric rows to write to {path}")
    path = Path(path)
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def per_segment_metrics(keys: Sequence[str], pred: Tensor, target: Tensor, overall_weights: Sequence[float]
                        ) -> dict[str, dict[str, float]]:
    """``{segment: metrics}`` (as :meth:`ActionErrorAccumulator.compute`) over each segment's windows.

    keys: N window keys; pred, target (N, T, A)."""
    rows: dict[str, list[int]] = {}
    for row, key in enumerate(keys):
        rows.setdefault(parse_key(key).segment, []).append(row)
    out = {}
    for segment, idx in sorted(rows.items()):
        acc = ActionErrorAccumulator(overall_weights)
        i = torch.tensor(idx)
        acc.update(pred[i], target[i])
        out[segment] = acc.compute()
    return out


def segment_series(keys: Sequence[str], pred: Tensor, target: Tensor, segment: str
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame series of one segment from window predictions.

    keys: N window keys; pred, target (N, T, A). Each frame takes the prediction of the window where it
    has the longest history (latest step). Returns frames (F,), pred (F, A), target (F, A), sorted by frame.
    """
    best: dict[int, tuple[int, int, int]] = {}  # frame -> (step, window row, step index)
    T = pred.shape[1]
    for row, key in enumerate(keys):
        k = parse_key(key)
        if k.segment != segment:
            continue
        for t in range(T):
            frame = k.start + t
            if frame not in best or t > best[frame][0]:
                best[frame] = (t, row, t)
    if not best:
        raise ValueError(f"segment {segment!r} has no windows among the {len(keys)} evaluated keys")
    frames = np.array(sorted(best))
    rows = torch.tensor([best[f][1] for f in frames])
    steps = torch.tensor([best[f][2] for f in frames])
    return frames, pred[rows, steps].cpu().numpy(), target[rows, steps].cpu().numpy()


def plot_segment(path: str | Path, frames: np.ndarray, series: dict[str, np.ndarray], target: np.ndarray,
                 title: str, names: Sequence[str] = ACTION_NAMES) -> Path:
    """PNG with one panel per action: ground truth and each predictor's (F, A) series along the frames."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 3 * len(names)), sharex=True)
    for i, (ax, name) in enumerate(zip(np.atleast_1d(axes), names)):
        ax.plot(frames, target[:, i], color="black", linewidth=2, label="ground truth")
        for label, values in series.items():
            ax.plot(frames, values[:, i], linewidth=1.2, label=label)
        ax.set_ylabel(f"{name} [{UNITS.get(name, '')}]")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    np.atleast_1d(axes)[-1].set_xlabel("frame")
    fig.suptitle(title)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    return path
