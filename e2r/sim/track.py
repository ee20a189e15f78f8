"""Closed race tracks for the synthetic world: a smooth centre line, two wall polylines, barrels.

World frame: X east, Y north, metres, ground at Z = 0. A track is a closed, star-shaped loop whose radius
is a sum of a few random harmonics (so curvature varies: straights, sweepers, hairpin-ish corners) and whose
width varies slowly along the lap. The centre line is resampled at ``ds`` metres and oriented in the
driving direction; the *left* wall is on the driver's left. Tracks are accepted only if every corner is
wider than ``min_radius`` and no two parts of the loop come closer than their half widths plus a margin.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["TrackConfig", "Track", "make_track", "PaintMap", "paint_map", "GRASS", "ASPHALT", "EDGE_LINE",
           "CENTRE_LINE", "FADED_EDGE", "FADED_CENTRE"]


@dataclass
class TrackConfig:
    """Random-track parameters (metres)."""
    base_radius: tuple[float, float] = (35.0, 65.0)
    harmonics: tuple[int, ...] = (2, 3, 4, 5)
    width: tuple[float, float] = (8.0, 13.0)          # corridor width wall to wall, varies along the lap
    wall_height: float = 1.2
    min_radius: float = 12.0                          # tightest allowed corner radius of the centre line
    ds: float = 1.0                                   # centre-line sample spacing
    wall_step: int = 2                                # a wall vertex every wall_step centre samples
    n_obstacles: tuple[int, int] = (3, 8)             # barrels placed along the walls (inclusive range)
    max_attempts: int = 200


@dataclass
class Track:
    """One closed track. Arrays with K = number of centre samples, S = wall segments, B = barrels.

    centre (K, 2), tangent (K, 2) unit, normal (K, 2) unit pointing left, s (K,) arc length,
    curvature (K,) 1/m (positive = left turn), width (K,) m.
    walls: seg_a, seg_b (S, 2) segment end points, seg_side (S,) 0 = left wall 1 = right wall,
    seg_s0 (S,) arc length of the wall at seg_a (for stripes).
    barrels: obs_xy (B, 2), obs_radius (B,), obs_height (B,).
    """
    centre: np.ndarray
    tangent: np.ndarray
    normal: np.ndarray
    s: np.ndarray
    curvature: np.ndarray
    width: np.ndarray
    length: float
    wall_height: float
    seg_a: np.ndarray
    seg_b: np.ndarray
    seg_side: np.ndarray
    seg_s0: np.ndarray
    obs_xy: np.ndarray
    obs_radius: np.ndarray
    obs_height: np.ndarray
    clockwise: bool
    paint: "PaintMap | None" = field(default=None, repr=False)   # built lazily by paint_map()
    # the sensor-gap world's additions (None in the clean world): the look (e2r.sim.appearance.Appearance,
    # whose paint_state wears the paint) and the other cars (e2r.sim.traffic.Traffic); not in fingerprint()
    look: Any = field(default=None, repr=False)
    traffic: Any = field(default=None, repr=False)

    def lateral_offset(self, x: np.ndarray, y: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Signed offset (B,) m of points (x, y) (B,) from the centre line at their nearest samples ``index``
        (B,) (+ = left of the driving direction)."""
        return ((np.stack([x, y], 1) - self.centre[index]) * self.normal[index]).sum(1)

    def heading_error(self, yaw: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Heading (B,) rad minus the centre line's direction at samples ``index`` (B,), wrapped to (-pi, pi]."""
        return np.angle(np.exp(1j * (yaw - np.arctan2(self.tangent[index, 1], self.tangent[index, 0]))))

    @cached_property
    def seg_len(self) -> np.ndarray:
        """Length (S,) of each wall segment (cached: the sensors read it every frame)."""
        return np.linalg.norm(self.seg_b - self.seg_a, axis=1)

    @cached_property
    def seg_normal(self) -> np.ndarray:
        """Unit normal (S, 2) of each wall segment, to the left of seg_a -> seg_b (cached)."""
        e = self.seg_b - self.seg_a
        return np.stack([-e[:, 1], e[:, 0]], 1) / self.seg_len[:, None]

    def fingerprint(self) -> str:
        """A short, stable digest of the geometry (to check that two tracks are different)."""
        return hashlib.sha1(np.round(self.centre, 3).astype(np.float64).tobytes()).hexdigest()[:16]


def _periodic_diff(a: np.ndarray, ds: float) -> tuple[np.ndarray, np.ndarray]:
    d1 = (np.roll(a, -1, axis=0) - np.roll(a, 1, axis=0)) / (2 * ds)
    d2 = (np.roll(a, -1, axis=0) - 2 * a + np.roll(a, 1, axis=0)) / ds ** 2
    return d1, d2


def _resample_closed(pts: np.ndarray, ds: float) -> np.ndarray:
    """Resample a closed polyline (M, 2) at (almost exactly) uniform arc length ``ds``."""
    closed = np.vstack([pts, pts[:1]])
    seg = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(8, int(round(cum[-1] / ds)))
    s_new = np.arange(n) * (cum[-1] / n)
    return np.stack([np.interp(s_new, cum, closed[:, 0]), np.interp(s_new, cum, closed[:, 1])], axis=1)


def _wall_segments(poly: np.ndarray, side: int) -> tuple[np.ndarray, ...]:
    a = poly
    b = np.roll(poly, -1, axis=0)
    seglen = np.linalg.norm(b - a, axis=1)
    s0 = np.concatenate([[0.0], np.cumsum(seglen)[:-1]])
    return a, b, np.full(len(a), side, dtype=np.int8), s0


def make_track(rng: np.random.Generator, cfg: TrackConfig | None = None, clockwise: bool = False) -> Track:
    """Draw a random valid closed track; ``clockwise`` sets the driving direction (balances left/right turns).

    Raises RuntimeError if no valid track is found in ``cfg.max_attempts`` draws (parameters too tight).
    """
    cfg = cfg or TrackConfig()
    theta = np.linspace(0.0, 2 * np.pi, 2048, endpoint=False)
    for _ in range(cfg.max_attempts):
        r0 = rng.uniform(*cfg.base_radius)
        r = np.ones_like(theta)
        for k in cfg.harmonics:
            r += rng.uniform(0.0, 0.32 / k ** 0.8) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        if r.min() < 0.45:
            continue
        raw = (r0 * r)[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)
        if clockwise:
            raw = raw[::-1].copy()
        centre = _resample_closed(raw, cfg.ds)
        n = len(centre)
        ds = float(np.linalg.norm(centre[1] - centre[0]))
        d1, d2 = _periodic_diff(centre, ds)
        speed = np.linalg.norm(d1, axis=1)
        tangent = d1 / speed[:, None]
        normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
        curvature = (d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]) / speed ** 3
        s = np.arange(n) * ds
        length = n * ds
        w_lo, w_hi = cfg.width
        w_mid, w_amp = (w_lo + w_hi) / 2, (w_hi - w_lo) / 2
        cycles = rng.integers(2, 5)
        width = w_mid + w_amp * np.sin(2 * np.pi * cycles * s / length + rng.uniform(0, 2 * np.pi))
        if np.abs(curvature).max() > 1.0 / cfg.min_radius:
            continue
        if (np.abs(curvature) * (width / 2 + 1.0)).max() > 0.6:
            continue
        # global clearance: parts of the loop far apart along the lap must be far apart in space
        sub = np.arange(0, n, max(1, int(4.0 / ds)))
        p = centre[sub]
        dist = np.linalg.norm(p[:, None] - p[None], axis=2)
        arc = np.abs(s[sub][:, None] - s[sub][None])
        arc = np.minimum(arc, length - arc)
        need = width[sub][:, None] / 2 + width[sub][None] / 2 + 6.0
        if np.any((arc > 3 * need) & (dist < need)):
            continue
        break
    else:
        raise RuntimeError(f"make_track: no valid track in {cfg.max_attempts} attempts; relax TrackConfig {cfg}")

    walls = []
    idx = np.arange(0, n, cfg.wall_step)
    for side, sign in ((0, 1.0), (1, -1.0)):
        poly = centre[idx] + sign * normal[idx] * (width[idx] / 2)[:, None]
        walls.append(_wall_segments(poly, side))
    seg_a, seg_b, seg_side, seg_s0 = (np.concatenate(parts) for parts in zip(*walls))

    nb = int(rng.integers(cfg.n_obstacles[0], cfg.n_obstacles[1] + 1))
    at = np.sort(rng.choice(n, size=nb, replace=False))
    side_sign = rng.choice([-1.0, 1.0], size=nb)
    radius = rng.uniform(0.35, 0.5, size=nb)
    lateral = side_sign * (width[at] / 2 - radius - rng.uniform(0.1, 0.5, size=nb))
    obs_xy = centre[at] + normal[at] * lateral[:, None]
    obs_height = rng.uniform(0.8, 1.1, size=nb)

    return Track(centre=centre, tangent=tangent, normal=normal, s=s, curvature=curvature, width=width,
                 length=float(length), wall_height=cfg.wall_height, seg_a=seg_a, seg_b=seg_b,
                 seg_side=seg_side, seg_s0=seg_s0, obs_xy=obs_xy, obs_radius=radius, obs_height=obs_height,
                 clockwise=clockwise)


