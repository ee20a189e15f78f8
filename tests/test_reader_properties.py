"""Properties of every reader of input files, and of the key grammar, on arbitrary (fuzzed, mutated) input:
a read returns a correct result or raises DataError naming the file (InvalidKeyError for keys) - never another
exception, never a hang, never an allocation far beyond the file's size. Examples are derived from a fixed seed
(``derandomize``), so CI sees the same ones every run."""
from __future__ import annotations

import csv
import io
import copy
import json
import math
import signal
import struct
import tracemalloc
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from e2r.data.calib import MAX_IMAGE_SIDE, RIGID_TOL
from e2r.data.layout import read_segment_table
from e2r.data.readers import MAX_INTENSITY, DataError, read_calib, read_image, read_lidar2ego, read_points
from stores.keys import InvalidKeyError, make_key, parse_key, validate_part
from tests.fixtures import Hang, write_calib

FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HANG_S = 10.0                  # one read of a file of a few KB taking this long is a hang
ALLOC_SLACK = 8 << 20          # bytes any read may allocate (Python objects, numpy temporaries) ...
ALLOC_FACTOR = 64              # ... plus this many times the file's size


@contextmanager
def bounded(size: int, allowed: int = 0):
    """Fail on a read that hangs, or whose peak traced allocation (Python and numpy) exceeds
    ALLOC_SLACK + ALLOC_FACTOR * size + allowed."""
    def alarm(signum, frame):
        raise Hang(f"read still running after {HANG_S} s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_S)
    tracemalloc.start()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    limit = ALLOC_SLACK + ALLOC_FACTOR * size + allowed
    assert peak <= limit, f"a read of a {size}-byte file allocated {peak} bytes (limit {limit})"


def read_or_error(read, path: Path, allowed: int = 0, row=None):
    """``read()`` within bounds -> its result, or None after a DataError naming ``path`` (and ``row``)."""
    with bounded(path.stat().st_size if path.exists() else 0, allowed):
        try:
            return read()
        except DataError as e:
            assert e.file == str(path) and str(path) in str(e) and e.row == row, str(e)
            return None


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """``data`` with 0-4 byte-level edits: flips, overwrites, truncation, insertion, deletion, duplication."""
    out = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "dup"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and out:
            out[at] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, ord("\n"), ord(" "), ord("-"), ord("9")]))
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del out[at:at + draw(st.integers(1, 16))]
        elif kind == "dup":
            out[at:at] = out[at:at + draw(st.integers(1, 64))]
    return bytes(out)


def check_points(points: np.ndarray) -> None:
    """What every point reader promises: (N, 4) float32, finite, intensity in [0, 65535]."""
    assert points.dtype == np.float32 and points.ndim == 2 and points.shape[1] == 4
    assert np.isfinite(points).all() and (points[:, 3] >= 0).all() and (points[:, 3] <= MAX_INTENSITY).all()


def point_rows(n_max: int = 24):
    """(N, 4) plausible scans as lists: x, y, z within 100 m, intensity 0..255, not all zero (a zero-filled
    frame is refused; every reader accepts these)."""
    coord, inten = st.floats(-100, 100, width=32), st.floats(0, 255, width=32)
    return st.lists(st.tuples(coord, coord, coord, inten), min_size=1, max_size=n_max).map(
        lambda rows: np.array(rows, np.float32)).filter(lambda a: bool(a.any()))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ----- point files ------------------------------------------------------------------------------------------------
@FUZZ
@given(points=point_rows(), extra=st.sampled_from([0, 1, 4]), data=st.data())
def test_bin(work, points, extra, data):
    nf = 4 + extra
    raw = np.concatenate([points, np.zeros((len(points), extra), np.float32)], 1).astype("<f4").tobytes()
    body = data.draw(st.one_of(mutated(raw), st.binary(max_size=512)))
    given_nf = data.draw(st.sampled_from([nf, 4, 5, 8, "auto"]))
    path = work / "p.bin"
    path.write_bytes(body)
    got = read_or_error(lambda: read_points(path, given_nf, row=3), path, row=3)
    if got is None:
        assert body != raw or given_nf == "auto" or given_nf != nf
        return
    out, layout = got
    check_points(out)
    expect = np.frombuffer(body, "<f4").reshape(-1, layout.num_features)[:, :4]
    np.testing.assert_array_equal(out, expect)


