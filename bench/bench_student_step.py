"""Where a tiny camera student's training step spends its time, part by part.

    python bench/bench_student_step.py --data_root DATA                 # a world made by make_dataset
    python bench/bench_student_step.py --data_root DATA --threads 1 --batch_size 8 --steps 30

Reads ``--steps`` batches of ``--batch_size`` windows from the train split (the tiny preset's image size,
seq_len 5) and times, per step: reading and decoding the windows (``CameraSequenceDataset`` items, collated),
the image CNN, the Lift-Splat view transform, the BEV CNN (with the adapter and the bev_vec readout), the
GRU and head, the backward pass and the optimizer step. The forward parts are timed by running them one after
another exactly as ``CameraBEVStudent.forward`` does. Prints the median milliseconds per part, the share of
the step and the windows per second of the whole step (the training throughput without a DataLoader worker).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import numpy as np

import e2r  # noqa: F401  (before torch: it sets the OpenMP wait policy, e2r/__init__.py)
import torch

from e2r.data.datasets import CameraSequenceDataset
from e2r.losses import action_loss, action_weights
from e2r.models.config import TeacherConfig
from e2r.models.student import CameraBEVStudent
from e2r.models.student_config import StudentConfig
from e2r.workflow.trainer import ActionNormalizer

PARTS = ("decode", "image CNN", "lift-splat", "BEV CNN", "GRU + head", "backward", "optimizer")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_root", required=True, help="dataset root (pipelines.make_dataset)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--batch_size", type=int, default=8, help="windows per step (default 8)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps after 3 warm-up ones (default 20)")
    ap.add_argument("--residual_actions", default="scene", help="the head (default scene)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    teacher = replace(TeacherConfig.preset_named("tiny"), residual_actions=a.residual_actions)
    cfg = StudentConfig.from_teacher(teacher, "tiny")
    model = CameraBEVStudent(cfg)
    ds = CameraSequenceDataset(a.data_root, "train", 5, 1, tuple(cfg.image_size))
    norm = ActionNormalizer.from_dataset(ds)
    model.set_action_stats(norm.mean, norm.std)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    weights = action_weights(1.0, 0.05)
    order = np.random.default_rng(0).permutation(len(ds))
    times = {p: [] for p in PARTS}
    for step in range(a.steps + 3):
        t = [time.perf_counter()]
        idx = order[(step * a.batch_size) % len(ds):][:a.batch_size]
        items = [ds[int(i)] for i in idx]
        b = {k: torch.stack([it[k] for it in items]) for k in ("images", "intrinsics", "cam2ego", "speed",
                                                                   "steering", "actions")}
        t.append(time.perf_counter())
        B, T, n_cam, _, H, W = b["images"].shape
        K = b["intrinsics"][:, None].expand(B, T, *b["intrinsics"].shape[1:]).reshape(B * T, n_cam, 3, 3)
        c2e = b["cam2ego"][:, None].expand(B, T, *b["cam2ego"].shape[1:]).reshape(B * T, n_cam, 4, 4)
        feats = model.image_encoder(b["images"].reshape(B * T * n_cam, 3, H, W))
        t.append(time.perf_counter())
        bev = model.view_transform(feats, K.float(), c2e.float(), (H, W))
        t.append(time.perf_counter())
        bev_feat = model.adapter(model.bev_encoder(bev))
        bev_vec = model.to_vec(model.pool(bev_feat))
        t.append(time.perf_counter())
        pred = model.sequence_outputs(bev_vec, bev_feat, B, T, b["speed"], b["steering"], False)
        loss = action_loss(model.normalize_actions(pred), model.normalize_actions(b["actions"]), weights)
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        if step >= 3:
            for p, t0, t1 in zip(PARTS, t[:-1], t[1:]):
                times[p].append(t1 - t0)
    med = {p: float(np.median(v)) * 1e3 for p, v in times.items()}
    total = sum(med.values())
    print(f"tiny student step, batch {a.batch_size} windows x 5 frames, image {cfg.image_size[0]}x{cfg.image_size[1]}, "
          f"torch threads {torch.get_num_threads()}, {a.steps} steps (medians)")
    for p in PARTS:
        print(f"  {p:<12} {med[p]:8.1f} ms  {med[p] / total:6.1%}")
    print(f"  {'step':<12} {total:8.1f} ms  -> {a.batch_size / total * 1e3:.1f} windows/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