# ------------------------------------------------------------------------------------- ground paint raster
GRASS, ASPHALT, EDGE_LINE, CENTRE_LINE = 0, 1, 2, 3
FADED_EDGE, FADED_CENTRE = 4, 5          # worn paint (gap world): low contrast for the camera only
EDGE_INSET, EDGE_WIDTH, CENTRE_WIDTH, DASH = 0.6, 0.36, 0.24, 3.0   # metres


@dataclass
class PaintMap:
    """Ground material codes (GRASS, ASPHALT, EDGE_LINE, CENTRE_LINE) on a world raster: codes (H, W)
    uint8, cell (row, col) covers X in [x0 + col*res, ...), Y in [y0 + row*res, ...)."""
    codes: np.ndarray
    x0: float
    y0: float
    res: float
    _framed: np.ndarray = field(init=False, repr=False)      # (H + 2, W + 2) codes in a frame of GRASS

    def __post_init__(self) -> None:
        self._framed = np.pad(np.asarray(self.codes, np.uint8), 1, constant_values=GRASS).ravel()

    def lookup(self, xy: np.ndarray) -> np.ndarray:
        """Material code (P,) uint8 of world points ``xy`` (P, 2); GRASS outside the raster (a point outside
        reads the frame of GRASS around it)."""
        h, w = self.codes.shape
        col = np.floor((xy[:, 0] - self.x0) / self.res)
        row = np.floor((xy[:, 1] - self.y0) / self.res)
        np.clip(col, -1, w, out=col)
        np.clip(row, -1, h, out=row)
        at = (row.astype(np.int64) + 1) * (w + 2)
        at += col.astype(np.int64) + 1
        return self._framed.take(at)


