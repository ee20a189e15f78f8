"""Train the camera student (image CNN -> Lift-Splat -> BEV CNN -> GRU) by behaviour cloning plus knowledge
distillation from the LiDAR teacher's outputs stored in a memorybank.

    python -m pipelines.train_student --data_root data/synth --preset tiny --memorybank runs/mb.zarr \\
        --kd_action_w 1 --kd_bevvec_w 0.5 --kd_temporal_w 0.5 --save_path runs/student_best.pt
    torchrun --nproc_per_node 4 -m pipelines.train_student ...        # multi-GPU (DDP), same flags

Loss = BC (weighted MSE, steering 1.0 / speed 0.05, on actions normalised with the training split's
statistics, stored in the checkpoint) + for the samples whose key is in the memorybank the weighted KD
terms (e2r.kd: action MSE, bev_vec 1 - cosine, GRU-out MSE, dense bev_feat masked to the camera FOV and
weighted towards teacher-occupied cells; --kd_depth_w: LiDAR depth supervision of the Lift-Splat depth
distribution, a cross-entropy against the store's depth targets from `export --store_depth`; e2r/depth.py).
Samples without teacher targets get BC only; each epoch logs how
many samples had KD and how many BC only. Teacher targets are streamed: the training process reads each
batch's rows by key with one batched read of the store (opened read-only), up to two batches ahead of the
step, while the DataLoader workers read the camera windows (--kd_targets main, the default; --kd_targets worker
has the workers read the rows too). Without --memorybank (or with all KD weights 0) this is the BC-only student.

Length of the run: --epochs, or --steps N optimizer steps (the same budget whatever the data size); the learning
rate warms up linearly over --warmup_steps (default 150) and then decays by a cosine. bev_vec reads a 4 x 4
pool of the BEV map (--bev_pool_grid): with the global mean and no warm-up the tiny student stayed at the label
mean in 4 of 6 seed x thread-count runs (docs/STUDENT.md). --photometric S jitters the training images'
brightness, contrast, gamma, colour and noise (off by default: no measured gain yet, docs/STUDENT.md).
--norm group and --input_norm per_image replace the CNNs' BatchNorm and the fixed input normalisation (neither
drives better at 4 camera tracks; per-image normalisation drives worse, docs/STUDENT.md, "The levers").

The validation loss (the best-checkpoint metric, listed per epoch in the checkpoint's ``valid_losses``) is
the BC weighted MSE on --valid_split, in the same normalised units as the teacher's. ``--hflip_prob`` (off by
default) mirrors samples left-right together with their cached targets (steering negated, teacher bev_feat
and depth targets flipped); the bev_vec and temporal KD terms are dropped for mirrored samples (their targets
cannot be mirrored).

Camera and LiDAR recorded apart (make_dataset --camera_root, other rates or clock offsets): train on the camera
root with --pair_lidar_root LIDAR_ROOT [--pair_tolerance_ms 50]; each epoch also logs the windows paired and
unpaired and the pairs' mean confidence (e2r/workflow/pairing.py).
"""
from __future__ import annotations

import argparse
import sys

from e2r.cli_config import config_parser, parse_config as parse
from e2r.workflow.configs import StudentTrainConfig
from e2r.workflow.train import train_student
from pipelines._common import training_main

#: the run config: one flag per field
CONFIG = StudentTrainConfig


def build_parser() -> argparse.ArgumentParser:
    return config_parser(CONFIG, "python -m pipelines.train_student", __doc__)


def parse_config(argv: list[str] | None = None) -> StudentTrainConfig:
    """The run config of the command line."""
    return parse(CONFIG, build_parser(), argv)


def main(argv: list[str] | None = None) -> int:
    return training_main("train_student", build_parser(), CONFIG, train_student, argv,
                         _last_epoch_counts)


def _last_epoch_counts(last: dict) -> str:
    """The final summary's per-epoch sample counts (KD, BC-only, retrieved, timestamp pairs, damaged rows)."""
    text = f"KD samples/epoch {last.get('kd_samples', 0)}, BC-only {last.get('bc_only_samples', 0)}"
    if last.get("retrieved_samples"):
        text += f", retrieved {last['retrieved_samples']}"
    if last.get("paired_samples") is not None:
        text += f", paired by time {last['paired_samples']} (mean confidence {last['pair_confidence_mean']:.3f}), " \
                f"unpaired {last['unpaired_samples']}"
    if last.get("damaged_samples"):
        text += f", damaged rows skipped {last['damaged_samples']}"
    return text + "; "


if __name__ == "__main__":
    sys.exit(main())
