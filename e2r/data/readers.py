"""Readers for one file each: point clouds (.bin / .npy / .pcd), images (PNG/JPEG) and calib.json.

Every reader raises :class:`DataError` (a ``ValueError``) naming the file (and the data.csv row when the
caller passes it) for missing, empty, truncated, corrupt or implausible input. Point readers always return
``(N, 4)`` float32 ``x, y, z, intensity`` plus the :class:`~e2r.data.point_layout.PointLayout` used.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from e2r.errors import DataError, Problem
from e2r.data.point_layout import (SUPPORTED_NUM_FEATURES, LayoutUndecidable, PointLayout,
                                   detect_from_arrays)

__all__ = ["DataError", "Problem", "NumFeatures", "read_points", "read_bin", "read_npy", "read_pcd",
           "read_image", "prepare_image", "scale_intrinsics", "CameraCalib", "read_calib", "PointLayout"]

NumFeatures = Union[int, str]   # 4 | 5 | 8 | "auto"
POINT_SUFFIXES = (".bin", ".npy", ".pcd")


def _check_file(path: Path, row: Optional[int]) -> int:
    if not path.exists():
        raise DataError(path, "file is missing", row)
    if not path.is_file():
        raise DataError(path, "is not a regular file", row)
    size = path.stat().st_size
    if size == 0:
        raise DataError(path, "file is empty", row)
    return size


def _xyzi(points: np.ndarray, path: Path, row: Optional[int]) -> np.ndarray:
    out = np.ascontiguousarray(points[:, :4], dtype=np.float32)
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        raise DataError(path, f"{int(bad.sum())} of {len(out)} points have non-finite x/y/z/intensity "
                              f"(first at point {int(np.argmax(bad))})", row)
    return out


def read_bin(path: Union[str, Path], num_features: NumFeatures = "auto",
             row: Optional[int] = None) -> tuple[np.ndarray, PointLayout]:
    """Raw little-endian float32 ``.bin`` with 4, 5 or 8 features per point -> ((N, 4) float32, layout).

    ``num_features="auto"`` decides from this one file's size and values (datasets decide once per segment
    from several files instead and pass the result here as an int).
    """
    path = Path(path)
    size = _check_file(path, row)
    if size % 4:
        raise DataError(path, f"truncated: {size} bytes is not a whole number of float32 values", row)
    flat = np.fromfile(path, dtype="<f4")
    if num_features == "auto":
        try:
            layout = detect_from_arrays([flat], [str(path)])
        except LayoutUndecidable as e:
            raise DataError(path, f"cannot auto-detect the point layout: {e}", row) from None
    else:
        if num_features not in SUPPORTED_NUM_FEATURES:
            raise ValueError(f"lidar_num_features must be one of {SUPPORTED_NUM_FEATURES} or 'auto', "
                             f"got {num_features!r}")
        layout = PointLayout(int(num_features), "given")
    f = layout.num_features
    if flat.size % f:
        raise DataError(path, f"size {size} bytes is not a multiple of the point size {4 * f} bytes "
                              f"({f} float32 features per point); truncated or wrong lidar_num_features", row)
    return _xyzi(flat.reshape(-1, f), path, row), layout


def read_npy(path: Union[str, Path], row: Optional[int] = None) -> tuple[np.ndarray, PointLayout]:
    """``.npy`` array (N, F>=4), columns x, y, z, intensity first -> ((N, 4) float32, layout)."""
    path = Path(path)
    _check_file(path, row)
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises several types for corrupt files
        raise DataError(path, f"cannot read .npy: {type(e).__name__}: {e}", row) from None
    if arr.ndim != 2 or arr.shape[1] < 4:
        raise DataError(path, f".npy point array must be (N, F>=4), got shape {arr.shape}", row)
    if not np.issubdtype(arr.dtype, np.number):
        raise DataError(path, f".npy point array has non-numeric dtype {arr.dtype}", row)
    return _xyzi(arr, path, row), PointLayout(int(arr.shape[1]), "npy")


_PCD_TYPES = {("F", 4): "<f4", ("F", 8): "<f8", ("I", 1): "<i1", ("I", 2): "<i2", ("I", 4): "<i4",
              ("I", 8): "<i8", ("U", 1): "<u1", ("U", 2): "<u2", ("U", 4): "<u4", ("U", 8): "<u8"}


def read_pcd(path: Union[str, Path], row: Optional[int] = None) -> tuple[np.ndarray, PointLayout]:
    """PCD v0.7 with ``DATA ascii`` or ``DATA binary`` and fields x y z intensity (or ``i``) -> ((N, 4), layout)."""
    path = Path(path)
    _check_file(path, row)
    raw = path.read_bytes()
    header: dict[str, list[str]] = {}
    pos = 0
    while True:
        end = raw.find(b"\n", pos)
        if end < 0:
            raise DataError(path, "PCD header has no DATA line", row)
        line = raw[pos:end].decode("ascii", errors="replace").strip()
        pos = end + 1
        if not line or line.startswith("#"):
            continue
        name, *values = line.split()
        header[name.upper()] = values
        if name.upper() == "DATA":
            break
    try:
        fields = header["FIELDS"]
        sizes = [int(s) for s in header["SIZE"]]
        types = [t.upper() for t in header["TYPE"]]
        counts = [int(c) for c in header.get("COUNT", ["1"] * len(fields))]
        n = int(header.get("POINTS", [None])[0] or int(header["WIDTH"][0]) * int(header["HEIGHT"][0]))
        mode = header["DATA"][0].lower()
    except (KeyError, ValueError, IndexError) as e:
        raise DataError(path, f"malformed PCD header ({type(e).__name__}: {e})", row) from None
    if not (len(fields) == len(sizes) == len(types) == len(counts)):
        raise DataError(path, "PCD header FIELDS/SIZE/TYPE/COUNT lengths differ", row)
    names = ["intensity" if f == "i" else f for f in fields]
    missing = [f for f in ("x", "y", "z", "intensity") if f not in names]
    if missing:
        raise DataError(path, f"PCD has no field(s) {missing} (fields: {fields})", row)
    try:
        dtype = np.dtype([(f"{nm}_{k}" if c > 1 else nm, _PCD_TYPES[(t, s)], (c,) if c > 1 else ())
                          for k, (nm, t, s, c) in enumerate(zip(names, types, sizes, counts))])
    except KeyError as e:
        raise DataError(path, f"unsupported PCD TYPE/SIZE {e}", row) from None
    if mode == "ascii":
        text = raw[pos:].decode("ascii", errors="replace").split()
        width = sum(counts)
        if len(text) < n * width:
            raise DataError(path, f"truncated: PCD says {n} points but holds {len(text) // width}", row)
        try:
            table = np.asarray(text[: n * width], dtype=np.float64).reshape(n, width)
        except ValueError as e:
            raise DataError(path, f"non-numeric value in PCD data: {e}", row) from None
        offsets = np.cumsum([0] + counts[:-1])
        cols = [table[:, offsets[names.index(f)]] for f in ("x", "y", "z", "intensity")]
    elif mode == "binary":
        need = n * dtype.itemsize
        if len(raw) - pos < need:
            raise DataError(path, f"truncated: PCD says {n} points ({need} bytes) but holds {len(raw) - pos} "
                                  f"bytes of data", row)
        rec = np.frombuffer(raw, dtype=dtype, count=n, offset=pos)
        cols = [rec[f].astype(np.float64) for f in ("x", "y", "z", "intensity")]
    else:
        raise DataError(path, f"unsupported PCD DATA mode {mode!r} (ascii and binary are supported)", row)
    return _xyzi(np.stack(cols, axis=1), path, row), PointLayout(len(fields), "pcd", " ".join(fields))


def read_points(path: Union[str, Path], num_features: NumFeatures = "auto",
                row: Optional[int] = None) -> tuple[np.ndarray, PointLayout]:
    """Any supported point file -> ((N, 4) float32 x, y, z, intensity, the PointLayout used).

    ``num_features`` (4 | 5 | 8 | "auto") only matters for ``.bin``; .npy and .pcd state their own layout.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".bin":
        return read_bin(path, num_features, row)
    if suffix == ".npy":
        return read_npy(path, row)
    if suffix == ".pcd":
        return read_pcd(path, row)
    raise DataError(path, f"unsupported point file type {suffix!r} (expected one of {POINT_SUFFIXES})", row)


