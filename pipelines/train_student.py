"""Train the camera student (image CNN -> Lift-Splat -> BEV CNN -> GRU) by behaviour cloning plus knowledge
distillation from the LiDAR teacher's outputs stored in a memorybank.

    python -m pipelines.train_student --data_root data/synth --preset tiny --memorybank runs/mb.zarr \\
        --kd_action_w 1 --kd_bevvec_w 0.5 --kd_temporal_w 0.5 --save_path runs/student_best.pt
    torchrun --nproc_per_node 4 -m pipelines.train_student ...        # multi-GPU (DDP), same flags

Loss = BC (weighted MSE, steering 1.0 / speed 0.05, on actions normalised with the training split's
statistics, stored in the checkpoint) + for the samples whose key is in the memorybank the weighted KD
terms (e2r.kd: action MSE, bev_vec 1 - cosine, GRU-out MSE, dense bev_feat masked to the camera FOV and
weighted towards teacher-occupied cells). Samples without teacher targets get BC only; each epoch logs how
many samples had KD and how many BC only. Teacher targets are streamed: the training process reads each
batch's rows by key with one batched read of the store (opened read-only), up to two batches ahead of the
step, while the DataLoader workers read the camera windows (--kd_targets main, the default; --kd_targets worker
has the workers read the rows too). Without --memorybank (or with all KD weights 0) this is the BC-only student.

Length of the run: --epochs, or --steps N optimizer steps (the same budget whatever the data size); the learning
rate warms up linearly over --warmup_steps (default 150) and then decays by a cosine. bev_vec reads a 4 x 4
pool of the BEV map (--bev_pool_grid): with the global mean and no warm-up the tiny student stayed at the label
mean in 4 of 6 seed x thread-count runs (docs/STUDENT.md). --photometric S jitters the training images'
brightness, contrast, gamma, colour and noise (off by default: no measured gain yet, docs/STUDENT.md).

The validation loss (the best-checkpoint metric, listed per epoch in the checkpoint's ``valid_losses``) is
the BC weighted MSE on --valid_split, in the same normalised units as the teacher's. ``--hflip_prob`` (off by
default) mirrors samples left-right together with their cached targets (steering negated, teacher bev_feat
flipped); the bev_vec and temporal KD terms are dropped for mirrored samples (their targets cannot be mirrored).

Camera and LiDAR recorded apart (make_dataset --camera_root, other rates or clock offsets): train on the camera
root with --pair_lidar_root LIDAR_ROOT [--pair_tolerance_ms 50]; each epoch also logs the windows paired and
unpaired and the pairs' mean confidence (e2r/workflow/pairing.py).
"""
from __future__ import annotations

import argparse
import sys

