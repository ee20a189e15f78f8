"""Offline evaluation of a camera student checkpoint on one split, next to two trivial baselines, and (with
``--memorybank``) the KD gap to the teacher whose outputs the store holds.

    python -m pipelines.eval_student --data_root data/synth --split test --student_ckpt runs/student_best.pt \\
        --memorybank runs/mb.zarr --overall_weights 1.0,0.05 --csv_path runs/eval_student.csv \\
        --plot_path runs/eval_student.png

Prints per-action MSE / MAE / RMSE (degrees, m/s) over every (window, step) of the split and the weighted
overall ``sum_a w_a * MSE_a``, for:
  student                 the checkpoint (architecture, image size and normalisation come from it);
  baseline_train_mean     always the training split's mean action (stored in the checkpoint);
  baseline_prev_steering  steering = the previous command (wheel_angle[t-1]), speed = keep the current speed (the speed input) as the command.
KD gap (windows whose key is in the store): per-action MSE and weighted overall between the student's and
the teacher's actions, mean bev_vec cosine similarity, gru_out MSE. In the CSV the gap is extra columns
(``kd_*``) of the student row.
On a synthetic world also each segment's light and the per-look table: the mean over each look's (noon / dusk /
night) segments of the physical MSEs and of the loss in normalised units (``loss_norm``, the training loss
without its extra terms; ``loss_vs_mean``: against always predicting the training mean); absent on real data.
"""
from __future__ import annotations

import argparse
import sys

from e2r.cli_config import config_parser, parse_config as parse
from e2r.workflow.configs import StudentEvalConfig
from e2r.workflow.evaluate import evaluate_student, print_kd_gap
from pipelines._common import eval_main

#: the run config: one flag per field
CONFIG = StudentEvalConfig


def build_parser() -> argparse.ArgumentParser:
    return config_parser(CONFIG, "python -m pipelines.eval_student", __doc__)


def parse_config(argv: list[str] | None = None) -> StudentEvalConfig:
    """The run config of the command line."""
    return parse(CONFIG, build_parser(), argv)


def main(argv: list[str] | None = None) -> int:
    return eval_main("eval_student", build_parser(), CONFIG, evaluate_student, argv, print_kd_gap)


if __name__ == "__main__":
    sys.exit(main())
