"""Closed-loop racing: drive policies (expert, teacher, student checkpoints, baselines) on the held-out track(s)
of a synthetic world, rendering each car's LiDAR and camera from its own pose every step.

    python -m pipelines.drive --data_root data/synth --split test --policy expert \\
        --policy teacher=runs/teacher_best.pt --policy student_kd=runs/student_best.pt --policy constant \\
        [--starts 8] [--laps 1] [--time_limit 120] [--seed 0] [--device auto] \\
        [--csv_path drive.csv] [--plot_path traj.png] [--video run.gif --video_policy student_kd]

Policies (--policy, repeatable): expert (pure pursuit + speed profile from the true pose), constant (repeat
the previous steering, keep the current speed), train_mean=CKPT (steer the training mean wheel angle stored
in a checkpoint, keep the speed), NAME=CKPT (a teacher or student checkpoint; the checkpoint's kind decides).
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

from e2r.cli_config import config_parser, parse_config as parse
from e2r.errors import E2RError
from e2r.sim.drive import DriveConfig, drive, format_table

#: the run config: one flag per field
CONFIG = DriveConfig


def build_parser() -> argparse.ArgumentParser:
    return config_parser(CONFIG, "python -m pipelines.drive", __doc__)


def parse_config(argv: list[str] | None = None) -> DriveConfig:
    """The run config of the command line."""
    return parse(CONFIG, build_parser(), argv)


def main(argv: list[str] | None = None) -> int:
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
