"""Surface materials of the synthetic world: what the camera's colour and the LiDAR's intensity are made of.

- Clean world (and every LiDAR intensity): :func:`ground_material`, :func:`wall_material`,
  :func:`barrel_material` give RGB in [0, 1], :func:`ground_intensity`, :func:`wall_intensity` the LiDAR
  intensity, from the same layout, so the two agree (paint bright, white wall stripes bright; red/white left
  wall, blue/white right wall).
- Gap world, camera only: :func:`ground_albedo`, :func:`wall_albedo`, :func:`car_albedo` give the
  reflectance under the track's look (``e2r.sim.appearance``: per-track wall paint, concrete texture,
  asphalt, grass, paint colours and wear); lighting is applied by ``appearance.lighting``.
- Other cars: :func:`car_albedo` (camera: body paint, dark glass, black bumpers, red tail lights that glow
  at night) and :func:`car_intensity` (LiDAR: body, weak glass, bright rear reflectors).
"""
from __future__ import annotations

import numpy as np

from e2r.sim.appearance import Appearance, hash01, value_noise
from e2r.sim.track import ASPHALT, CENTRE_LINE, EDGE_LINE, FADED_CENTRE, FADED_EDGE, GRASS, Track, paint_map
from e2r.sim.traffic import FACE_REAR, FACE_SIDE, Traffic

__all__ = ["STRIPE_LEN", "CAP", "ground_material", "ground_intensity", "wall_material", "wall_intensity",
           "barrel_material", "ground_albedo", "wall_albedo", "car_albedo", "car_intensity", "wall_s"]

STRIPE_LEN = 2.0       # metres of one wall stripe
CAP = 0.12             # dark band at the top of the walls (m)
GLASS = (0.95, 0.12)   # window band: from this height to this far below the roof (m)


