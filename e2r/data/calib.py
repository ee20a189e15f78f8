"""calib.json (docs/CONTRACTS.md) as data: its cameras and the LiDAR's extrinsic validated, LiDAR points moved to
the ego frame, and calib.json documents converted from the calibration formats datasets ship with.

No file is read here: ``e2r.data.readers.read_calib`` / ``read_lidar2ego`` read a calib.json and validate it
with :func:`cameras_from_doc` / :func:`lidar2ego_from_doc` (which file holds a segment's extrinsic is decided by
``e2r.data.layout.read_segment_lidar2ego``). ``python -m pipelines.import_calib`` converts with
:func:`calib_from_kitti` (KITTI calib .txt: ``P2``, ``R0_rect``, ``Tr_velo_to_cam``; ego = the velodyne frame)
or :func:`calib_from_nuscenes` (``calibrated_sensor`` records: translation, quaternion ``w, x, y, z``,
``camera_intrinsic``) and writes with :func:`write_calib` (validated as above, then temporary file + rename).
Every bad value is a :class:`~e2r.errors.DataError` naming the file and the field.
"""
from __future__ import annotations

import json
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from e2r.atomic import write_text_atomic
from e2r.cli_config import MAX_IMAGE_SIDE, image_size, option
from e2r.errors import ConfigError, DataError

__all__ = ["CameraCalib", "MAX_IMAGE_SIDE", "RIGID_TOL", "MAX_MOUNT_OFFSET_M", "FOV_RANGE_DEG", "cameras_from_doc",
           "lidar2ego_from_doc", "check_rigid", "check_field_of_view", "lidar_to_ego", "quaternion_to_matrix",
           "calib_from_kitti", "calib_from_nuscenes", "CalibImport", "format_calib", "write_calib", "scale_intrinsics"]

PathLike = Union[str, Path]
RIGID_TOL = 1e-4             # |R^T R - I| per entry and |det R - 1| of a rigid transform's rotation part
MAX_MOUNT_OFFSET_M = 100.0   # a sensor farther than this from the ego origin is not mounted on the car
QUATERNION_TOL = 1e-3        # |norm - 1| of a rotation quaternion (it is normalised after the check)
#: field of view (degrees) a pinhole K may give its image, per axis: 2 atan(side / (2 f)). 0.5 deg is a 4000 mm
#: telephoto on a full-frame sensor; 170 deg is past any rectilinear lens (a pinhole K cannot describe a
#: fisheye's 180+ deg). fx = fy = 1e30 (a field of view of 0) or fx = 1e-3 are refused.
FOV_RANGE_DEG = (0.5, 170.0)


@dataclass(frozen=True)
class CameraCalib:
    """One camera of calib.json: name, image_size (W, H), K (3, 3) for that size, cam2ego (4, 4)."""
    name: str
    image_size: tuple[int, int]
    K: np.ndarray
    cam2ego: np.ndarray


def _numbers_only(value: object) -> bool:
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "fiu"
    if isinstance(value, (list, tuple)):
        return all(_numbers_only(v) for v in value)
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _matrix(value: object, shape: tuple[int, ...], what: str, path: PathLike) -> np.ndarray:
    """``value`` as a float64 array of ``shape`` of finite numbers (a bool, string or null standing in for a
    number is refused, not converted), else DataError naming ``path`` and ``what``."""
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError, RecursionError):
        raise DataError(path, f"{what} is not a numeric matrix: {str(value)[:200]}") from None
    if m.shape != shape:
        raise DataError(path, f"{what} must have shape {shape}, got {m.shape}")
    if not _numbers_only(value):
        raise DataError(path, f"{what} must hold numbers only, got {value!r}")
    if not np.isfinite(m).all():
        raise DataError(path, f"{what} has non-finite values")
    return m


def _check_float32_invertible(m: np.ndarray, what: str, path: PathLike) -> None:
    """The models use K and cam2ego as float32 and invert them: refuse a matrix valid in float64 whose
    float32 version overflows, underflows to a singular matrix (fx = 1e-300 -> 0) or has a non-finite inverse."""
    with np.errstate(all="ignore"):
        m32 = m.astype(np.float32)
        ok = bool(np.isfinite(m32).all())
        if ok:
            try:
                inv = np.linalg.inv(m32)
                ok = bool(np.isfinite(inv).all()) and bool(np.isfinite(inv.astype(np.float32)).all()) \
                    and np.allclose(inv @ m32, np.eye(len(m32)), atol=1e-3)
            except np.linalg.LinAlgError:
                ok = False
    if not ok:
        raise DataError(path, f"{what} is not usable in float32 (its float32 version is not finite or not "
                              f"invertible): {m.tolist()}")