def _runs(values: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs ``(first, last, value)`` of equal values of a closed loop (a run may wrap past the end)."""
    n = len(values)
    change = np.nonzero(values != np.roll(values, 1))[0]
    if len(change) == 0:
        return [(0, n - 1, int(values[0]))]
    ends = np.roll(change, -1)
    return [(int(a), int(a + (b - a) % n - 1), int(values[a])) for a, b in zip(change, ends)]


def paint_map(track: Track, res: float = 0.05) -> PaintMap:
    """The track's ground paint (asphalt corridor between the walls, white edge lines ``EDGE_INSET`` inside
    each wall, a dashed yellow centre line) drawn once with Pillow and cached on the track. With a look
    (gap world) its ``paint_state`` leaves the paint out where it is gone and marks it FADED_* where faded."""
    if track.paint is not None and track.paint.res == res:
        return track.paint
    half = (track.width / 2)[:, None]
    left, right = track.centre + track.normal * (half + 0.1), track.centre - track.normal * (half + 0.1)
    lo = np.minimum(left.min(0), right.min(0)) - 2.0
    hi = np.maximum(left.max(0), right.max(0)) + 2.0
    size = np.ceil((hi - lo) / res).astype(int)
    img = Image.new("L", (int(size[0]), int(size[1])), GRASS)
    draw = ImageDraw.Draw(img)

    def px(p: np.ndarray) -> list[tuple[float, float]]:
        q = (p - lo) / res
        return list(map(tuple, q.tolist()))

    n = len(track.centre)
    nxt = np.roll(np.arange(n), -1)
    quads = np.stack([left, left[nxt], right[nxt], right], axis=1)          # (K, 4, 2)
    for quad in quads:
        draw.polygon(px(quad), fill=ASPHALT)
    state = getattr(track.look, "paint_state", None)          # (3, K): left edge, right edge, centre line
    if state is None:
        for sign in (1.0, -1.0):
            line = track.centre + sign * track.normal * (half - EDGE_INSET)
            draw.line(px(np.vstack([line, line[:2]])), fill=EDGE_LINE, width=max(1, round(EDGE_WIDTH / res)),
                      joint="curve")
    else:
        for row, sign in ((0, 1.0), (1, -1.0)):
            line = track.centre + sign * track.normal * (half - EDGE_INSET)
            for i0, i1, value in _runs(state[row]):
                if value < 2:
                    idx = np.arange(i0, i1 + 2) % n           # through the next sample: no gaps between runs
                    draw.line(px(line[idx]), fill=(EDGE_LINE, FADED_EDGE)[value],
                              width=max(1, round(EDGE_WIDTH / res)), joint="curve")
    on = (track.s % (2 * DASH)) < DASH
    starts = np.nonzero(on & ~np.roll(on, 1))[0]
    for i0 in starts:
        value = 0 if state is None else int(state[2, i0])
        if value == 2:
            continue
        idx = [i0]
        while on[(idx[-1] + 1) % n] and len(idx) < n:
            idx.append((idx[-1] + 1) % n)
        idx.append((idx[-1] + 1) % n)   # close the dash to its full length
        draw.line(px(track.centre[idx]), fill=(CENTRE_LINE, FADED_CENTRE)[value],
                  width=max(1, round(CENTRE_WIDTH / res)))
    track.paint = PaintMap(codes=np.asarray(img, dtype=np.uint8), x0=float(lo[0]), y0=float(lo[1]), res=res)
    return track.paint