def npy_arrays():
    dtypes = st.sampled_from(["<f4", ">f8", "<f2", "<i2", "|u1", "<i8", "|b1", "<c8", "<U3", "<M8[s]"])
    shapes = st.sampled_from([(5, 4), (3, 5), (0, 4), (4, 3), (6,), (2, 4, 1), (1, 8)])
    return st.tuples(dtypes, shapes, st.integers(0, 2 ** 31)).map(
        lambda t: (np.random.default_rng(t[2]).uniform(0, 50, t[1]).astype(t[0]) if t[0][1] not in "UM"
                   else np.zeros(t[1], t[0])))


def npy_header(shape: str, descr: str = "<f4", fortran: str = "False") -> bytes:
    text = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}"
    text += " " * (-(len(text) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


@FUZZ
@given(arr=npy_arrays(), lie=st.sampled_from([None, "(10**12, 4)", "(4294967296, 4)", "(-1, 4)", "(2, 4)"]),
       data=st.data())
def test_npy(work, arr, lie, data):
    buf = io.BytesIO()
    np.save(buf, arr)
    raw = buf.getvalue()
    if lie is not None:            # a header that declares other data than the file holds
        raw = npy_header(lie.replace("10**12", str(10 ** 12))) + np.zeros(8, "<f4").tobytes()
    body = data.draw(mutated(raw))
    path = work / "p.npy"
    path.write_bytes(body)
    got = read_or_error(lambda: read_points(path, row=1), path, row=1)
    if got is None:
        numeric = arr.dtype.kind in "fiu" and arr.ndim == 2 and arr.shape[1] >= 4
        assert not (body == raw and lie is None and numeric), "a valid .npy was refused"
        return
    out, layout = got
    check_points(out)
    truth = np.load(io.BytesIO(body), allow_pickle=False)
    assert layout.num_features == truth.shape[1]
    np.testing.assert_array_equal(out, truth[:, :4].astype(np.float32))
    if body == raw and lie is None:
        np.testing.assert_array_equal(out, arr[:, :4].astype(np.float32))


PCD_TYPES = [("F", 4, "<f4"), ("F", 8, "<f8"), ("I", 2, "<i2"), ("U", 1, "<u1"), ("U", 2, "<u2"), ("I", 4, "<i4")]
PCD_TOKENS = ["-1", "0", "1", "3", "2147483648", "99999999999999", "1e3", "nan", "F", "U", "I", "8", "x", "i",
              "intensity", "_", "ascii", "binary", "binary_compressed", "\t"]


@st.composite
def pcd_files(draw) -> tuple[bytes, np.ndarray]:
    """A valid PCD (fields x y z intensity|i in any order, padding and extra fields, any mode), its points."""
    points = draw(point_rows(12))
    fields = [("x", 0), ("y", 1), ("z", 2), (draw(st.sampled_from(["intensity", "i"])), 3)]
    fields += [(name, None) for name in draw(st.lists(st.sampled_from(["ring", "_", "t"]), max_size=2))]
    fields = draw(st.permutations(fields))
    types = [draw(st.sampled_from(PCD_TYPES[:2] if col is not None and col < 3 else PCD_TYPES)) for _, col in fields]
    counts = [1 if col is not None else draw(st.integers(1, 3)) for _, col in fields]
    binary = draw(st.booleans())
    n = len(points)
    header = (f"# .PCD v0.7\nVERSION 0.7\nFIELDS {' '.join(f for f, _ in fields)}\n"
              f"SIZE {' '.join(str(t[1]) for t in types)}\nTYPE {' '.join(t[0] for t in types)}\n"
              f"COUNT {' '.join(map(str, counts))}\nWIDTH {n}\nHEIGHT 1\nPOINTS {n}\n"
              f"DATA {'binary' if binary else 'ascii'}\n").encode()
    cols = [np.round(points[:, col]) if col is not None and t[0] != "F" else
            (points[:, col] if col is not None else np.ones(n)) for (_, col), t in zip(fields, types)]
    truth = np.stack([cols[[c for _, c in fields].index(k)] for k in range(4)], 1).astype(np.float32)
    if binary:
        rec = np.zeros(n, [(f"f{k}", t[2], (c,) if c > 1 else ()) for k, (t, c) in enumerate(zip(types, counts))])
        for k, col in enumerate(cols):
            rec[f"f{k}"] = col if counts[k] == 1 else col[:, None]
        return header + rec.tobytes(), truth
    lines = [" ".join(" ".join([repr(float(cols[k][i]))] * counts[k]) for k in range(len(cols))) for i in range(n)]
    return header + ("\n".join(lines) + "\n").encode(), truth


@st.composite
def header_edits(draw, raw: bytes) -> bytes:
    """0-3 header edits: a token replaced by an odd one, a line dropped or repeated."""
    head, sep, data = raw.partition(b"DATA ")
    lines = head.decode().split("\n")
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        words = lines[i].split(" ")
        kind = draw(st.sampled_from(["token", "drop", "repeat"]))
        if kind == "token":
            words[draw(st.integers(0, len(words) - 1))] = draw(st.sampled_from(PCD_TOKENS))
            lines[i] = " ".join(words)
        elif kind == "drop":
            lines[i] = ""
        else:
            lines.insert(i, lines[i])
    return "\n".join(lines).encode() + sep + data


@FUZZ
@given(pcd=pcd_files(), data=st.data())
def test_pcd(work, pcd, data):
    raw, truth = pcd
    body = data.draw(st.one_of(header_edits(raw), mutated(raw)))
    path = work / "p.pcd"
    path.write_bytes(body)
    got = read_or_error(lambda: read_points(path, row=0), path, row=0)
    if body == raw:
        assert got is not None, "a valid PCD was refused"
        np.testing.assert_allclose(got[0], truth, rtol=1e-6)
    if got is not None:
        check_points(got[0])


# ----- images -----------------------------------------------------------------------------------------------------
def png_with_size(png: bytes, w: int, h: int) -> bytes:
    """The PNG with its IHDR declaring ``w`` x ``h`` pixels (CRC recomputed, so only the size lies)."""
    ihdr = bytearray(png[8:33])
    ihdr[8:16] = struct.pack(">II", w, h)
    ihdr[21:25] = struct.pack(">I", zlib.crc32(bytes(ihdr[4:21])) & 0xFFFFFFFF)
    return png[:8] + bytes(ihdr) + png[33:]


@FUZZ
@given(w=st.integers(1, 12), h=st.integers(1, 12), mode=st.sampled_from(["RGB", "L", "RGBA", "P", "I;16", "1"]),
       fmt=st.sampled_from(["PNG", "JPEG", "PNG", "JPEG", "BMP", "GIF", "TIFF", "PPM"]), seed=st.integers(0, 2 ** 31),
       data=st.data())
def test_image(work, w, h, mode, fmt, seed, data):
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16))
    else:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    if fmt not in ("PNG", "JPEG"):
        im = im.convert("RGB")             # a foreign format: any of its modes must be refused
    fmt = "PNG" if fmt == "JPEG" and mode not in ("RGB", "L") else fmt
    buf = io.BytesIO()
    im.save(buf, fmt)
    raw = buf.getvalue()
    lie = data.draw(st.sampled_from([None, (1 << 31) - 1, 70000, 5000, 3 * w]))
    if fmt == "PNG" and lie is not None:
        raw = png_with_size(raw, lie, data.draw(st.sampled_from([h, lie])))
    body = data.draw(mutated(raw))
    path = work / f"i.{fmt.lower()}"
    path.write_bytes(body)
    size = data.draw(st.sampled_from([None, (8, 4)]))
    got = read_or_error(lambda: read_image(path, size, row=2, expected_size=(w, h)), path, row=2,
                        allowed=96 * 4 * w * h)
    if fmt not in ("PNG", "JPEG"):
        assert got is None, f"a {fmt} file was decoded (PNG and JPEG only)"
    elif body == buf.getvalue():
        assert got is not None, "a valid image was refused"
    if got is not None:
        arr, (ow, oh) = got
        assert ow * oh <= 4 * w * h and max(ow, oh) <= MAX_IMAGE_SIDE
        assert arr.dtype == np.float32 and arr.shape == (3,) + ((oh, ow) if size is None else (size[1], size[0]))
        assert np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1