def cameras_from_doc(doc: object, path: PathLike) -> list[CameraCalib]:
    """The cameras of a parsed calib.json (format in docs/CONTRACTS.md), validated, in file order."""
    cams = doc.get("cameras") if isinstance(doc, dict) else None
    if not isinstance(cams, list) or not cams:
        raise DataError(path, "expected {\"cameras\": [ ... ]} with at least one camera")
    out: list[CameraCalib] = []
    for i, cam in enumerate(cams):
        where = f"cameras[{i}]"
        if not isinstance(cam, dict):
            raise DataError(path, f"{where} is not an object")
        for field in ("name", "image_size", "K", "cam2ego"):
            if field not in cam:
                raise DataError(path, f"{where} has no {field!r}")
        name = cam["name"]
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            raise DataError(path, f"{where}.name {name!r} must be a non-empty string of [A-Za-z0-9_.-]")
        size = cam["image_size"]
        if (not isinstance(size, list) or len(size) != 2 or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 < s <= MAX_IMAGE_SIDE for s in size)):
            raise DataError(path, f"{where}.image_size must be [W, H], integers in 1..{MAX_IMAGE_SIDE}, "
                                  f"got {str(size)[:200]}")
        K = _matrix(cam["K"], (3, 3), f"{where}.K", path)
        if K[0, 0] <= 0 or K[1, 1] <= 0 or not np.allclose(K[2], [0, 0, 1]):
            raise DataError(path, f"{where}.K must have fx, fy > 0 and last row [0, 0, 1], got {K.tolist()}")
        _check_float32_invertible(K, f"{where}.K", path)
        check_field_of_view(K, (int(size[0]), int(size[1])), f"{where}.K", path)
        T = check_rigid(_matrix(cam["cam2ego"], (4, 4), f"{where}.cam2ego", path), f"{where}.cam2ego", path)
        _check_float32_invertible(T, f"{where}.cam2ego", path)
        out.append(CameraCalib(name, (int(size[0]), int(size[1])), K, T))
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise DataError(path, f"duplicate camera names {names}")
    return out


#: how far (in image sides) a principal point may lie outside its image: loose, because a K is sometimes kept for
#: a crop or a rescaled copy of its images; a unit or field mix-up (cx = 1e6 for 64 pixels) lies far beyond
MAX_PRINCIPAL_OFFSET_SIDES = 100


def check_field_of_view(K: np.ndarray, image_size: tuple[int, int], what: str, path: PathLike) -> None:
    """DataError naming ``path`` and ``what`` unless the pinhole ``K`` gives an image of ``image_size`` (W, H) a
    physical field of view along x and y, within :data:`FOV_RANGE_DEG` (``2 atan(side / (2 f))``), and puts its
    principal point (cx, cy) within :data:`MAX_PRINCIPAL_OFFSET_SIDES` image sides of the image (a crop keeps it
    near the image; a point a million pixels away is a unit or field mix-up: every ray would miss the image)."""
    lo, hi = FOV_RANGE_DEG
    for axis, (f, side) in enumerate(((K[0, 0], image_size[0]), (K[1, 1], image_size[1]))):
        fov = float(np.degrees(2.0 * np.arctan2(side, 2.0 * f)))
        if not lo <= fov <= hi:
            raise DataError(path, f"{what}: {'fx' if axis == 0 else 'fy'} = {f:.6g} gives the {side}-pixel image "
                                  f"side a field of view of {fov:.3g} deg, outside the physical {lo:g}..{hi:g} deg "
                                  f"(K must be in pixels, for image_size {list(image_size)})")
        c = float(K[axis, 2])
        if not -MAX_PRINCIPAL_OFFSET_SIDES * side <= c <= (1 + MAX_PRINCIPAL_OFFSET_SIDES) * side:
            raise DataError(path, f"{what}: {'cx' if axis == 0 else 'cy'} = {c:.6g} lies more than "
                                  f"{MAX_PRINCIPAL_OFFSET_SIDES} image sides outside the {side}-pixel image (K must "
                                  f"be in pixels, for image_size {list(image_size)})")


