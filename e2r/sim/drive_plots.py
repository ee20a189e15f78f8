"""Pictures of closed-loop runs: the trajectories over the track map (PNG, matplotlib) and a GIF of one run
(its camera view beside a bird's-eye view of the car on the track, Pillow)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from e2r.atomic import make_dirs
from e2r.sim.closed_loop import RunResult, SimWorld
from e2r.sim.track import Track
from e2r.sim.vehicle import VehicleState, body_corners

__all__ = ["plot_trajectories", "write_video", "wall_polylines"]

LEFT_WALL, RIGHT_WALL = (200, 40, 40), (40, 70, 210)


def wall_polylines(track: Track) -> tuple[np.ndarray, np.ndarray]:
    """The left and right walls as closed polylines (M+1, 2) (first point repeated at the end)."""
    out = []
    for side in (0, 1):
        pts = track.seg_a[track.seg_side == side]
        out.append(np.vstack([pts, pts[:1]]))
    return out[0], out[1]


def plot_trajectories(path: str | Path, runs: Sequence[RunResult], worlds: dict[str, SimWorld]) -> Path:
    """PNG: one panel per segment (track walls, centre line), every run's path in its policy's colour, start
    points as dots, collisions as an x."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    make_dirs(path.parent)
    segments = list(dict.fromkeys(r.segment for r in runs)) or list(worlds)
    policies = list(dict.fromkeys(r.policy for r in runs))
    colours = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(policies)}
    cols = min(3, len(segments))
    rows = math.ceil(len(segments) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 6.5 * rows), squeeze=False)
    for ax, seg in zip(axes.flat, segments):
        world = worlds[seg]
        left, right = wall_polylines(world.track)
        ax.plot(left[:, 0], left[:, 1], color=np.array(LEFT_WALL) / 255, linewidth=1.2)
        ax.plot(right[:, 0], right[:, 1], color=np.array(RIGHT_WALL) / 255, linewidth=1.2)
        c = np.vstack([world.track.centre, world.track.centre[:1]])
        ax.plot(c[:, 0], c[:, 1], color="0.7", linewidth=0.6, linestyle="--")
        for name in policies:
            first = True
            for r in (r for r in runs if r.segment == seg and r.policy == name):
                tr = r.trajectory
                ax.plot(tr[:, 0], tr[:, 1], color=colours[name], linewidth=1.0, alpha=0.85,
                        label=name if first else None)
                ax.plot(tr[0, 0], tr[0, 1], "o", color=colours[name], markersize=3)
                if r.collisions:
                    ax.plot(tr[-1, 0], tr[-1, 1], "x", color=colours[name], markersize=10, markeredgewidth=2.5)
                first = False
        ax.set_title(f"{world.split}/{seg}  ({world.track.length:.0f} m, x = collision)")
        ax.set_aspect("equal")
        ax.legend(loc="upper right", fontsize=8)
    for ax in list(axes.flat)[len(segments):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _bev_base(track: Track, size: int) -> tuple[Image.Image, Callable[[np.ndarray], list[tuple[float, float]]]]:
    """The track map (size x size px) and the world -> pixel mapping."""
    left, right = wall_polylines(track)
    lo = np.minimum(left.min(0), right.min(0)) - 3.0
    hi = np.maximum(left.max(0), right.max(0)) + 3.0
    scale = (size - 1) / float(max(hi - lo))

    def px(p: np.ndarray) -> list[tuple[float, float]]:
        p = np.atleast_2d(p)
        return [(float(u), float(v)) for u, v in zip((p[:, 0] - lo[0]) * scale, (hi[1] - p[:, 1]) * scale)]

    img = Image.new("RGB", (size, size), (28, 60, 30))
    d = ImageDraw.Draw(img)
    d.line(px(left), fill=LEFT_WALL, width=2)
    d.line(px(right), fill=RIGHT_WALL, width=2)
    d.line(px(np.vstack([track.centre, track.centre[:1]])), fill=(120, 120, 120), width=1)
    return img, px


def write_video(path: str | Path, run: RunResult, world: SimWorld, max_frames: int = 300) -> Path:
    """GIF of a run recorded with its camera (``RunResult.camera_frames``): camera view (left, scaled to the
    map's height) beside the track map with the car's body, its trail and the commands; real time, at most
    ``max_frames`` frames (every k-th step)."""
    if not run.camera_frames:
        raise ValueError(f"run of {run.policy} on {run.segment} has no recorded camera frames")
    path = Path(path)
    make_dirs(path.parent)
    size = 320
    base, px = _bev_base(world.track, size)
    h, w = run.camera_frames[0].shape[:2]
    cam_w = int(round(w * size / h))
    stride = max(2, math.ceil(len(run.camera_frames) / max_frames))
    frames = []
    for i in range(0, len(run.camera_frames), stride):
        x, y, yaw = run.trajectory[i]
        canvas = Image.new("RGB", (cam_w + size, size + 22), (0, 0, 0))
        canvas.paste(Image.fromarray(run.camera_frames[i]).resize((cam_w, size), Image.BILINEAR), (0, 22))
        bev = base.copy()
        d = ImageDraw.Draw(bev)
        if i > 0:
            d.line(px(run.trajectory[: i + 1, :2]), fill=(250, 210, 40), width=2)
        corners = body_corners(VehicleState.create(x, y, yaw, 0.0), world.config.vehicle)[0]
        d.polygon(px(corners), fill=(255, 255, 255))
        canvas.paste(bev, (cam_w, 22))
        steer, speed_cmd = run.commands[min(i, len(run.commands) - 1)]
        ImageDraw.Draw(canvas).text(
            (6, 5), f"{run.policy}  {world.split}/{run.segment} start {run.start_index}  t={i / world.rate_hz:5.1f} s"
                    f"  steer {steer:+5.1f} deg  speed cmd {speed_cmd:4.1f} m/s  end: {run.end}", fill=(255, 255, 255))
        frames.append(canvas)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(round(1000 * stride / world.rate_hz)),
                   loop=0, optimize=False)
    return path
