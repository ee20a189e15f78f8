"""The retrieval index inside a memorybank (`stores.retrieval`): exact search = brute force, self-segment
exclusion, append, checksums (a flipped byte is refused naming the file), faiss recall, the CLI."""
from __future__ import annotations

import pickle
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from stores.keys import SampleKey, parse_key
from stores import StoreCorruptError, create_memorybank, open_memorybank
from stores.retrieval import RetrievalIndex, append_index, build_index, verify_indexes
from pipelines.retrieval_index import main
from stores.retrieval.layout import faiss_module
from tests.store_fixtures import tiny_prov, tiny_schema

D, SEGS, FRAMES = 32, 40, 50


def _keys(split: str, segs: range) -> list[str]:
    return [f"{split}/seg_{s:03d}:{t}" for s in segs for t in range(FRAMES)]


def _trajectories(n_segs: int, seed: int) -> np.ndarray:
    """(n_segs * FRAMES, D): per segment a slow random walk, so a frame's nearest rows are its own neighbours."""
    rng = np.random.default_rng(seed)
    start = rng.standard_normal((n_segs, 1, D))
    return (start + 0.08 * np.cumsum(rng.standard_normal((n_segs, FRAMES, D)), 1)).reshape(-1, D).astype(np.float32)


def _make_store(path: str, splits: dict[str, list[str]]) -> str:
    schema = tiny_schema()
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=1024)
    for split, keys in splits.items():
        bank.reserve_split(split, keys)
        bank.write_rows(split, 0, {f: np.zeros((len(keys),) + schema.row_shape(f), schema.dtype) for f in schema.fields})
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A store of 2000 train keys (40 segments x 50 frames) and 200 valid keys; seq_len 3."""
    return _make_store(str(tmp_path_factory.mktemp("retr") / "mb.zarr"),
                       {"train": _keys("train", range(SEGS)), "valid": _keys("valid", range(100, 104))})


def _brute(index: RetrievalIndex, q: np.ndarray, k: int, exclude=None, T: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top k by numpy over every stored row, excluded rows masked."""
    allkeys = index.keys_of(np.arange(len(index)))
    sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ index.vectors(np.arange(len(index))).T
    if exclude is not None:
        parsed = [parse_key(k) for k in allkeys]
        for b, e in enumerate(exclude):
            e = parse_key(e)
            sims[b, [i for i, p in enumerate(parsed) if p.segment == e.segment and abs(p.start - e.start) <= T]] = -np.inf
    order = np.argsort(-sims, 1, kind="stable")[:, :k]
    return allkeys[order], np.take_along_axis(sims, order, 1)


def test_exact_search_equals_brute_force(store):
    keys = _keys("train", range(SEGS))
    X = np.random.default_rng(1).standard_normal((len(keys), D)).astype(np.float32)
    index = build_index(store, "exact_bf", X, keys, chunk_rows=256)        # 8 chunks, the last one partial
    assert len(index) == 2000 and index.dim == D and index.kind == "exact" and index.exclude_frames == 3
    np.testing.assert_allclose(index.vectors(np.arange(5)), X[:5] / np.linalg.norm(X[:5], axis=1, keepdims=True),
                               atol=1e-3)
    q = np.random.default_rng(2).standard_normal((7, D)).astype(np.float32)
    got_k, got_s = index.retrieve(torch.from_numpy(q), 10)
    want_k, want_s = _brute(index, q, 10)
    assert got_k.shape == (7, 10) and got_s.dtype == np.float32
    assert (got_k == want_k).all()
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)
    assert (np.diff(got_s, axis=1) <= 0).all()
    k_all, s_all = index.retrieve(q[:1], 2005)                            # more than N: padded
    assert (k_all[0, -5:] == "").all() and np.isneginf(s_all[0, -5:]).all() and len(set(k_all[0, :2000])) == 2000
    with pytest.raises(ValueError, match=r"\(B, 32\)"):
        index.retrieve(q[:, :16], 3)
    with pytest.raises(ValueError, match="zero"):
        index.retrieve(np.zeros((1, D)), 3)


