"""The faster sensors render exactly what they rendered before (``tests/sensor_reference.py``, the code of
commit 0a0a4a2): the same image bytes and LiDAR points, bit for bit, on poses of gap-world tracks in every
light (other cars in and out of view, barrels, motion blur, noise or none), of the clean world, and far from
the first turn of the yaw; and the exact shortcuts they rest on (angle wrap, lattice noise)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from e2r.sim import appearance
from e2r.sim.sensors import CameraConfig, LidarConfig, cast_lidar, render_camera
from e2r.sim.traffic import car_poses
from e2r.sim.world import SyntheticConfig, track_for_index
from tests import sensor_reference as ref

CFG = SyntheticConfig(tracks=6, seed=11)


@pytest.fixture(scope="module")
def tracks():
    """Gap-world tracks of all three lights (the light cycles over a split's tracks), with traffic."""
    return [track_for_index(CFG, i) for i in range(4)]


def _poses(track, n: int, seed: int):
    """``n`` poses (x, y, yaw, t, speed) near the centre line: off it, turned, at any time and speed; one of
    them right behind another car (so it is in view)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        i = int(rng.integers(len(track.centre)))
        x, y = track.centre[i] + track.normal[i] * rng.normal(0, 0.8)
        yaw = float(np.arctan2(track.tangent[i, 1], track.tangent[i, 0]) + rng.normal(0, 0.3))
        out.append((float(x), float(y), yaw, float(rng.uniform(0, 60)), float(rng.uniform(0, 15))))
    if track.traffic is not None and len(track.traffic):
        t = 5.0
        car = car_poses(track, track.traffic, t)
        yaw = float(car.yaw[0])
        out.append((float(car.x[0] - 9 * np.cos(yaw)), float(car.y[0] - 9 * np.sin(yaw)), yaw, t, 8.0))
    return out


def _same_camera(track, pose, cam: CameraConfig, seed: int) -> None:
    x, y, yaw, t, v = pose
    for rng in (lambda: np.random.default_rng(seed), lambda: None):
        new = render_camera(track, x, y, yaw, cam, t=t, speed=v, rng=rng())
        old = ref.render_camera(track, x, y, yaw, cam, t=t, speed=v, rng=rng())
        assert new.dtype == old.dtype == np.uint8 and new.shape == old.shape
        assert np.array_equal(new, old), f"image differs at {pose}: max |diff| " \
                                         f"{np.abs(new.astype(int) - old.astype(int)).max()}"


def _same_lidar(track, pose, lidar: LidarConfig, seed: int) -> None:
    x, y, yaw, t, _ = pose
    new = cast_lidar(track, x, y, yaw, np.random.default_rng(seed), lidar, t=t)
    old = ref.cast_lidar(track, x, y, yaw, np.random.default_rng(seed), lidar, t=t)
    assert new.dtype == old.dtype == np.float32
    assert np.array_equal(new, old), f"points differ at {pose}: {new.shape} vs {old.shape}"


def test_camera_and_lidar_are_bit_identical_to_the_reference(tracks):
    cam = CameraConfig(image_size=(128, 64))
    for i, track in enumerate(tracks):
        for k, pose in enumerate(_poses(track, 4, i)):
            _same_camera(track, pose, cam, 100 * i + k)
            _same_lidar(track, pose, CFG.lidar, 100 * i + k)


def test_the_worlds_own_camera_size_and_far_turned_yaws(tracks):
    """The world's camera (256 x 128) and yaws many turns away from [-pi, pi) (a car that drove laps)."""
    track = tracks[1]
    for k, (x, y, yaw, t, v) in enumerate(_poses(track, 2, 7)):
        for turns in (0, 3, -5):
            pose = (x, y, yaw + 2 * np.pi * turns, t, v)
            _same_camera(track, pose, CFG.camera, k)
            _same_lidar(track, pose, CFG.lidar, k)


def test_clean_world_is_bit_identical_to_the_reference(tracks):
    clean = replace(tracks[0], look=None, traffic=None, paint=None)
    cam = CameraConfig(image_size=(96, 48))
    for k, pose in enumerate(_poses(clean, 3, 5)):
        _same_camera(clean, pose, cam, k)
        _same_lidar(clean, pose, LidarConfig(azimuth_steps=360), k)


def test_wrap_angle_is_the_remainder_bit_for_bit():
    rng = np.random.default_rng(0)
    two_pi = 2 * np.pi
    edges = np.array([0.0, -0.0, np.pi, -np.pi, two_pi, -two_pi, 3 * np.pi, -3 * np.pi, 1e-300, -1e-300,
                      np.nextafter(np.pi, 0), np.nextafter(-np.pi, 0), np.nextafter(3 * np.pi, 0),
                      -3 * np.pi + 1e-16])
    for a in (edges, rng.uniform(-4 * np.pi, 4 * np.pi, 10_000), rng.uniform(-100, 100, 1000), np.zeros(0)):
        want = (a + np.pi) % two_pi - np.pi
        assert np.array_equal(appearance.wrap_angle(a.copy()), want)
        assert np.array_equal(np.signbit(appearance.wrap_angle(a.copy())), np.signbit(want))


def test_value_noise_and_hash_match_the_reference():
    """The lattice is hashed once and gathered when the points span few cells, directly otherwise: both give
    the reference's values (also the row y = 0 that the shadow bands use)."""
    rng = np.random.default_rng(1)
    for scale in (0.3, 4.0, 60.0, 3000.0):
        for n in (1, 9, 5000):
            x, y = rng.normal(0, scale, n), rng.normal(0, scale, n)
            for seed in (0, 7, 99991):
                assert np.array_equal(appearance.value_noise(x, y, seed), ref.value_noise(x, y, seed))
                assert np.array_equal(appearance.value_noise(x, None, seed),
                                      ref.value_noise(x, np.zeros_like(x), seed))
            assert np.array_equal(appearance.hash01(np.floor(x), np.floor(y)), ref.hash01(np.floor(x), np.floor(y)))
