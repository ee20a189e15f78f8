"""How much of the driving labels the student's frozen image features hold: a linear probe.

    python bench/student_probe.py --data_root D --student_ckpt S [--train_segments segment_0000 ...]
        [--valid_split valid] [--grid 2x4] [--threads 1]

Takes the student's image encoder frozen (its per-camera feature map before lift-splat, ``(N, C, h, w)``),
pools each frame's map two ways: ``avg`` (mean over the map, ``C`` per camera) and ``grid`` (adaptive average
pool to ``--grid`` rows x columns, ``C * rows * cols`` per camera), and fits ridge regression (closed form,
features standardised on the training frames) from them to the normalised action labels (steering, speed
command; the checkpoint's training mean/std) of every frame of the training segments. Each action's lambda is
chosen on held-out training segments (leave one segment out; with one segment, its last fifth). Reports on
``--valid_split`` (and the in-sample fit on the training frames), overall and per look (noon / dusk / night, the
synthetic world's rule, ``e2r.sim.world.segment_lights``; none on real data):
  R2    1 - SSE / SST around the evaluated frames' own mean;
  nMSE  MSE / MSE of always predicting the training frames' mean label (1.0 = no better than the mean).
The same probe on a randomly initialised encoder of the same architecture (``--random_seed``) is the baseline:
the difference is what training put into the image features. Frames are read once by the trainer's dataset
(``CameraSequenceDataset``, seq_len 1) and window loader.
"""
from __future__ import annotations

import argparse
import sys
import time

import e2r  # noqa: F401  (before torch: it sets the OpenMP wait policy, e2r/__init__.py)
import torch
import torch.nn.functional as F

from e2r.data.datasets import CameraSequenceDataset, collate_camera
from e2r.metrics import ACTION_NAMES
from e2r.models.student import CameraBEVStudent, ImageEncoder, load_student
from e2r.models.student_config import StudentConfig
from e2r.runtime import DistContext
from e2r.sim.appearance import LIGHTS
from e2r.sim.world import segment_lights
from e2r.workflow.trainer import make_window_loader
from stores.keys import parse_key

LAMBDAS = tuple(10.0 ** e for e in range(-4, 4))     # x the number of training frames (features standardised)


def frame_features(encoders: dict[str, ImageEncoder], ds: CameraSequenceDataset, grid: tuple[int, int],
                   batch_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[str]]:
    """Every frame of ``ds`` (seq_len 1) through each frozen encoder: ``({"<encoder>/avg" (N, Ncam*C),
    "<encoder>/grid" (N, Ncam*C*rows*cols)}, physical actions (N, A), segment of each frame [N])``."""
    loader, _ = make_window_loader(ds, batch_size, False, 0, 0, collate_camera, DistContext())
    feats: dict[str, list[torch.Tensor]] = {}
    actions, segments = [], []
    with torch.no_grad():
        for batch in loader:
            images = batch["images"][:, 0]                                   # (B, Ncam, 3, H, W)
            B = images.shape[0]
            for name, enc in encoders.items():
                fmap = enc(images.flatten(0, 1))                             # (B*Ncam, C, h, w)
                feats.setdefault(f"{name}/avg", []).append(fmap.mean((2, 3)).reshape(B, -1))
                feats.setdefault(f"{name}/grid", []).append(F.adaptive_avg_pool2d(fmap, grid).reshape(B, -1))
            actions.append(batch["actions"][:, 0])
            segments.extend(parse_key(k).segment for k in batch["keys"])
    return {k: torch.cat(v).double() for k, v in feats.items()}, torch.cat(actions), segments


def ridge(X: torch.Tensor, Y: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge on standardised ``X`` (N, D) -> ``Y`` (N, A) with penalty ``lam * N``: ``(W (D, A),
    b (A,))``; predict ``X @ W + b``."""
    x_mean, y_mean = X.mean(0), Y.mean(0)
    Xc, Yc = X - x_mean, Y - y_mean
    gram = Xc.T @ Xc + lam * X.shape[0] * torch.eye(X.shape[1], dtype=X.dtype)
    W = torch.linalg.solve(gram, Xc.T @ Yc)
    return W, y_mean - x_mean @ W


def holdout_folds(segments: list[str]) -> list[torch.Tensor]:
    """Boolean (N,) held-out masks: one per segment, or the last fifth of the frames with one segment."""
    names = sorted(set(segments))
    if len(names) > 1:
        return [torch.tensor([s == n for s in segments]) for n in names]
    held = torch.zeros(len(segments), dtype=torch.bool)
    held[int(len(segments) * 0.8):] = True
    return [held]


def fit_probe(X: torch.Tensor, Y: torch.Tensor, segments: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Standardise ``X`` (N, D) by its training statistics, choose each action's lambda on the held-out folds,
    refit on all frames. Returns ``(W (D, A), b (A,), lambdas [A])`` for raw (unstandardised) features."""
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-6)
    Xs = (X - mu) / sd
    errors = torch.zeros(len(LAMBDAS), Y.shape[1], dtype=X.dtype)
    for held in holdout_folds(segments):
        for i, lam in enumerate(LAMBDAS):
            W, b = ridge(Xs[~held], Y[~held], lam)
            errors[i] += ((Xs[held] @ W + b - Y[held]) ** 2).sum(0)
    best = [LAMBDAS[int(i)] for i in errors.argmin(0)]
    fits = [ridge(Xs, Y[:, a:a + 1], lam) for a, lam in enumerate(best)]
    W, b = torch.cat([f[0] for f in fits], 1), torch.cat([f[1] for f in fits])
    return W / sd[:, None], b - (mu / sd) @ W, best


