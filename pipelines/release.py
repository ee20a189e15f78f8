"""The released models shipped in the package (``e2r/released/``): add one, or measure them by driving.

    python -m pipelines.release add --name student_dagger --ckpt runs/dagger/round_05/student.pt \\
        --description "..." --made_with "python -m pipelines.dagger ..." --commit 45ae872 [--world DATA] \\
        [--budget "..."] [--source_result "..."] [--replace]
    python -m pipelines.release measure --data_root runs/w1 --label "fresh world seed 1, test" \\
        [--names teacher student_dagger] [--split test] [--starts 2] [--time_limit 40] [--csv_path drive.csv]

add: the checkpoint written compactly (float16 weights, no optimizer state) as e2r/released/<name>.pt, with
its manifest entry: sha256, size, what it is, how it was made (the command, the commit, the equivalent
train_teacher/train_student line, the world's seed, the budget, the seed, the source's sha256 and result) and
the fingerprints of the tracks its training read. measure: drives the released files (sha256 verified) on a
synthetic world's split (laps 1) and records success, progress and whether those tracks were held out for each
model, under --label, with this command. List them: python -m pipelines.drive --list_released; drive one:
python -m pipelines.drive --data_root D --policy kd=released:student_dagger.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from e2r.cli_config import parse_config, subcommand_parser
from e2r.errors import E2RError
from e2r.workflow.release import ReleaseConfig, add_release, measure_release

#: the run config: one flag per field (``command`` is the sub-command)
CONFIG = ReleaseConfig
_HELP = {"add": "write a checkpoint compactly into the released folder with its manifest entry",
         "measure": "drive released models on a synthetic world's split and record the results"}


def build_parser() -> argparse.ArgumentParser:
    return subcommand_parser(CONFIG, "python -m pipelines.release", __doc__, _HELP)


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_config(CONFIG, build_parser(), argv)
    try:
        if cfg.command == "add":
            entry = add_release(cfg)
            print(f"released {cfg.name}: {entry['file']} ({entry['kind']}, {entry['bytes'] / 1e6:.2f} MB, sha256 "
                  f"{entry['sha256'][:16]}...), {len(entry['trained_tracks'])} tracks trained on, {len(entry['valid_tracks'])} valid; "
                  f"{entry['made_by']['budget']}")
        else:
            for name, r in measure_release(cfg).items():
                print(f"{name:<18} {r['label']}: {r['successes']}/{r['runs']} laps, progress {r['progress']:.3f}, "
                      f"collisions {r['collisions']}, tracks {r['track_status']}")
            print(f"drove in {r['wall_s_all_names']:.0f} s wall, {r['cpu_s_all_names']:.0f} s CPU")
    except (E2RError, ValueError, FileNotFoundError, OSError) as e:
        print(f"release {cfg.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
