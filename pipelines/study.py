"""The KD study in one command: does distilling the LiDAR teacher make the camera student drive better, or
learn from less camera data? Resumable: finished runs are skipped, so re-running the same command finishes
an interrupted study.

    python -m pipelines.study --out runs/study                       # the full grid (hours on 2 CPU cores)
    python -m pipelines.study --out runs/study --seeds 0 --budgets 1 4 --ablations    # a smaller grid
    python -m pipelines.study --out runs/study --report_only         # re-write the report from what finished
    python -m pipelines.study --out runs/study2 --teacher_ckpt T.pt  # the grid with a given teacher

What it runs (e2r.workflow.study): the synthetic world with the sensor gap (--camera_tracks paired
LiDAR+camera training tracks, --lidar_only_tracks more recorded by the LiDAR only, --valid_tracks and
--test_tracks held out, both driving directions) -> the tiny LiDAR teacher on every LiDAR track (or the
--teacher_ckpt given, e.g. one made better by pipelines.dagger --learner teacher) -> the
memorybank of its outputs (with dense BEV features and LiDAR depth targets when a variant needs them) -> per
seed, camera budget (the first B camera tracks) and variant (bc and kd_all: BC + teacher actions, bev_vec,
GRU state, dense BEV features and LiDAR depth; the ablations kd, kd_action, kd_state, kd_dense, kd_depth at
--ablation_budgets) one camera student with the same steps or epochs, seed and mirroring -> each evaluated
offline and in closed loop on every held-out test track. The goals judge the first KD variant of --variants.

Writes into --out: one folder per run (checkpoints, eval CSVs, result.json), study.csv (one row per run and
test track, and pooled), study.md (mean ± std over seeds per budget and variant, the spread across test
tracks, the goals as measured) and study.png (error and closed-loop success vs camera budget, BC vs KD).
"""
from __future__ import annotations

import argparse
import sys
import time

from e2r.cli_config import config_from_namespace, config_parser
from e2r.errors import E2RError
from e2r.workflow.study import StudyConfig, read_results, run_study
from e2r.workflow.study_report import write_report
from stores import StoreError

#: the run config: one flag per field, and the flags that are not fields
CONFIG = StudyConfig
PLAIN_FLAGS = ("report_only",)


def build_parser() -> argparse.ArgumentParser:
    p = config_parser(CONFIG, "python -m pipelines.study", __doc__)
    p.add_argument("--report_only", action="store_true", help="only re-write the report from the finished runs")
    return p


def parse_config(argv: list[str] | None = None) -> tuple[StudyConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    return config_from_namespace(CONFIG, args), args


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    try:
        cfg, args = parse_config(argv)
        if not args.report_only:
            run_study(cfg)
        report = write_report(cfg.out, read_results(cfg.out), kd=cfg.kd_variant())
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
