"""The synthetic world's sensors as they were before they were made faster (e2r/sim at commit 0a0a4a2):
the reference that ``tests/test_sensor_speed.py`` holds the package's ``cast_lidar`` and ``render_camera``
to, bit for bit. Only the functions that changed are here; the rest is imported from the package. Not
used by the package."""
from __future__ import annotations

import numpy as np

from e2r.sim.appearance import Appearance, _smoothstep
from e2r.sim.materials import CAP, STRIPE_LEN, _car_parts, barrel_material, car_intensity
from e2r.sim.sensors import (BARREL, CAR, GROUND, LIDAR_HEIGHT, SKY, WALL, CameraConfig, LidarConfig,
                             camera_intrinsics, camera_to_ego)
from e2r.sim.track import (ASPHALT, CENTRE_LINE, EDGE_LINE, FADED_CENTRE, FADED_EDGE, GRASS, PaintMap, Track,
                           paint_map)
from e2r.sim.traffic import Traffic, car_poses, ray_boxes

__all__ = ["cast_lidar", "render_camera"]


def _lookup(paint: PaintMap, xy: np.ndarray) -> np.ndarray:
    """``PaintMap.lookup`` as it was."""
    col = np.floor((xy[:, 0] - paint.x0) / paint.res).astype(np.int64)
    row = np.floor((xy[:, 1] - paint.y0) / paint.res).astype(np.int64)
    h, w = paint.codes.shape
    ok = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    out = np.full(len(xy), GRASS, np.uint8)
    out[ok] = paint.codes[row[ok], col[ok]]
    return out


def hash01(ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """Deterministic integer hash of grid cells -> [0, 1)."""
    h = (ix.astype(np.int64) * 73856093) ^ (iy.astype(np.int64) * 19349663)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h >> 8) & 0xFFFF).astype(np.float64) / 65536.0