# ----- data.csv (through e2r.data.layout) -------------------------------------------------------------------------
CSV_CELLS = ["", " ", "nan", "inf", "-inf", "1e999", "0x10", "1_0", "١٢", "3.5", "-0", "../x.bin", "/etc/passwd",
             "lidar/0.bin", "camera/0.png", "a\x00b", "x" * 5000, "\"", "a,b", "line\nbreak", "\r", "é", "None"]
CSV_COLUMNS = ["timestamp", "lidar_filepath", "image_filepath", "velocity", "wheel_angle", "speed_command"]


@pytest.fixture(scope="module")
def segment(work) -> Path:
    """root/train/seg with 4 LiDAR files, 4 images and calib.json; each example writes its own data.csv."""
    seg = work / "root" / "train" / "seg"
    rng = np.random.default_rng(0)
    for i in range(4):
        (seg / "lidar").mkdir(parents=True, exist_ok=True)
        np.c_[rng.uniform(-20, 20, (50, 3)), rng.uniform(0, 1, 50)].astype("<f4").tofile(seg / "lidar" / f"{i}.bin")
        Image.new("RGB", (8, 4)).save(write_calib(seg / "camera" / "calib.json", (8, 4)).parent / f"{i}.png")
    (seg / "meta").mkdir(exist_ok=True)
    return seg