def read_image(path: Union[str, Path], size: Optional[tuple[int, int]] = None,
               row: Optional[int] = None) -> tuple[np.ndarray, tuple[int, int]]:
    """PNG/JPEG -> ((3, H', W') float32 RGB in [0, 1], original (W, H)); resized to ``size=(W', H')`` if given."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    _check_file(path, row)
    try:
        with Image.open(path) as im:
            im.load()
            original = im.size
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"corrupt or unreadable image: {type(e).__name__}: {e}", row) from None
    return prepare_image(rgb, size), (int(original[0]), int(original[1]))


def prepare_image(image: Union["PIL.Image.Image", np.ndarray], size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """An RGB image (a PIL image, or an (H, W, 3) uint8 array) -> (3, H', W') float32 in [0, 1], resized
    (bilinear) to ``size=(W', H')`` when given and different. The one conversion from pixels to a model's
    image input: :func:`read_image` (the datasets) and the closed loop's rendered camera frames use it."""
    from PIL import Image

    rgb = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    if size is not None and tuple(size) != rgb.size:
        rgb = rgb.resize((int(size[0]), int(size[1])), Image.BILINEAR)
    arr = np.asarray(rgb, dtype=np.float32) / 255.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def scale_intrinsics(K, sx: float, sy: float):
    """K (..., 3, 3) of an image -> K of the same view resampled by factors (sx, sy) (new px per old px).

    One function for every resize: an image resized to (W', H') uses ``sx = W'/W, sy = H'/H``; a feature map
    downsampled by 4 uses ``sx = sy = 1/4``. Pixel ``u`` has its centre at coordinate ``u``, and resampling
    (Pillow's resize, strided convolutions) keeps pixel *edges* aligned, so a centre maps as
    ``u' = (u + 0.5) * sx - 0.5``: ``fx' = fx*sx``, ``cx' = (cx + 0.5)*sx - 0.5`` (same for y).
    Works on numpy arrays (returns float64) and torch tensors (keeps dtype)."""
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


