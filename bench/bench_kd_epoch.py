"""What KD costs a student's training epoch: BC vs KD on the same data, whole processes, alternating.

    python bench/bench_kd_epoch.py                      # world, teacher, store in a temp dir, 3 rounds
    python bench/bench_kd_epoch.py --dir /tmp/kde --rounds 5

Builds (or reuses, in ``--dir``) a small synthetic world (``make_dataset --tracks 4 --frames 300``: 2 train
tracks), a tiny teacher (1 epoch) and its memorybank (``export``), then trains the tiny student for one epoch
per run, ``--rounds`` times each of:

* BC - no memorybank;
* KD, ``--kd_targets main`` (the default) - the teacher rows read by key in the training process, a batch
  ahead of the step (``e2r.workflow.targets_ahead``);
* KD, ``--kd_targets worker`` - the rows read by the DataLoader workers with the camera windows;

in turn (BC, KD main, KD worker, BC, ...), so that other load hits all alike. KD = the study's terms
(``--kd_action_w 1 --kd_bevvec_w 1 --kd_temporal_w 1``). Same seed, batches and workers (``--workers``) for
all. Per run: the epoch's seconds as ``train_student`` prints them (train + valid), the whole process's wall
seconds and its CPU seconds (user + system, its workers included). Prints medians, the ratios to BC and the
goal of issue 14: the KD epoch <= 1.05x the BC epoch.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

VARIANTS = {"BC": [], "KD main": ["--kd_targets", "main"], "KD worker": ["--kd_targets", "worker"]}
KD_FLAGS = ["--kd_action_w", "1", "--kd_bevvec_w", "1", "--kd_temporal_w", "1"]


def run(cmd: list[str], quiet: bool = True, env: dict[str, str] | None = None) -> tuple[str, float, float]:
    """Run ``python -m <cmd>`` (with ``env`` added to this process's environment) -> (its output, wall s, CPU s
    of it and its children); exits on failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True,
                       env={**os.environ, **env} if env else None)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        sys.exit(f"bench_kd_epoch: {' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    if not quiet:
        print(p.stdout.strip().splitlines()[-1], flush=True)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return p.stdout, wall, cpu


def prepare(d: str, tracks: int, frames: int, workers: int) -> tuple[str, str]:
    """The world and memorybank in ``d`` (made once; reused when present) -> (data root, store path)."""
    data, teacher, store = (os.path.join(d, x) for x in ("data", "teacher.pt", "mb.zarr"))
    if not os.path.exists(os.path.join(data, "synthetic_dataset.json")):
        print(f"making the world ({tracks} tracks x {frames} frames) ...", flush=True)
        run(["pipelines.make_dataset", "--out", data, "--tracks", str(tracks), "--frames", str(frames), "--no_progress",
             "--overwrite"])
    if not os.path.exists(teacher):
        print("training the tiny teacher (1 epoch) ...", flush=True)
        run(["pipelines.train_teacher", "--data_root", data, "--preset", "tiny", "--epochs", "1", "--save_path",
             teacher, "--checkpoint_path", os.path.join(d, "teacher_last.pt"), "--no_progress",
             "--num_workers", str(workers)])
    if not os.path.exists(os.path.join(store, "zarr.json")):
        print("exporting the memorybank ...", flush=True)
        run(["pipelines.export", "--data_root", data, "--teacher_ckpt", teacher, "--store", store,
             "--split", "train", "--split", "valid", "--no_progress", "--overwrite"])
    return data, store


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="work directory, reused when it holds the world (default: temp)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each variant, alternating (default 3)")
    ap.add_argument("--tracks", type=int, default=4, help="make_dataset --tracks (default 4: 2 train)")
    ap.add_argument("--frames", type=int, default=300, help="make_dataset --frames (default 300)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    ap.add_argument("--epochs", type=int, default=1, help="student epochs per run (default 1)")
    a = ap.parse_args(argv)
    d = a.dir or tempfile.mkdtemp(prefix="bench_kd_epoch_")
    os.makedirs(d, exist_ok=True)
    try:
        data, store = prepare(d, a.tracks, a.frames, a.workers)
        got: dict[str, dict[str, list[float]]] = {v: {"epoch": [], "wall": [], "cpu": []} for v in VARIANTS}
        for r in range(a.rounds):
            for name, flags in VARIANTS.items():
                kd = ["--memorybank", store, *KD_FLAGS] if name != "BC" else []
                out, wall, cpu = run(["pipelines.train_student", "--data_root", data, "--preset", "tiny",
                                      "--epochs", str(a.epochs), "--seed", "0", "--no_progress", "--num_workers",
                                      str(a.workers), "--save_path", os.path.join(d, "student.pt"),
                                      "--checkpoint_path", os.path.join(d, "student_last.pt"), *kd, *flags])
                secs = [float(s) for s in re.findall(r"^epoch \d+/\d+: .* ([0-9.]+)s$", out, re.M)]
                got[name]["epoch"].append(sum(secs))
                got[name]["wall"].append(wall)
                got[name]["cpu"].append(cpu)
                print(f"  round {r + 1}/{a.rounds} {name:<10} epoch {sum(secs):6.1f} s, process {wall:6.1f} s wall, "
                      f"{cpu:6.1f} s CPU", flush=True)
    finally:
        if a.dir is None:
            shutil.rmtree(d, ignore_errors=True)
    med = {n: {k: float(np.median(v)) for k, v in m.items()} for n, m in got.items()}
    bc = med["BC"]
    print(f"\nbench_kd_epoch: tiny student, {a.epochs} epoch(s) per run, {a.rounds} alternating runs each, "
          f"{a.workers} workers, load average {os.getloadavg()[0]:.1f}; medians")
    print(f"{'variant':<12}{'epoch s':>9}{'x BC':>7}{'process s':>11}{'x BC':>7}{'CPU s':>9}{'x BC':>7}")
    for n, m in med.items():
        print(f"{n:<12}{m['epoch']:>9.1f}{m['epoch'] / bc['epoch']:>7.2f}{m['wall']:>11.1f}"
              f"{m['wall'] / bc['wall']:>7.2f}{m['cpu']:>9.1f}{m['cpu'] / bc['cpu']:>7.2f}")
    kd = med["KD main"]
    ok = kd["epoch"] <= 1.05 * bc["epoch"]
    print(f"  [{'PASS' if ok else 'FAIL'}] KD epoch <= 1.05x the BC epoch (--kd_targets main: "
          f"{kd['epoch'] / bc['epoch']:.2f}x; worker: {med['KD worker']['epoch'] / bc['epoch']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
