import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from e2r.data.point_layout import LayoutUndecidable, detect_bin_layout, detect_from_arrays
from e2r.data.calib import lidar_to_ego, scale_intrinsics
from e2r.data.layout import read_segment_lidar2ego, read_segment_table
from e2r.data.readers import DataError, read_calib, read_image, read_lidar2ego, read_npy, read_pcd, read_points
from tests.fixtures import make_points, write_calib, write_pcd, write_points_bin


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.mark.parametrize("nf", [4, 5, 8])
def test_bin_given_layout_returns_xyzi(tmp_path, rng, nf):
    pts = make_points(rng, 300, nf)
    path = write_points_bin(tmp_path / "a.bin", pts)
    out, layout = read_points(path, nf)
    assert out.dtype == np.float32 and out.shape == (300, 4)
    np.testing.assert_array_equal(out, pts[:, :4])
    assert (layout.num_features, layout.source) == (nf, "given")


@pytest.mark.parametrize("nf,n", [(4, 400), (5, 400), (8, 200), (4, 2000), (5, 1600)])
def test_bin_auto_resolves_sizes_ambiguous_by_values(tmp_path, rng, nf, n):
    pts = make_points(rng, n, nf)
    assert pts.size % 4 == 0 and pts.size % 5 == 0 and pts.size % 8 == 0  # size alone cannot tell
    path = write_points_bin(tmp_path / "a.bin", pts)
    out, layout = read_points(path, "auto")
    assert (layout.num_features, layout.source) == (nf, "detected")
    np.testing.assert_array_equal(out, pts[:, :4])


def test_eight_features_whose_4_wide_reading_is_plausible_decided_by_column_statistics(rng):
    n = 400
    base = make_points(rng, n, 4)
    extras = np.stack([rng.integers(0, 32, n), rng.uniform(0, 0.1, n), rng.normal(0, 0.01, n),
                       rng.uniform(0, 1, n)], 1).astype(np.float32)
    pts = np.concatenate([base, extras], 1)
    # the 4-wide reading of this file passes every per-point plausibility check ...
    from e2r.data.point_layout import plausibility_failures
    assert plausibility_failures(pts.reshape(-1, 4)) == []
    # ... so only the comparison of columns 4..7 with 0..3 can tell, and it says 8
    layout = detect_from_arrays([pts.ravel()])
    assert layout.num_features == 8


def test_auto_detection_pools_files_of_a_segment(tmp_path, rng):
    paths = [write_points_bin(tmp_path / f"{i}.bin", make_points(rng, n, 4)) for i, n in enumerate((301, 250, 222))]
    # the odd point count of the first file rules out 8 by size; values rule out 5
    assert detect_bin_layout(paths).num_features == 4


@pytest.mark.parametrize("content,why", [
    (np.zeros(1600, np.float32), "plausible for [4, 5, 8]"),
    (np.random.default_rng(0).uniform(-1e6, 1e6, 1600).astype(np.float32), "not plausible"),
])
def test_auto_refuses_when_values_cannot_decide(tmp_path, content, why):
    path = write_points_bin(tmp_path / "odd.bin", content.reshape(-1, 4))
    with pytest.raises(DataError, match="cannot auto-detect") as e:
        read_points(path, "auto", row=3)
    assert str(path) in str(e.value) and "row 3" in str(e.value) and why in str(e.value)
    with pytest.raises(LayoutUndecidable):
        detect_bin_layout([path])


def test_auto_refuses_between_4_and_8_when_columns_4_to_7_half_resemble_a_point(rng):
    base = make_points(rng, 400, 4)
    pts = np.concatenate([base, base * np.float32([1.5, 1.5, 1.0, 1.0])], 1)  # like a point, but stretched
    with pytest.raises(LayoutUndecidable, match="cannot tell 4 from 8"):
        detect_from_arrays([pts.ravel()])


def test_auto_refuses_too_few_points(rng):
    with pytest.raises(LayoutUndecidable, match="too few"):
        detect_from_arrays([make_points(rng, 10, 4).ravel()])