def check_rigid(T: np.ndarray, what: str, path: PathLike) -> np.ndarray:
    """``T`` (4, 4) if it is a proper rigid transform within :data:`RIGID_TOL` (rotation with det +1, last row
    ``[0, 0, 0, 1]``, translation within :data:`MAX_MOUNT_OFFSET_M`), else DataError naming ``path`` and ``what``."""
    R, t = T[:3, :3], T[:3, 3]
    if not np.allclose(T[3], [0, 0, 0, 1], rtol=0, atol=1e-9):
        raise DataError(path, f"{what} last row must be [0, 0, 0, 1], got {T[3].tolist()}")
    with np.errstate(all="ignore"):
        orthonormal = bool(np.abs(R.T @ R - np.eye(3)).max() <= RIGID_TOL)
        det = float(np.linalg.det(R))
    if not orthonormal or not abs(det - 1.0) <= RIGID_TOL:
        raise DataError(path, f"{what} is not a rigid transform: its 3x3 part must be a rotation (orthonormal, "
                              f"determinant +1, within {RIGID_TOL:g}; determinant {det:.6g}), got {R.tolist()}")
    if not float(np.linalg.norm(t)) <= MAX_MOUNT_OFFSET_M:
        raise DataError(path, f"{what} translation {t.tolist()} is farther than {MAX_MOUNT_OFFSET_M:g} m from the "
                              f"ego origin (metres expected)")
    return T


def lidar2ego_from_doc(doc: object, path: PathLike, required: bool = False) -> Optional[np.ndarray]:
    """``"lidar2ego"`` (4, 4) float64 of a parsed calib.json, validated (:func:`check_rigid`); None when the
    document has none (identity) and it is not ``required``. Only that field is looked at."""
    if not isinstance(doc, dict):
        raise DataError(path, "expected a JSON object (docs/CONTRACTS.md)")
    if "lidar2ego" not in doc:
        if required:
            raise DataError(path, "has no \"lidar2ego\" (the 4x4 matrix mapping LiDAR points to the ego frame)")
        return None
    return check_rigid(_matrix(doc["lidar2ego"], (4, 4), "lidar2ego", path), "lidar2ego", path)


def lidar_to_ego(points: np.ndarray, lidar2ego: Optional[np.ndarray]) -> np.ndarray:
    """(N, 4) float32 x, y, z, intensity in the LiDAR frame -> the same points in the ego frame: x, y, z rotated
    and translated by ``lidar2ego``, intensity kept; None = identity (the array is returned as is). Computed in
    float64; a coordinate past float32's range (a far outlier the readers let through) is clamped to it."""
    if lidar2ego is None:
        return points
    T = np.asarray(lidar2ego, dtype=np.float64)
    out = np.array(points, dtype=np.float32, copy=True)
    big = float(np.finfo(np.float32).max)
    out[:, :3] = np.clip(points[:, :3].astype(np.float64) @ T[:3, :3].T + T[:3, 3], -big, big)
    return out


