"""Offline evaluation of a LiDAR teacher checkpoint on one split, next to two trivial baselines.

    python -m pipelines.eval_teacher --data_root data/synth --split valid --teacher_ckpt runs/teacher_best.pt \\
        --overall_weights 1.0,0.05 --csv_path runs/eval_teacher.csv --plot_path runs/eval_teacher.png

Prints per-action MSE / MAE / RMSE (degrees, m/s) over every (window, step) of the split and the weighted
overall ``sum_a w_a * MSE_a``, for:
  teacher                 the checkpoint (architecture and normalisation come from the checkpoint);
  baseline_train_mean     always the training split's mean action (stored in the checkpoint);
  baseline_prev_steering  steering = the previous command (the model's steering input, wheel_angle[t-1]),
                          speed = keep the current speed (the speed input velocity[t]) as the command.
"""
from __future__ import annotations

import argparse
import sys

from e2r.workflow.configs import TeacherEvalConfig, config_from_namespace
from e2r.workflow.evaluate import evaluate_teacher
from pipelines._common import add_eval_input_args, add_eval_output_args, add_eval_window_args, eval_main, num_features


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.eval_teacher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_input_args(p, "teacher")
    add_eval_window_args(p)
    p.add_argument("--lidar_num_features", default="auto", type=num_features, help="columns per point: 4, 5, 8 or auto")
    add_eval_output_args(p)
    return p


def parse_config(argv: list[str] | None = None) -> TeacherEvalConfig:
    """The run config of the command line."""
    return config_from_namespace(TeacherEvalConfig, build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    return eval_main("eval_teacher", build_parser(), TeacherEvalConfig, evaluate_teacher, argv)


if __name__ == "__main__":
    sys.exit(main())
