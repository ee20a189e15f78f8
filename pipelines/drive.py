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

from e2r.errors import E2RError
from e2r.sim.drive import DriveConfig, drive, format_table
from e2r.workflow.configs import config_from_namespace


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.drive", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", required=True, help="synthetic dataset root (with synthetic_dataset.json)")
    p.add_argument("--split", default="test", help="split whose tracks are driven (default: test, the held-out one)")
    p.add_argument("--policy", action="append", default=None, metavar="SPEC",
                   help="expert | constant | train_mean=CKPT | NAME=CKPT (teacher or student); repeat for several "
                        "(default: expert)")
    p.add_argument("--segment", action="append", default=[], help="drive only this segment (repeatable; default: all)")
    p.add_argument("--starts", type=int, default=8, help="cars (start points evenly spaced along the lap) per track "
                                                        "(default 8)")
    p.add_argument("--start_fraction", type=float, default=0.0,
                   help="where along the lap the first car starts, as a fraction of the lap (default 0)")
    p.add_argument("--laps", type=int, default=1, help="laps to complete for a success (default 1)")
    p.add_argument("--time_limit", type=float, default=120.0, help="simulated seconds per run (default 120)")
    p.add_argument("--seq_len", type=int, default=5, help="frames per model window T, as in training (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the LiDAR noise; same seed -> same results")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads while driving (default 1: each step's batch is small, and a thread "
                        "pool on a busy CPU was 30-80x slower); 0 = torch's default")
    p.add_argument("--csv_path", default=None, help="write one row per run plus one aggregated row per policy")
    p.add_argument("--plot_path", default=None, help="PNG of the trajectories over the track map (x = collision)")
    p.add_argument("--video", default=None, metavar="GIF", help="GIF of one run: camera view beside the car on the map")
    p.add_argument("--video_policy", default=None, help="policy of the video run (default: the last --policy)")
    p.add_argument("--video_start", type=int, default=0, help="which start (0-based) of the first track to film")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    g = p.add_argument_group("recording and mixed control (on-policy data)")
    g.add_argument("--record", default=None, metavar="ROOT", help="write every car's run as a dataset segment under "
                                                                  "ROOT/<record_split> (one --policy)")
    g.add_argument("--record_split", default="recorded", help="split name of the recorded segments (default recorded)")
    g.add_argument("--mix_teacher", default=None, metavar="CKPT", help="teacher checkpoint sharing each student's car")
    g.add_argument("--p_student", type=float, default=1.0, help="probability that the student drives a period "
                                                                "(default 1)")
    g.add_argument("--switch_every", type=int, default=10, help="steps per drawn period (default 10 = 0.5 s)")
    g.add_argument("--envelope_lateral", type=float, default=1.5, help="teacher takeover beyond this |lateral "
                                                                       "offset| m (default 1.5)")
    g.add_argument("--envelope_heading", type=float, default=30.0, help="teacher takeover beyond this |heading "
                                                                        "error| deg (default 30)")
    g.add_argument("--recover_steps", type=int, default=20, help="steps the teacher keeps the car after it is back "
                                                                 "inside the envelope (default 20)")
    return p


def parse_config(argv: list[str] | None = None) -> DriveConfig:
    ns = build_parser().parse_args(argv)
    if ns.policy is None:
        ns.policy = ["expert"]
    return config_from_namespace(DriveConfig, ns)


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