@st.composite
def csv_files(draw) -> tuple[bytes, list[list[str]]]:
    """A valid data.csv (1-4 rows, optional speed_command), then cell / row / header edits."""
    cols = CSV_COLUMNS if draw(st.booleans()) else CSV_COLUMNS[:5]
    n = draw(st.integers(1, 4))
    num = st.floats(-50, 50, allow_nan=False).map(repr)
    rows = [[str(i), f"lidar/{i}.bin", f"camera/{i}.png"] + [draw(num) for _ in cols[3:]] for i in range(n)]
    table = [list(cols)] + rows
    for _ in range(draw(st.integers(0, 3))):
        r = draw(st.integers(0, len(table) - 1))
        kind = draw(st.sampled_from(["cell", "cell", "drop_cell", "add_cell", "drop_row", "rename"]))
        if kind == "cell":
            table[r][draw(st.integers(0, len(table[r]) - 1))] = draw(st.one_of(st.sampled_from(CSV_CELLS), st.text()))
        elif kind == "drop_cell" and table[r]:
            table[r].pop()
        elif kind == "add_cell":
            table[r].append(draw(st.sampled_from(CSV_CELLS)))
        elif kind == "drop_row" and len(table) > 1:
            table.pop(r)
        elif kind == "rename":
            table[0][draw(st.integers(0, len(table[0]) - 1))] = draw(st.sampled_from(CSV_COLUMNS))
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(table)
    return text.getvalue().encode("utf-8", "surrogatepass"), table


