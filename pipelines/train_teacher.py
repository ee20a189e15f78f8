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

from e2r.cli_config import config_parser, parse_config as parse
from e2r.workflow.configs import TeacherTrainConfig
from e2r.workflow.train import train_teacher
from pipelines._common import training_main

#: the run config: one flag per field
CONFIG = TeacherTrainConfig


def build_parser() -> argparse.ArgumentParser:
    return config_parser(CONFIG, "python -m pipelines.train_teacher", __doc__)


def parse_config(argv: list[str] | None = None) -> TeacherTrainConfig:
    """The run config of the command line."""
    return parse(CONFIG, build_parser(), argv)


def main(argv: list[str] | None = None) -> int:
    return training_main("train_teacher", build_parser(), CONFIG, train_teacher, argv)


if __name__ == "__main__":
    sys.exit(main())
