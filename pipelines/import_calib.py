"""Write a segment's calib.json (docs/CONTRACTS.md) from the calibration a dataset ships with.

    python -m pipelines.import_calib kitti    CALIB_TXT    OUT --image_size 1242x375 [--camera P2] [--name front]
    python -m pipelines.import_calib nuscenes RECORDS_JSON OUT [--image_size 1600x900] [--ground_z -1.0]

KITTI: an object/tracking ``calib/<frame>.txt`` (P0..P3, R0_rect, Tr_velo_to_cam) -> one camera (K and cam2ego
of ``--camera``), ego = the velodyne frame, lidar2ego identity. nuScenes: a JSON file
``{"lidar": record, "cameras": {name: record, ...}}`` of ``calibrated_sensor`` records -> lidar2ego and every
camera. The result is checked as the datasets' readers will check it, written atomically and printed
(``e2r.data.calib``). Exit status 0 written, 2 nothing written (the message names the file and the field).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from e2r.cli_config import add_options, parse_config
from e2r.data.calib import CalibImport, calib_from_kitti, calib_from_nuscenes, write_calib
from e2r.data.readers import read_json, read_text
from e2r.errors import E2RError

#: the run config: one flag per field (``format`` is the sub-command)
CONFIG = CalibImport


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.import_calib", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write our calib.json (cameras: name, image_size, K, cam2ego; lidar2ego) from KITTI or "
                    "nuScenes calibration. Put it at <segment>/camera/calib.json, or at <segment>/lidar/"
                    "calib.json for a segment without cameras (docs/CONTRACTS.md).",
        epilog="examples:\n"
               "  python -m pipelines.import_calib kitti calib/000000.txt seg/camera/calib.json --image_size 1242x375\n"
               "  python -m pipelines.import_calib nuscenes records.json seg/camera/calib.json --image_size 1600x900\n"
               "  python -m pipelines.import_calib SUBCOMMAND --help   (the flags of each format)\n\n"
               "Exit status: 0 = written (and printed), 2 = nothing written; the message names the file and field.")
    sub = p.add_subparsers(dest="format", required=True, metavar="{kitti,nuscenes}")
    kitti = sub.add_parser("kitti", help="KITTI object/tracking calib .txt (P2, R0_rect, Tr_velo_to_cam)",
                           description="One camera from a KITTI calib .txt: K from its projection matrix P = K [I|b], "
                                       "cam2ego = inverse of [I|b] R0_rect Tr_velo_to_cam; ego = the velodyne frame "
                                       "(x forward, y left, z up, ground at about -1.73 m), lidar2ego identity.")
    add_options(kitti, CONFIG, "kitti")
    nus = sub.add_parser("nuscenes", help="nuScenes calibrated_sensor records of the LiDAR and the cameras",
                         description="lidar2ego and cameras from nuScenes calibrated_sensor records (translation in "
                                     "metres, rotation quaternion [w, x, y, z], camera_intrinsic), given as "
                                     "{\"lidar\": record, \"cameras\": {name: record, ...}} (no cameras: a "
                                     "lidar/calib.json). nuScenes' vehicle frame has its origin on the ground; the "
                                     "written ego frame has the ground at --ground_z.")
    add_options(nus, CONFIG, "nuscenes")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        cfg = parse_config(CONFIG, build_parser(), argv)
        if cfg.format == "kitti":
            doc = calib_from_kitti(read_text(cfg.source), cfg.source, cfg.image_size, cfg.camera, cfg.name)
        else:
            doc = calib_from_nuscenes(read_json(cfg.source), cfg.source, cfg.image_size, cfg.ground_z)
        text = write_calib(doc, cfg.out, cfg.source)
    except E2RError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {cfg.out} (from {cfg.format} {cfg.source}):")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
