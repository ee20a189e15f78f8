"""Windows per CPU-second of the student's real training step (``e2r.workflow.train.train_student``).

    OMP_NUM_THREADS=1 python bench/bench_train_step.py --threads 1 --warmup 40 --timed 60 -- \\
        --data_root DATA --train_segments segment_0000 [--memorybank MB.zarr]      # BC (+ KD with a store)

Runs ``train_student`` with the flags after ``--`` (``--steps`` set to warm-up + timed steps, no validation,
nothing saved) and records ``time.process_time()`` (CPU time of this process, all its threads) after every
optimizer step through a global optimizer hook, so what is timed is the whole training step of the real
path: the batch from the loader (frame cache, teacher rows), augmentation, forward, loss, backward, clipping
and the AdamW step. The first ``--warmup`` steps (first reads of the frames, allocator warm-up) are not
counted. CPU time rather than wall time: the machine is shared, and CPU time is what a run costs. Keep
``--num_workers`` 0 (the default): worker processes' time is not in this process's CPU time.

Prints one line: steps timed, CPU seconds, windows per CPU-second (and wall seconds, for reference).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import e2r  # noqa: E402,F401  (first: it sets the OpenMP wait policy before torch loads OpenMP)
import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

from e2r.cli_config import config_parser, parse_config  # noqa: E402
from e2r.workflow.configs import StudentTrainConfig  # noqa: E402
from e2r.workflow.train import train_student  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--warmup", type=int, default=40, help="steps not timed, >= 1 (default 40)")
    ap.add_argument("--timed", type=int, default=60, help="steps timed after the warm-up (default 60)")
    a = ap.parse_args(ours)
    if a.warmup < 1 or a.timed < 1:
        ap.error("--warmup and --timed must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    train_flags = config_parser(StudentTrainConfig, "train_student flags", None)
    cfg = replace(parse_config(StudentTrainConfig, train_flags, flags), steps=a.warmup + a.timed, valid_split="", save_path=None,
                  checkpoint_path=None, no_progress=True, num_workers=0)
    stamps: list[tuple[float, float]] = []
    handle = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: stamps.append((time.process_time(), time.perf_counter())))
    try:
        train_student(cfg)
    finally:
        handle.remove()
    if len(stamps) <= a.warmup:
        raise SystemExit(f"only {len(stamps)} optimizer steps ran; need more than --warmup {a.warmup}")
    (c0, w0), (c1, w1) = stamps[a.warmup - 1], stamps[-1]
    n = len(stamps) - a.warmup
    batch_size = cfg.hparams()[2]
    windows = n * batch_size
    print(f"train step (OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}, {'KD' if cfg.memorybank else 'BC'}, preset {cfg.preset}, batch {batch_size}, torch threads "
          f"{torch.get_num_threads()}): {n} steps in {c1 - c0:.2f} CPU-s ({w1 - w0:.2f} s wall): "
          f"{windows / (c1 - c0):.2f} windows per CPU-s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
