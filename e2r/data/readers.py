"""Readers for one file each: point clouds (.bin / .npy / .pcd), images (PNG/JPEG) and calib.json (whose content
is validated by ``e2r.data.calib``).

Every reader raises :class:`DataError` (a ``ValueError``) naming the file (and the data.csv row when the
caller passes it) for missing, empty, truncated, corrupt or implausible input. Point readers always return
``(N, 4)`` float32 ``x, y, z, intensity`` plus the :class:`~e2r.data.point_layout.PointLayout` used.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from e2r.cli_config import MAX_IMAGE_PIXELS
from e2r.errors import DataError, Problem
from e2r.data.calib import MAX_IMAGE_SIDE, CameraCalib, cameras_from_doc, lidar2ego_from_doc, lidar_to_ego
from e2r.data.point_checks import MAX_INTENSITY, check_point_count, xyzi
from e2r.data.point_layout import (MAX_POINT_FILE_BYTES, SUPPORTED_NUM_FEATURES, LayoutUndecidable, PointLayout,
                                   detect_from_arrays, frame_layout_mismatch)

__all__ = ["DataError", "Problem", "NumFeatures", "MAX_INTENSITY", "read_points", "read_bin", "read_npy", "read_pcd",
           "read_image", "prepare_image", "CameraCalib", "read_calib", "read_lidar2ego", "read_json",
           "read_text", "PointLayout"]

NumFeatures = Union[int, str]   # 4 | 5 | 8 | "auto"
POINT_SUFFIXES = (".bin", ".npy", ".pcd")


MAX_TEXT_BYTES = 16 << 20   # a calib.json / calibration record file: a few KB per camera; 16 MiB is far beyond


def _check_file(path: Path, row: Optional[int], max_bytes: int) -> int:
    """The size of ``path``; DataError when it is missing, not a regular file (a FIFO would block), empty,
    larger than ``max_bytes`` (the cap of its format, checked before a byte is read: a sparse file can claim
    gigabytes while holding nothing) or cannot even be looked at (a name too long, no permission)."""
    try:
        if not path.exists():
            raise DataError(path, "file is missing", row)
        if not path.is_file():
            raise DataError(path, "is not a regular file", row)
        size = path.stat().st_size
    except OSError as e:
        raise DataError(path, f"cannot be read: {e.strerror or e}", row) from None
    if size == 0:
        raise DataError(path, "file is empty", row)
    if size > max_bytes:
        raise DataError(path, f"file is {size} bytes, more than this kind of file may hold ({max_bytes} bytes); "
                              f"refused before reading", row)
    return size


def _read_bytes(path: Path, row: Optional[int], max_bytes: int) -> bytes:
    """The whole file, after :func:`_check_file`; an OS error while reading is a DataError too."""
    _check_file(path, row, max_bytes)
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(path, f"cannot be read: {e.strerror or e}", row) from None


def read_bin(path: Union[str, Path], num_features: NumFeatures = "auto",
             row: Optional[int] = None) -> tuple[np.ndarray, PointLayout]:
    """Raw little-endian float32 ``.bin`` with 4, 5 or 8 features per point -> ((N, 4) float32, layout).

    ``num_features="auto"`` decides from this one file's size and values (datasets decide once per segment
    from several files instead and pass the result here as an int); either way the frame's own values must
    not contradict the layout (:func:`~e2r.data.point_layout.frame_layout_mismatch`). At most
    :data:`MAX_POINT_FILE_BYTES` (checked before reading) and :data:`MAX_POINTS_PER_FRAME` points.
    """
    path = Path(path)
    raw = _read_bytes(path, row, MAX_POINT_FILE_BYTES)
    size = len(raw)
    if size % 4:
        raise DataError(path, f"truncated: {size} bytes is not a whole number of float32 values", row)
    flat = np.frombuffer(raw, dtype="<f4").copy()      # a copy: the points handed on are writable
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
    check_point_count(flat.size // f, path, row)
    mismatch = frame_layout_mismatch(flat, f)
    if mismatch:
        raise DataError(path, f"does not have the segment's point layout: {mismatch}; this frame was written "
                              f"with another layout (re-export it, or split the segment)", row)
    pts = flat.reshape(-1, f)
    return xyzi(pts, path, row, ring=pts[:, 4] if f == 5 else None), layout


def read_npy(path: Union[str, Path], row: Optional[int] = None) -> tuple[np.ndarray, PointLayout]:
    """``.npy`` array (N, F>=4), columns x, y, z, intensity first -> ((N, 4) float32, layout)."""
    path = Path(path)
    _check_file(path, row, MAX_POINT_FILE_BYTES)
    try:
        # memory-mapped first: a header that declares more data than the file holds fails here, before any
        # allocation of the declared size
        mapped = np.load(path, allow_pickle=False, mmap_mode="r")
    except Exception as e:  # noqa: BLE001 - numpy raises several types for corrupt files
        raise DataError(path, f"cannot read .npy: {type(e).__name__}: {e}", row) from None
    if mapped.ndim != 2 or mapped.shape[1] < 4:
        raise DataError(path, f".npy point array must be (N, F>=4), got shape {mapped.shape}", row)
    check_point_count(int(mapped.shape[0]), path, row)
    try:
        arr = np.array(mapped)
    except Exception as e:  # noqa: BLE001
        raise DataError(path, f"cannot read .npy: {type(e).__name__}: {e}", row) from None
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(path, f".npy point array has dtype {arr.dtype}; expected real numbers (float or int"
                              f"{', not complex: the imaginary part would be lost' if np.iscomplexobj(arr) else ''})",
                        row)
    return xyzi(arr, path, row), PointLayout(int(arr.shape[1]), "npy")


_PCD_TYPES = {("F", 4): "<f4", ("F", 8): "<f8", ("I", 1): "<i1", ("I", 2): "<i2", ("I", 4): "<i4",
              ("I", 8): "<i8", ("U", 1): "<u1", ("U", 2): "<u2", ("U", 4): "<u4", ("U", 8): "<u8"}


def read_pcd(path: Union[str, Path], row: Optional[int] = None) -> tuple[np.ndarray, PointLayout]:
    """PCD v0.7 with ``DATA ascii`` or ``DATA binary`` and fields x y z intensity (or ``i``) -> ((N, 4), layout)."""
    path = Path(path)
    raw = _read_bytes(path, row, MAX_POINT_FILE_BYTES)
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
    for f in ("x", "y", "z", "intensity"):
        if names.count(f) > 1:
            raise DataError(path, f"PCD field {f!r} appears {names.count(f)} times (fields: {fields})", row)
        if counts[names.index(f)] != 1:
            raise DataError(path, f"PCD field {f!r} has COUNT {counts[names.index(f)]}; x, y, z and intensity "
                                  f"must have COUNT 1", row)
    if n < 0 or any(c < 1 for c in counts) or any(sz < 1 for sz in sizes):
        raise DataError(path, f"malformed PCD header: POINTS {n}, SIZE {sizes}, COUNT {counts}", row)
    check_point_count(n, path, row)
    try:   # positional field names: padding fields ("_") may repeat and have COUNT > 1
        dtype = np.dtype([(f"f{k}", _PCD_TYPES[(t, s)], (c,) if c > 1 else ())
                          for k, (t, s, c) in enumerate(zip(types, sizes, counts))])
    except KeyError as e:
        raise DataError(path, f"unsupported PCD TYPE/SIZE {e}", row) from None
    except ValueError as e:       # numpy refuses the record (a COUNT beyond a C int, a record over 2 GB)
        raise DataError(path, f"malformed PCD header: SIZE {sizes}, COUNT {counts}: {e}", row) from None
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
        cols = [rec[f"f{names.index(f)}"].astype(np.float64) for f in ("x", "y", "z", "intensity")]
    else:
        raise DataError(path, f"unsupported PCD DATA mode {mode!r} (ascii and binary are supported)", row)
    return xyzi(np.stack(cols, axis=1), path, row), PointLayout(len(fields), "pcd", " ".join(fields))


def read_points(path: Union[str, Path], num_features: NumFeatures = "auto", row: Optional[int] = None,
                lidar2ego: Optional[np.ndarray] = None) -> tuple[np.ndarray, PointLayout]:
    """Any supported point file -> ((N, 4) float32 x, y, z, intensity, the PointLayout used).

    ``num_features`` (4 | 5 | 8 | "auto") only matters for ``.bin``; .npy and .pcd state their own layout.
    With ``lidar2ego`` (the segment's LiDAR extrinsic, :func:`read_lidar2ego`) the points come back in the ego
    frame (:func:`e2r.data.calib.lidar_to_ego`; the readers' checks are made in the LiDAR's own frame).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".bin":
        points, layout = read_bin(path, num_features, row)
    elif suffix == ".npy":
        points, layout = read_npy(path, row)
    elif suffix == ".pcd":
        points, layout = read_pcd(path, row)
    else:
        raise DataError(path, f"unsupported point file type {suffix!r} (expected one of {POINT_SUFFIXES})", row)
    return lidar_to_ego(points, lidar2ego), layout


#: the largest image file read (checked before it is opened): an image of MAX_IMAGE_PIXELS stored at 8 bytes
#: per pixel (16-bit RGBA, uncompressed), plus 1 MiB of metadata; no camera frame the readers accept is larger
MAX_IMAGE_FILE_BYTES = MAX_IMAGE_PIXELS * 8 + (1 << 20)
IMAGE_FORMATS = ("PNG", "JPEG")    # the only decoders tried (not every format Pillow knows, e.g. EPS via Ghostscript)
EXPECTED_SIZE_FACTOR = 4           # more than this many times the pixels of ``expected_size``: refused
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _check_image_header(path: Path, im: "PIL.Image.Image", expected_size: Optional[tuple[int, int]],
                        row: Optional[int]) -> None:
    """Refuse, from the header alone (nothing decoded yet), an image too large to be a camera frame: a tiny
    compressed file can declare a size whose decoding allocates gigabytes."""
    w, h = im.size
    if w < 1 or h < 1 or w > MAX_IMAGE_SIDE or h > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
        raise DataError(path, f"image header declares {w}x{h} pixels, more than the limit ({MAX_IMAGE_SIDE} per "
                              f"side, {MAX_IMAGE_PIXELS} in all); refused before decoding", row)
    if expected_size is not None and w * h > EXPECTED_SIZE_FACTOR * expected_size[0] * expected_size[1]:
        raise DataError(path, f"image header declares {w}x{h} pixels, more than {EXPECTED_SIZE_FACTOR}x the "
                              f"expected {expected_size[0]}x{expected_size[1]}; refused before decoding", row)
    if im.mode not in _SIXTEEN_BIT_MODES + ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX",
                                            "CMYK", "YCbCr", "LAB", "HSV"):
        raise DataError(path, f"unsupported image mode {im.mode!r} (8-bit gray/colour or 16-bit gray expected)",
                        row)