from e2r.workflow.configs import StudentTrainConfig, config_from_namespace
from e2r.workflow.train import train_student
from pipelines._common import (add_pairing_args, add_store_access_args, add_training_data_args,
                              add_training_run_args, add_training_window_args, training_main)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.train_student", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_data_args(p, "student")
    p.add_argument("--view_transform", choices=("lss", "identity"), default="lss",
                   help="camera -> BEV: lss (Lift-Splat, default) or identity (resize placeholder, ablation)")
    p.add_argument("--photometric", type=float, default=StudentTrainConfig.photometric,
                   help="strength in [0, 1] of the photometric augmentation of training windows: brightness, "
                        "contrast, gamma, colour and noise, one draw per window (e2r/data/augment.py; default "
                        f"{StudentTrainConfig.photometric} = off: no measured gain at 4 tracks, docs/STUDENT.md)")
    p.add_argument("--select_by", choices=("loss", "drive"), default=StudentTrainConfig.select_by,
                   help="what picks the kept checkpoint (--save_path) after each epoch: the BC loss on --valid_split "
                        "(default), or driving the --valid_split tracks in closed loop (synthetic worlds only; most "
                        "success + progress in laps)")
    p.add_argument("--select_starts", type=int, default=StudentTrainConfig.select_starts,
                   help="with --select_by drive: start points per valid track (default "
                        f"{StudentTrainConfig.select_starts})")
    p.add_argument("--select_time_limit", type=float, default=StudentTrainConfig.select_time_limit,
                   help="with --select_by drive: seconds of simulated driving per start (default "
                        f"{StudentTrainConfig.select_time_limit})")
    p.add_argument("--splat_pool", choices=("sum", "mean"), default=StudentTrainConfig.splat_pool,
                   help="Lift-Splat: sum the frustum points falling in a BEV cell (as LSS) or average them, so the "
                        f"cells next to the camera do not outweigh the image (default {StudentTrainConfig.splat_pool})")
    p.add_argument("--bev_pool_grid", type=int, default=StudentTrainConfig.bev_pool_grid,
                   help="bev_vec reads a k x k average pool of the BEV features (default "
                        f"{StudentTrainConfig.bev_pool_grid}; 1 = their global mean, which keeps what is seen but "
                        "not where: the tiny student then often never leaves the label mean, docs/STUDENT.md)")
    p.add_argument("--memorybank", "--teacher_cache_dir", dest="memorybank", default=None,
                   help="memorybank of teacher outputs (pipelines.export); KD for the keys it holds. Unset: BC only")
    p.add_argument("--teacher_ckpt", default=None,
                   help="teacher checkpoint, only for its config (BEV grid) when the memorybank does not record it")
    p.add_argument("--skip_damaged", action="store_true",
                   help="a damaged memorybank (rows failing their checksums, missing shards) stops the run by "
                        "default; with this flag the damaged rows are left without KD and counted")
    add_store_access_args(p)
    p.add_argument("--kd_action_w", type=float, default=1.0, help="weight of action KD (default 1.0)")
    p.add_argument("--kd_bevvec_w", type=float, default=1.0, help="weight of bev_vec 1-cosine KD (default 1.0)")
    p.add_argument("--kd_temporal_w", type=float, default=1.0, help="weight of GRU-out MSE KD (default 1.0)")
    p.add_argument("--kd_bevfeat_w", type=float, default=0.0,
                   help="weight of dense bev_feat KD (needs bev_feat in the store; default 0 = off)")
    p.add_argument("--kd_bevfeat_background", type=float, default=0.05,
                   help="dense KD weight of cells the teacher finds unoccupied (default 0.05)")
    p.add_argument("--kd_retrieval", default=None, metavar="INDEX",
                   help="KD for windows without a row in the memorybank from the teacher rows of the most similar "
                        "situations, found in this retrieval index of the store (python -m pipelines.retrieval_index, "
                        "e.g. state); paired windows keep their own targets. Default: off")
    p.add_argument("--kd_retrieval_k", type=int, default=8, help="rows retrieved per window (default 8)")
    p.add_argument("--kd_retrieval_tau", type=float, default=0.05,
                   help="temperature of the softmax over similarities that mixes the k rows (default 0.05)")
    p.add_argument("--kd_retrieval_min_sim", type=float, default=0.9,
                   help="no KD for a window whose best cosine similarity is below this (default 0.9)")
    add_pairing_args(p)
    p.add_argument("--kd_unpaired", action="store_true",
                   help="with --kd_retrieval: ignore every window's own row and its whole segment (the unpaired-data "
                        "experiment: camera drives that share no key with the LiDAR drives)")
    add_training_window_args(p, StudentTrainConfig.warmup_steps)
    add_training_run_args(p, "seed for init, shuffling and flips (default 0)", "runs/student_best.pt")
    return p


def parse_config(argv: list[str] | None = None) -> StudentTrainConfig:
    """The run config of the command line."""
    return config_from_namespace(StudentTrainConfig, build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    return training_main("train_student", build_parser(), StudentTrainConfig, train_student, argv,
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