def test_bin_bad_files_name_file_and_row(tmp_path, rng):
    good = make_points(rng, 50, 4)
    trunc = tmp_path / "trunc.bin"
    trunc.write_bytes(good.tobytes()[:-2])
    with pytest.raises(DataError, match="whole number of float32") as e:
        read_points(trunc, 4, row=5)
    assert e.value.file == str(trunc) and e.value.row == 5 and "row 5" in str(e.value)
    partial = write_points_bin(tmp_path / "partial.bin", np.concatenate([good.ravel(), good[0, :2]]))
    with pytest.raises(DataError, match="not a multiple of the point size 16 bytes"):
        read_points(partial, 4, row=1)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        read_points(empty, 4)
    with pytest.raises(DataError, match="missing") as e:
        read_points(tmp_path / "nope.bin", 4, row=2)
    assert "nope.bin" in str(e.value)
    nan = good.copy()
    nan[7, 2] = np.nan
    with pytest.raises(DataError, match="non-finite.*first at point 7"):
        read_points(write_points_bin(tmp_path / "nan.bin", nan), 4)
    with pytest.raises(DataError, match="unsupported point file type"):
        read_points(tmp_path / "x.las", 4)
    with pytest.raises(ValueError, match="lidar_num_features"):
        read_points(write_points_bin(tmp_path / "ok.bin", good), 6)


def test_npy(tmp_path, rng):
    pts = make_points(rng, 120, 5).astype(np.float64)
    np.save(tmp_path / "p.npy", pts)
    out, layout = read_npy(tmp_path / "p.npy")
    assert out.dtype == np.float32 and layout.num_features == 5 and layout.source == "npy"
    np.testing.assert_allclose(out, pts[:, :4], rtol=1e-6)
    np.save(tmp_path / "bad.npy", np.zeros((10, 3)))
    with pytest.raises(DataError, match=r"\(N, F>=4\)"):
        read_points(tmp_path / "bad.npy", row=4)
    (tmp_path / "corrupt.npy").write_bytes(b"not a numpy file at all")
    with pytest.raises(DataError, match="cannot read .npy"):
        read_points(tmp_path / "corrupt.npy")


@pytest.mark.parametrize("binary", [True, False])
def test_pcd_ascii_and_binary(tmp_path, rng, binary):
    pts = make_points(rng, 80, 4)
    path = write_pcd(tmp_path / "p.pcd", pts, binary=binary)
    out, layout = read_pcd(path)
    np.testing.assert_allclose(out, pts, rtol=1e-6)
    assert layout.source == "pcd" and layout.num_features == 4
    assert read_points(path, 8)[0].shape == (80, 4)  # lidar_num_features does not apply to .pcd


def test_pcd_extra_fields_and_bad_pcds(tmp_path, rng):
    pts = make_points(rng, 20, 4)
    header = ("VERSION 0.7\nFIELDS x y z i ring\nSIZE 4 4 4 4 2\nTYPE F F F F U\nCOUNT 1 1 1 1 1\n"
              "WIDTH 20\nHEIGHT 1\nPOINTS 20\nDATA binary\n")
    rec = np.zeros(20, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("i", "<f4"), ("ring", "<u2")])
    for j, f in enumerate("xyzi"):
        rec[f] = pts[:, j]
    (tmp_path / "r.pcd").write_bytes(header.encode() + rec.tobytes())
    np.testing.assert_array_equal(read_pcd(tmp_path / "r.pcd")[0], pts)
    (tmp_path / "t.pcd").write_bytes(header.encode() + rec.tobytes()[:-10])
    with pytest.raises(DataError, match="truncated") as e:
        read_pcd(tmp_path / "t.pcd", row=9)
    assert "t.pcd" in str(e.value) and "row 9" in str(e.value)
    (tmp_path / "n.pcd").write_text(header.replace("x y z i ring", "x y z r ring"))
    with pytest.raises(DataError, match="no field"):
        read_pcd(tmp_path / "n.pcd")
    (tmp_path / "c.pcd").write_text(header.replace("binary", "binary_compressed"))
    with pytest.raises(DataError, match="unsupported PCD DATA"):
        read_pcd(tmp_path / "c.pcd")


