"""Horizontal ray casting against the synthetic world's vertical geometry, shared by both sensors
(``e2r.sim.sensors``): the nearest wall along a fan of azimuths (cost O(rays + crossings)), the barrels along
given rays, and picking each ray's nearest hit among candidate kinds."""
from __future__ import annotations

import numpy as np

from e2r.sim.appearance import wrap_angle
from e2r.sim.track import Track

__all__ = ["walls_along", "barrels_along", "nearest", "nearest_column"]


def walls_along(track: Track, origin: np.ndarray, angle0: float, step: float, count: int,
                 max_range: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest wall along the horizontal rays ``angle0 + k * step`` (k < ``count``, world yaw angles)
    from ``origin`` (2,).

    Each wall segment within ``max_range`` is only intersected with the rays inside its angular extent as
    seen from the origin, so the cost is O(rays + ray-segment crossings), not O(rays x segments).
    Returns horizontal distance (count,) (inf where no wall), segment index (count,), position u in
    [0, 1] along the segment (count,).
    """
    a, b = track.seg_a - origin, track.seg_b - origin
    near = np.minimum(np.hypot(a[:, 0], a[:, 1]), np.hypot(b[:, 0], b[:, 1])) < max_range + 5
    seg_ids = np.nonzero(near)[0]
    a, b = a[seg_ids], b[seg_ids]
    ang_a = np.arctan2(a[:, 1], a[:, 0]) - angle0
    span = (np.arctan2(b[:, 1], b[:, 0]) - angle0 - ang_a + np.pi) % (2 * np.pi) - np.pi   # signed, |.| < pi
    lo = np.where(span >= 0, ang_a, ang_a + span) % (2 * np.pi)
    k0 = np.ceil(lo / step - 1e-9).astype(np.int64)
    k1 = np.floor((lo + np.abs(span)) / step + 1e-9).astype(np.int64)
    k0, k1 = k0 - 1, k1 + 1                              # one spare ray each side: rounding safety
    n_per = np.maximum(k1 - k0 + 1, 0)
    full = int(round(2 * np.pi / step))                 # rays per turn (may exceed count for a camera)
    pair_seg = np.repeat(np.arange(len(seg_ids)), n_per)
    first = np.repeat(np.cumsum(n_per) - n_per, n_per)
    k = (np.repeat(k0, n_per) + np.arange(len(pair_seg)) - first) % full
    keep = k < count
    pair_seg, k = pair_seg[keep], k[keep]
    ang = angle0 + k * step
    dx, dy = np.cos(ang), np.sin(ang)
    ax, ay = a[pair_seg, 0], a[pair_seg, 1]
    ex, ey = b[pair_seg, 0] - ax, b[pair_seg, 1] - ay
    denom = dx * ey - dy * ex
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (ax * ey - ay * ex) / denom
        u = (ax * dy - ay * dx) / denom
    ok = (np.abs(denom) > 1e-12) & (t > 1e-6) & (u >= -1e-6) & (u <= 1 + 1e-6)
    t, u, k, pair_seg = t[ok], np.clip(u[ok], 0, 1), k[ok], pair_seg[ok]
    # each ray's nearest crossing, the first listed of equally near ones (a ray through a shared vertex):
    # per-ray minima with ufunc.at, no sort
    dist = np.full(count, np.inf)
    np.minimum.at(dist, k, t)
    nearest = np.flatnonzero(t == dist.take(k))          # the crossings at their ray's minimum
    first = np.full(count, len(t))
    np.minimum.at(first, k.take(nearest), nearest)
    rays = np.flatnonzero(first < len(t))
    first = first.take(rays)
    seg = np.zeros(count, np.int64)
    pos = np.zeros(count)
    seg[rays] = seg_ids[pair_seg.take(first)]
    pos[rays] = u.take(first)
    return dist, seg, pos


def barrels_along(track: Track, origin: np.ndarray, dirs: np.ndarray, max_range: float,
                   forward: np.ndarray | None = None,
                   fov: tuple[float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal distance (A, B') to the near side of the B' barrels within ``max_range`` (and in front
    of ``forward`` if given) that some ray of ``dirs`` (A, 2) hits, inf where missed; and their indices (B',).
    ``fov`` (yaw, lo, hi): the rays' azimuths lie in yaw + [lo, hi]; barrels wholly outside are not cast."""
    w = track.obs_xy - origin                                   # (B, 2)
    sel = np.linalg.norm(w, axis=1) < max_range + 1
    if forward is not None:
        sel &= w @ forward > -1.0
    ids = np.nonzero(sel)[0]
    w = w[ids]
    near = None
    if fov is not None and len(ids):
        yaw, lo, hi = fov
        d = np.hypot(w[:, 0], w[:, 1])
        r = track.obs_radius[ids]
        bearing = wrap_angle(np.arctan2(w[:, 1], w[:, 0]) - yaw)
        half = np.arcsin(np.minimum(r / np.maximum(d, 1e-9), 1.0)) + 0.02        # + a margin for rounding
        near = (d <= r + 0.05) | ((bearing + half >= lo) & (bearing - half <= hi))
        if not near.any():                      # none in view: no ray to cast (what the cast below gives)
            return np.full((len(dirs), 0), np.inf), ids[:0]
    proj = dirs @ w.T                                           # (A, B') (all of them: the same products)
    if near is not None:
        ids, w, proj = ids[near], w[near], proj[:, near]
    perp2 = (w ** 2).sum(1)[None] - proj ** 2
    disc = track.obs_radius[ids][None] ** 2 - perp2
    t = proj - np.sqrt(np.maximum(disc, 0.0))
    hit = (disc >= 0) & (t > 1e-6)
    seen = hit.any(axis=0)
    return np.where(hit[:, seen], t[:, seen], np.inf), ids[seen]


def nearest(cands: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """What each ray hits first: ``(kind, distance)`` from ``(kind code, distances (...))`` candidates in
    order (the earlier one wins a tie, as an argmin over them; inf everywhere: the first kind)."""
    kind = np.full(cands[0][1].shape, cands[0][0], np.int64)
    dist = cands[0][1].copy()
    for code, h in cands[1:]:
        kind[h < dist] = code
        np.minimum(dist, h, out=dist)
    return kind, dist


def nearest_column(h: np.ndarray, slope: np.ndarray, z0: float, lo: float, hi: np.ndarray) -> np.ndarray:
    """Horizontal hit distances ``h`` on vertical objects, kept where the ray's height there, ``z0 + h * slope``,
    lies in [lo, hi] (``slope`` and each object's top ``hi`` broadcast against h: (..., K) with hi (K,), or
    object-major (K, P) with hi (K, 1)); inf elsewhere."""
    z = h * slope
    if z0:
        z = z0 + z
    return np.where((z >= lo) & (z <= hi), h, np.inf)