@pytest.mark.parametrize("kind", ["exact", "faiss-ivf"])
def test_self_segment_exclusion(store, kind):
    keys = _keys("train", range(SEGS))
    index = build_index(store, f"excl_{kind}", _trajectories(SEGS, 3), keys, kind=kind, chunk_rows=256)
    qi = np.array([0, 25, 49, 777, 1999])
    q, qkeys = index.vectors(qi), [keys[i] for i in qi]
    own, _ = index.retrieve(q, 8)
    assert all(parse_key(k).segment == parse_key(qk).segment for qk, row in zip(qkeys, own) for k in row[:3])
    for T in (3, 10):
        got, sims = index.retrieve(q, 8, exclude=qkeys, exclude_frames=T)
        for qk, row in zip(qkeys, got):
            p = parse_key(qk)
            assert all(not (parse_key(k).segment == p.segment and abs(parse_key(k).start - p.start) <= T) for k in row)
        if kind == "exact":
            want, want_s = _brute(index, q, 8, qkeys, T)
            assert (got == want).all()
            np.testing.assert_allclose(sims, want_s, atol=1e-5)
        else:                                      # over-fetch k + 2T + 1: always k results
            assert (got != "").all() and np.isfinite(sims).all()
    # the other forms of an exclusion: SampleKey, (segment, start), None; a key of another split, same segment
    forms = [parse_key(qkeys[0]), (parse_key(qkeys[1]).segment, 25), None, "valid/seg_000:49", qkeys[4]]
    got, _ = index.retrieve(q, 8, exclude=forms)
    ref, _ = index.retrieve(q, 8, exclude=[qkeys[0], qkeys[1], None, qkeys[2], qkeys[4]])
    assert (got == ref).all() and isinstance(forms[0], SampleKey)
    with pytest.raises(ValueError, match="2 entries for 5 queries"):
        index.retrieve(q, 8, exclude=qkeys[:2])


def test_append_extends_the_index(store):
    train, valid = _keys("train", range(SEGS)), _keys("valid", range(100, 104))
    X = _trajectories(SEGS + 4, 4)
    whole = build_index(store, "whole", X, train + valid)
    for kind in ("exact", "faiss-hnsw"):
        name = f"app_{kind}"
        first = build_index(store, name, X[:2000], train, kind=kind, fsync=False)
        index = append_index(store, name, torch.from_numpy(X[2000:]), valid, fsync=kind == "exact")
        assert len(first) == 2000 and len(index) == 2200 and [p["rows"] for p in index.attrs["parts"]] == [2000, 200]
        assert index.row_of("valid/seg_101:7") == 2000 + 57 and first.row_of("valid/seg_101:7") is None
        q, excl = X[[5, 2100, 2150]], ["train/seg_000:5", None, "valid/seg_103:0"]
        got, sims = index.retrieve(q, 6, exclude=excl, exact=True)
        want, want_s = whole.retrieve(q, 6, exclude=excl)
        assert (got == want).all()
        np.testing.assert_allclose(sims, want_s, atol=1e-6)
        assert index.retrieve(q, 1)[0][1, 0] == "valid/seg_102:0"         # an appended row, found by faiss too
        if kind != "exact":
            nodes = sorted(p.name for p in index.dir.iterdir() if p.name.startswith("faiss_"))
            assert nodes == ["faiss_00001"] and index.attrs["faiss"]["node"] == "faiss_00001"
        with pytest.raises(ValueError, match="indexed already"):
            append_index(store, name, X[2000:2001], valid[:1])
    with pytest.raises(ValueError, match="no complete row"):
        append_index(store, "whole", X[:1], ["train/absent:0"])
    with pytest.raises(FileExistsError, match="--replace"):
        build_index(store, "whole", X[:10], train[:10])
    assert len(build_index(store, "whole", X[:10], train[:10], replace=True)) == 10


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset % len(raw)] ^= 0x10
    path.write_bytes(bytes(raw))


def test_a_flipped_byte_is_refused_naming_the_file(tmp_path, capsys):
    keys = _keys("train", range(12))
    store = _make_store(str(tmp_path / "mb.zarr"), {"train": keys})
    X = _trajectories(12, 5)
    targets = ["part_00000/vectors/c/3/0", "part_00000/start/c/4", "part_00000/segments/c/0/0", "zarr.json",
               "part_00000/vectors/zarr.json", "faiss_00000/c/0"]
    for i, rel in enumerate(targets):
        name = f"flip{i}"
        index = build_index(store, name, X, keys, kind="faiss-ivf", chunk_rows=128, fsync=False)
        before = index.retrieve(X[:4], 5)
        _flip(index.dir / rel, 300 + 7 * i)
        problems = verify_indexes(store)
        assert len(problems) == 1 and rel in problems[0], problems
        with pytest.raises(StoreCorruptError, match=str(index.dir / rel)):
            again = RetrievalIndex.open(store, name)
            again.retrieve(X[:4], 5, exact=True)
            again.retrieve(X[:4], 5)
            again.keys_of(np.arange(len(again)))
        assert main(["verify", "--store", store]) == 1 and rel in capsys.readouterr().out
        again = build_index(store, name, X, keys, kind="faiss-ivf", replace=True, fsync=False)    # repaired
        assert (again.retrieve(X[:4], 5)[0] == before[0]).all()
    assert verify_indexes(store) == [] and verify_indexes(store, keys) == []
    assert "1 indexed keys have no complete row" in verify_indexes(store, keys[1:])[0]