def test_image_resize_and_intrinsics(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20, 0] = 255  # left half red
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=95)
    for name in ("a.png", "a.jpg"):
        img, original = read_image(tmp_path / name, (80, 10))
        assert original == (40, 20) and img.shape == (3, 10, 80) and img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0
        assert img[0, :, :35].mean() > 0.9 and img[0, :, 45:].mean() < 0.1
    K = np.array([[30.0, 0, 20], [0, 25.0, 10], [0, 0, 1]])
    K2 = scale_intrinsics(K, 80 / 40, 10 / 20)
    np.testing.assert_allclose(K2, [[60, 0, 40.5], [0, 12.5, 4.75], [0, 0, 1]])
    # a ray through pixel (u, v) keeps its direction: it projects to the resampled pixel (u+.5)*s-.5
    p = np.array([1.0, -0.5, 4.0])
    uv, uv2 = K @ p / p[2], K2 @ p / p[2]
    np.testing.assert_allclose(uv2[:2], (uv[:2] + 0.5) * [2.0, 0.5] - 0.5)


def test_corrupt_image_names_file_and_row(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(DataError, match="corrupt or unreadable image") as e:
        read_image(tmp_path / "bad.png", (8, 8), row=4)
    assert "bad.png" in str(e.value) and e.value.row == 4
    good = np.zeros((16, 16, 3), np.uint8)
    Image.fromarray(good).save(tmp_path / "t.png")
    (tmp_path / "t2.png").write_bytes((tmp_path / "t.png").read_bytes()[:40])
    with pytest.raises(DataError, match="t2.png"):
        read_image(tmp_path / "t2.png")


def test_calib_valid_and_invalid(tmp_path):
    path = write_calib(tmp_path / "calib.json", (64, 32), ("front", "left"))
    cams = read_calib(path)
    assert [c.name for c in cams] == ["front", "left"] and cams[0].image_size == (64, 32)
    assert cams[0].K.shape == (3, 3) and cams[1].cam2ego.shape == (4, 4)
    doc = json.loads(path.read_text())

    def broken(mutate, match):
        d = json.loads(json.dumps(doc))
        mutate(d)
        p = tmp_path / "bad_calib.json"
        p.write_text(json.dumps(d).replace("NaN", "NaN"))
        with pytest.raises(DataError, match=match) as e:
            read_calib(p)
        assert str(p) in str(e.value)

    broken(lambda d: d["cameras"][0].__setitem__("K", [[1, 0], [0, 1]]), r"cameras\[0\]\.K must have shape")
    broken(lambda d: d["cameras"][1]["cam2ego"][0].__setitem__(0, float("nan")), "non-finite")
    broken(lambda d: d["cameras"][0].pop("image_size"), "no 'image_size'")
    broken(lambda d: d["cameras"][0].__setitem__("image_size", [64, -1]), "image_size")
    broken(lambda d: d.__setitem__("cameras", []), "at least one camera")
    broken(lambda d: d["cameras"][1].__setitem__("name", "front"), "duplicate")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_calib(tmp_path / "x.json")


def rot_z(deg: float) -> np.ndarray:
    a = np.radians(deg)
    T = np.eye(4)
    T[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return T


def test_lidar_to_ego_moves_xyz_keeps_intensity():
    pts = np.array([[0, 5, 0, 9], [1, 0, -1, 0.5]], np.float32)
    assert lidar_to_ego(pts, None) is pts                          # identity: no copy, no arithmetic
    T = rot_z(-90)
    T[:3, 3] = [1.0, 0.0, 1.5]
    out = lidar_to_ego(pts, T)
    assert out.dtype == np.float32 and out.shape == (2, 4) and out is not pts
    np.testing.assert_allclose(out, [[6, 0, 1.5, 9], [1, -1, 0.5, 0.5]], atol=1e-6)
    far = np.array([[3e38, 3e38, 0, 1]], np.float32)                 # an outlier the reader lets through
    assert np.isfinite(lidar_to_ego(far, rot_z(45))).all()


def test_read_lidar2ego_validates_the_matrix(tmp_path):
    def write(doc):
        p = tmp_path / "calib.json"
        p.write_text(json.dumps(doc))
        return p

    T = rot_z(30)
    T[:3, 3] = [0.5, 0, 1.2]
    np.testing.assert_allclose(read_lidar2ego(write({"lidar2ego": T.tolist()})), T)
    assert read_lidar2ego(write({"cameras": []})) is None
    with pytest.raises(DataError, match="has no \"lidar2ego\"") as e:
        read_lidar2ego(write({"cameras": []}), required=True)
    assert str(tmp_path / "calib.json") in str(e.value)
    scaled, mirror, far, bottom, nan = T.copy(), T.copy(), T.copy(), T.copy(), T.tolist()
    scaled[:3, :3] *= 1.01
    mirror[:, 1] *= -1
    far[:3, 3] = [0, 150, 0]
    bottom[3] = [0, 0, 1, 1]
    nan[0][0] = float("nan")
    for bad, match in ((scaled, "not a rigid transform"), (mirror, r"determinant -1"),
                       (far, "farther than 100 m"), (bottom, r"last row must be \[0, 0, 0, 1\]"),
                       (nan, "non-finite"), ([[1, 0, 0], [0, 1, 0], [0, 0, 1]], r"shape \(4, 4\)"),
                       ("identity", "not a numeric matrix")):
        with pytest.raises(DataError, match=match) as e:
            read_lidar2ego(write({"lidar2ego": bad.tolist() if isinstance(bad, np.ndarray) else bad}))
        assert "lidar2ego" in str(e.value) and str(tmp_path / "calib.json") in str(e.value)
    with pytest.raises(DataError, match="JSON object"):
        read_lidar2ego(write([1, 2]))


def test_segment_extrinsic_location(tmp_path):
    seg = tmp_path / "seg"
    assert read_segment_lidar2ego(seg) is None                            # nothing: identity
    write_calib(seg / "camera" / "calib.json", (32, 16))
    assert read_segment_lidar2ego(seg) is None                            # camera calib without lidar2ego
    doc = json.loads((seg / "camera" / "calib.json").read_text())
    (seg / "camera" / "calib.json").write_text(json.dumps({**doc, "lidar2ego": rot_z(-90).tolist()}))
    np.testing.assert_allclose(read_segment_lidar2ego(seg), rot_z(-90))
    (seg / "lidar").mkdir()
    (seg / "lidar" / "calib.json").write_text(json.dumps({"lidar2ego": np.eye(4).tolist()}))
    with pytest.raises(DataError, match="belongs there") as e:            # two places: which one holds?
        read_segment_lidar2ego(seg)
    assert e.value.file == str(seg / "lidar" / "calib.json")
    (seg / "camera" / "calib.json").unlink()
    np.testing.assert_allclose(read_segment_lidar2ego(seg), np.eye(4))    # a segment without cameras
    (seg / "lidar" / "calib.json").write_text("{}")
    with pytest.raises(DataError, match="has no \"lidar2ego\""):          # a lidar/calib.json must say it
        read_segment_lidar2ego(seg)


# ----- found by tests/test_reader_properties.py, kept as fixed examples (each was another exception or a
# silent misread) ---------------------------------------------------------------------------------------------------
def _calib_with(**changes) -> bytes:
    cam = {"name": "front", "image_size": [64, 32], "K": [[32, 0, 32], [0, 32, 16], [0, 0, 1]],
           "cam2ego": [[0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1]], **changes}
    return json.dumps({"cameras": [cam]}).encode()


def _bmp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 4)).save(buf, "BMP")
    return buf.getvalue()


