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

Controls in the same command (--mode): bc_extra, kd_extra (the expert drives: more expert frames) and oracle
(driven as dagger, labelled by the simulator's expert). A teacher worth imitating (simulator only):

    python -m pipelines.dagger --data_root D --teacher_ckpt teacher.pt --learner teacher --mode oracle \
        --out runs/teacher_dagger --rounds 5 [--train_segments ...]

the teacher drives its training tracks alone, the expert labels every recorded state, the teacher fine-tunes
on its training split + the recorded splits.
"""
from __future__ import annotations

import argparse
import sys

from e2r.cli_config import config_parser, parse_config as parse
from e2r.errors import E2RError
from e2r.workflow.dagger import ROUND_COLUMNS, DaggerConfig, run_dagger

#: the run config: one flag per field
CONFIG = DaggerConfig


def build_parser() -> argparse.ArgumentParser:
    return config_parser(CONFIG, "python -m pipelines.dagger", __doc__)


def parse_config(argv: list[str] | None = None) -> DaggerConfig:
    """The run config of the command line."""
    return parse(CONFIG, build_parser(), argv)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        result = run_dagger(cfg)
    except (E2RError, ValueError, FileNotFoundError) as e:
        print(f"dagger: error: {e}", file=sys.stderr)
        return 1
    print("\n" + "  ".join(f"{c:>12}" for c in ROUND_COLUMNS))
    for row in result["rounds"]:
        print("  ".join(f"{row[c]:>12.3f}" if isinstance(row[c], float) else f"{row[c]:>12}" for c in ROUND_COLUMNS))
    print(f"last {cfg.learner}: {result['student']}\nwrote {result['csv_path']} and {result['plot_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
