"""Writers of tiny fake datasets in the data layout of docs/CONTRACTS.md, for tests and benchmarks.

``write_tiny_dataset(root)`` gives ``<root>/<split>/segment_XXXX/{meta/data.csv, lidar/*.bin,
camera/*.png, camera/calib.json}`` with LiDAR-like point clouds (ground at z = -1, walls, intensity in
[0, 1]), random small images and smooth velocity / wheel_angle signals. Deterministic for a given seed.
Unlike ``e2r.sim.world`` there is no track, car or sensor model: the numbers only have the right shapes,
ranges and layout.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

__all__ = ["make_points", "write_points_bin", "write_pcd", "write_calib", "write_tiny_dataset", "FRONT_CAM2EGO"]

# OpenCV camera (x right, y down, z forward) -> ego (x forward, y left, z up), 0.5 m above ground.
FRONT_CAM2EGO = [[0.0, 0.0, 1.0, 0.5], [-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, -0.5], [0.0, 0.0, 0.0, 1.0]]


def make_points(rng: np.random.Generator, n: int, num_features: int = 4) -> np.ndarray:
    """(n, num_features) float32 LiDAR-like scan: x, y, z, intensity [+ ring] [+ ring, time, range, ambient].

    4: KITTI-like; 5: nuScenes-like (ring integer 0..31); 8: x, y, z, intensity, ring, time (s), range (m),
    ambient. Points are ordered by azimuth like a spinning sensor.
    """
    n_ground = int(n * 0.6)
    az = rng.uniform(-np.pi, np.pi, n)
    r = np.concatenate([rng.uniform(3.0, 60.0, n_ground), rng.uniform(4.0, 30.0, n - n_ground)])
    z = np.concatenate([-1.0 + rng.normal(0.0, 0.03, n_ground), rng.uniform(-1.0, 1.0, n - n_ground)])
    x, y = r * np.cos(az), r * np.sin(az)
    intensity = rng.beta(2.0, 5.0, n)
    order = np.argsort(az)
    cols = [x, y, z, intensity]
    elevation = np.arctan2(z, r)
    ring = np.clip(np.round((elevation + 0.4) / 0.8 * 31), 0, 31)
    if num_features == 5:
        cols.append(ring)
    elif num_features == 8:
        cols += [ring, (az + np.pi) / (2 * np.pi) * 0.1, np.sqrt(r ** 2 + z ** 2), rng.uniform(0, 800, n)]
    elif num_features != 4:
        raise ValueError(f"num_features must be 4, 5 or 8, got {num_features}")
    return np.stack(cols, axis=1)[order].astype(np.float32)


def write_points_bin(path: Path, points: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    points.astype("<f4").tofile(path)
    return path


def write_pcd(path: Path, points: np.ndarray, binary: bool = True) -> Path:
    """Write (N, 4) x, y, z, intensity as a PCD v0.7 file (binary or ascii)."""
    n = len(points)
    header = ("# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\nFIELDS x y z intensity\n"
              "SIZE 4 4 4 4\nTYPE F F F F\nCOUNT 1 1 1 1\n"
              f"WIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA {'binary' if binary else 'ascii'}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(header.encode("ascii"))
        if binary:
            f.write(points[:, :4].astype("<f4").tobytes())
        else:
            f.write("\n".join(" ".join(repr(float(v)) for v in p[:4]) for p in points).encode("ascii") + b"\n")
    return path


def write_calib(path: Path, image_size: tuple[int, int], names: Sequence[str] = ("front",)) -> Path:
    """calib.json with one entry per camera name; K for ``image_size=(W, H)`` (90 degree horizontal FOV)."""
    w, h = image_size
    cams = [{"name": nm, "image_size": [w, h], "K": [[w / 2, 0, w / 2], [0, w / 2, h / 2], [0, 0, 1]],
             "cam2ego": FRONT_CAM2EGO} for nm in names]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cameras": cams}, indent=1))
    return path


def write_tiny_dataset(root: Path, splits: Optional[dict[str, int]] = None, frames: int = 12,
                       image_size: tuple[int, int] = (32, 16), num_features: int = 4, seed: int = 0,
                       points_per_frame: tuple[int, int] = (200, 400), cameras: Sequence[str] = ("front",),
                       lidar: bool = True, camera: bool = True, speed_command: bool = True) -> Path:
    """Write ``splits`` ({split: number of segments}) of ``frames`` frames each under ``root``; return root.

    Segment names are ``segment_0000``, ``segment_0001``, ... per split. One camera writes the column
    ``image_filepath``; several write ``image_filepath_<name>`` each (images under ``camera/<name>/``).
    ``num_features`` (4 | 5 | 8) is the .bin layout (see make_points); velocity and wheel_angle are written with
    full precision so tests can compare dataset items with the csv exactly. With ``speed_command`` the csv also
    has the commanded speed (the next frame's velocity + 0.25 m/s; it draws no random numbers, so the rest of
    the dataset is the same either way).
    """
    root = Path(root)
    splits = {"train": 2, "valid": 1} if splits is None else splits
    rng = np.random.default_rng(seed)
    for split, n_segments in splits.items():
        for s in range(n_segments):
            seg = root / split / f"segment_{s:04d}"
            (seg / "meta").mkdir(parents=True, exist_ok=True)
            velocity = np.round(8.0 + np.cumsum(rng.normal(0.0, 0.3, frames)), 4)
            wheel = np.round(np.cumsum(rng.normal(0.0, 2.0, frames)), 4)
            if camera:
                write_calib(seg / "camera" / "calib.json", image_size, cameras)
            rows = []
            for t in range(frames):
                stamp = f"{1_700_000_000_000 + 100 * t + 1000 * s}"
                row: dict[str, object] = {"timestamp": stamp}
                if lidar:
                    pts = make_points(rng, int(rng.integers(*points_per_frame)), num_features)
                    write_points_bin(seg / "lidar" / f"{stamp}.bin", pts)
                    row["lidar_filepath"] = f"lidar/{stamp}.bin"
                if camera:
                    for name in cameras:
                        img = rng.integers(0, 256, (image_size[1], image_size[0], 3), dtype=np.uint8)
                        rel = f"camera/{stamp}.png" if len(cameras) == 1 else f"camera/{name}/{stamp}.png"
                        (seg / rel).parent.mkdir(parents=True, exist_ok=True)
                        Image.fromarray(img).save(seg / rel)
                        row["image_filepath" if len(cameras) == 1 else f"image_filepath_{name}"] = rel
                row["velocity"] = repr(float(velocity[t]))
                row["wheel_angle"] = repr(float(wheel[t]))
                if speed_command:
                    row["speed_command"] = repr(round(float(velocity[min(t + 1, frames - 1)]) + 0.25, 4))
                rows.append(row)
            with open(seg / "meta" / "data.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    return root
