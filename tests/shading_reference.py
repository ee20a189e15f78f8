"""The camera's shading and the materials as they were before the sensors were made faster (e2r/sim at commit
0a0a4a2), for ``tests/sensor_reference.py``: only the functions that changed since; not used by the package."""
from __future__ import annotations

import numpy as np

from e2r.sim.appearance import Appearance, _smoothstep
from e2r.sim.materials import CAP, STRIPE_LEN, _car_parts
from e2r.sim.track import ASPHALT, CENTRE_LINE, EDGE_LINE, FADED_CENTRE, FADED_EDGE, GRASS, PaintMap, Track, paint_map
from e2r.sim.traffic import Traffic

__all__ = ["hash01", "value_noise", "lighting", "sky", "finish", "ground_material", "wall_material", "ground_albedo",
           "wall_albedo", "car_albedo"]


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
    """``appearance.hash01`` as it was."""
    h = (ix.astype(np.int64) * 73856093) ^ (iy.astype(np.int64) * 19349663)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h >> 8) & 0xFFFF).astype(np.float64) / 65536.0


def value_noise(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """``appearance.value_noise`` as it was."""
    ix, iy = np.floor(x), np.floor(y)
    fx, fy = x - ix, y - iy
    sx, sy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    ix, iy = ix.astype(np.int64) + seed * 7919, iy.astype(np.int64) - seed * 104729
    top = hash01(ix, iy) * (1 - sx) + hash01(ix + 1, iy) * sx
    bottom = hash01(ix, iy + 1) * (1 - sx) + hash01(ix + 1, iy + 1) * sx
    return top * (1 - sy) + bottom * sy


def shadow(look: Appearance, xy: np.ndarray) -> np.ndarray:
    """``appearance.shadow`` as it was."""
    if look.sun_level <= 0 or len(xy) == 0:
        return np.zeros(len(xy))
    p = xy @ look.shadow_dir / look.shadow_period
    band = _smoothstep(0.4, 0.6, value_noise(p, np.zeros_like(p), look.noise_seed + 1))
    region = value_noise(xy[:, 0] / 40.0, xy[:, 1] / 40.0, look.noise_seed + 2)
    cover = _smoothstep(1.0 - look.shadow_cover - 0.08, 1.0 - look.shadow_cover + 0.08, region)
    return look.shadow_strength * band * cover


def lighting(look: Appearance, xy: np.ndarray, z: np.ndarray, normal: np.ndarray | None,
             ego: tuple[float, float, float]) -> np.ndarray:
    """``appearance.lighting`` as it was."""
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
    """``appearance.sky`` as it was."""
    t = np.clip(slope, 0, 1)[:, None] ** 0.7
    return look.horizon[None] * (1 - t) + look.zenith[None] * t


def _box_blur(img: np.ndarray, length: np.ndarray) -> np.ndarray:
    """``appearance._box_blur`` as it was."""
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
    """``appearance.finish`` as it was."""
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
    """``materials.ground_material`` as it was."""
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
    """``materials.wall_s`` as it was."""
    seglen = np.linalg.norm(track.seg_b[seg] - track.seg_a[seg], axis=1)
    return track.seg_s0[seg] + u * seglen


def wall_material(track: Track, seg: np.ndarray, u: np.ndarray, z: np.ndarray):
    """``materials.wall_material`` as it was."""
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
    """``materials.ground_albedo`` as it was."""
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
    """``materials.wall_albedo`` as it was."""
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
    """``materials.car_albedo`` as it was."""
    glass, low, tail = _car_parts(traffic, car, face, along, z)
    rgb = traffic.colour[car].copy()
    rgb[glass] = (0.06, 0.07, 0.08)
    rgb[low] = (0.04, 0.04, 0.04)
    rgb[tail] = (0.6, 0.04, 0.03)
    glow = np.zeros_like(rgb)
    glow[tail] = np.array([1.0, 0.12, 0.06]) * (0.15 + 1.2 * (1.0 - look.daylight))
    return rgb, glow