def _ground_code_noise(track: Track, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paint code (P,) and the clean world's 25 cm asphalt noise in [0, 1) (P,) of ground points ``xy`` (P, 2)."""
    return paint_map(track).lookup(xy), hash01(np.floor(xy[:, 0] * 4), np.floor(xy[:, 1] * 4))


def ground_material(track: Track, xy: np.ndarray) -> np.ndarray:
    """Clean-world RGB (P, 3) in [0, 1] of ground points ``xy`` (P, 2) (world frame)."""
    code, noise = _ground_code_noise(track, xy)
    grey = 0.30 + 0.07 * noise
    rgb = np.repeat(grey[:, None], 3, axis=1)
    rgb[code == EDGE_LINE] = (0.93, 0.93, 0.93)
    rgb[code == CENTRE_LINE] = (0.95, 0.80, 0.15)
    rgb[code < ASPHALT] = (0.25, 0.45, 0.20)
    return rgb


def ground_intensity(track: Track, xy: np.ndarray) -> np.ndarray:
    """LiDAR intensity (P,) of ground points ``xy`` (P, 2): paint 0.75, asphalt and grass 0.08-0.14."""
    code, noise = _ground_code_noise(track, xy)
    return np.where(code > ASPHALT, 0.75, 0.08 + 0.06 * noise)


def wall_s(track: Track, seg: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Arc length along the wall (P,) of hits on segments ``seg`` at position ``u`` in [0, 1]."""
    return track.seg_s0[seg] + u * track.seg_len[seg]


def _wall_white_cap(track: Track, seg: np.ndarray, u: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(light stripe, dark cap) bool masks (P,) of wall hits on ``seg`` at ``u``, height ``z``."""
    white = (np.floor(wall_s(track, seg, u) / STRIPE_LEN).astype(np.int64) % 2) == 0
    return white, z > track.wall_height - CAP


def wall_material(track: Track, seg: np.ndarray, u: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Clean-world RGB (P, 3) of wall hits on segments ``seg`` at position ``u``, height ``z`` above ground."""
    white, cap = _wall_white_cap(track, seg, u, z)
    left = track.seg_side[seg] == 0
    colour = np.where(left[:, None], np.array([[0.80, 0.10, 0.10]]), np.array([[0.10, 0.25, 0.80]]))
    rgb = np.where(white[:, None], 0.92, colour)
    rgb[cap] = 0.12
    return rgb


def wall_intensity(track: Track, seg: np.ndarray, u: np.ndarray, z: np.ndarray) -> np.ndarray:
    """LiDAR intensity (P,) of wall hits: light stripes 0.8, coloured ones 0.35, the cap 0.2."""
    white, cap = _wall_white_cap(track, seg, u, z)
    return np.where(cap, 0.2, np.where(white, 0.8, 0.35))


def barrel_material(z: np.ndarray, height: np.ndarray):
    band = np.abs(z / height - 0.6) < 0.1
    rgb = np.where(band[:, None], 0.95, np.array([[1.0, 0.5, 0.05]]))
    return rgb, np.full(len(z), 0.95)


# ------------------------------------------------------------------------------------- gap world, camera
def ground_albedo(look: Appearance, track: Track, xy: np.ndarray) -> np.ndarray:
    """Camera reflectance (3, P) (channel-major) of ground points ``xy`` (P, 2): the track's asphalt (grain at
    10 cm, patches of ``patch_scale`` m), its paint colours (faded paint blended into the asphalt), its grass."""
    code = paint_map(track).lookup(xy)
    grain = hash01(np.floor(xy[:, 0] * 10), np.floor(xy[:, 1] * 10)) - 0.5
    patch = value_noise(xy[:, 0] / look.patch_scale, xy[:, 1] / look.patch_scale, look.noise_seed) - 0.5
    grey = look.asphalt_grey * (1 + look.grain * grain + 2 * look.patches * patch)
    rgb = grey[None] * look.asphalt_tint[:, None]
    for full, faded, colour in ((EDGE_LINE, FADED_EDGE, look.edge_paint),
                                (CENTRE_LINE, FADED_CENTRE, look.centre_paint)):
        sel = np.flatnonzero(code == full)
        rgb[:, sel] = colour[:, None] * (0.95 + 0.1 * grain[sel])[None]
        sel = np.flatnonzero(code == faded)
        old = rgb[:, sel]
        rgb[:, sel] = old + look.fade_contrast * (colour[:, None] - old)
    g = np.flatnonzero(code == GRASS)
    rgb[:, g] = look.grass[:, None] * (0.8 + 0.4 * (grain[g] + 0.5))[None] * (1 + 0.3 * patch[g])[None]
    np.clip(rgb, 0.0, 1.0, out=rgb)
    return rgb


def wall_albedo(look: Appearance, track: Track, seg: np.ndarray, u: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Camera reflectance (3, P) (channel-major) of wall hits: the side's two paint colours in ``STRIPE_LEN``
    stripes (where the LiDAR sees its bright stripes), a concrete texture of ``wall_texture`` amplitude, the
    dark cap."""
    s_wall = wall_s(track, seg, u)
    first = (np.floor(s_wall / STRIPE_LEN).astype(np.int64) % 2) == 0
    side = track.seg_side[seg].astype(np.int64)
    rgb = look.wall_colours.reshape(4, 3).T.take(side * 2 + first, axis=1)      # [side, 1 if first else 0]
    tex = value_noise(s_wall * 3.0, z * 3.0, look.noise_seed + 3) + 0.5 * hash01(np.floor(s_wall * 20),
                                                                                 np.floor(z * 20))
    rgb = rgb * (1 - look.wall_texture * (tex - 0.75))[None]
    rgb[:, z > track.wall_height - CAP] = 0.12
    np.clip(rgb, 0.0, 1.0, out=rgb)
    return rgb


def _car_parts(traffic: Traffic, car: np.ndarray, face: np.ndarray, along: np.ndarray,
               z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(glass, low, tail) bool masks (P,) of hits on ``car`` (P,) at ``face``, ``along`` the face, height z."""
    hl, hw, h = traffic.half_length[car], traffic.half_width[car], traffic.height[car]
    inner = np.where(face == FACE_SIDE, np.abs(along) < hl - 0.4, np.abs(along) < hw - 0.15)
    glass = (z > GLASS[0]) & (z < h - GLASS[1]) & inner
    low = z < 0.28
    tail = (face == FACE_REAR) & (z > 0.55) & (z < 0.8) & (np.abs(along) > hw - 0.45)
    return glass, low, tail


def car_albedo(look: Appearance, traffic: Traffic, car: np.ndarray, face: np.ndarray, along: np.ndarray,
               z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Camera reflectance (3, P) and emitted light (3, P) (channel-major) of hits on the other cars (tail
    lights glow, brighter as the light falls)."""
    glass, low, tail = _car_parts(traffic, car, face, along, z)
    rgb = traffic.colour.T.take(car, axis=1)
    rgb[:, glass] = np.array([0.06, 0.07, 0.08])[:, None]
    rgb[:, low] = 0.04
    rgb[:, tail] = np.array([0.6, 0.04, 0.03])[:, None]
    glow = np.zeros_like(rgb)
    glow[:, tail] = (np.array([1.0, 0.12, 0.06]) * (0.15 + 1.2 * (1.0 - look.daylight)))[:, None]
    return rgb, glow


def car_intensity(traffic: Traffic, car: np.ndarray, face: np.ndarray, along: np.ndarray,
                  z: np.ndarray) -> np.ndarray:
    """LiDAR intensity (P,) of hits on the other cars: body 0.4, glass 0.08, tyres/bumper 0.1, rear
    reflectors 0.9 (independent of the light and of the paint's visible colour)."""
    glass, low, tail = _car_parts(traffic, car, face, along, z)
    return np.select([tail, glass, low], [0.9, 0.08, 0.1], 0.4)
