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
"""
from __future__ import annotations

import argparse
import sys

from e2r.workflow.configs import StudentEvalConfig, config_from_namespace
from e2r.workflow.evaluate import evaluate_student, print_kd_gap
from pipelines._common import (add_eval_input_args, add_eval_output_args, add_eval_window_args, add_pairing_args,
                              add_store_access_args, eval_main)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.eval_student", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_input_args(p, "student")
    p.add_argument("--memorybank", "--teacher_cache_dir", dest="memorybank", default=None,
                   help="memorybank of teacher outputs: also report the KD gap to the teacher on its keys")
    p.add_argument("--kd_retrieval", default=None, metavar="INDEX",
                   help="also check retrieval from this index of the store: the similarity of windows without a row, "
                        "and for windows with one how close the retrieved targets come to their own")
    p.add_argument("--kd_retrieval_k", type=int, default=8, help="rows retrieved per window (default 8)")
    p.add_argument("--kd_retrieval_tau", type=float, default=0.05, help="mixing temperature (default 0.05)")
    add_pairing_args(p)
    p.add_argument("--skip_damaged", action="store_true",
                   help="a damaged memorybank (rows failing their checksums, missing shards) stops the run by "
                        "default; with this flag the damaged rows are left without KD and counted")
    add_store_access_args(p)
    add_eval_window_args(p)
    add_eval_output_args(p)
    return p


def parse_config(argv: list[str] | None = None) -> StudentEvalConfig:
    """The run config of the command line."""
    return config_from_namespace(StudentEvalConfig, build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    return eval_main("eval_student", build_parser(), StudentEvalConfig, evaluate_student, argv, print_kd_gap)


if __name__ == "__main__":
    sys.exit(main())
