"""The camera's side of the sensor gap: a per-track look (light, exposure, shadows, materials, worn paint)
and the camera's finishing (motion blur, sensor noise). ``SyntheticConfig.appearance = "clean"`` keeps the
old look (uniform light, the same red/blue walls and fresh paint everywhere); ``"gap"`` (default) uses this.

Why each part, from what real rigs see (the values are physical orders of magnitude, not tuned to results):
- A camera measures reflected *visible* light; a LiDAR measures the return of its own near-infrared pulse.
  So the image changes with the time of day, shadows and exposure, and the LiDAR does not: nothing here
  reaches ``cast_lidar`` except paint that is physically gone.
- Time of day (per track): noon (high white sun, blue sky), dusk (low warm sun, long shadows, orange sky,
  headlights on) and night (dark sky, a little ambient light; the road is lit only by the car's low-beam
  cone, which falls off with distance, so walls beyond ~30 m fade into the dark).
- Auto-exposure is imperfect: each track gets an exposure bias (``exposure_ev`` stops: under- or over-
  exposed; bright paint and sky clip). In low light the camera exposes longer (4 ms at noon up to 30 ms at
  night, the span of automotive cameras at 20-30 fps) and raises its gain (x1 to x8).
- Motion blur: during the exposure each pixel sweeps its optical flow; for forward motion at speed v a
  point at depth Z and column u moves ``(u - cx) v / Z`` pixels per second, so each pixel is averaged over
  that horizontal length times the exposure time: proportional to speed, worst at night and at the image
  sides (yaw-rate blur is left out).
- Sensor noise: photon shot noise (variance proportional to the signal) and read noise, both scaled by the
  gain, so dark and night images are grainier.
- Soft shadows: bands of tree/building shade across the road (penumbra-soft edges), only in parts of the
  lap, oriented by the sun's azimuth; none at night.
- Materials differ per track: wall paint (two colours per side), concrete texture, asphalt tone, tint,
  grain and patches, grass, paint colours; lane paint is missing on stretches (for both sensors: it is gone)
  and faded on others (low contrast for the camera; the paint's glass beads still return the LiDAR pulse).
- Other cars (``e2r.sim.traffic``): the LiDAR sees them all around, the camera only in its field of view.

Held-out looks: wall hues come from 12 sectors of the colour circle; train (and LiDAR-only) tracks draw
from the even sectors, valid tracks from sectors 1, 5, 9 and test tracks from 3, 7, 11, and held-out tracks
draw from their own random stream, so no train track has the wall paint of a valid or test track. The light
conditions are shared (each split cycles noon, dusk, night over its tracks): the test asks for new places
in known conditions.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass, field

import numpy as np

from e2r.sim.track import Track

__all__ = ["AppearanceConfig", "Appearance", "LIGHTS", "HUE_SECTORS", "draw_appearance", "wrap_angle", "hash01",
           "value_noise", "shadow", "lighting", "sky", "finish"]

LIGHTS = ("noon", "dusk", "night")
#: colour-circle sectors (of 12) each split draws its wall hues from
HUE_SECTORS = {"train": (0, 2, 4, 6, 8, 10), "valid": (1, 5, 9), "test": (3, 7, 11)}
_ANCHORS = np.array([0.0, 0.4, 0.9])          # daylight of night, dusk, noon: the tables below interpolate
_SUN = np.array([0.0, 0.5, 0.85])
_SUN_TINT = np.array([[1.0, 1.0, 1.0], [1.0, 0.72, 0.48], [1.0, 0.98, 0.95]])
_AMBIENT = np.array([0.03, 0.32, 0.36])
_AMBIENT_TINT = np.array([[0.7, 0.8, 1.1], [0.85, 0.8, 1.0], [0.92, 0.96, 1.05]])
_HORIZON = np.array([[0.03, 0.035, 0.06], [0.95, 0.6, 0.38], [0.78, 0.86, 0.95]])
_ZENITH = np.array([[0.005, 0.008, 0.02], [0.28, 0.26, 0.5], [0.30, 0.50, 0.85]])
_HEADLIGHT = np.array([1.4, 0.35, 0.0])
_GAIN = np.array([8.0, 2.5, 1.0])
_EXPOSURE_MS = np.array([30.0, 12.0, 4.0])


@dataclass
class AppearanceConfig:
    """Ranges the per-track looks are drawn from, and the camera/LiDAR gap settings."""
    noon_daylight: tuple[float, float] = (0.8, 1.0)      # 1 = high sun, 0 = no sun or sky light
    dusk_daylight: tuple[float, float] = (0.3, 0.5)
    night_daylight: tuple[float, float] = (0.0, 0.05)
    exposure_ev: tuple[float, float] = (-1.0, 1.0)       # auto-exposure bias, stops
    shadow_strength: tuple[float, float] = (0.5, 0.8)    # share of sunlight a shadow band blocks
    shadow_period: tuple[float, float] = (4.0, 12.0)     # m between shadow bands
    shadow_cover: tuple[float, float] = (0.3, 0.7)       # share of the ground in shaded regions
    paint_missing: tuple[float, float] = (0.0, 0.35)     # share of the lap each line is gone on
    paint_faded: tuple[float, float] = (0.1, 0.5)        # ... is faded on
    fade_contrast: tuple[float, float] = (0.15, 0.5)     # faded paint's contrast over asphalt
    headlight_range: float = 12.0                        # m: beyond it the cone's light falls as 1/d^2
    headlight_spread_deg: float = 28.0                   # std of the beam's horizontal profile (seen from
                                                         # the rear axle: the two lamps' spread near the car)
    shot_noise: float = 3e-4                             # shot-noise variance per unit signal at gain 1
    read_noise: float = 0.004                            # read-noise std at gain 1 (image range 0..1)
    lidar_weak_dropout: float = 0.3                      # LiDAR: extra loss of weak far returns (below)


@dataclass
class Appearance:
    """One track's look. Light: ``light`` (LIGHTS), ``daylight`` in [0, 1]; sun (azimuth, elevation rad,
    level, tint), ambient (level, tint), sky (horizon, zenith), headlight level, exposure (bias ev, gain,
    time s). Shadows: band direction, period, phase, strength and cover. Materials: wall colours (2 sides x
    2 colours x RGB), wall texture amplitude, asphalt grey, tint, grain and patch amplitudes, patch scale,
    grass, paint colours (edge, centre), fade contrast; ``paint_state`` (3, K): per centre sample, for the left
    edge, right edge and centre line, 0 paint, 1 faded, 2 gone. ``noise_seed`` offsets the texture noise."""
    light: str
    daylight: float
    split: str
    sun_azimuth: float
    sun_elevation: float
    sun_level: float
    sun_tint: np.ndarray
    ambient: float
    ambient_tint: np.ndarray
    horizon: np.ndarray
    zenith: np.ndarray
    headlight: float
    exposure_ev: float
    gain: float
    exposure_time: float
    shadow_dir: np.ndarray
    shadow_period: float
    shadow_strength: float
    shadow_cover: float
    wall_colours: np.ndarray
    wall_texture: float
    asphalt_grey: float
    asphalt_tint: np.ndarray
    grain: float
    patches: float
    patch_scale: float
    grass: np.ndarray
    edge_paint: np.ndarray
    centre_paint: np.ndarray
    fade_contrast: float
    paint_state: np.ndarray = field(repr=False)
    noise_seed: int = 0
    cfg: AppearanceConfig = field(default_factory=AppearanceConfig, repr=False)

    def summary(self) -> dict:
        """JSON-ready description (track.json, the preview)."""
        state = self.paint_state
        return {"light": self.light, "daylight": round(self.daylight, 3), "exposure_ev": round(self.exposure_ev, 2),
                "gain": round(self.gain, 2), "exposure_ms": round(self.exposure_time * 1e3, 1),
                "sun_elevation_deg": round(float(np.degrees(self.sun_elevation)), 1),
                "wall_colours": np.round(self.wall_colours[:, 0], 3).tolist(),
                "paint_gone": round(float((state == 2).mean()), 3), "paint_faded": round(float((state == 1).mean()), 3),
                "split_palette": self.split}


def _table(values: np.ndarray, daylight: float) -> np.ndarray:
    if values.ndim == 1:
        return np.float64(np.interp(daylight, _ANCHORS, values))
    return np.array([np.interp(daylight, _ANCHORS, values[:, c]) for c in range(values.shape[1])])


def _hue_colour(rng: np.random.Generator, sectors: tuple[int, ...], sat: tuple[float, float],
                val: tuple[float, float]) -> np.ndarray:
    """An RGB colour whose hue lies inside one of ``sectors`` (of 12; 10 % margin to the sector edges)."""
    hue = (rng.choice(sectors) + rng.uniform(0.1, 0.9)) / 12.0
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(*sat), rng.uniform(*val)))


def _wear(rng: np.random.Generator, n: int, share_gone: float, share_faded: float) -> np.ndarray:
    """(n,) uint8 paint state along the lap: 1-3 stretches faded, then 1-3 stretches gone."""
    state = np.zeros(n, np.uint8)
    for value, share in ((1, share_faded), (2, share_gone)):
        k = int(rng.integers(1, 4))
        lengths = rng.dirichlet(np.ones(k)) * share * n
        for length in lengths:
            start = int(rng.integers(n))
            state[(start + np.arange(int(round(length)))) % n] = value
    return state


def draw_appearance(rng: np.random.Generator, track: Track, light: str, split: str,
                    cfg: AppearanceConfig) -> Appearance:
    """Draw the look of ``track`` in light condition ``light`` (LIGHTS), wall hues from ``split``'s sectors."""
    lo, hi = getattr(cfg, f"{light}_daylight")
    d = float(rng.uniform(lo, hi))
    sectors = HUE_SECTORS["train" if split not in HUE_SECTORS else split]
    walls = np.zeros((2, 2, 3))
    for side in range(2):
        walls[side, 0] = _hue_colour(rng, sectors, (0.5, 0.9), (0.45, 0.85))
        light_b = rng.random() < 0.6          # second stripe colour: near-white or another hue
        walls[side, 1] = (np.full(3, rng.uniform(0.8, 0.95)) - rng.uniform(0, 0.08, size=3) if light_b
                          else _hue_colour(rng, sectors, (0.3, 0.8), (0.6, 0.95)))
    grey = rng.uniform(0.18, 0.42)
    tint = 1.0 + rng.uniform(-0.06, 0.06, size=3)
    grass = np.array(colorsys.hsv_to_rgb(rng.uniform(0.12, 0.33), rng.uniform(0.35, 0.7), rng.uniform(0.3, 0.55)))
    edge = np.array([0.93, 0.93, 0.9]) if rng.random() < 0.8 else np.array([0.95, 0.82, 0.2])
    centre = np.array([0.95, 0.80, 0.15]) if rng.random() < 0.7 else np.array([0.92, 0.92, 0.9])
    n = len(track.centre)
    state = np.stack([_wear(rng, n, rng.uniform(*cfg.paint_missing), rng.uniform(*cfg.paint_faded))
                      for _ in range(3)])
    az = rng.uniform(0, 2 * np.pi)
    return Appearance(
        light=light, daylight=d, split=split, sun_azimuth=float(az),
        sun_elevation=float(np.radians(4.0 + 60.0 * max(0.0, d - 0.3) / 0.7)),
        sun_level=float(_table(_SUN, d)), sun_tint=_table(_SUN_TINT, d), ambient=float(_table(_AMBIENT, d)),
        ambient_tint=_table(_AMBIENT_TINT, d), horizon=_table(_HORIZON, d), zenith=_table(_ZENITH, d),
        headlight=float(_table(_HEADLIGHT, d)), exposure_ev=float(rng.uniform(*cfg.exposure_ev)),
        gain=float(_table(_GAIN, d)), exposure_time=float(_table(_EXPOSURE_MS, d)) * 1e-3,
        shadow_dir=np.array([-np.sin(az), np.cos(az)]), shadow_period=float(rng.uniform(*cfg.shadow_period)),
        shadow_strength=float(rng.uniform(*cfg.shadow_strength)), shadow_cover=float(rng.uniform(*cfg.shadow_cover)),
        wall_colours=walls, wall_texture=float(rng.uniform(0.05, 0.25)), asphalt_grey=float(grey),
        asphalt_tint=tint, grain=float(rng.uniform(0.05, 0.2)), patches=float(rng.uniform(0.0, 0.3)),
        patch_scale=float(rng.uniform(2.0, 8.0)), grass=grass, edge_paint=edge, centre_paint=centre,
        fade_contrast=float(rng.uniform(*cfg.fade_contrast)), paint_state=state,
        noise_seed=int(rng.integers(1, 2 ** 20)), cfg=cfg)