def value_noise(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Smooth 2-D value noise in [0, 1) (lattice spacing 1, smoothstep-interpolated hashes)."""
    ix, iy = np.floor(x), np.floor(y)
    fx, fy = x - ix, y - iy
    sx, sy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    ix, iy = ix.astype(np.int64) + seed * 7919, iy.astype(np.int64) - seed * 104729
    top = hash01(ix, iy) * (1 - sx) + hash01(ix + 1, iy) * sx
    bottom = hash01(ix, iy + 1) * (1 - sx) + hash01(ix + 1, iy + 1) * sx
    return top * (1 - sy) + bottom * sy


def shadow(look: Appearance, xy: np.ndarray) -> np.ndarray:
    """(P,) share of the sunlight blocked at world points ``xy`` (P, 2): soft bands (period
    ``shadow_period``, penumbra ~1/5 of it) inside shaded regions (~40 m across) covering ``shadow_cover``."""
    if look.sun_level <= 0 or len(xy) == 0:
        return np.zeros(len(xy))
    p = xy @ look.shadow_dir / look.shadow_period
    band = _smoothstep(0.4, 0.6, value_noise(p, np.zeros_like(p), look.noise_seed + 1))
    region = value_noise(xy[:, 0] / 40.0, xy[:, 1] / 40.0, look.noise_seed + 2)
    cover = _smoothstep(1.0 - look.shadow_cover - 0.08, 1.0 - look.shadow_cover + 0.08, region)
    return look.shadow_strength * band * cover


def lighting(look: Appearance, xy: np.ndarray, z: np.ndarray, normal: np.ndarray | None,
             ego: tuple[float, float, float]) -> np.ndarray:
    """Irradiance (P, 3) at world points ``xy`` (P, 2), height ``z`` (P,) on surfaces with horizontal unit
    ``normal`` (P, 2) facing the camera (None = ground, facing up): ambient sky light, sunlight (less in
    shadow) and the ego car's low-beam headlights at (x, y, yaw) ``ego``: a cone of std
    ``headlight_spread_deg`` around the heading, 1/d^2 beyond ``headlight_range``."""
    cfg = look.cfg
    sun_h = np.array([np.cos(look.sun_azimuth), np.sin(look.sun_azimuth)])
    if normal is None:
        sun_cos = np.full(len(xy), np.sin(look.sun_elevation))
        ambient = look.ambient
    else:
        sun_cos = np.cos(look.sun_elevation) * np.maximum(normal @ sun_h, 0.0)
        ambient = 0.7 * look.ambient
    sun = look.sun_level * sun_cos * (1.0 - shadow(look, xy))
    out = ambient * look.ambient_tint[None] + sun[:, None] * look.sun_tint[None]
    if look.headlight > 0:
        x, y, yaw = ego
        lamp = np.array([x + 3.5 * np.cos(yaw), y + 3.5 * np.sin(yaw)])
        d = xy - lamp
        r = np.maximum(np.hypot(d[:, 0], d[:, 1]), 1e-3)
        angle = (np.arctan2(xy[:, 1] - y, xy[:, 0] - x) - yaw + np.pi) % (2 * np.pi) - np.pi
        cone = np.exp(-0.5 * (angle / np.radians(cfg.headlight_spread_deg)) ** 2)
        falloff = 1.0 / (1.0 + (r / cfg.headlight_range) ** 2)
        facing = np.ones(len(xy)) if normal is None else np.maximum(-(normal * d).sum(1) / r, 0.0)
        high = np.clip(1.0 - (z - 0.9) / 1.5, 0.2, 1.0)             # low beam: less light up high
        out = out + (look.headlight * cone * falloff * facing * high)[:, None] * np.array([1.0, 0.97, 0.9])
    return out


def sky(look: Appearance, slope: np.ndarray) -> np.ndarray:
    """Sky radiance (P, 3) of rays rising ``slope`` (m up per m ahead): horizon to zenith gradient."""
    t = np.clip(slope, 0, 1)[:, None] ** 0.7
    return look.horizon[None] * (1 - t) + look.zenith[None] * t


def _box_blur(img: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Each pixel (H, W, 3) averaged over a horizontal window ``length`` (H, W) pixels long centred on it
    (continuous box, fractional lengths via the row's running integral; clipped at the borders). Pixels
    whose window is under one pixel are left as they are."""
    h, w, _ = img.shape
    rows, cols = np.nonzero(length > 1.0)
    csum = np.concatenate([np.zeros((h, 1, 3), img.dtype), np.cumsum(img, axis=1)], axis=1)   # (H, W + 1, 3)

    def integral(x: np.ndarray) -> np.ndarray:
        k = np.minimum(np.floor(x + 0.5).astype(np.int64), w)
        frac = (x + 0.5 - k)[:, None]
        return csum[rows, k] + frac * img[rows, np.minimum(k, w - 1)]

    half = length[rows, cols] / 2
    lo, hi = np.maximum(cols - half, -0.5), np.minimum(cols + half, w - 0.5)
    out = img.copy()
    out[rows, cols] = (integral(hi) - integral(lo)) / (hi - lo)[:, None]
    return out


def finish(look: Appearance, radiance: np.ndarray, blur_px_per_s: np.ndarray,
           rng: np.random.Generator | None) -> np.ndarray:
    """The image a camera records (H, W, 3) uint8 from scene radiance (H, W, 3) and each pixel's horizontal
    optical flow (H, W) px/s: exposure bias, motion blur over the exposure time, shot + read noise scaled by
    the gain (none when ``rng`` is None), clipping and 8-bit quantisation."""
    img = (radiance * 2.0 ** look.exposure_ev).astype(np.float32)
    length = np.abs(blur_px_per_s) * look.exposure_time
    if (length > 1.0).any():
        img = _box_blur(img, length)
    if rng is not None:
        signal = np.clip(img, 0.0, 1.0)
        std = np.sqrt(look.cfg.shot_noise * look.gain * signal + (look.cfg.read_noise * look.gain) ** 2)
        img = img + std * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def ground_material(track: Track, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RGB (P, 3) in [0, 1] and LiDAR intensity (P,) of ground points ``xy`` (P, 2) (world frame)."""
    code = _lookup(paint_map(track), xy)
    noise = hash01(np.floor(xy[:, 0] * 4), np.floor(xy[:, 1] * 4))
    grey = 0.30 + 0.07 * noise
    rgb = np.repeat(grey[:, None], 3, axis=1)
    inten = 0.08 + 0.06 * noise
    rgb[code == EDGE_LINE] = (0.93, 0.93, 0.93)
    rgb[code == CENTRE_LINE] = (0.95, 0.80, 0.15)
    rgb[code < ASPHALT] = (0.25, 0.45, 0.20)
    inten = np.where(code > ASPHALT, 0.75, inten)
    return rgb, inten


def wall_s(track: Track, seg: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Arc length along the wall (P,) of hits on segments ``seg`` at position ``u`` in [0, 1]."""
    seglen = np.linalg.norm(track.seg_b[seg] - track.seg_a[seg], axis=1)
    return track.seg_s0[seg] + u * seglen


def wall_material(track: Track, seg: np.ndarray, u: np.ndarray, z: np.ndarray):
    """RGB (P, 3) and intensity (P,) of wall hits on segments ``seg`` at position ``u``, height ``z``
    above ground."""
    s_wall = wall_s(track, seg, u)
    white = (np.floor(s_wall / STRIPE_LEN).astype(np.int64) % 2) == 0
    left = track.seg_side[seg] == 0
    colour = np.where(left[:, None], np.array([[0.80, 0.10, 0.10]]), np.array([[0.10, 0.25, 0.80]]))
    rgb = np.where(white[:, None], 0.92, colour)
    inten = np.where(white, 0.8, 0.35)
    cap = z > track.wall_height - CAP
    rgb[cap] = 0.12
    inten = np.where(cap, 0.2, inten)
    return rgb, inten


def ground_albedo(look: Appearance, track: Track, xy: np.ndarray) -> np.ndarray:
    """Camera reflectance (P, 3) of ground points ``xy`` (P, 2): the track's asphalt (grain at 10 cm, patches
    of ``patch_scale`` m), its paint colours (faded paint blended into the asphalt), its grass."""
    code = _lookup(paint_map(track), xy)
    grain = hash01(np.floor(xy[:, 0] * 10), np.floor(xy[:, 1] * 10)) - 0.5
    patch = value_noise(xy[:, 0] / look.patch_scale, xy[:, 1] / look.patch_scale, look.noise_seed) - 0.5
    grey = look.asphalt_grey * (1 + look.grain * grain + 2 * look.patches * patch)
    rgb = grey[:, None] * look.asphalt_tint[None]
    for full, faded, colour in ((EDGE_LINE, FADED_EDGE, look.edge_paint),
                                (CENTRE_LINE, FADED_CENTRE, look.centre_paint)):
        rgb[code == full] = colour * (0.95 + 0.1 * grain[code == full, None])
        sel = code == faded
        rgb[sel] = rgb[sel] + look.fade_contrast * (colour[None] - rgb[sel])
    g = code == GRASS
    rgb[g] = look.grass[None] * (0.8 + 0.4 * (grain[g, None] + 0.5)) * (1 + 0.3 * patch[g, None])
    return np.clip(rgb, 0.0, 1.0)


def wall_albedo(look: Appearance, track: Track, seg: np.ndarray, u: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Camera reflectance (P, 3) of wall hits: the side's two paint colours in ``STRIPE_LEN`` stripes (where
    the LiDAR sees its bright stripes), a concrete texture of ``wall_texture`` amplitude, the dark cap."""
    s_wall = wall_s(track, seg, u)
    first = (np.floor(s_wall / STRIPE_LEN).astype(np.int64) % 2) == 0
    side = track.seg_side[seg].astype(np.int64)
    rgb = look.wall_colours[side, np.where(first, 1, 0)]
    tex = value_noise(s_wall * 3.0, z * 3.0, look.noise_seed + 3) + 0.5 * hash01(np.floor(s_wall * 20),
                                                                                 np.floor(z * 20))
    rgb = rgb * (1 - look.wall_texture * (tex[:, None] - 0.75))
    rgb[z > track.wall_height - CAP] = 0.12
    return np.clip(rgb, 0.0, 1.0)


def car_albedo(look: Appearance, traffic: Traffic, car: np.ndarray, face: np.ndarray, along: np.ndarray,
               z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Camera reflectance (P, 3) and emitted light (P, 3) of hits on the other cars (tail lights glow,
    brighter as the light falls)."""
    glass, low, tail = _car_parts(traffic, car, face, along, z)
    rgb = traffic.colour[car].copy()
    rgb[glass] = (0.06, 0.07, 0.08)
    rgb[low] = (0.04, 0.04, 0.04)
    rgb[tail] = (0.6, 0.04, 0.03)
    glow = np.zeros_like(rgb)
    glow[tail] = np.array([1.0, 0.12, 0.06]) * (0.15 + 1.2 * (1.0 - look.daylight))
    return rgb, glow


def _walls_along(track: Track, origin: np.ndarray, angle0: float, step: float, count: int,
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
    order = np.lexsort((t, k))                          # by ray, nearest first
    k, t, u, pair_seg = k[order], t[order], u[order], pair_seg[order]
    firsts = np.ones(len(k), bool)
    firsts[1:] = k[1:] != k[:-1]
    dist = np.full(count, np.inf)
    seg = np.zeros(count, np.int64)
    pos = np.zeros(count)
    dist[k[firsts]] = t[firsts]
    seg[k[firsts]] = seg_ids[pair_seg[firsts]]
    pos[k[firsts]] = u[firsts]
    return dist, seg, pos


def _barrels_along(track: Track, origin: np.ndarray, dirs: np.ndarray, max_range: float,
                   forward: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal distance (A, B') to the near side of the B' barrels within ``max_range`` (and in front
    of ``forward`` if given) along ``dirs`` (A, 2), inf where missed; and their indices (B',)."""
    w = track.obs_xy - origin                                   # (B, 2)
    sel = np.linalg.norm(w, axis=1) < max_range + 1
    if forward is not None:
        sel &= w @ forward > -1.0
    ids = np.nonzero(sel)[0]
    w = w[ids]
    proj = dirs @ w.T                                           # (A, B')
    perp2 = (w ** 2).sum(1)[None] - proj ** 2
    disc = track.obs_radius[ids][None] ** 2 - perp2
    t = proj - np.sqrt(np.maximum(disc, 0.0))
    return np.where((disc >= 0) & (t > 1e-6), t, np.inf), ids


def cast_lidar(track: Track, x: float, y: float, yaw: float, rng: np.random.Generator,
               cfg: LidarConfig | None = None, t: float = 0.0) -> np.ndarray:
    """Point cloud (N, 4) float32 [x, y, z, intensity] in the ego frame of the car at world (x, y, yaw), at
    time ``t`` (s; places the other cars of a gap-world track)."""
    cfg = cfg or LidarConfig()
    elev = np.radians(np.linspace(cfg.elevation_deg[0], cfg.elevation_deg[1], cfg.rings))       # (R,)
    az = np.arange(cfg.azimuth_steps) * (2 * np.pi / cfg.azimuth_steps)                          # (A,)
    world_dirs = np.stack([np.cos(az + yaw), np.sin(az + yaw)], axis=1)
    origin = np.array([x, y])
    h_wall, seg, u = _walls_along(track, origin, yaw, az[1], len(az), cfg.max_range)             # (A,)
    h_obs, obs_ids = _barrels_along(track, origin, world_dirs, cfg.max_range)                    # (A, B')
    tan_e = np.tan(elev)[:, None]                                                               # (R, 1)

    with np.errstate(divide="ignore"):
        h_ground = np.where(tan_e < 0, LIDAR_HEIGHT / -tan_e, np.inf) * np.ones((1, len(az)))    # (R, A)
    z_wall = h_wall[None] * tan_e
    h_wall_ok = np.where(z_wall <= track.wall_height - LIDAR_HEIGHT, h_wall[None], np.inf)       # (R, A)
    z_obs = h_obs[None] * tan_e[..., None]                                                      # (R, A, B)
    obs_ok = (z_obs >= -LIDAR_HEIGHT) & (z_obs <= track.obs_height[obs_ids][None, None] - LIDAR_HEIGHT)
    h_obs_r = np.where(obs_ok, h_obs[None], np.inf)
    h_obs_min = h_obs_r.min(axis=2) if h_obs_r.shape[2] else np.full(h_ground.shape, np.inf)
    cands = [h_ground, h_wall_ok, h_obs_min]
    traffic = track.traffic
    if traffic is not None and len(traffic):
        poses = car_poses(track, traffic, t)
        h_car, face, along = ray_boxes(origin, world_dirs, poses, traffic)                      # (A, M)
        z_car = h_car[None] * tan_e[..., None]                                                  # (R, A, M)
        car_ok = (z_car >= -LIDAR_HEIGHT) & (z_car <= traffic.height[None, None] - LIDAR_HEIGHT)
        h_car_r = np.where(car_ok, h_car[None], np.inf)
        which_car = np.argmin(h_car_r, axis=2)                                                  # (R, A)
        cands.append(h_car_r.min(axis=2))
    cand = np.stack(cands)                                                                      # (3|4, R, A)
    kind = np.argmin(cand, axis=0)
    h = np.min(cand, axis=0)
    cos_e = np.cos(elev)[:, None]
    keep = np.isfinite(h) & (h / cos_e <= cfg.max_range) & (rng.random(h.shape) >= cfg.dropout)
    ri, ai = np.nonzero(keep)
    h, kind = h[ri, ai], kind[ri, ai]
    rng_noise = rng.normal(0.0, cfg.range_noise, size=h.shape)
    h_noisy = h * (1 + rng_noise * cos_e[ri, 0] / np.maximum(h, 1e-3))   # range noise along the ray
    pts = np.empty((len(h), 4), np.float32)
    pts[:, 0] = h_noisy * np.cos(az[ai])
    pts[:, 1] = h_noisy * np.sin(az[ai])
    pts[:, 2] = h_noisy * np.tan(elev[ri])

    # intensities from the material at the exact (noise-free) hit point
    inten = np.zeros(len(h))
    hit_xy = origin + world_dirs[ai] * h[:, None]
    g = kind == GROUND
    if g.any():
        inten[g] = ground_material(track, hit_xy[g])[1]
    wm = kind == WALL
    if wm.any():
        inten[wm] = wall_material(track, seg[ai[wm]], u[ai[wm]], h[wm] * tan_e[ri[wm], 0] + LIDAR_HEIGHT)[1]
    om = kind == BARREL
    if om.any():
        inten[om] = 0.95
    cm = kind == CAR
    if cm.any():
        car = which_car[ri[cm], ai[cm]]
        inten[cm] = car_intensity(traffic, car, face[ai[cm], car], along[ai[cm], car],
                                  h[cm] * tan_e[ri[cm], 0] + LIDAR_HEIGHT)
    clean = np.clip(inten, 0.0, 1.0)
    inten = np.clip(inten + rng.normal(0.0, 0.02, size=inten.shape), 0.0, 1.0)
    pts[:, 3] = inten
    if track.look is not None:
        # weak returns (dark surfaces far away) fall below the detection threshold: lost more often
        lost = track.look.cfg.lidar_weak_dropout * (1.0 - clean) * np.minimum(h / cos_e[ri, 0] / cfg.max_range, 1.0)
        pts = pts[rng.random(len(pts)) >= lost]
    return pts


def _shade_gap(track: Track, kind: np.ndarray, dist: np.ndarray, dirs: np.ndarray, slope: np.ndarray,
               origin: np.ndarray, cam_h: float, walls: tuple, barrels: tuple, cars: tuple,
               ego: tuple[float, float, float]) -> np.ndarray:
    """Scene radiance (P, 3) of the pixels' hits under the track's look (gap world)."""
    look = track.look
    rgb = np.empty((len(kind), 3))
    rgb[kind == SKY] = sky(look, slope[kind == SKY])
    xy = origin + dirs * np.where(np.isfinite(dist), dist, 0.0)[:, None]
    z = cam_h + dist * slope
    g = kind == GROUND
    if g.any():
        rgb[g] = ground_albedo(look, track, xy[g]) * lighting(look, xy[g], np.zeros(g.sum()), None, ego)
    wm = kind == WALL
    if wm.any():
        seg, u = walls[0][wm], walls[1][wm]
        e = track.seg_b[seg] - track.seg_a[seg]
        normal = np.stack([-e[:, 1], e[:, 0]], 1) / np.linalg.norm(e, axis=1, keepdims=True)
        normal *= -np.sign((normal * dirs[wm]).sum(1) + 1e-12)[:, None]           # facing the camera
        rgb[wm] = wall_albedo(look, track, seg, u, z[wm]) * lighting(look, xy[wm], z[wm], normal, ego)
    om = kind == BARREL
    if om.any():
        k = barrels[0][om]
        ids = barrels[1][k]
        normal = xy[om] - track.obs_xy[ids]
        normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-9)
        rgb[om] = barrel_material(z[om], track.obs_height[ids])[0] * lighting(look, xy[om], z[om], normal, ego)
    cm = kind == CAR
    if cm.any():
        which, face, along, yaw_cars = cars
        car = which[cm]
        fwd = np.stack([np.cos(yaw_cars[car]), np.sin(yaw_cars[car])], 1)
        f = face[cm, car]
        normal = np.where((f == 2)[:, None], np.stack([-fwd[:, 1], fwd[:, 0]], 1), fwd)
        normal *= -np.sign((normal * dirs[cm]).sum(1) + 1e-12)[:, None]
        albedo, glow = car_albedo(look, track.traffic, car, f, cars[2][cm, car], z[cm])
        rgb[cm] = albedo * lighting(look, xy[cm], z[cm], normal, ego) + glow
    hit = kind != SKY
    fog = 1.0 - np.exp(-dist[hit] * np.sqrt(1 + slope[hit] ** 2) / 140.0)
    rgb[hit] = rgb[hit] * (1 - fog[:, None]) + look.horizon * fog[:, None]
    return rgb


def render_camera(track: Track, x: float, y: float, yaw: float, cfg: CameraConfig | None = None, *,
                  t: float = 0.0, speed: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """RGB image (H, W, 3) uint8 seen by the camera of the car at world (x, y, yaw). Gap world only: ``t``
    (s) places the other cars, ``speed`` (m/s) sets the motion blur and ``rng`` draws the sensor noise
    (None: a noise-free image)."""
    cfg = cfg or CameraConfig()
    w, h = cfg.image_size
    K = camera_intrinsics(cfg)
    c2e = camera_to_ego(cfg)
    uu, vv = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    ray_cam = np.stack([(uu - K[0, 2]) / K[0, 0], (vv - K[1, 2]) / K[1, 1], np.ones_like(uu)], -1).reshape(-1, 3)
    ray_ego = ray_cam @ c2e[:3, :3].T
    cy, sy = np.cos(yaw), np.sin(yaw)
    dx = cy * ray_ego[:, 0] - sy * ray_ego[:, 1]
    dy = sy * ray_ego[:, 0] + cy * ray_ego[:, 1]
    dz = ray_ego[:, 2]
    horiz = np.hypot(dx, dy)
    dirs = np.stack([dx, dy], 1) / horiz[:, None]
    cam = c2e[:3, 3]
    origin = np.array([x + cy * cam[0] - sy * cam[1], y + sy * cam[0] + cy * cam[1]])
    cam_h = LIDAR_HEIGHT + cam[2]
    slope = dz / horiz                                  # height change per horizontal metre

    # wall distance on a fine azimuth table, looked up per pixel
    rel = (np.arctan2(dirs[:, 1], dirs[:, 0]) - yaw + np.pi) % (2 * np.pi) - np.pi   # azimuth vs heading
    lo, hi = rel.min(), rel.max() + 1e-9                                  # camera FOV < 180 deg: no wrap
    nbins = max(16, int(np.degrees(hi - lo) * 10))                        # 0.1 deg bins
    bins_phi = yaw + lo + (np.arange(nbins) + 0.5) * ((hi - lo) / nbins)
    fwd = np.array([cy, sy])
    tbl_h, tbl_seg, tbl_u = _walls_along(track, origin, bins_phi[0], bins_phi[1] - bins_phi[0], nbins, 150.0)
    b = np.clip(((rel - lo) / (hi - lo) * nbins).astype(np.int64), 0, nbins - 1)
    h_wall = tbl_h[b]
    z_wall = cam_h + h_wall * slope
    h_wall = np.where((z_wall >= 0) & (z_wall <= track.wall_height), h_wall, np.inf)
    h_obs, obs_ids = _barrels_along(track, origin, dirs, 150.0, forward=fwd)       # (P, B')
    z_obs = cam_h + h_obs * slope[:, None]
    h_obs = np.where((z_obs >= 0) & (z_obs <= track.obs_height[obs_ids][None]), h_obs, np.inf)
    if h_obs.shape[1]:
        which_obs = np.argmin(h_obs, axis=1)
        h_obs_min = h_obs[np.arange(len(h_obs)), which_obs]
    else:
        which_obs = np.zeros(len(horiz), np.int64)
        h_obs_min = np.full(len(horiz), np.inf)
    with np.errstate(divide="ignore"):
        h_ground = np.where(slope < 0, cam_h / -slope, np.inf)
    cands = [h_ground, h_wall, h_obs_min]
    traffic, cars = track.traffic, None
    if traffic is not None and len(traffic):                 # other cars: only rays in the field of view exist
        poses = car_poses(track, traffic, t)          # boxes are vertical: cast on the azimuth table too
        bin_dirs = np.stack([np.cos(bins_phi), np.sin(bins_phi)], axis=1)
        h_car, face, along = (a[b] for a in ray_boxes(origin, bin_dirs, poses, traffic))       # (P, M)
        z_car = cam_h + h_car * slope[:, None]
        h_car = np.where((z_car >= 0) & (z_car <= traffic.height[None]), h_car, np.inf)
        which_car = np.argmin(h_car, axis=1)
        cands.append(h_car[np.arange(len(h_car)), which_car])
        cars = (which_car, face, along, poses.yaw)
    cand = np.stack(cands)
    kind = np.argmin(cand, axis=0)
    dist = np.min(cand, axis=0)
    kind = np.where(np.isfinite(dist), kind, SKY)

    if track.look is not None:
        rgb = _shade_gap(track, kind, dist, dirs, slope, origin, cam_h, (tbl_seg[b], tbl_u[b]),
                         (which_obs, obs_ids), cars, (x, y, yaw))
        # horizontal optical flow of forward motion: (u - cx) v / Z, Z = depth along the optical axis
        with np.errstate(divide="ignore", invalid="ignore"):
            flow = np.where(kind != SKY, (uu.reshape(-1) - K[0, 2]) * float(speed) * horiz / dist, 0.0)
        return finish(track.look, rgb.reshape(h, w, 3), flow.reshape(h, w), rng)

    horizon_rgb = np.array([0.78, 0.86, 0.95])
    elev_frac = np.clip(slope, 0, 1)[:, None]
    rgb = horizon_rgb * (1 - elev_frac) + np.array([0.30, 0.50, 0.85]) * elev_frac
    g = kind == GROUND
    if g.any():
        rgb[g] = ground_material(track, origin + dirs[g] * dist[g, None])[0]
    wm = kind == WALL
    if wm.any():
        col, _ = wall_material(track, tbl_seg[b[wm]], tbl_u[b[wm]], z_wall[wm])
        seg = tbl_seg[b[wm]]
        e = track.seg_b[seg] - track.seg_a[seg]
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        shade = 0.55 + 0.45 * np.abs(dirs[wm, 0] * e[:, 1] - dirs[wm, 1] * e[:, 0])
        rgb[wm] = col * shade[:, None]
    om = kind == BARREL
    if om.any():
        k = which_obs[om]
        rgb[om] = barrel_material(z_obs[om, k], track.obs_height[obs_ids[k]])[0]
    hit = kind != SKY
    fog = 1.0 - np.exp(-dist[hit] * np.sqrt(1 + slope[hit] ** 2) / 140.0)
    rgb[hit] = rgb[hit] * (1 - fog[:, None]) + horizon_rgb * fog[:, None]
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8).reshape(h, w, 3)