def read_image(path: Union[str, Path], size: Optional[tuple[int, int]] = None, row: Optional[int] = None,
               expected_size: Optional[tuple[int, int]] = None) -> tuple[np.ndarray, tuple[int, int]]:
    """PNG/JPEG -> ((3, H', W') float32 RGB in [0, 1], original (W, H)); resized to ``size=(W', H')`` if given.

    PNG and JPEG only (other formats are refused, whatever the file name). 8-bit images are scaled by 255,
    16-bit grayscale ones by 65535 (by their bit depth, not clipped). The size is checked from the header before
    decoding (limits above; ``expected_size=(W, H)`` adds a bound relative to the size the caller expects)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    _check_file(path, row, MAX_IMAGE_FILE_BYTES)
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:    # lazy: only the header has been read
            _check_image_header(path, im, expected_size, row)
            im.load()
            original = im.size
            if im.mode in _SIXTEEN_BIT_MODES:
                gray = np.asarray(im, dtype=np.float32) / 65535.0
                return _prepare_gray(gray, size), (int(original[0]), int(original[1]))
            rgb = im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise DataError(path, f"image too large (decompression bomb guard): {e}", row) from None
    except UnidentifiedImageError:
        raise DataError(path, f"corrupt or unreadable image: not a {' or '.join(IMAGE_FORMATS)} image", row) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"corrupt or unreadable image: {type(e).__name__}: {e}", row) from None
    return prepare_image(rgb, size), (int(original[0]), int(original[1]))


def _prepare_gray(gray: np.ndarray, size: Optional[tuple[int, int]]) -> np.ndarray:
    """(H, W) float32 in [0, 1] -> (3, H', W') float32, resized (bilinear) like :func:`prepare_image`."""
    from PIL import Image

    if size is not None and (int(size[0]), int(size[1])) != (gray.shape[1], gray.shape[0]):
        gray = np.asarray(Image.fromarray(gray).resize((int(size[0]), int(size[1])), Image.BILINEAR))
    return np.ascontiguousarray(np.broadcast_to(np.clip(gray, 0.0, 1.0), (3,) + gray.shape), dtype=np.float32)


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


def read_text(path: Union[str, Path]) -> str:
    """A small UTF-8 text file (calibration) -> its text; DataError naming the file when it is missing, empty,
    unreadable or not UTF-8."""
    path = Path(path)
    try:
        return _read_bytes(path, None, MAX_TEXT_BYTES).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8 text: {e}") from None


def read_json(path: Union[str, Path]) -> object:
    """A small JSON file (calib.json, calibration records) -> the parsed document; DataError naming the file when
    it is missing, empty, not UTF-8 text, not JSON, nested too deeply or names a key twice in one object."""
    path = Path(path)
    text = read_text(path)
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON: {e}") from None
    except RecursionError:
        raise DataError(path, "JSON nested too deeply to be a calibration file") from None
    except _DuplicateKeys as e:
        raise DataError(path, f"key(s) {e} appear more than once in one object (which one holds?)") from None


class _DuplicateKeys(Exception):
    """A JSON object naming a key twice (json.loads would keep the last one silently)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _DuplicateKeys(sorted({k for k in keys if keys.count(k) > 1}))
    return dict(pairs)


def read_calib(path: Union[str, Path]) -> list[CameraCalib]:
    """Read and validate calib.json (format in docs/CONTRACTS.md) -> cameras in file order."""
    return cameras_from_doc(read_json(path), Path(path))


def read_lidar2ego(path: Union[str, Path], required: bool = False) -> Optional[np.ndarray]:
    """The ``"lidar2ego"`` (4, 4) of a calib.json, validated; None when it has none (identity) and it is not
    ``required``. Only that field is read: a LiDAR dataset does not depend on the camera entries."""
    return lidar2ego_from_doc(read_json(path), Path(path), required)


def sample_paths(paths: Sequence[Path], k: int = 3) -> list[Path]:
    """Up to ``k`` distinct paths spread over a sequence (first, middle, last) for per-segment detection."""
    if len(paths) <= k:
        return list(dict.fromkeys(paths))
    idx = sorted({round(i * (len(paths) - 1) / (k - 1)) for i in range(k)})
    return list(dict.fromkeys(paths[i] for i in idx))