FOUND = [
    ("p.pcd", b"FIELDS x y z intensity _\nSIZE 4 4 4 4 1\nTYPE F F F F U\nCOUNT 1 1 1 1 2147483648\nPOINTS 0\n"
              b"DATA binary\n", "malformed PCD header"),                          # was numpy's ValueError
    ("calib.json", _calib_with(K=[[10 ** 400, 0, 1], [0, 1, 1], [0, 0, 1]]), "K is not a numeric matrix"),
    ("calib.json", _calib_with(K=[[True, 0, 1], [0, 1, 1], [0, 0, 1]]), "K must hold numbers only"),
    ("calib.json", _calib_with(K=[["32", 0, 1], [0, 1, 1], [0, 0, 1]]), "K must hold numbers only"),
    ("calib.json", _calib_with(name="frönt"), "name 'frönt' must be"),
    ("calib.json", _calib_with(image_size=[10 ** 30, 32]), "image_size must be"),
    ("calib.json", b'{"cameras": [], "cameras": [1]}', "key(s) ['cameras'] appear more than once"),
    ("i.png", _bmp(), "corrupt or unreadable image: not a PNG or JPEG image"),  # a BMP was decoded
]


@pytest.mark.parametrize("name,body,message", FOUND, ids=[m.split()[0] + str(i) for i, (_, _, m) in enumerate(FOUND)])
def test_found_file_cases(tmp_path, name, body, message):
    path = tmp_path / name
    path.write_bytes(body)
    read = {"p.pcd": lambda: read_points(path), "calib.json": lambda: read_calib(path),
            "i.png": lambda: read_image(path)}[name]
    with pytest.raises(DataError, match=re.escape(message)) as e:
        read()
    assert e.value.file == str(path)


