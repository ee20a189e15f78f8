"""The synthetic world's sensors as they were before they were made faster (e2r/sim at commit 0a0a4a2): the
reference that ``tests/test_sensor_speed.py`` holds the package's ``cast_lidar`` and ``render_camera`` to, bit
for bit. Only what changed since is here (with ``tests/shading_reference.py``); the rest (the wall casting
included) is the package's.
Not used by the package."""
from __future__ import annotations

import numpy as np

from e2r.sim.materials import barrel_material, car_intensity
from e2r.sim.raycast import walls_along
from e2r.sim.sensors import (BARREL, CAR, GROUND, LIDAR_HEIGHT, SKY, WALL, CameraConfig, LidarConfig,
                             camera_intrinsics, camera_to_ego)
from e2r.sim.track import Track
from e2r.sim.traffic import car_poses, ray_boxes
from tests.shading_reference import (car_albedo, finish, ground_albedo, ground_material, hash01, lighting, sky,
                                     value_noise, wall_albedo, wall_material)

__all__ = ["cast_lidar", "render_camera", "hash01", "value_noise"]


def _barrels_along(track: Track, origin: np.ndarray, dirs: np.ndarray, max_range: float,
                   forward: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``sensors._barrels_along`` as it was."""
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
    """``sensors.cast_lidar`` as it was."""
    cfg = cfg or LidarConfig()
    elev = np.radians(np.linspace(cfg.elevation_deg[0], cfg.elevation_deg[1], cfg.rings))       # (R,)
    az = np.arange(cfg.azimuth_steps) * (2 * np.pi / cfg.azimuth_steps)                          # (A,)
    world_dirs = np.stack([np.cos(az + yaw), np.sin(az + yaw)], axis=1)
    origin = np.array([x, y])
    h_wall, seg, u = walls_along(track, origin, yaw, az[1], len(az), cfg.max_range)             # (A,)
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
    """``sensors._shade_gap`` as it was."""
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
    """``sensors.render_camera`` as it was."""
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
    tbl_h, tbl_seg, tbl_u = walls_along(track, origin, bins_phi[0], bins_phi[1] - bins_phi[0], nbins, 150.0)
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