def quaternion_to_matrix(q: object, what: str, path: PathLike) -> np.ndarray:
    """Rotation quaternion ``[w, x, y, z]`` (Hamilton, as nuScenes and pyquaternion) -> (3, 3) rotation."""
    v = _matrix(q, (4,), what, path)
    norm = float(np.linalg.norm(v))
    if abs(norm - 1.0) > QUATERNION_TOL:
        raise DataError(path, f"{what} {v.tolist()} is not a unit quaternion [w, x, y, z] (norm {norm:.6g})")
    w, x, y, z = v / norm
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def _rigid(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T


def _camera_entry(name: str, image_size: tuple[int, int], K: np.ndarray, cam2ego: np.ndarray) -> dict:
    return {"name": name, "image_size": [int(image_size[0]), int(image_size[1])], "K": K.tolist(),
            "cam2ego": cam2ego.tolist()}


# ----- KITTI ----------------------------------------------------------------------------------------------------
KITTI_ALIASES = {"R0_rect": ("R0_rect", "R_rect"), "Tr_velo_to_cam": ("Tr_velo_to_cam", "Tr_velo_cam")}


def _kitti_matrix(text: str, name: str, shape: tuple[int, int], path: PathLike) -> np.ndarray:
    """The ``name: numbers`` line (object format; tracking files have no colon and other names) as a matrix."""
    names = KITTI_ALIASES.get(name, (name,))
    for n, line in enumerate(text.splitlines(), 1):
        key, sep, rest = line.strip().partition(":")
        if not sep:
            key, _, rest = line.strip().partition(" ")
        if key.strip() in names:
            try:
                values = np.array([float(v) for v in rest.split()])
            except ValueError:
                raise DataError(path, f"{key} (line {n}): not a list of numbers: {rest.strip()[:80]!r}") from None
            if values.size != shape[0] * shape[1]:
                raise DataError(path, f"{key} (line {n}): expected {shape[0] * shape[1]} numbers, got {values.size}")
            return _matrix(values.reshape(shape), shape, f"{key} (line {n})", path)
    raise DataError(path, f"has no {' or '.join(names)} line (expected a KITTI calib .txt)")


def calib_from_kitti(text: str, path: PathLike, image_size: tuple[int, int], camera: str = "P2",
                     name: str = "front") -> dict:
    """KITTI object/tracking calib .txt (``text`` of file ``path``) -> calib.json document: one camera
    (``camera``'s projection matrix ``P = K [I | b]`` in the rectified frame), ego = the velodyne frame,
    ``lidar2ego`` identity. camera <- velodyne is ``[I | b] R0_rect Tr_velo_to_cam``; cam2ego its inverse."""
    P = _kitti_matrix(text, camera, (3, 4), path)
    K = P[:, :3]
    if not np.allclose(K[2], [0, 0, 1], rtol=0, atol=1e-9) or K[1, 0] != 0 or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise DataError(path, f"{camera} is not of the form K [I | b] (K upper triangular, fx, fy > 0, last row "
                              f"0 0 1): {P.tolist()}")
    baseline = np.linalg.solve(K, P[:, 3])
    R0 = check_rigid(_rigid(_kitti_matrix(text, "R0_rect", (3, 3), path), np.zeros(3)), "R0_rect", path)
    velo2cam = check_rigid(np.vstack([_kitti_matrix(text, "Tr_velo_to_cam", (3, 4), path), [0, 0, 0, 1]]),
                           "Tr_velo_to_cam", path)
    velo2camera = _rigid(np.eye(3), baseline) @ R0 @ velo2cam
    return {"cameras": [_camera_entry(name, image_size, K, np.linalg.inv(velo2camera))],
            "lidar2ego": np.eye(4).tolist()}


# ----- nuScenes -------------------------------------------------------------------------------------------------
def _nuscenes_sensor2ego(record: object, what: str, path: PathLike, ground_z: float) -> np.ndarray:
    if not isinstance(record, dict):
        raise DataError(path, f"{what} is not a calibrated_sensor record (a JSON object)")
    for field in ("translation", "rotation"):
        if field not in record:
            raise DataError(path, f"{what} has no {field!r}")
    t = _matrix(record["translation"], (3,), f"{what}.translation", path)
    T = _rigid(quaternion_to_matrix(record["rotation"], f"{what}.rotation", path), t)
    T[2, 3] += ground_z                           # nuScenes' vehicle frame has its origin on the ground
    return check_rigid(T, what, path)


def calib_from_nuscenes(doc: object, path: PathLike, image_size: Optional[tuple[int, int]] = None,
                        ground_z: float = -1.0) -> dict:
    """``{"lidar": record, "cameras": {name: record, ...}}`` (parsed from file ``path``; nuScenes
    ``calibrated_sensor`` records, sensor -> vehicle frame) -> calib.json document: ``lidar2ego`` and, when
    there are cameras, their entries (K = ``camera_intrinsic`` for ``image_size``: nuScenes keeps the size
    elsewhere, 1600x900 for its cameras). nuScenes' vehicle frame (x forward, y left, z up) has its origin on
    the ground; ours has the ground at ``ground_z`` (docs/CONTRACTS.md: -1.0), so ``ground_z`` is added to z."""
    if not isinstance(doc, dict) or "lidar" not in doc:
        raise DataError(path, "expected {\"lidar\": {calibrated_sensor record}, \"cameras\": {name: record}}")
    out: dict = {"lidar2ego": _nuscenes_sensor2ego(doc["lidar"], "lidar", path, ground_z).tolist()}
    cameras = doc.get("cameras", {})
    if not isinstance(cameras, dict):
        raise DataError(path, "cameras must be an object {name: calibrated_sensor record}")
    if cameras and image_size is None:
        raise DataError(path, "has cameras: their image size (W, H) must be given (nuScenes: 1600x900)")
    entries = []
    for name, record in cameras.items():
        what = f"cameras.{name}"
        cam2ego = _nuscenes_sensor2ego(record, what, path, ground_z)
        if "camera_intrinsic" not in record:
            raise DataError(path, f"{what} has no 'camera_intrinsic'")
        K = _matrix(record["camera_intrinsic"], (3, 3), f"{what}.camera_intrinsic", path)
        entries.append(_camera_entry(name, image_size, K, cam2ego))
    return {"cameras": entries, **out} if entries else out


# ----- writing --------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class CalibImport:
    """One conversion (fields = the flags of ``python -m pipelines.import_calib``)."""

    format: str                                     # "kitti" | "nuscenes": the sub-command
    source: str = option(positional=True, help="the calibration file", commands={
        "kitti": {"metavar": "CALIB_TXT", "help": "KITTI calib file, e.g. training/calib/000000.txt"},
        "nuscenes": {"metavar": "RECORDS_JSON", "help": "JSON file holding the records"}})
    out: str = option(positional=True, metavar="OUT", help="calib.json to write, e.g. <segment>/camera/calib.json")
    image_size: Optional[tuple[int, int]] = option(None, type=image_size, help="WxH of the cameras' images", commands={
        "kitti": {"required": True,
                  "help": "WxH of that camera's images, which K is for (KITTI: about 1242x375; check yours)"},
        "nuscenes": {"help": "WxH of the cameras' images, which camera_intrinsic is for (nuScenes: 1600x900); "
                             "required when the records have cameras"}})
    camera: str = option("P2", choices=("P0", "P1", "P2", "P3"), commands={"kitti": {}},
                         help="projection matrix of the camera (default %(default)s, the left colour camera)")
    name: str = option("front", commands={"kitti": {}}, help="the camera's name in calib.json (default %(default)s)")
    ground_z: float = option(-1.0, commands={"nuscenes": {}},
                             help="z of the ground in the ego frame written (default %(default)s, the contract's: the "
                                  "teacher's z range is [-3, 1]); 0 keeps nuScenes' vehicle frame")
    force: bool = option(False, help="replace OUT if it exists")

    def check(self) -> None:
        """ConfigError naming the flag for values that cannot work."""
        if self.format not in ("kitti", "nuscenes"):
            raise ConfigError(f"format must be kitti or nuscenes, got {self.format!r}")
        if self.format == "kitti" and self.image_size is None:
            raise ConfigError("--image_size WxH is required for KITTI (the calib file does not hold it)")
        if not np.isfinite(self.ground_z) or abs(self.ground_z) > 10:
            raise ConfigError(f"--ground_z must be a height in metres within [-10, 10], got {self.ground_z}")
        if Path(self.out).is_dir():
            raise ConfigError(f"OUT {self.out} is a directory; give the calib.json file to write")
        if Path(self.out).exists() and not self.force:
            raise ConfigError(f"OUT {self.out} exists; pass --force to replace it")


def format_calib(doc: dict) -> str:
    """calib.json text: indented, each matrix row on one line."""
    text = json.dumps(doc, indent=2)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


def write_calib(doc: dict, out: PathLike, source: PathLike) -> str:
    """Validate ``doc`` as the readers will (cameras if any, lidar2ego), then write it to ``out`` atomically
    (temporary file in the same folder, fsync, rename) -> the text written. A document the readers would
    refuse is a DataError naming ``source``, the file it was converted from; nothing is written then."""
    try:
        if "cameras" in doc:
            cameras_from_doc(json.loads(json.dumps(doc)), out)
        lidar2ego_from_doc(doc, out, required=True)
    except DataError as e:
        raise DataError(source, f"the converted calibration is unusable: {e.problem.reason}") from None
    text = format_calib(doc)
    write_text_atomic(out, text)
    return text


def scale_intrinsics(K, sx: float, sy: float):
    """K (..., 3, 3) of an image -> K of the same view resampled by factors (sx, sy) (new px per old px).

    One function for every resize: an image resized to (W', H') uses ``sx = W'/W, sy = H'/H``; a feature map
    downsampled by 4 uses ``sx = sy = 1/4``. Pixel ``u`` has its centre at coordinate ``u``, and resampling
    (Pillow's resize, strided convolutions) keeps pixel *edges* aligned, so a centre maps as
    ``u' = (u + 0.5) * sx - 0.5``: ``fx' = fx*sx``, ``cx' = (cx + 0.5)*sx - 0.5`` (same for y).
    Works on numpy arrays (returns float64) and torch tensors (keeps dtype); ``sx``, ``sy`` may also be arrays
    of K's leading shape (one factor per matrix)."""
    if hasattr(K, "clone"):
        K2 = K.clone()
    else:
        K2 = np.array(K, dtype=np.float64, copy=True)
    K2[..., 0, 0] = K[..., 0, 0] * sx
    K2[..., 0, 1] = K[..., 0, 1] * sx
    K2[..., 0, 2] = (K[..., 0, 2] + 0.5) * sx - 0.5
    K2[..., 1, 1] = K[..., 1, 1] * sy
    K2[..., 1, 2] = (K[..., 1, 2] + 0.5) * sy - 0.5
    return K2