def _mixture(n: int, seed: int, k: int = 64, rank: int = 6) -> np.ndarray:
    """Clustered rows: a Gaussian mixture of k components, each low rank plus a little isotropic noise."""
    rng = np.random.default_rng(0)
    centres, bases = rng.standard_normal((k, D)), rng.standard_normal((k, rank, D)) * 0.4
    r = np.random.default_rng(seed)
    c = r.integers(0, k, n)
    return (centres[c] + np.einsum("nr,nrd->nd", r.standard_normal((n, rank)), bases[c])
            + 0.05 * r.standard_normal((n, D))).astype(np.float32)


def _check_recall(index, q: np.ndarray, label: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Assert recall@8 >= 0.95 of ``index``'s search against its exact one, and that the neighbours both found
    carry the exact similarity (candidates re-scored exactly); returns (approximate similarities, exact
    neighbours, recall)."""
    approx, sims = index.retrieve(q, 8)
    exact, exact_s = index.retrieve(q, 8, exact=True)
    recall = np.mean([len(set(a) & set(e)) / 8 for a, e in zip(approx, exact)])
    assert recall >= 0.95, f"{label} recall@8 {recall:.3f}"
    same = approx == exact
    np.testing.assert_allclose(sims[same], exact_s[same], atol=1e-6)
    return sims, exact, float(recall)


@pytest.mark.parametrize("kind", ["faiss-ivf", "faiss-hnsw"])
def test_faiss_recall_on_clustered_data(store, kind):
    keys = _keys("train", range(SEGS))
    index = build_index(store, f"recall_{kind}", _mixture(len(keys), 6), keys, kind=kind)
    q = _mixture(200, 7)
    _check_recall(index, q, kind)
    assert index.retrieve(q, 8, nprobe=1, ef_search=8)[0].shape == (200, 8)
    with pytest.raises(ValueError, match="does not apply to"):
        build_index(store, "wrong", q, keys[:200], kind=kind, nprobe=4, ef_search=8)


@pytest.mark.parametrize("codec,coarse", [("SQ8", "flat"), ("PQ8x4fsr", "PQ16x4fs"), ("PQ16x4fsr", "HNSW16"),
                                          ("SQ8", "PQ16x4fs")])
def test_ivf_codes_and_coarse_quantizers(store, codec, coarse):
    """Every IVF variant (codes in the lists x coarse quantizer) finds the exact neighbours after the re-score,
    records its parameters, honours exclusions, and a fast coarse quantizer picks the lists a flat one would."""
    keys = _keys("train", range(SEGS))
    X = _mixture(len(keys), 6)
    index = build_index(store, f"ivf_{codec}_{coarse}", X, keys, kind="faiss-ivf", nlist=64, nprobe=12, codec=codec,
                        coarse=coarse, candidates=64, fsync=False)
    f = index.attrs["faiss"]
    assert (f["codec"], f["coarse"], f["nlist"], f["candidates"]) == (codec, coarse, 64, 64)
    faiss = faiss_module()
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index._faiss_index()).quantizer)
    want = {"flat": "IndexFlat", "PQ16x4fs": "IndexRefineFlat", "HNSW16": "IndexHNSWFlat"}[coarse]
    assert type(quantizer).__name__.startswith(want), type(quantizer).__name__
    q = _mixture(200, 7)
    sims, exact, recall = _check_recall(index, q, f"{codec}/{coarse}")
    assert (np.diff(sims, axis=1) <= 0).all()
    few, _ = index.retrieve(q, 8, candidates=16, nprobe=1)              # overrides: fewer candidates, one list
    assert few.shape == (200, 8) and np.mean([len(set(a) & set(e)) / 8 for a, e in zip(few, exact)]) < recall
    own = np.array([3, 777, 1500])
    got, s = index.retrieve(index.vectors(own), 8, exclude=[keys[i] for i in own], exclude_frames=10)
    for i, row in zip(own, got):
        p = parse_key(keys[i])
        assert all(not (parse_key(k).segment == p.segment and abs(parse_key(k).start - p.start) <= 10) for k in row)
    assert (got != "").all() and np.isfinite(s).all()


def test_ivf_defaults_and_bad_parameters(store):
    from stores.retrieval.faiss_index import faiss_params
    big = faiss_params("faiss-ivf", 10**6, dim=256)
    assert (big["nlist"], big["codec"], big["coarse"]) == (4096, "PQ64x4fsr", "PQ128x4fs")
    assert faiss_params("faiss-ivf", 2000, dim=32)["coarse"] == "flat"               # few lists: flat is cheap
    assert faiss_params("faiss-ivf", 2000, dim=6)["codec"] == "SQ8"                  # no 4-dim sub-vectors
    assert faiss_params("faiss-ivf", 10**6, {"codec": "SQ8"}, dim=256)["candidates"] == 0   # accurate codes: 2 k
    assert big["candidates"] == 96 and faiss_params("faiss-ivf", 10**6, {"candidates": 64}, dim=256)["candidates"] == 64
    keys = _keys("train", range(SEGS))
    with pytest.raises(ValueError, match="coarse must be"):
        build_index(store, "bad", _mixture(len(keys), 1), keys, kind="faiss-ivf", coarse="IVF8")
    with pytest.raises(ValueError, match="do not divide"):
        build_index(store, "bad", _mixture(len(keys), 1), keys, kind="faiss-ivf", nlist=16, coarse="PQ5x4fs")


def test_missing_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)
    with pytest.raises(ImportError, match=r"e2r-kd\[retrieval\]"):
        faiss_module()


def test_open_is_cheap_fork_safe_and_zarr_readable(store):
    keys = _keys("train", range(SEGS))
    X = _trajectories(SEGS, 8)
    build_index(store, "cheap", X, keys, kind="faiss-ivf", chunk_rows=256)
    threads = threading.active_count()
    index = RetrievalIndex.open(store, "cheap")
    assert threading.active_count() == threads and not index._parts[0]["vectors"]._maps and index._faiss is None
    ref = index.retrieve(X[:3], 4)
    clone = pickle.loads(pickle.dumps(index))
    assert len(pickle.dumps(index)) < 20000 and clone._faiss is None and not clone._parts[0]["vectors"]._maps
    assert (clone.retrieve(X[:3], 4)[0] == ref[0]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # zarr warns about anything not a Zarr node
        members = dict(zarr.open_group(store, mode="r")["retrieval"].members(max_depth=None))
        assert "cheap/part_00000/vectors" in members
        stored = zarr.open_array(store + "/retrieval/cheap/part_00000/vectors", mode="r")[:]
    np.testing.assert_array_equal(stored.astype(np.float32), index.vectors(np.arange(len(index))))
    assert len(open_memorybank(store)) == 2200


def test_cli_build_query_and_errors(store, tmp_path, capsys):
    keys = _keys("train", range(SEGS))
    np.save(tmp_path / "v.npy", _trajectories(SEGS, 9))
    (tmp_path / "k.txt").write_text("\n".join(keys) + "\n")
    assert main(["build", "--store", store, "--name", "cli", "--vectors", str(tmp_path / "v.npy"), "--keys",
                 str(tmp_path / "k.txt"), "--kind", "faiss-ivf", "--nprobe", "4"]) == 0
    assert "retrieval index 'cli' (from " in (out := capsys.readouterr().out) and "faiss-ivf): built, 2000 rows of " \
        "dimension 32" in out
    assert main(["query", "--store", store, "--key", "train/seg_007:20", "--name", "cli", "--k", "5"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 6 and "5 neighbours" in out[-1] and "seg_007 within +-3 frames excluded" in out[-1]
    for line in out[:5]:
        k = parse_key(line.split()[-1])
        assert not (k.segment == "seg_007" and abs(k.start - 20) <= 3)
    np.save(tmp_path / "bad.npy", np.zeros((3, 4)))
    (tmp_path / "bad.txt").write_text("train/seg_000:0\n\ntrain/seg_000:1\n")
    build, query = ["build", "--store", store, "--vectors"], ["query", "--store", store, "--key"]
    for argv, msg in [([*build, str(tmp_path / "none.npy"), "--name", "x"], "none.npy"),
                      ([*build, str(tmp_path / "v.npy"), "--name", "x", "--keys", str(tmp_path / "bad.txt")],
                       "bad.txt: line 2 is empty"),
                      ([*build, str(tmp_path / "bad.npy"), "--name", "x"], "bad.npy"),
                      ([*build, str(tmp_path / "v.npy"), "--name", "cli"], "exists"),
                      ([*query, "train/seg_999:0", "--name", "cli"], "'train/seg_999:0' is not in"),
                      ([*query, "train/seg_000:0", "--name", "nope"], "no retrieval index 'nope'")]:
        assert main(argv) == 1, argv
        assert msg in capsys.readouterr().err, (argv, msg)
