"""Train the LiDAR teacher (PointPillars BEV + GRU) on ``<data_root>/<train_split>``.

    python -m pipelines.train_teacher --data_root data/synth --preset tiny --epochs 8 \\
        --save_path runs/teacher_best.pt --checkpoint_path runs/teacher_last.pt
    torchrun --nproc_per_node 4 -m pipelines.train_teacher ...        # multi-GPU (DDP), same flags

Actions are normalised with the training split's statistics (stored in the checkpoint); the loss is the
weighted MSE (steering 1.0, speed 0.05) in normalised units. ``--checkpoint_path`` gets the latest state
after every epoch (model, optimizer, scheduler, epoch, best metric, RNG state, history) for
``--resume_path``; ``--save_path`` gets the best model by validation loss. ``--init_path`` loads weights
only (transfer), optionally without the output layer.
"""
from __future__ import annotations

import argparse
import sys

from e2r.workflow.configs import TeacherTrainConfig, config_from_namespace
from e2r.workflow.train import train_teacher
from pipelines._common import (add_training_data_args, add_training_run_args, add_training_window_args, num_features,
                               training_main)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.train_teacher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_data_args(p, "model")
    add_training_window_args(p, TeacherTrainConfig.warmup_steps)
    p.add_argument("--lidar_num_features", default="auto", type=num_features,
                   help="columns per point in the .bin files: 4, 5, 8 or auto (default: auto-detect)")
    p.add_argument("--residual_actions", choices=("all", "steering", "none", "scene"),
                   default=TeacherTrainConfig.residual_actions,
                   help="what the head predicts as a change w.r.t. its inputs: all (steering and speed), steering "
                        "(the speed command outright), none, scene (none, and the previous-steering input unused: "
                        f"the head that drives, default {TeacherTrainConfig.residual_actions}; a head that sees its "
                        "previous command learns to repeat it and leaves the road); the student follows")
    add_training_run_args(p, "seed for init and shuffling (default 0)", "runs/teacher_best.pt")
    return p


def parse_config(argv: list[str] | None = None) -> TeacherTrainConfig:
    """The run config of the command line."""
    return config_from_namespace(TeacherTrainConfig, build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    return training_main("train_teacher", build_parser(), TeacherTrainConfig, train_teacher, argv)


if __name__ == "__main__":
    sys.exit(main())
