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

from e2r.data.check import DatasetCheck, check_dataset
from e2r.workflow.configs import config_from_namespace, image_size
from pipelines._common import num_features


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.check_dataset", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Validate a dataset in the e2r layout (<root>/<split>/<segment>/meta/data.csv, lidar/, "
                    "camera/): reads every file and reports every problem with its file and data.csv row.",
        epilog="Exit status: 0 = no problems, 1 = problems found (listed above the summary), "
               "2 = the dataset root or a split cannot be used at all.")
    p.add_argument("data_root", metavar="DIR", help="dataset root holding one folder per split")
    p.add_argument("--seq_len", type=int, default=5, help="frames per sample window (default 5)")
    p.add_argument("--stride", type=int, default=1, help="frames between window starts (default 1)")
    p.add_argument("--lidar_num_features", type=num_features, default="auto",
                   help="float32 features per point in .bin files: 4, 5, 8 or auto (decided per segment from "
                        "file sizes and values; default auto)")
    p.add_argument("--image_size", type=image_size, default=(256, 128),
                   help="WxH images are resized to (default 256x128); checks that every image decodes")
    p.add_argument("--splits", nargs="+", default=None, help="splits to check (default: every split found)")
    p.add_argument("--no_progress", action="store_true", help="no tqdm progress bars")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return check_dataset(config_from_namespace(DatasetCheck, build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
