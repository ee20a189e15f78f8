"""Offline evaluation of a LiDAR teacher checkpoint on one split, next to two trivial baselines.

    python -m pipelines.eval_teacher --data_root data/synth --split valid --teacher_ckpt runs/teacher_best.pt \\
        --overall_weights 1.0,0.05 --csv_path runs/eval_teacher.csv --plot_path runs/eval_teacher.png

Prints per-action MSE / MAE / RMSE (degrees, m/s) over every (window, step) of the split and the weighted
overall ``sum_a w_a * MSE_a``, for:
  teacher                 the checkpoint (architecture and normalisation come from the checkpoint);
  baseline_train_mean     always the training split's mean action (stored in the checkpoint);
  baseline_prev_steering  steering = the previous command (the model's steering input, wheel_angle[t-1]),
                          speed = keep the current speed (the speed input velocity[t]) as the command.
On a synthetic world also each segment's light and the per-look table (as ``pipelines.eval_student``).
"""
from __future__ import annotations

import argparse
import sys

from e2r.cli_config import config_parser, parse_config as parse
from e2r.workflow.configs import TeacherEvalConfig
from e2r.workflow.evaluate import evaluate_teacher
from pipelines._common import eval_main

#: the run config: one flag per field
CONFIG = TeacherEvalConfig


def build_parser() -> argparse.ArgumentParser:
    return config_parser(CONFIG, "python -m pipelines.eval_teacher", __doc__)


def parse_config(argv: list[str] | None = None) -> TeacherEvalConfig:
    """The run config of the command line."""
    return parse(CONFIG, build_parser(), argv)


def main(argv: list[str] | None = None) -> int:
    return eval_main("eval_teacher", build_parser(), CONFIG, evaluate_teacher, argv)


if __name__ == "__main__":
    sys.exit(main())
