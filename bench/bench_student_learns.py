"""Does the tiny camera student learn from the image, whatever the torch thread count and the seed?

    python bench/bench_student_learns.py                           # world + head-only teacher in a temp dir
    python bench/bench_student_learns.py --dir /tmp/sl --seeds 0 1 2 --threads 1 2 --steps 296
    python bench/bench_student_learns.py --dir /tmp/sl -- --bev_pool_grid 1    # flags after -- go to train_student

Builds (or reuses, in ``--dir``) a world of ``--train_tracks`` paired tracks (``make_dataset --train_tracks 4
--valid_tracks 2 --test_tracks 4 --frames 300 --seed 0``: the first camera tracks of the study's world) and a
teacher checkpoint trained for one epoch on one track with ``--residual_actions scene``, used for its
architecture only (the BC student takes the teacher's head). Then, for every ``--threads`` x ``--seeds``,
one whole ``python -m pipelines.train_student`` process with ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set,
BC only, ``--steps`` optimizer steps, ``--hflip_prob 0.5``, no validation, on every paired track.

Prints each run's training loss per epoch (normalised units: 1.0 is what predicting the label mean scores)
and its CPU seconds, and the verdict: every run's last whole epoch below ``--learned_below`` (default 0.9).
A run stuck at the label mean stays at 1.0-1.05 (docs/STUDENT.md).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np
import torch

from bench_kd_epoch import run


def prepare(d: str, train_tracks: int, frames: int) -> tuple[str, str]:
    """The world and the head-only teacher in ``d`` (made once; reused when present) -> (data root, teacher)."""
    data, teacher = os.path.join(d, "data"), os.path.join(d, "teacher_scene.pt")
    if not os.path.exists(os.path.join(data, "synthetic_dataset.json")):
        print(f"making the world ({train_tracks} paired train tracks x {frames} frames) ...", flush=True)
        run(["pipelines.make_dataset", "--out", data, "--train_tracks", str(train_tracks), "--valid_tracks", "2",
             "--test_tracks", "4", "--frames", str(frames), "--seed", "0", "--no_progress", "--overwrite"])
    if not os.path.exists(teacher):
        print("training a teacher for its architecture (scene head, 1 epoch on one track) ...", flush=True)
        run(["pipelines.train_teacher", "--data_root", data, "--train_segments", "segment_0000", "--epochs", "1",
             "--residual_actions", "scene", "--save_path", teacher, "--checkpoint_path",
             os.path.join(d, "teacher_scene_last.pt"), "--no_progress"])
    return data, teacher


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="work directory, reused when it holds the world (default: temp)")
    ap.add_argument("--train_tracks", type=int, default=4, help="paired train tracks, all trained on (default 4)")
    ap.add_argument("--frames", type=int, default=300, help="frames per track (default 300)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds (default 0 1 2)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default 1 2)")
    ap.add_argument("--steps", type=int, default=296, help="optimizer steps per run (default 296: 2 epochs of "
                                                           "the default world)")
    ap.add_argument("--learned_below", type=float, default=0.9,
                    help="a run learned when its last whole epoch's training loss is below this (default 0.9)")
    a = ap.parse_args(argv)
    d = a.dir or tempfile.mkdtemp(prefix="bench_student_learns_")
    os.makedirs(d, exist_ok=True)
    rows = []
    try:
        data, teacher = prepare(d, a.train_tracks, a.frames)
        segments = [f"segment_{i:04d}" for i in range(a.train_tracks)]
        print(f"student: BC, {a.steps} steps, seeds {a.seeds}, threads {a.threads}, extra flags {extra or 'none'}",
              flush=True)
        for threads in a.threads:
            for seed in a.seeds:
                last = os.path.join(d, f"student_t{threads}_s{seed}_last.pt")
                _, wall, cpu = run(["pipelines.train_student", "--data_root", data, "--train_segments", *segments,
                                    "--teacher_ckpt", teacher, "--steps", str(a.steps), "--hflip_prob", "0.5",
                                    "--seed", str(seed), "--valid_split", "", "--save_path",
                                    os.path.join(d, f"student_t{threads}_s{seed}.pt"), "--checkpoint_path", last,
                                    "--no_progress", *extra],
                                   env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
                history = torch.load(last, map_location="cpu", weights_only=True)["history"]
                whole = [h["train_loss"] for h, prev in zip(history, [{"steps": 0}] + history[:-1])
                         if h["steps"] - prev["steps"] == history[0]["steps"]]
                rows.append((threads, seed, [h["train_loss"] for h in history], whole[-1], cpu))
                curve = " -> ".join(f"{h['train_loss']:.3f}" for h in history)
                print(f"  threads {threads} seed {seed}: train loss per epoch {curve}  ({cpu:.0f} s CPU, "
                      f"{wall:.0f} s wall)", flush=True)
    finally:
        if a.dir is None:
            shutil.rmtree(d, ignore_errors=True)
    print("\nthreads  seeds learned  last whole epoch's train loss (mean +- std)")
    for threads in a.threads:
        finals = np.array([r[3] for r in rows if r[0] == threads])
        print(f"{threads:>7}  {int((finals < a.learned_below).sum())}/{len(finals):<12} "
              f"{finals.mean():.3f} +- {finals.std():.3f}")
    ok = all(r[3] < a.learned_below for r in rows)
    print(f"CPU time {sum(r[4] for r in rows):.0f} s in all")
    print(f"{'PASS' if ok else 'FAIL'}: every run below {a.learned_below} (1.0 = the label mean)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