# ------------------------------------------------------------------------------------------------- noise
def wrap_angle(a: np.ndarray) -> np.ndarray:
    """``(a + pi) % (2 pi) - pi`` of angles ``a`` (P,) (rad), bit for bit, computed in place on ``a``: into
    [-pi, pi). Angles within two turns of the range skip the slow floating-point remainder (its result
    there is one exact add or subtract of 2 pi)."""
    two_pi = 2 * np.pi
    a += np.pi
    if len(a) and a.min() >= -two_pi and a.max() < 2 * two_pi:
        below, above = a < 0, a >= two_pi          # both decided before either moves a value
        np.add(a, two_pi, out=a, where=below)
        np.subtract(a, two_pi, out=a, where=above)
    else:
        np.remainder(a, two_pi, out=a)
    a -= np.pi
    return a


_HASH_X, _HASH_Y, _HASH_MIX = 73856093, 19349663, 1274126177
_GRID_SHARE = 4          # value_noise hashes its lattice once when the lattice box has <= points / this cells


def _mix01(h: np.ndarray) -> np.ndarray:
    """The last rounds of :func:`hash01` on ``h`` (P,) int64 = ``ix * _HASH_X ^ iy * _HASH_Y`` (modified in
    place) -> [0, 1) float64."""
    h ^= h >> 13
    h *= _HASH_MIX
    h >>= 8
    h &= 0xFFFF
    return h.astype(np.float64) / 65536.0


