"""On-policy distillation: the student drives, the LiDAR teacher labels its drives, the memorybank grows by
one split per round, the student trains on the union (e2r.workflow.dagger has the full account).

    python -m pipelines.dagger --data_root D --teacher_ckpt teacher.pt --student_ckpt student.pt \\
        --memorybank mb.zarr --out runs/dagger --rounds 5 [--train_segments segment_0000 segment_0001 ...]

Per round: drive (student with probability --p_student_*, rising over the rounds; the teacher otherwise and
whenever the car leaves the envelope), record every car's run into D as split <--split_prefix>NN, append the
teacher's outputs for it to --memorybank (the earlier chunks checked byte-identical), fine-tune the last
round's student for --steps steps on the camera tracks + every recorded split (recorded windows train on the
teacher's actions), drive it alone on the held-out tracks. Re-running the command continues where it
stopped. Prints a table per round; writes <out>/dagger.csv and <out>/dagger.png.
"""
from __future__ import annotations

import argparse
import sys

from e2r.errors import E2RError
from e2r.workflow.configs import config_from_namespace
from e2r.workflow.dagger import MODES, ROUND_COLUMNS, DaggerConfig, run_dagger


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.dagger", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DaggerConfig
    p.add_argument("--data_root", required=True, help="synthetic dataset root; the recorded splits are added to it")
    p.add_argument("--teacher_ckpt", required=True, help="the LiDAR teacher: labels the drives, shares the car")
    p.add_argument("--student_ckpt", required=True, help="the camera student of round 0")
    p.add_argument("--memorybank", required=True, help="Zarr store holding the teacher's outputs of the training "
                                                       "tracks; one split is appended per round")
    p.add_argument("--out", required=True, help="run folder: round_NN/ (checkpoints, drives), dagger.csv, dagger.png")
    p.add_argument("--rounds", type=int, default=d.rounds, help=f"rounds (default {d.rounds})")
    p.add_argument("--mode", choices=MODES, default=d.mode,
                   help="dagger: the student drives (mixed with the teacher), the teacher labels; the controls with "
                        "the same frames and steps: bc_extra: the expert drives, BC on its labels; kd_extra: the "
                        "expert drives, BC + KD with those frames exported (default dagger)")
    p.add_argument("--train_segments", nargs="+", default=None, metavar="SEGMENT",
                   help="camera tracks driven and trained on (default: every paired training track of the world)")
    p.add_argument("--p_student_first", type=float, default=d.p_student_first,
                   help=f"probability that the student drives a period in round 1 (default {d.p_student_first})")
    p.add_argument("--p_student_last", type=float, default=d.p_student_last,
                   help=f"... in the last round, linear in between (default {d.p_student_last})")
    p.add_argument("--starts", type=int, default=d.starts, help=f"cars per track and round (default {d.starts})")
    p.add_argument("--record_seconds", type=float, default=d.record_seconds,
                   help=f"seconds driven per car and round (default {d.record_seconds:g}: 300 frames at 20 Hz, "
                        f"one recorded track's worth)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"fine-tuning optimizer steps per round (default {d.steps})")
    p.add_argument("--warmup_steps", type=int, default=d.warmup_steps,
                   help=f"linear learning-rate warm-up of each round's fine-tuning (default {d.warmup_steps})")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's)")
    p.add_argument("--hflip_prob", type=float, default=d.hflip_prob, help=f"mirror probability (default {d.hflip_prob})")
    for name in ("kd_action_w", "kd_bevvec_w", "kd_temporal_w"):
        p.add_argument(f"--{name}", type=float, default=getattr(d, name),
                       help=f"KD weight, as train_student's (default {getattr(d, name)})")
    p.add_argument("--switch_every", type=int, default=d.switch_every, help="steps per drawn control period")
    p.add_argument("--envelope_lateral", type=float, default=d.envelope_lateral, help="takeover |lateral offset| m")
    p.add_argument("--envelope_heading", type=float, default=d.envelope_heading, help="takeover |heading error| deg")
    p.add_argument("--recover_steps", type=int, default=d.recover_steps, help="steps the teacher keeps the car")
    p.add_argument("--eval_split", default=d.eval_split, help=f"held-out split driven after each round ({d.eval_split})")
    p.add_argument("--eval_starts", type=int, default=d.eval_starts, help=f"cars per held-out track ({d.eval_starts})")
    p.add_argument("--eval_time_limit", type=float, default=d.eval_time_limit,
                   help=f"seconds per held-out run ({d.eval_time_limit:g})")
    p.add_argument("--split_prefix", default=None, help="name of the recorded splits before the round number "
                                                        "(default <mode>_s<seed>_r)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of training, drives and mixing (default 0)")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_namespace(DaggerConfig, build_parser().parse_args(argv))
        result = run_dagger(cfg)
    except (E2RError, ValueError, FileNotFoundError) as e:
        print(f"dagger: error: {e}", file=sys.stderr)
        return 1
    print("\n" + "  ".join(f"{c:>12}" for c in ROUND_COLUMNS))
    for row in result["rounds"]:
        print("  ".join(f"{row[c]:>12.3f}" if isinstance(row[c], float) else f"{row[c]:>12}" for c in ROUND_COLUMNS))
    print(f"last student: {result['student']}\nwrote {result['csv_path']} and {result['plot_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
