"""Calibration beyond the camera entries of calib.json: the LiDAR's extrinsic, and converters to calib.json.

- :func:`read_lidar2ego`: the 4x4 LiDAR -> ego transform ``"lidar2ego"`` of a calib.json, validated (a proper
  rigid transform). Which file holds a segment's extrinsic (``camera/calib.json``, or ``lidar/calib.json`` for
  a segment without one) is decided by :func:`e2r.data.layout.read_segment_lidar2ego`; docs/CONTRACTS.md.
- :func:`calib_from_kitti` / :func:`calib_from_nuscenes`: a calib.json document from KITTI's calib .txt
  (``P2``, ``R0_rect``, ``Tr_velo_to_cam``; ego = the velodyne frame) or from nuScenes ``calibrated_sensor``
  records (translation, rotation quaternion ``w, x, y, z``, ``camera_intrinsic``).
- :func:`import_calib`: one conversion (``python -m pipelines.import_calib``): read, convert, check the result
  with the same readers the datasets use, write atomically (temporary file + rename).

Every bad input is a :class:`~e2r.errors.DataError` naming the file and the field.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from e2r.data.readers import _check_file, _matrix, read_calib, read_json
from e2r.errors import ConfigError, DataError

__all__ = ["RIGID_TOL", "MAX_MOUNT_OFFSET_M", "check_rigid", "read_lidar2ego", "quaternion_to_matrix",
           "calib_from_kitti", "calib_from_nuscenes", "CalibImport", "import_calib", "format_calib"]

RIGID_TOL = 1e-4             # |R^T R - I| per entry and |det R - 1| of a rigid transform's rotation part
MAX_MOUNT_OFFSET_M = 100.0   # a sensor farther than this from the ego origin is not mounted on the car
QUATERNION_TOL = 1e-3        # |norm - 1| of a rotation quaternion (it is normalised after the check)


def check_rigid(T: np.ndarray, what: str, path: Union[str, Path]) -> np.ndarray:
    """``T`` (4, 4) if it is a proper rigid transform within :data:`RIGID_TOL` (rotation with det +1, last row
    ``[0, 0, 0, 1]``, translation within :data:`MAX_MOUNT_OFFSET_M`), else DataError naming ``path`` and ``what``."""
    R, t = T[:3, :3], T[:3, 3]
    if not np.allclose(T[3], [0, 0, 0, 1], rtol=0, atol=1e-9):
        raise DataError(path, f"{what} last row must be [0, 0, 0, 1], got {T[3].tolist()}")
    with np.errstate(all="ignore"):
        orthonormal = bool(np.abs(R.T @ R - np.eye(3)).max() <= RIGID_TOL)
        det = float(np.linalg.det(R))
    if not orthonormal or abs(det - 1.0) > RIGID_TOL:
        raise DataError(path, f"{what} is not a rigid transform: its 3x3 part must be a rotation (orthonormal, "
                              f"determinant +1, within {RIGID_TOL:g}; determinant {det:.6g}), got {R.tolist()}")
    if float(np.linalg.norm(t)) > MAX_MOUNT_OFFSET_M:
        raise DataError(path, f"{what} translation {t.tolist()} is farther than {MAX_MOUNT_OFFSET_M:g} m from the "
                              f"ego origin (metres expected)")
    return T


def read_lidar2ego(path: Union[str, Path], required: bool = False) -> Optional[np.ndarray]:
    """``"lidar2ego"`` (4, 4) float64 of a calib.json, validated; ``None`` when the file has none (identity)
    and not ``required``. Only that field is read: a LiDAR dataset does not depend on the camera entries."""
    path = Path(path)
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise DataError(path, "expected a JSON object (docs/CONTRACTS.md)")
    if "lidar2ego" not in doc:
        if required:
            raise DataError(path, "has no \"lidar2ego\" (the 4x4 matrix mapping LiDAR points to the ego frame)")
        return None
    return check_rigid(_matrix(doc["lidar2ego"], (4, 4), "lidar2ego", path), "lidar2ego", path)


def quaternion_to_matrix(q: object, what: str, path: Union[str, Path]) -> np.ndarray:
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


def _kitti_fields(text: str) -> dict[str, tuple[str, int]]:
    """``name: numbers`` lines (object format; the tracking format has no colon) -> {name: (numbers, line)}."""
    out: dict[str, tuple[str, int]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        name, sep, rest = line.strip().partition(":")
        if not sep:
            name, _, rest = line.strip().partition(" ")
        if name.strip():
            out.setdefault(name.strip(), (rest, n))
    return out


def _kitti_matrix(fields: dict[str, tuple[str, int]], name: str, shape: tuple[int, int], path: Path) -> np.ndarray:
    names = KITTI_ALIASES.get(name, (name,))
    found = next((nm for nm in names if nm in fields), None)
    if found is None:
        raise DataError(path, f"has no {' or '.join(names)} line (expected a KITTI calib .txt)")
    text, line = fields[found]
    try:
        values = np.array([float(v) for v in text.split()])
    except ValueError:
        raise DataError(path, f"{found} (line {line}): not a list of numbers: {text.strip()[:80]!r}") from None
    if values.size != shape[0] * shape[1]:
        raise DataError(path, f"{found} (line {line}): expected {shape[0] * shape[1]} numbers, got {values.size}")
    return _matrix(values.reshape(shape), shape, f"{found} (line {line})", path)


def calib_from_kitti(path: Union[str, Path], image_size: tuple[int, int], camera: str = "P2",
                     name: str = "front") -> dict:
    """KITTI object/tracking calib .txt -> calib.json document: one camera (``camera``'s projection matrix,
    ``P = K [I | b]`` in the rectified frame), ego = the velodyne frame, ``lidar2ego`` identity.

    camera <- velodyne is ``[I | b] R0_rect Tr_velo_to_cam``; ``cam2ego`` is its inverse."""
    path = Path(path)
    _check_file(path, None)
    try:
        fields = _kitti_fields(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(path, f"not a text file: {e}") from None
    P = _kitti_matrix(fields, camera, (3, 4), path)
    K = P[:, :3]
    if not np.allclose(K[2], [0, 0, 1], rtol=0, atol=1e-9) or K[1, 0] != 0 or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise DataError(path, f"{camera} is not of the form K [I | b] (K upper triangular, fx, fy > 0, last row "
                              f"0 0 1): {P.tolist()}")
    baseline = np.linalg.solve(K, P[:, 3])
    R0 = _kitti_matrix(fields, "R0_rect", (3, 3), path)
    check_rigid(_rigid(R0, np.zeros(3)), "R0_rect", path)
    velo2cam = np.vstack([_kitti_matrix(fields, "Tr_velo_to_cam", (3, 4), path), [0, 0, 0, 1]])
    check_rigid(velo2cam, "Tr_velo_to_cam", path)
    velo2camera = _rigid(np.eye(3), baseline) @ _rigid(R0, np.zeros(3)) @ velo2cam
    return {"cameras": [_camera_entry(name, image_size, K, np.linalg.inv(velo2camera))],
            "lidar2ego": np.eye(4).tolist()}


# ----- nuScenes -------------------------------------------------------------------------------------------------
def _nuscenes_sensor2ego(record: object, what: str, path: Path, ground_z: float) -> np.ndarray:
    if not isinstance(record, dict):
        raise DataError(path, f"{what} is not a calibrated_sensor record (a JSON object)")
    for field in ("translation", "rotation"):
        if field not in record:
            raise DataError(path, f"{what} has no {field!r}")
    t = _matrix(record["translation"], (3,), f"{what}.translation", path)
    T = _rigid(quaternion_to_matrix(record["rotation"], f"{what}.rotation", path), t)
    T[2, 3] += ground_z                           # nuScenes' vehicle frame has its origin on the ground
    return check_rigid(T, what, path)


def calib_from_nuscenes(path: Union[str, Path], image_size: Optional[tuple[int, int]] = None,
                        ground_z: float = -1.0) -> dict:
    """``{"lidar": record, "cameras": {name: record, ...}}`` (nuScenes ``calibrated_sensor`` records, sensor ->
    vehicle frame) -> calib.json document: ``lidar2ego`` and, when there are cameras, their entries (K =
    ``camera_intrinsic`` for ``image_size``, which nuScenes keeps elsewhere: 1600x900 for its cameras).

    nuScenes' vehicle frame (x forward, y left, z up) has its origin on the ground; ours has the ground at
    ``ground_z`` (docs/CONTRACTS.md: -1.0, the teacher's z range), so ``ground_z`` is added to every z."""
    path = Path(path)
    doc = read_json(path)
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
    if entries:
        out = {"cameras": entries, **out}
    return out


# ----- one conversion -------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class CalibImport:
    """One conversion (fields = the flags of ``python -m pipelines.import_calib``)."""

    format: str                                     # "kitti" | "nuscenes"
    source: str
    out: str
    image_size: Optional[tuple[int, int]] = None    # (W, H); required for cameras
    camera: str = "P2"                              # KITTI: the projection matrix of the camera
    name: str = "front"                             # KITTI: the camera's name in calib.json
    ground_z: float = -1.0                          # nuScenes: z of the ground in the ego frame written
    force: bool = False                             # replace an existing ``out``

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


def import_calib(cfg: CalibImport) -> tuple[dict, str]:
    """Convert ``cfg.source`` and write ``cfg.out`` atomically -> (document, text written). The document is read
    back with :func:`~e2r.data.readers.read_calib` / :func:`read_lidar2ego` before it replaces anything; a
    conversion they refuse is a DataError naming the source file."""
    cfg.check()
    out = Path(cfg.out)
    if cfg.format == "kitti":
        doc = calib_from_kitti(cfg.source, cfg.image_size, cfg.camera, cfg.name)
    else:
        doc = calib_from_nuscenes(cfg.source, cfg.image_size, cfg.ground_z)
    text = format_calib(doc)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        os.chmod(tmp, 0o644)                       # mkstemp makes it owner-only; a calib.json is shared data
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            if "cameras" in doc:
                read_calib(tmp)
            read_lidar2ego(tmp, required=True)
        except DataError as e:
            raise DataError(cfg.source, f"the converted calibration is unusable: {e.problem.reason}") from None
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return doc, text
