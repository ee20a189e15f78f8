"""A preview PNG of one recorded frame, to see that the LiDAR and the camera agree.

Layout (1024 x 532 px): left, the LiDAR bird's-eye view (ego at the white triangle, x forward = up, y left
= left, 8 px per metre, 10 m range rings, the camera's field of view as two yellow lines, the tiny teacher's
range as a blue box; ground points grey by intensity, everything above the ground coloured by height and
brightened by intensity; other cars show up as raised boxes, behind the car too); right top, the camera
image (2x) as recorded (in the gap world: the track's light, exposure, blur, noise, the cars in view);
right bottom, the same image with the LiDAR points projected through cam2ego and K (same height colours).
The title names the segment, the frame, speed and steering, and the segment's look from meta/track.json
(light, exposure, other cars). A LiDAR-only segment gets the BEV alone. It reads the files back from disk,
so it also checks what was written.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from e2r.atomic import make_dirs

__all__ = ["write_preview", "project_to_image"]

_BEV_X = (-8.0, 56.0)      # metres shown along x (bottom..top)
_BEV_Y = 32.0              # +-metres shown along y
_PX_PER_M = 8.0


def project_to_image(points_ego: np.ndarray, K: np.ndarray, cam2ego: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project ego-frame points (N, >=3) into the image: returns (uv (N, 2) pixels, depth (N,) metres along
    the optical axis; depth <= 0 means behind the camera)."""
    ego2cam = np.linalg.inv(cam2ego)
    p = points_ego[:, :3] @ ego2cam[:3, :3].T + ego2cam[:3, 3]
    depth = p[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = (p[:, :2] / depth[:, None]) * np.diag(K)[:2] + K[:2, 2]
    return uv, depth


def _height_colours(z: np.ndarray, intensity: np.ndarray) -> np.ndarray:
    """(N, 3) uint8: ground (z < -0.85) grey by intensity; above ground a blue->green->red ramp by height,
    brighter for higher intensity (white wall stripes, barrels)."""
    t = np.clip((z + 0.85) / 1.05, 0.0, 1.0)
    ramp = np.stack([np.clip(2 * t - 0.6, 0, 1), np.clip(1.4 - np.abs(2.2 * t - 1.2), 0, 1),
                     np.clip(1.2 - 2 * t, 0, 1)], axis=1)
    grey = (0.25 + 0.75 * np.clip(intensity, 0, 1))[:, None] * np.ones((1, 3))
    lit = (0.45 + 0.55 * np.clip(intensity, 0, 1))[:, None]
    col = np.where((z < -0.85)[:, None], grey, (0.25 + 0.75 * ramp) * lit)
    return (col * 255).astype(np.uint8)


def _pick_segment(root: Path) -> Path:
    """``root`` itself when it is a segment folder, else its first segment with a camera (train first)."""
    if (root / "meta" / "data.csv").is_file():
        return root
    for split in ("train", "valid", "test"):
        segs = sorted((root / split).glob("*/camera/calib.json")) if (root / split).is_dir() else []
        if segs:
            return segs[0].parent.parent
    segs = sorted(root.glob("*/*/meta/data.csv"))
    if not segs:
        raise FileNotFoundError(f"no <split>/<segment>/meta/data.csv under {root}")
    return segs[0].parent.parent


def _look_text(seg: Path) -> str:
    """The segment's look from meta/track.json ("" for a clean or non-synthetic segment)."""
    path = seg / "meta" / "track.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    look = info.get("look")
    if not look:
        return ""
    return (f"  |  {look['light']} (daylight {look['daylight']:.2f}), exposure {look['exposure_ev']:+.1f} EV, "
            f"{look['exposure_ms']:.0f} ms, gain x{look['gain']:.1f}, paint gone {look['paint_gone']:.0%}, "
            f"{info.get('cars', 0)} other cars")


def write_preview(root: str | Path, out_png: str | Path, frame: int | None = None) -> Path:
    """Write the preview of ``frame`` (default: the middle one) of a segment folder, or of the first
    segment with a camera of a dataset root (train first). Returns the PNG path."""
    seg = _pick_segment(Path(root))
    with open(seg / "meta" / "data.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{seg / 'meta' / 'data.csv'} has no rows")
    f = len(rows) // 2 if frame is None else frame
    if not 0 <= f < len(rows):
        raise IndexError(f"frame {f} out of range: {seg} has {len(rows)} frames")
    row = rows[f]
    pts = np.fromfile(seg / row["lidar_filepath"], dtype="<f4").reshape(-1, 4)
    has_camera = bool(row.get("image_filepath"))
    img, K, c2e = np.zeros((128, 256, 3), np.uint8), None, None     # LiDAR-only: a black camera panel
    if has_camera:
        img = np.asarray(Image.open(seg / row["image_filepath"]).convert("RGB"))
        cam = json.loads((seg / "camera" / "calib.json").read_text())["cameras"][0]
        K, c2e = np.asarray(cam["K"], float), np.asarray(cam["cam2ego"], float)
    cols = _height_colours(pts[:, 2], pts[:, 3])

    # --- BEV
    size = int(round((_BEV_X[1] - _BEV_X[0]) * _PX_PER_M))
    bev = np.full((size, size, 3), 18, np.uint8)
    order = np.argsort(pts[:, 2])                       # draw high points last
    r = ((_BEV_X[1] - pts[order, 0]) * _PX_PER_M).astype(int)
    c = ((_BEV_Y - pts[order, 1]) * _PX_PER_M).astype(int)
    ok = (r >= 0) & (r < size - 1) & (c >= 0) & (c < size - 1)
    for dr in (0, 1):
        for dc in (0, 1):
            bev[r[ok] + dr, c[ok] + dc] = cols[order][ok]
    bev_im = Image.fromarray(bev)
    d = ImageDraw.Draw(bev_im)
    oy, ox = _BEV_X[1] * _PX_PER_M, _BEV_Y * _PX_PER_M      # ego origin (row, col)
    for rad in range(10, 70, 10):
        p = rad * _PX_PER_M
        d.ellipse([ox - p, oy - p, ox + p, oy + p], outline=(60, 60, 60))
    if has_camera:
        half = np.arctan(K[0, 2] / K[0, 0])
        for sgn in (-1, 1):
            d.line([ox, oy, ox + sgn * np.sin(half) * 400, oy - np.cos(half) * 400], fill=(230, 200, 40))
    # the tiny teacher's BEV range, x 0..51.2, y +-25.6
    d.rectangle([ox - 25.6 * _PX_PER_M, oy - 51.2 * _PX_PER_M, ox + 25.6 * _PX_PER_M, oy], outline=(90, 90, 160))
    d.polygon([(ox, oy - 10), (ox - 6, oy + 6), (ox + 6, oy + 6)], fill=(255, 255, 255))
    d.text((6, 4), "LiDAR BEV (x fwd = up, 10 m rings, box = tiny teacher range)", fill=(255, 255, 255))

    # --- camera and projection overlay
    h, w = img.shape[:2]
    scale = max(1, size // (2 * h))
    cam_im = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
    over = np.asarray(cam_im).copy()
    vis_order = np.zeros(0, np.int64)
    if has_camera:
        uv, depth = project_to_image(pts, K, c2e)
        vis = (depth > 0.5) & (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
        vis_order = np.nonzero(vis)[0][np.argsort(-depth[vis])]      # far first, near drawn on top
    uu = (uv[vis_order, 0] * scale).astype(int) if has_camera else vis_order
    vv = (uv[vis_order, 1] * scale).astype(int) if has_camera else vis_order
    for dv in (0, 1):
        for du in (0, 1):
            over[np.clip(vv + dv, 0, h * scale - 1), np.clip(uu + du, 0, w * scale - 1)] = cols[vis_order]
    canvas = Image.new("RGB", (size + w * scale, max(size, 2 * h * scale) + 20), (0, 0, 0))
    canvas.paste(bev_im, (0, 20))
    canvas.paste(cam_im, (size, 20))
    canvas.paste(Image.fromarray(over), (size, 20 + h * scale))
    d = ImageDraw.Draw(canvas)
    d.text((6, 4), f"{seg.parent.name}/{seg.name} frame {f}  v={float(row['velocity']):.1f} m/s  "
                   f"wheel_angle={float(row['wheel_angle']):+.1f} deg  ({len(pts)} LiDAR points){_look_text(seg)}",
           fill=(255, 255, 255))
    d.text((size + 6, 24), "camera" if has_camera else "no camera (LiDAR-only segment)",
           fill=(255, 255, 255))
    d.text((size + 6, 24 + h * scale), "camera + projected LiDAR", fill=(255, 255, 255))
    out_png = Path(out_png)
    make_dirs(out_png.parent)
    canvas.save(out_png)
    return out_png