@FUZZ
@given(made=csv_files(), data=st.data())
def test_csv(segment, made, data):
    raw, table = made
    body = data.draw(st.one_of(st.just(raw), mutated(raw)))
    path = segment / "meta" / "data.csv"
    path.write_bytes(body)
    root = segment.parents[1]
    with bounded(len(body)):
        try:
            got = read_segment_table(root, "train", "seg", lidar=True, camera=True)
        except DataError as e:
            assert e.file == str(path) and str(path) in str(e), str(e)
            assert e.row is None or f"line {e.row + 2}" in str(e) or "line" in str(e), str(e)
            got = None
    valid = (body == raw and len(set(table[0])) == len(table[0]) and len(table) > 1
             and all(len(r) == len(table[0]) for r in table) and table[0] in (CSV_COLUMNS, CSV_COLUMNS[:5]))
    if valid and all(_number(c) for r in table[1:] for c in r[3:]) and all(
            r[1] == f"lidar/{i}.bin" and r[2] == f"camera/{i}.png" for i, r in enumerate(table[1:])):
        assert got is not None, "a valid data.csv was refused"
        np.testing.assert_array_equal(got.velocity, [float(r[3]) for r in table[1:]])
    if got is None:
        return
    header = next(csv.reader(io.StringIO(body.decode("utf-8-sig"))))
    assert len({h.strip() for h in header}) == len(header), "a csv naming a column twice was read"
    n = got.num_frames
    assert n >= 1 and len(got.lidar_paths) == n and len(got.image_paths["front"]) == n
    assert np.isfinite(got.velocity).all() and np.isfinite(got.wheel_angle).all()
    for i, p in enumerate(got.lidar_paths):
        assert p.is_relative_to(segment) and ".." not in p.relative_to(segment).parts
        out = read_or_error(lambda: read_points(p, 4, row=i), p, row=i)
        if out is not None:
            check_points(out[0])


def _number(text: str) -> bool:
    try:
        return np.isfinite(float(text))
    except ValueError:
        return False