def probe_scores(pred: torch.Tensor, Y: torch.Tensor, train_mean: torch.Tensor) -> dict[str, float]:
    """``{"<action>_r2", "<action>_nmse"}`` of predictions ``pred`` (N, A) of labels ``Y`` (N, A)."""
    sse = ((pred - Y) ** 2).sum(0)
    sst = ((Y - Y.mean(0)) ** 2).sum(0).clamp_min(1e-12)
    base = ((train_mean - Y) ** 2).sum(0).clamp_min(1e-12)
    out = {}
    for a, name in enumerate(ACTION_NAMES):
        out[f"{name}_r2"], out[f"{name}_nmse"] = float(1 - sse[a] / sst[a]), float(sse[a] / base[a])
    return out


def grouped(segments: list[str], lights: dict[str, str], where: str) -> list[tuple[str, torch.Tensor]]:
    """``[(row label, boolean frame mask)]``: all frames of ``where``, then each look present."""
    rows = [(where, torch.ones(len(segments), dtype=torch.bool))]
    for light in LIGHTS:
        mask = torch.tensor([lights.get(s) == light for s in segments])
        if lights and bool(mask.any()):
            rows.append((f"{where} {light}", mask))
    return rows


def parse_grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid must look like ROWSxCOLS, e.g. 2x4; got {text!r}") from None
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"--grid needs rows and columns >= 1, got {text!r}")
    return rows, cols


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_root", required=True, help="dataset root (pipelines.make_dataset)")
    ap.add_argument("--student_ckpt", required=True, help="checkpoint written by pipelines.train_student")
    ap.add_argument("--train_split", default="train", help="split of the training frames (default train)")
    ap.add_argument("--train_segments", nargs="+", default=None, help="these segments of it (default: all)")
    ap.add_argument("--valid_split", default="valid", help="split the probe is scored on (default valid)")
    ap.add_argument("--grid", type=parse_grid, default=(2, 4), help="spatial pool rows x cols (default 2x4)")
    ap.add_argument("--random_seed", type=int, default=0, help="seed of the random encoder (default 0)")
    ap.add_argument("--batch_size", type=int, default=32, help="frames per batch (default 32)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.process_time()
    model, ckpt = load_student(a.student_ckpt, "cpu")
    torch.manual_seed(a.random_seed)
    encoders = {"trained": model.image_encoder,
                "random": CameraBEVStudent(StudentConfig.from_dict(ckpt["config"])).image_encoder.eval()}
    size = tuple(model.cfg.image_size)
    train_ds = CameraSequenceDataset(a.data_root, a.train_split, 1, 1, size, segments=a.train_segments)
    valid_ds = CameraSequenceDataset(a.data_root, a.valid_split, 1, 1, size)
    for split, ds in ((a.train_split, train_ds), (a.valid_split, valid_ds)):
        if len(ds) == 0:
            print(f"student_probe: error: {a.data_root}/{split} has no camera frames", file=sys.stderr)
            return 1
    X_tr, act_tr, seg_tr = frame_features(encoders, train_ds, a.grid, a.batch_size)
    X_va, act_va, seg_va = frame_features(encoders, valid_ds, a.grid, a.batch_size)
    with torch.no_grad():
        Y_tr, Y_va = model.normalize_actions(act_tr).double(), model.normalize_actions(act_va).double()
    rows = grouped(seg_tr, segment_lights(a.data_root, a.train_split), f"{a.train_split} (fit)")
    rows += grouped(seg_va, segment_lights(a.data_root, a.valid_split), a.valid_split)
    cols = [f"{n}_{m}" for n in ACTION_NAMES for m in ("r2", "nmse")]
    print(f"linear probe: {len(seg_tr)} training frames ({len(set(seg_tr))} segments), {len(seg_va)} "
          f"{a.valid_split} frames; features: avg = C per camera, grid = C x {a.grid[0]}x{a.grid[1]}")
    print("features".ljust(19) + "frames".ljust(28) + "".join(c.rjust(15) for c in cols) + "  lambda (steer, speed)")
    for name in X_tr:
        W, b, lams = fit_probe(X_tr[name], Y_tr, seg_tr)
        train_mean = Y_tr.mean(0)
        for label, mask in rows:
            X, Y = (X_tr[name], Y_tr) if label.startswith(f"{a.train_split} (fit)") else (X_va[name], Y_va)
            s = probe_scores(X[mask] @ W + b, Y[mask], train_mean)
            print(f"{name} ({X.shape[1]})".ljust(19) + f"{label} [{int(mask.sum())}]".ljust(28)
                  + "".join(f"{s[c]:15.3f}" for c in cols) + f"  {lams[0]:g}, {lams[1]:g}")
    print(f"CPU time {time.process_time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