def hash01(ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """Deterministic integer hash of grid cells ``ix``, ``iy`` (P,) (integer-valued) -> [0, 1) (P,)."""
    h = np.asarray(ix).astype(np.int64) * _HASH_X
    h ^= np.asarray(iy).astype(np.int64) * _HASH_Y
    return _mix01(h)


def _lattice_hashes(ix: np.ndarray, iy: np.ndarray | int) -> tuple[np.ndarray, ...]:
    """:func:`hash01` at the lattice corners (ix, iy), (ix + 1, iy)[, (ix, iy + 1), (ix + 1, iy + 1)] of cells
    ``ix``, ``iy`` (P,) int64 (``iy`` an int: one row for all, the first two corners only). When the cells
    span a box of few lattice points (<= P / _GRID_SHARE) the box is hashed once and gathered (the same
    values)."""
    row = not isinstance(iy, np.ndarray)
    if len(ix):
        x0, x1 = int(ix.min()), int(ix.max()) + 1
        y0, y1 = (int(iy), int(iy)) if row else (int(iy.min()), int(iy.max()) + 1)
        nx, ny = x1 - x0 + 1, y1 - y0 + 1
        if nx * ny * _GRID_SHARE <= len(ix):
            grid = _mix01((np.arange(x0, x1 + 1, dtype=np.int64)[:, None] * _HASH_X
                           ^ np.arange(y0, y1 + 1, dtype=np.int64)[None] * _HASH_Y).ravel())   # (nx * ny,)
            at = (ix - x0) * ny
            if not row:
                at += iy - y0
            corners = (at, at + ny) if row else (at, at + ny, at + 1, at + ny + 1)
            return tuple(grid.take(c) for c in corners)
    hx0 = ix * _HASH_X
    hx1 = hx0 + _HASH_X                                  # (ix + 1) * _HASH_X, wrapping as int64 does
    hy0 = np.int64(iy) * _HASH_Y if row else iy * _HASH_Y
    if row:
        return _mix01(hx0 ^ hy0), _mix01(hx1 ^ hy0)
    hy1 = hy0 + _HASH_Y
    return _mix01(hx0 ^ hy0), _mix01(hx1 ^ hy0), _mix01(hx0 ^ hy1), _mix01(hx1 ^ hy1)


def value_noise(x: np.ndarray, y: np.ndarray | None, seed: int) -> np.ndarray:
    """Smooth 2-D value noise in [0, 1) (P,) at (x, y) (P,) (lattice spacing 1, smoothstep-interpolated
    hashes). ``y`` None: the row y = 0 (the same values as zeros, half the work)."""
    ix = np.floor(x)
    fx = x - ix
    sx = fx * fx * (3 - 2 * fx)
    ix = ix.astype(np.int64) + seed * 7919
    if y is None:
        h00, h10 = _lattice_hashes(ix, -seed * 104729)
        return h00 * (1 - sx) + h10 * sx          # top * (1 - 0) + bottom * 0 at y = 0: the top, bit for bit
    iy = np.floor(y)
    fy = y - iy
    sy = fy * fy * (3 - 2 * fy)
    iy = iy.astype(np.int64) - seed * 104729
    h00, h10, h01, h11 = _lattice_hashes(ix, iy)
    rx = 1 - sx
    top = h00 * rx + h10 * sx
    bottom = h01 * rx + h11 * sx
    return top * (1 - sy) + bottom * sy


def _smoothstep(lo: float, hi: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def shadow(look: Appearance, xy: np.ndarray) -> np.ndarray:
    """(P,) share of the sunlight blocked at world points ``xy`` (P, 2): soft bands (period
    ``shadow_period``, penumbra ~1/5 of it) inside shaded regions (~40 m across) covering ``shadow_cover``."""
    if look.sun_level <= 0 or len(xy) == 0:
        return np.zeros(len(xy))
    p = xy @ look.shadow_dir / look.shadow_period
    band = _smoothstep(0.4, 0.6, value_noise(p, None, look.noise_seed + 1))
    region = value_noise(xy[:, 0] / 40.0, xy[:, 1] / 40.0, look.noise_seed + 2)
    cover = _smoothstep(1.0 - look.shadow_cover - 0.08, 1.0 - look.shadow_cover + 0.08, region)
    return look.shadow_strength * band * cover


def lighting(look: Appearance, xy: np.ndarray, z: np.ndarray, normal: np.ndarray | None,
             ego: tuple[float, float, float]) -> np.ndarray:
    """Irradiance (3, P) (channel-major) at world points ``xy`` (P, 2), height ``z`` (P,) on surfaces with
    horizontal unit ``normal`` (P, 2) facing the camera (None = ground, facing up): ambient sky light,
    sunlight (less in shadow) and the ego car's low-beam headlights at (x, y, yaw) ``ego``: a cone of std
    ``headlight_spread_deg`` around the heading, 1/d^2 beyond ``headlight_range``."""
    cfg = look.cfg
    sun_h = np.array([np.cos(look.sun_azimuth), np.sin(look.sun_azimuth)])
    if normal is None:
        sun_cos = np.sin(look.sun_elevation)            # the same for every point of the ground
        ambient = look.ambient
    else:
        sun_cos = np.cos(look.sun_elevation) * np.maximum(normal @ sun_h, 0.0)
        ambient = 0.7 * look.ambient
    sun = look.sun_level * sun_cos * (1.0 - shadow(look, xy))
    out = (ambient * look.ambient_tint)[:, None] + sun[None] * look.sun_tint[:, None]
    if look.headlight > 0:
        x, y, yaw = ego
        px, py = xy[:, 0], xy[:, 1]
        dx, dy = px - (x + 3.5 * np.cos(yaw)), py - (y + 3.5 * np.sin(yaw))           # from the lamps
        r = np.maximum(np.hypot(dx, dy), 1e-3)
        angle = wrap_angle(np.arctan2(py - y, px - x) - yaw)
        cone = np.exp(-0.5 * (angle / np.radians(cfg.headlight_spread_deg)) ** 2)
        falloff = 1.0 / (1.0 + (r / cfg.headlight_range) ** 2)
        facing = np.ones(len(xy)) if normal is None else np.maximum(-(normal[:, 0] * dx + normal[:, 1] * dy) / r, 0.0)
        high = np.clip(1.0 - (z - 0.9) / 1.5, 0.2, 1.0)             # low beam: less light up high
        out += (look.headlight * cone * falloff * facing * high)[None] * np.array([1.0, 0.97, 0.9])[:, None]
    return out


def sky(look: Appearance, slope: np.ndarray) -> np.ndarray:
    """Sky radiance (3, P) (channel-major) of rays rising ``slope`` (P,) (m up per m ahead): horizon to
    zenith gradient."""
    t = np.clip(slope, 0, 1) ** 0.7
    return look.horizon[:, None] * (1 - t)[None] + look.zenith[:, None] * t[None]


def _box_blur(img: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Each pixel of ``img`` (3, H, W) (channel-major) averaged over a horizontal window ``length`` (H, W)
    pixels long centred on it (continuous box, fractional lengths via the row's running integral; clipped at
    the borders). Pixels whose window is under one pixel are left as they are."""
    _, h, w = img.shape
    rows, cols = np.nonzero(length > 1.0)
    # running integrals of the rows with a blurred pixel only (the sky's rows have none): row rows[i] is
    # row ``band[i]`` of ``csum``
    used = np.zeros(h, np.int64)
    used[rows] = 1
    band = np.cumsum(used) - 1
    used = np.flatnonzero(used)
    csum = np.zeros((3, len(used), w + 1), img.dtype)
    np.cumsum(img[:, used], axis=2, out=csum[:, :, 1:])                               # (3, H', W + 1)
    csum, flat = csum.reshape(3, -1), img.reshape(3, -1)
    at_sum, at_img = band.take(rows) * (w + 1), rows * w

    def integral(x: np.ndarray) -> np.ndarray:
        x = x + 0.5
        k = np.minimum(np.floor(x).astype(np.int64), w)
        x -= k                                          # the fraction of pixel k inside
        return csum.take(at_sum + k, axis=1) + x * flat.take(at_img + np.minimum(k, w - 1), axis=1)

    half = length.reshape(-1).take(at_img + cols) / 2
    lo, hi = np.maximum(cols - half, -0.5), np.minimum(cols + half, w - 0.5)
    out = img.copy()
    out.reshape(3, -1)[:, at_img + cols] = (integral(hi) - integral(lo)) / (hi - lo)
    return out


def finish(look: Appearance, radiance: np.ndarray, blur_px_per_s: np.ndarray,
           rng: np.random.Generator | None) -> np.ndarray:
    """The image a camera records (H, W, 3) uint8 from scene radiance (3, H, W) (channel-major) and each
    pixel's horizontal optical flow (H, W) px/s: exposure bias, motion blur over the exposure time, shot +
    read noise scaled by the gain (none when ``rng`` is None; drawn in (H, W, 3) order), clipping and 8-bit
    quantisation."""
    img = np.empty(radiance.shape, np.float32)
    np.multiply(radiance, 2.0 ** look.exposure_ev, out=img, casting="same_kind")    # float64 product, rounded
    length = np.abs(blur_px_per_s)
    length *= look.exposure_time
    if (length > 1.0).any():
        img = _box_blur(img, length)
    img = np.ascontiguousarray(img.transpose(1, 2, 0))                                   # (H, W, 3)
    if rng is not None:
        signal = np.clip(img, 0.0, 1.0)
        std = np.sqrt(look.cfg.shot_noise * look.gain * signal + (look.cfg.read_noise * look.gain) ** 2)
        std *= rng.standard_normal(img.shape, dtype=np.float32)
        img += std
    img *= 255.0
    img += 0.5
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)
