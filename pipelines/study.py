"""The KD study in one command: does distilling the LiDAR teacher make the camera student drive better, or
learn from less camera data? Resumable: finished runs are skipped, so re-running the same command finishes
an interrupted study.

    python -m pipelines.study --out runs/study                       # the full grid (hours on 2 CPU cores)
    python -m pipelines.study --out runs/study --seeds 0 --budgets 1 4 --ablations    # a smaller grid
    python -m pipelines.study --out runs/study --report_only         # re-write the report from what finished

What it runs (e2r.workflow.study): the synthetic world with the sensor gap (--camera_tracks paired
LiDAR+camera training tracks, --lidar_only_tracks more recorded by the LiDAR only, --valid_tracks and
--test_tracks held out, both driving directions) -> the tiny LiDAR teacher on every LiDAR track -> the
memorybank of its outputs -> per seed, camera budget (the first B camera tracks) and variant (bc, kd, and
the KD ablations kd_action, kd_state, kd_dense at --ablation_budgets) one camera student with the same
epochs, seed and mirroring -> each evaluated offline and in closed loop on every held-out test track.

Writes into --out: one folder per run (checkpoints, eval CSVs, result.json), study.csv (one row per run and
test track, and pooled), study.md (mean ± std over seeds per budget and variant, the spread across test
tracks, the goals as measured) and study.png (error and closed-loop success vs camera budget, BC vs KD).
"""
from __future__ import annotations

import argparse
import sys
import time

from e2r.errors import E2RError
from e2r.workflow.configs import config_from_namespace
from e2r.workflow.study import VARIANTS, StudyConfig, read_results, run_study
from e2r.workflow.study_report import write_report
from stores import StoreError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = StudyConfig()
    p.add_argument("--out", default=d.out, help=f"study folder (default {d.out})")
    p.add_argument("--data_root", default=None, help="the world's folder (default <out>/data); generated if missing, "
                                                     "reused if it holds the same world")
    w = p.add_argument_group("the world")
    w.add_argument("--camera_tracks", type=int, default=d.camera_tracks,
                   help=f"paired LiDAR+camera training tracks = the largest budget (default {d.camera_tracks})")
    w.add_argument("--lidar_only_tracks", type=int, default=d.lidar_only_tracks,
                   help=f"more training tracks recorded by the LiDAR only (default {d.lidar_only_tracks})")
    w.add_argument("--valid_tracks", type=int, default=d.valid_tracks, help=f"default {d.valid_tracks}")
    w.add_argument("--test_tracks", type=int, default=d.test_tracks, help=f"held out (default {d.test_tracks})")
    w.add_argument("--frames", type=int, default=d.frames, help=f"frames per track at 20 Hz (default {d.frames})")
    w.add_argument("--world_seed", type=int, default=d.world_seed, help="seed of the world and the teacher (default 0)")
    w.add_argument("--appearance", choices=("gap", "clean"), default=d.appearance,
                   help="gap: the camera/LiDAR sensor gap (default); clean: the old uniform look, for comparison")
    g = p.add_argument_group("the grid")
    g.add_argument("--budgets", type=int, nargs="+", default=d.budgets, help="camera training tracks per student "
                                                                             "(default 1 2 4)")
    g.add_argument("--seeds", type=int, nargs="+", default=d.seeds, help="student seeds (default 0 1 2)")
    g.add_argument("--variants", nargs="+", default=d.variants, choices=list(VARIANTS),
                   help="variants at every budget (default bc kd)")
    g.add_argument("--ablations", nargs="*", default=d.ablations, choices=list(VARIANTS),
                   help="KD ablations run at --ablation_budgets (default kd_action kd_state kd_dense; none: "
                        "--ablations with no value)")
    g.add_argument("--ablation_budgets", type=int, nargs="+", default=d.ablation_budgets,
                   help="budgets the ablations run at (default 1)")
    g.add_argument("--teacher_epochs", type=int, default=d.teacher_epochs, help=f"default {d.teacher_epochs}")
    g.add_argument("--teacher_stride", type=int, default=d.teacher_stride,
                   help=f"frames between the teacher's training windows (default {d.teacher_stride})")
    g.add_argument("--student_epochs", type=int, default=d.student_epochs, help=f"default {d.student_epochs}")
    g.add_argument("--student_steps", type=int, default=d.student_steps,
                   help="train every student this many optimizer steps instead of --student_epochs: the same "
                        "training whatever the camera budget (default: by epochs)")
    g.add_argument("--student_warmup_steps", type=int, default=d.student_warmup_steps,
                   help=f"learning-rate warm-up of every student (default {d.student_warmup_steps})")
    g.add_argument("--residual_actions", choices=("all", "steering", "none", "scene"), default=d.residual_actions,
                   help="the teacher's (and so every student's) head: what it predicts as a change of its inputs "
                        f"(pipelines.train_teacher --help; default {d.residual_actions}: a teacher that sees its "
                        "previous command copies it and drives off the track in closed loop)")
    g.add_argument("--hflip_prob", type=float, default=d.hflip_prob,
                   help="mirroring probability of the teacher's and every student's training windows (balances turn "
                        f"directions; default {d.hflip_prob})")
    c = p.add_argument_group("closed loop")
    c.add_argument("--starts", type=int, default=d.starts, help=f"start points per test track (default {d.starts})")
    c.add_argument("--time_limit", type=float, default=d.time_limit,
                   help=f"simulated seconds per run, one lap needs ~30 (default {d.time_limit})")
    c.add_argument("--no_drive", action="store_true", help="offline evaluation only")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    p.add_argument("--report_only", action="store_true", help="only re-write the report from the finished runs")
    return p


def parse_config(argv: list[str] | None = None) -> tuple[StudyConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    return config_from_namespace(StudyConfig, args), args


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    try:
        cfg, args = parse_config(argv)
        if not args.report_only:
            run_study(cfg)
        report = write_report(cfg.out, read_results(cfg.out))
    except (E2RError, StoreError, ValueError) as e:
        print(f"study: error: {e}", file=sys.stderr)
        return 1
    print("\n" + report["text"])
    n = sum(1 for (b, v) in report["table"] if v not in ("teacher", "expert"))
    print(f"study: {n} (budget, variant) cells in {time.perf_counter() - t0:.0f} s; table {report['md_path']}, "
          f"rows {report['csv_path']}, plot {report['plot_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