# ----- calib.json -------------------------------------------------------------------------------------------------
def rigid(q, t) -> list[list[float]]:
    w, x, y, z = np.asarray(q) / np.linalg.norm(q)
    R = [[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
         [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
         [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]]
    return [list(r) + [float(v)] for r, v in zip(R, t)] + [[0.0, 0.0, 0.0, 1.0]]


NAME = st.text("abcXYZ019_.-", min_size=1, max_size=8)
QUAT = st.tuples(*[st.floats(-1, 1)] * 4).filter(lambda q: np.linalg.norm(q) > 0.1)
TRANS = st.tuples(*[st.floats(-5, 5)] * 3)
ODD_VALUES = st.sampled_from([10 ** 400, -(10 ** 400), 1e308, -0.0, 1e-300, "12", "front", "é", "", True, False,
                              None, [], {}, [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [0, 0, 0, 1], [64, 32], [0, 10 ** 9]]
                             ).map(copy.deepcopy)   # a fresh copy: an edit must never change the shared list itself
JSON_VALUES = st.recursive(st.one_of(ODD_VALUES, st.none(), st.booleans(), st.integers(-10 ** 30, 10 ** 30),
                                     st.floats(), st.text(max_size=5)),
                           lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                   st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=12)


@st.composite
def calib_docs(draw) -> dict:
    names = draw(st.lists(NAME, min_size=1, max_size=3, unique=True))
    sizes = [(draw(st.integers(1, 4000)), draw(st.integers(1, 4000))) for _ in names]
    fov = st.floats(1, 160).map(lambda deg: 2 * math.tan(math.radians(deg) / 2))  # a physical field of view
    cams = [{"name": nm, "image_size": [w, h],
             "K": [[w / draw(fov), 0.0, draw(st.floats(0, w))],              # principal point in the image
                   [0.0, h / draw(fov), draw(st.floats(0, h))], [0.0, 0.0, 1.0]],
             "cam2ego": rigid(draw(QUAT), draw(TRANS))} for nm, (w, h) in zip(names, sizes)]
    doc = {"cameras": cams}
    if draw(st.booleans()):
        doc["lidar2ego"] = rigid(draw(QUAT), draw(TRANS))
    return doc


@st.composite
def json_edits(draw, doc):
    """0-3 edits of a JSON document: a value anywhere replaced by an arbitrary one, or a key removed."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(0, 3))):
        node, key = None, None
        cur = doc
        while isinstance(cur, (dict, list)) and cur and (node is None or draw(st.integers(0, 3)) > 0):
            keys = list(cur) if isinstance(cur, dict) else list(range(len(cur)))
            node, key = cur, draw(st.sampled_from(keys))
            cur = cur[key]
        if node is None:
            return draw(JSON_VALUES)
        if isinstance(node, dict) and draw(st.booleans()):
            del node[key]
        else:
            node[key] = draw(JSON_VALUES)
    return doc


@FUZZ
@given(doc=calib_docs(), data=st.data())
def test_calib(work, doc, data):
    edited = data.draw(json_edits(doc))
    text = json.dumps(edited).encode()
    body = data.draw(st.one_of(st.just(text), mutated(text)))
    path = work / "calib.json"
    path.write_bytes(body)
    cams = read_or_error(lambda: read_calib(path), path)
    lidar = read_or_error(lambda: read_lidar2ego(path), path)
    if body == json.dumps(doc).encode():
        assert cams is not None, "a valid calib.json was refused"
        assert [c.name for c in cams] == [c["name"] for c in doc["cameras"]]
        np.testing.assert_array_equal(cams[0].K, doc["cameras"][0]["K"])
        if "lidar2ego" in doc:
            np.testing.assert_array_equal(lidar, doc["lidar2ego"])
    for c in cams or []:
        assert c.name.isascii() and all(ch.isalnum() or ch in "_.-" for ch in c.name)
        assert all(isinstance(v, int) and 1 <= v <= MAX_IMAGE_SIDE for v in c.image_size)
        assert c.K.shape == (3, 3) and c.cam2ego.shape == (4, 4) and np.isfinite(c.K).all()
        assert np.isfinite(c.K.astype(np.float32)).all() and np.isfinite(c.cam2ego.astype(np.float32)).all()
    if lidar is not None:
        R = lidar[:3, :3]
        assert np.abs(R.T @ R - np.eye(3)).max() <= RIGID_TOL and np.linalg.det(R) > 0
    if cams is not None or lidar is not None:    # no key given twice: which one would hold?
        json.loads(body, object_pairs_hook=lambda pairs: dict(pairs) if len({k for k, _ in pairs}) == len(pairs)
                   else pytest.fail(f"a JSON object with a repeated key was read: {pairs}"))
    if cams is not None:    # what the file says is what is served: bools and strings are not numbers
        raw_cams = json.loads(body)["cameras"]
        assert all(type(v) in (int, float) for cam in raw_cams for row in cam["K"] + cam["cam2ego"] for v in row)


# ----- the key grammar --------------------------------------------------------------------------------------------
PART_CHARS = "abAB09_.-:/\\ é\n"


@FUZZ
@given(key=st.one_of(st.text(PART_CHARS, max_size=40), st.text(max_size=40),
                     st.builds(lambda a, b, c: f"{a}/{b}:{c}", st.text(PART_CHARS, max_size=12),
                               st.text(PART_CHARS, max_size=12), st.text("0123456789-+ ", max_size=22)),
                     st.integers(), st.none(), st.binary(max_size=8)))
def test_parse_key(key):
    with bounded(0):
        try:
            parsed = parse_key(key)
        except InvalidKeyError:
            return
    assert isinstance(key, str) and str(parsed) == key
    assert make_key(*parsed) == key and validate_part(parsed.split) == parsed.split
    assert parsed.start >= 0 and key.isascii()


@FUZZ
@given(split=st.one_of(st.text(PART_CHARS, max_size=10), st.integers()), segment=st.text(PART_CHARS, max_size=10),
       start=st.one_of(st.integers(-5, 10 ** 19), st.floats(), st.text(max_size=4), st.booleans(),
                       st.integers(0, 2 ** 62).map(np.int64), st.none()))
def test_make_key(split, segment, start):
    with bounded(0):
        try:
            key = make_key(split, segment, start)
        except InvalidKeyError:
            return
    assert parse_key(key) == (split, segment, int(start))

