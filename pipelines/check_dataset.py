"""Validate a whole dataset: read every csv, calib.json, point cloud and image, and report what is wrong.

    python -m pipelines.check_dataset DIR [--seq_len 5] [--stride 1] [--lidar_num_features auto]
                                          [--image_size 256x128] [--splits train valid]

Prints, per split, the segments, frames and windows (samples of seq_len frames) and, per segment, the point
layout used (features per point, detected or given) and the mean number of points per frame; then every
problem (file, data.csv row, reason) and a one-line summary (``e2r.data.check``). Exit code 0 when no problem was found, 1 when
problems were found, 2 when the dataset root itself cannot be used.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from e2r.cli_config import config_parser, parse_config
from e2r.data.check import DatasetCheck, check_dataset

#: the run config: one flag per field
CONFIG = DatasetCheck


def build_parser() -> argparse.ArgumentParser:
    return config_parser(
        CONFIG, "python -m pipelines.check_dataset",
        "Validate a dataset in the e2r layout (<root>/<split>/<segment>/meta/data.csv, lidar/, camera/): reads every "
        "file and reports every problem with its file and data.csv row.",
        epilog="Exit status: 0 = no problems, 1 = problems found (listed above the summary), "
               "2 = the dataset root or a split cannot be used at all.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return check_dataset(parse_config(CONFIG, build_parser(), argv))


if __name__ == "__main__":
    sys.exit(main())
