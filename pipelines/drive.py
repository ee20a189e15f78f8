"""Closed-loop racing: drive policies (expert, teacher, student checkpoints, baselines) on the held-out track(s)
of a synthetic world, rendering each car's LiDAR and camera from its own pose every step.

    python -m pipelines.drive --data_root data/synth --split test --policy expert \\
        --policy teacher=runs/teacher_best.pt --policy student_kd=runs/student_best.pt --policy constant \\
        [--starts 8] [--laps 1] [--time_limit 120] [--seed 0] [--device auto] \\
        [--csv_path drive.csv] [--plot_path traj.png] [--video run.gif --video_policy student_kd]

Policies (--policy, repeatable): expert (pure pursuit + speed profile from the true pose), constant (repeat
the previous steering, keep the current speed), train_mean=CKPT (steer the training mean wheel angle stored
in a checkpoint, keep the speed), NAME=CKPT (a teacher or student checkpoint; the checkpoint's kind decides).
CKPT may be released:<name>, a model shipped in the package (e2r/released/, sha256-checked): --list_released
names them, says what each is, what it measured and how it was made:

    python -m pipelines.drive --list_released
    python -m pipelines.drive --data_root D --policy kd=released:student_dagger --policy teacher=released:teacher

Every segment (track) of the split is driven by --starts cars starting at evenly spaced points of its centre
line. A run ends on a wall collision, after --laps laps, or at --time_limit seconds. Printed per policy
(over all runs): success rate (laps done without collision), laps, progress (laps as a float), collisions,
time of the first full lap, mean and max |lateral offset| from the centre line, mean speed, simulated
steps per second. The split must come from python -m pipelines.make_dataset (its tracks are rebuilt).

On-policy data (the DAgger rounds of pipelines.dagger): --record ROOT writes every car's run as a segment of
split --record_split under ROOT (camera and LiDAR frames, calib, data.csv of the executed commands;
e2r.sim.record); --mix_teacher CKPT drives each student under mixed control with that teacher (each car
executes the student's command with probability --p_student, drawn every --switch_every steps, otherwise the
teacher's; the teacher takes over outside the envelope --envelope_lateral m / --envelope_heading deg and
keeps the car for --recover_steps steps):

    python -m pipelines.drive --data_root D --split train --segment segment_0000 --policy s=student.pt \
        --mix_teacher teacher.pt --p_student 0.5 --record D --record_split dagger_r1 --time_limit 15
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from e2r.cli_config import config_parser, parse_config as parse
from e2r.errors import E2RError
from e2r.released import listing
from e2r.sim.drive import DriveConfig, drive, format_table

#: the run config: one flag per field, and the flag that is not a field (an action: list and exit)
CONFIG = DriveConfig
PLAIN_FLAGS = ("list_released",)
_LIST_HELP = ("list the released models (name, kind, what it is, measured results, how it was made) and exit; "
              "drive one with --policy NAME=released:<name>")


def _add_list_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--list_released", action="store_true", help=_LIST_HELP)
    return parser


def build_parser() -> argparse.ArgumentParser:
    return _add_list_flag(config_parser(CONFIG, "python -m pipelines.drive", __doc__))


def wants_listing(argv: Optional[Sequence[str]]) -> bool:
    """Whether the command line asks for --list_released (which needs no --data_root)."""
    known, _ = _add_list_flag(argparse.ArgumentParser(add_help=False)).parse_known_args(argv)
    return bool(known.list_released)


def parse_config(argv: list[str] | None = None) -> DriveConfig:
    """The run config of the command line."""
    return parse(CONFIG, build_parser(), argv)


def main(argv: list[str] | None = None) -> int:
    if wants_listing(argv):
        try:
            print(listing())
        except E2RError as e:
            print(f"drive: error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        cfg = parse_config(argv)
        out = drive(cfg)
    except (E2RError, ValueError, FileNotFoundError) as e:
        print(f"drive: error: {e}", file=sys.stderr)
        return 1
    segs = sorted({r.segment for r in out["runs"]})
    print(f"{cfg.split} ({', '.join(segs)}): {cfg.starts} starts per track, {cfg.laps} lap(s), "
          f"time limit {cfg.time_limit:g} s")
    print(format_table(out["summary"]))
    for what in ("csv_path", "plot_path", "video"):
        if out[what]:
            print(f"wrote {out[what]}")
    if out["recorded"]:
        frames = sum(r.steps for r in out["runs"])
        print(f"recorded {len(out['recorded'])} segment(s), {frames} frames, under {cfg.record}/{cfg.record_split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