@dataclass(frozen=True)
class CameraCalib:
    """One camera of calib.json: name, image_size (W, H), K (3, 3) for that size, cam2ego (4, 4)."""
    name: str
    image_size: tuple[int, int]
    K: np.ndarray
    cam2ego: np.ndarray


def _matrix(value: object, shape: tuple[int, int], what: str, path: Path) -> np.ndarray:
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(path, f"{what} is not a numeric matrix: {value!r}") from None
    if m.shape != shape:
        raise DataError(path, f"{what} must have shape {shape}, got {m.shape}")
    if not np.isfinite(m).all():
        raise DataError(path, f"{what} has non-finite values")
    return m


def read_calib(path: Union[str, Path]) -> list[CameraCalib]:
    """Read and validate calib.json (format in docs/CONTRACTS.md) -> cameras in file order."""
    path = Path(path)
    _check_file(path, None)
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"not valid JSON: {e}") from None
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
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-." for c in name):
            raise DataError(path, f"{where}.name {name!r} must be a non-empty string of [A-Za-z0-9_.-]")
        size = cam["image_size"]
        if (not isinstance(size, (list, tuple)) or len(size) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
            raise DataError(path, f"{where}.image_size must be [W, H] positive integers, got {size!r}")
        K = _matrix(cam["K"], (3, 3), f"{where}.K", path)
        if K[0, 0] <= 0 or K[1, 1] <= 0 or not np.allclose(K[2], [0, 0, 1]):
            raise DataError(path, f"{where}.K must have fx, fy > 0 and last row [0, 0, 1], got {K.tolist()}")
        T = _matrix(cam["cam2ego"], (4, 4), f"{where}.cam2ego", path)
        if not np.allclose(T[3], [0, 0, 0, 1]):
            raise DataError(path, f"{where}.cam2ego last row must be [0, 0, 0, 1], got {T[3].tolist()}")
        out.append(CameraCalib(name, (int(size[0]), int(size[1])), K, T))
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise DataError(path, f"duplicate camera names {names}")
    return out


def sample_paths(paths: Sequence[Path], k: int = 3) -> list[Path]:
    """Up to ``k`` distinct paths spread over a sequence (first, middle, last) for per-segment detection."""
    if len(paths) <= k:
        return list(dict.fromkeys(paths))
    idx = sorted({round(i * (len(paths) - 1) / (k - 1)) for i in range(k)})
    return list(dict.fromkeys(paths[i] for i in idx))