@pytest.mark.parametrize("text,message", [
    ("lidar_filepath,velocity,wheel_angle,velocity\nlidar/0.bin,1,2,3\n", "column(s) ['velocity'] appear more"),
    ("lidar_filepath,velocity,wheel_angle\nlidar/0.bin,1\n", "line 2 has fewer cells than the header"),
    (f"lidar_filepath,velocity,wheel_angle\n{'x' * 5000}.bin,1,2\n", "cannot be read: File name too long"),
])
def test_found_csv_cases(tmp_path, text, message):
    (tmp_path / "train" / "seg" / "meta").mkdir(parents=True)
    (tmp_path / "train" / "seg" / "meta" / "data.csv").write_text(text)
    with pytest.raises(DataError, match=re.escape(message)):
        table = read_segment_table(tmp_path, "train", "seg", lidar=True)
        read_points(table.lidar_paths[0], 4, row=0)


def test_data_file_symlinks_must_stay_inside_the_data_root(tmp_path):
    from tests.fixtures import read_csv_rows, write_tiny_dataset

    root = write_tiny_dataset(tmp_path / "d", splits={"train": 2}, frames=3, camera=False)
    seg0, seg1 = root / "train" / "segment_0000", root / "train" / "segment_0001"
    rel = read_csv_rows(seg0 / "meta" / "data.csv")[1]["lidar_filepath"]
    other = seg1 / read_csv_rows(seg1 / "meta" / "data.csv")[1]["lidar_filepath"]
    (seg0 / rel).unlink()
    (seg0 / rel).symlink_to(other)                        # another segment of the same root: fine
    assert read_segment_table(root, "train", "segment_0000", lidar=True).lidar_paths[1] == seg0 / rel
    outside = tmp_path / "outside"
    outside.mkdir()
    (seg0 / rel).unlink()
    (seg0 / rel).symlink_to(outside / "f.bin")            # a file outside the root, refused like ".."
    with pytest.raises(DataError, match=r"row 1: column 'lidar_filepath' .* leading outside the data root"):
        read_segment_table(root, "train", "segment_0000", lidar=True)
    (seg0 / rel).unlink()
    (seg0 / rel).parent.rename(seg0 / "real_lidar")
    (seg0 / rel).parent.symlink_to(outside)               # a linked folder on the way out
    with pytest.raises(DataError, match=r"row 0: column 'lidar_filepath' .* leading outside the data root"):
        read_segment_table(root, "train", "segment_0000", lidar=True)
