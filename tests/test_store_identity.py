"""Identity as well as integrity (issue 25): a row served is the row written for the key asked for, in its
split's current reservation, at its place, in this store, for the teacher the store records. Property-based
(hypothesis, few derandomized examples): shard permutations within a split, shards copied across splits,
another teacher's or store's rows put in place, HDF5 rows swapped with their checksums recomputed, stale
readers after rm-split + a new export, concurrent appends of different splits, rows permuted inside a shard
with its index checksum recomputed, shards moved together with their tag chunks and flags (light and bev_feat). Then older stores (no identity),
lost or damaged tag chunks, an edited teacher, and the same checks on object storage."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Callable
from pathlib import Path

import google_crc32c
import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from stores import StoreCorruptError, StoreStaleError, create_memorybank, open_memorybank
from stores.__main__ import main
from stores.convert import convert
from stores.index_file import index_files
from stores.verify import verify_path
from tests.store_fixtures import as_vlen_keys, make_keys, rows_for, s3_fs, tiny_prov, tiny_schema, upload_store

S = 8                              # rows per shard of these stores
FEW = settings(max_examples=6, derandomize=True, deadline=None, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])


def _fresh(tmp_path: Path, name: str = "mb.zarr") -> str:
    """A new store path (hypothesis runs a test body several times with one tmp_path)."""
    return os.path.join(tempfile.mkdtemp(dir=tmp_path), name)


def _build(path: str, splits: dict[str, int], sha: str | None = None, bev: bool = False,
           seed: int = 0) -> dict[str, tuple[list[str], dict[str, np.ndarray]]]:
    """A store at ``path`` with the splits ``{name: rows}`` written in full: ``{split: (keys, data)}``."""
    schema = tiny_schema(bev=bev)
    bank = create_memorybank(path, schema, tiny_prov(sha) if sha else tiny_prov(), shard_rows=S)
    out = {}
    for split, n in splits.items():
        keys = make_keys(split, n)
        data = rows_for(schema, keys, seed_base=seed)
        bank.reserve_split(split, keys)
        bank.write_rows(split, 0, data)
        out[split] = (keys, data)
    bank.close()
    return out


def _shard(path: str, i: int) -> Path:
    return Path(path) / "light" / "c" / str(i) / "0" / "0"


def _refused(bank, key: str, where: str) -> StoreCorruptError:
    """The read of ``key`` raises StoreCorruptError naming the key, the file ``where`` and the identity check."""
    with pytest.raises(StoreCorruptError) as e:
        bank.get_batch([key])
    assert e.value.keys == [key] and where in e.value.chunk and "identity" in str(e.value), str(e.value)
    return e.value


def _served(bank, keys: list[str], data: dict[str, np.ndarray], rows: list[int]) -> None:
    out, missing = bank.get_batch([keys[r] for r in rows])
    assert not missing
    for f, v in data.items():
        np.testing.assert_array_equal(out[f], v[rows])


def _identity_problems(path: str) -> list[str]:
    problems, _ = verify_path(path)
    return [p for p in problems if "identity" in p]


# ---------------------------------------------------------------------------------------------- misplaced rows
@FEW
@given(perm=st.permutations(range(4)).filter(lambda p: list(p) != [0, 1, 2, 3]))
def test_shard_permutations_within_a_split_are_refused_and_reported(tmp_path, perm):
    path = _fresh(tmp_path)
    keys, data = _build(path, {"train": 32})["train"]               # 4 shards of 8 rows
    original = [_shard(path, i).read_bytes() for i in range(4)]
    for i, place in enumerate(perm):
        _shard(path, place).write_bytes(original[i])               # shard i's file now lies at ``place``
    moved = sorted(place for i, place in enumerate(perm) if i != place)
    bank = open_memorybank(path)                                   # every file is there: it opens
    for place in range(4):
        if place in moved:
            _refused(bank, keys[place * S + 5], f"light/c/{place}/0/0")
        else:
            _served(bank, keys, data, list(range(place * S, (place + 1) * S)))
    found = _identity_problems(path)                               # verify: one line per moved shard
    assert len(found) == len(moved) and all(any(f"light/c/{p}/0/0" in x for x in found) for p in moved), found
    assert main(["verify", path]) == 1


@FEW
@given(src=st.sampled_from(["train", "valid"]), a=st.integers(0, 2), b=st.integers(0, 2))
def test_a_shard_of_another_split_copied_over_is_refused(tmp_path, src, a, b):
    path = _fresh(tmp_path)
    built = _build(path, {"train": 24, "valid": 24})                # train: shards 0-2, valid: shards 3-5
    first = {"train": 0, "valid": 3}
    dst = "valid" if src == "train" else "train"
    shutil.copyfile(_shard(path, first[src] + a), _shard(path, first[dst] + b))
    keys, data = built[dst]
    bank = open_memorybank(path)
    _refused(bank, keys[b * S + 3], f"light/c/{first[dst] + b}/0/0")
    _served(bank, keys, data, [r for r in range(24) if r // S != b])
    _served(bank, *built[src], list(range(24)))                    # the source split is untouched
    assert any(f"light/c/{first[dst] + b}/0/0" in p for p in _identity_problems(path))


@FEW
@given(what=st.sampled_from(["light", "light+complete", "one shard"]), other=st.sampled_from(["teacher", "store"]),
       bev=st.booleans())
def test_rows_of_another_teacher_or_store_put_in_place_are_refused(tmp_path, what, other, bev):
    path, foreign = _fresh(tmp_path), _fresh(tmp_path, "other.zarr")
    keys, data = _build(path, {"train": 24}, bev=bev)["train"]
    _build(foreign, {"train": 24}, sha="cd" * 32 if other == "teacher" else None, bev=bev, seed=1)  # same keys
    if what == "one shard":
        shutil.copyfile(_shard(foreign, 1), _shard(path, 1))
    else:
        for d in what.split("+"):          # whole directories of the other store (complete: flags and tags)
            shutil.rmtree(Path(path) / d)
            shutil.copytree(Path(foreign) / d, Path(path) / d)
    bank = open_memorybank(path)
    _refused(bank, keys[9], "light/c/1/0/0")
    if what == "one shard":
        _served(bank, keys, data, list(range(8)) + list(range(16, 24)))
    else:
        _refused(bank, keys[0], "light/c/0/0/0")
    assert _identity_problems(path)


@FEW
@given(i=st.integers(0, 23), j=st.integers(0, 23),
       what=st.sampled_from(["actions", "light fields", "every field", "every field and its tag"]))
def test_hdf5_rows_swapped_with_their_checksums_recomputed_are_refused(tmp_path, i, j, what):
    assume(i != j)
    path = _fresh(tmp_path, "mb.h5")
    keys, data = _build(path, {"train": 24})["train"]
    names = {"actions": ["actions"], "light fields": ["actions", "bev_vec", "gru_out"],
             "every field": list(data), "every field and its tag": [*data, "identity"]}[what]
    with h5py.File(path, "r+") as f:
        for n in names:
            d = f[n]
            x, y = d[i], d[j]
            d[i], d[j] = y, x                                      # HDF5 computes the chunks' fletcher32 anew
    bank = open_memorybank(path)
    for r in (i, j):
        with pytest.raises(StoreCorruptError) as e:
            bank.get_batch([keys[r]])
        assert e.value.keys == [keys[r]] and "identity" in str(e.value) and "mb.h5" in str(e.value)
    _served(bank, keys, data, [r for r in range(24) if r not in (i, j)])
    found = _identity_problems(path)
    assert any(keys[i] in p for p in found) and any(keys[j] in p for p in found)


def _rewrite_index(shard: Path, perm: list[int]) -> None:
    """Permute the inner-chunk entries (offset, nbytes) of a shard's index (its last 16·rows + 4 bytes) so that
    row k points at the chunk row ``perm[k]`` had, and recompute the index crc32c: every byte checks out."""
    raw = bytearray(shard.read_bytes())
    n = len(perm)
    index = np.frombuffer(bytes(raw[-(16 * n + 4):-4]), "<u8").reshape(n, 2)[perm]
    body = index.astype("<u8").tobytes()
    raw[-(16 * n + 4):] = body + google_crc32c.value(body).to_bytes(4, "little")
    shard.write_bytes(bytes(raw))


@FEW
@given(perm=st.permutations(range(S)).filter(lambda p: list(p) != list(range(S))), shard=st.integers(0, 2),
       array=st.sampled_from(["light", "bev_feat"]))
def test_rows_permuted_inside_a_shard_with_its_index_checksum_recomputed_are_refused(tmp_path, perm, shard, array):
    path = _fresh(tmp_path)
    keys, data = _build(path, {"train": 24}, bev=True)["train"]
    file = Path(path) / ("light/c" if array == "light" else "bev_feat/bev_feat/c") / str(shard)
    file = next(p for p in sorted(file.rglob("*")) if p.is_file())
    _rewrite_index(file, list(perm))
    moved = [shard * S + k for k in range(S) if perm[k] != k]
    bank = open_memorybank(path)                                   # the shard index passes its crc32c
    where = str(file.relative_to(path))
    for r in moved[:3]:
        with pytest.raises(StoreCorruptError) as e:
            bank.get_batch([keys[r]], fields=["bev_feat"] if array == "bev_feat" else ["actions"])
        assert e.value.keys == [keys[r]] and where in e.value.chunk and "identity" in str(e.value), str(e.value)
    _served(bank, keys, data, [r for r in range(24) if r not in moved])
    found = _identity_problems(path)
    assert any(where in p for p in found) and all(any(keys[r] in p for p in found) for r in moved[:1]), found


@FEW
@given(perm=st.permutations(range(3)).filter(lambda p: list(p) != [0, 1, 2]),
       array=st.sampled_from(["light", "bev_feat"]))
def test_shards_moved_together_with_their_tag_chunks_and_flags_are_refused(tmp_path, perm, array):
    path = _fresh(tmp_path)
    keys, data = _build(path, {"train": 24}, bev=True)["train"]
    base = Path(path) / ("light/c" if array == "light" else "bev_feat/bev_feat/c")
    shards = [next(p for p in sorted((base / str(i)).rglob("*")) if p.is_file()) for i in range(3)]
    tags = [Path(path) / "complete" / "tags" / str(i) for i in range(3)]
    flags = [Path(path) / "complete" / "c" / str(i) for i in range(3)]
    for files in (shards, tags, flags):                            # everything of shard i now lies at perm[i]
        old = [f.read_bytes() for f in files]
        for i, place in enumerate(perm):
            files[place].write_bytes(old[i])
    moved = [place for i, place in enumerate(perm) if i != place]
    bank = open_memorybank(path)
    field = ["bev_feat"] if array == "bev_feat" else ["gru_out"]
    for place in moved:
        with pytest.raises(StoreCorruptError, match="identity") as e:
            bank.get_batch([keys[place * S + 2]], fields=field)
        assert e.value.keys == [keys[place * S + 2]]
    found = _identity_problems(path)
    assert all(any(str(shards[p].relative_to(path)) in x for x in found) for p in moved), found


# ---------------------------------------------------------------------------------------------- generation
@FEW
@given(n_valid=st.integers(1, 40), n_new=st.integers(1, 60), same_name=st.booleans(), stat_blind=st.booleans())
def test_a_reader_of_a_split_removed_and_exported_anew_never_serves_the_new_rows(tmp_path, n_valid, n_new,
                                                                                  same_name, stat_blind):
    path = _fresh(tmp_path)
    built = _build(path, {"train": 16, "valid": n_valid})
    (tkeys, tdata), (vkeys, vdata) = built["train"], built["valid"]
    reader = open_memorybank(path)
    _served(reader, vkeys, vdata, [0])                             # valid's first shard is mapped
    assert main(["rm-split", path, "valid"]) == 0
    new = "valid" if same_name else "test"
    nkeys = make_keys(new, n_new)
    ndata = rows_for(tiny_schema(), nkeys, seed_base=7)
    writer = open_memorybank(path, "r+")
    writer.reserve_split(new, nkeys)                               # into the rows valid freed
    writer.write_rows(new, 0, ndata)
    with pytest.MonkeyPatch.context() as patch:
        if stat_blind:                    # the change falls inside one timestamp tick: the stat sees nothing
            patch.setattr(type(reader), "_attrs_signature", lambda self: "unchanged")
            reader._gen_sig = reader._seen_sig = "unchanged"
        else:                             # the reader compares the signature at most this often
            time.sleep(reader.generation_check_s)
        try:
            out, missing = reader.get_batch(vkeys)
        except StoreStaleError as e:
            assert e.splits == ["valid"] and "'valid' was" in str(e) and "refresh" in str(e)
        else:                             # only the stat-blind reader, and only from shards it had mapped
            assert stat_blind and not missing
            for f, v in vdata.items():    # valid's own rows as they were: never the new split's
                np.testing.assert_array_equal(out[f], v)
        if not stat_blind:
            with pytest.raises(StoreStaleError, match="'valid'"):
                reader.get_batch(vkeys[-1:])
        _served(reader, tkeys, tdata, list(range(16)))             # the other split is still served
    reader.refresh()                                               # sees the store as it is now
    _served(reader, nkeys, ndata, list(range(n_new)))
    if not same_name:
        assert reader.get_batch(vkeys)[1] == vkeys


def _append(path: str, split: str, n: int, barrier) -> None:
    """A process appending split ``split`` of ``n`` rows once both are ready (an export's calls)."""
    schema = tiny_schema()
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=S)
    keys = make_keys(split, n)
    data = rows_for(schema, keys)
    barrier.wait()
    bank.reserve_split(split, keys)
    for a in range(0, n, S):
        bank.write_rows(split, a, {f: v[a:a + S] for f, v in data.items()}, keys=keys[a:a + S])


def _in_threads(fn: Callable[..., None], calls: list[tuple], timeout: float) -> list[BaseException]:
    """Run ``fn(*args)`` for each of ``calls`` in its own thread at once; the exceptions they raised."""
    errors: list[BaseException] = []

    def run(*args: Any) -> None:
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - returned to the caller
            errors.append(e)
    threads = [threading.Thread(target=run, args=a) for a in calls]
    [t.start() for t in threads]
    [t.join(timeout) for t in threads]
    return errors


def _both_appended(path: str, sizes: dict[str, int]) -> None:
    bank = open_memorybank(path)
    spans = sorted(bank.splits.values())
    assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:]))          # disjoint rows
    for split, n in sizes.items():
        keys = make_keys(split, n)
        _served(bank, keys, rows_for(tiny_schema(), keys), list(range(n)))
    assert sorted(index_files(path)) == sorted(bank.splits)                       # no orphan index
    assert verify_path(path)[0] == []


@settings(max_examples=3, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_a=st.integers(1, 30), n_b=st.integers(1, 30))
def test_concurrent_appends_of_different_splits_serialise_and_both_succeed(tmp_path, n_a, n_b):
    path = _fresh(tmp_path)
    tkeys, tdata = _build(path, {"train": 5})["train"]
    reader = open_memorybank(path)                                 # open before the appends, reading throughout
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_append, args=(path, s, n, barrier)) for s, n in (("alpha", n_a), ("beta", n_b))]
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs):
        _served(reader, tkeys, tdata, list(range(5)))              # train is never stale: only appended to
        assert reader.get_batch(make_keys("alpha", 1))[1] in ([], make_keys("alpha", 1))
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    _both_appended(path, {"train": 5, "alpha": n_a, "beta": n_b})
    reader.refresh()                                               # the appended splits, whole
    for split, n in (("alpha", n_a), ("beta", n_b)):
        keys = make_keys(split, n)
        _served(reader, keys, rows_for(tiny_schema(), keys), list(range(n)))


def test_concurrent_appends_from_threads_of_one_process_both_succeed(tmp_path):
    path = _fresh(tmp_path)
    _build(path, {"train": 3})
    barrier = threading.Barrier(2)
    assert _in_threads(lambda split, n: _append(path, split, n, barrier), [("alpha", 21), ("beta", 9)], 120) == []
    _both_appended(path, {"train": 3, "alpha": 21, "beta": 9})


# ---------------------------------------------------------------------------------------------- older stores
def _strip_identity(path: str) -> None:
    """Make ``path`` what a store written before identity tags is: schema_version 4 (keys as vlen strings), no
    ``identity`` attribute, tags or split uid."""
    as_vlen_keys(path, version=4)
    root = Path(path) / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"].pop("identity")
    for v in meta["attributes"]["splits"].values():
        v.pop("uid")
    root.write_text(json.dumps(meta))
    shutil.rmtree(Path(path) / "complete" / "tags")


def test_older_stores_read_unchecked_with_a_verify_notice_and_convert_adds_identity(tmp_path, capsys):
    path = _fresh(tmp_path)
    keys, data = _build(path, {"train": 24})["train"]
    _strip_identity(path)
    bank = open_memorybank(path)
    assert not bank.has_identity
    _served(bank, keys, data, list(range(24)))
    assert main(["verify", path]) == 0
    out = capsys.readouterr().out
    assert "NOTICE" in out and "identity" in out and f"python -m stores convert {path}" in out and "0 problem" in out
    main(["info", path])
    assert "identity: none" in capsys.readouterr().out
    w = open_memorybank(path, "r+")                               # appending keeps the older format whole
    vkeys = make_keys("valid", 5)
    w.reserve_split("valid", vkeys)
    w.write_rows("valid", 0, rows_for(tiny_schema(), vkeys))
    assert not open_memorybank(path).has_identity and main(["verify", path]) == 0
    new = _fresh(tmp_path, "new.zarr")
    convert(path, new)                                            # writes the current format: tags included
    assert open_memorybank(new).has_identity and verify_path(new)[0] == []
    _served(open_memorybank(new), keys, data, list(range(24)))
    original = [_shard(new, i).read_bytes() for i in range(2)]
    _shard(new, 0).write_bytes(original[1])
    _shard(new, 1).write_bytes(original[0])
    _refused(open_memorybank(new), keys[1], "light/c/0/0/0")
    _shard(path, 1).unlink()                                      # a damaged older store: refused, never zeros
    with pytest.raises(StoreCorruptError, match="light/c/1/0/0 is missing"):
        open_memorybank(path)


def test_lost_or_damaged_tags_and_an_edited_teacher_are_refused_and_a_resume_repairs(tmp_path, capsys):
    path = _fresh(tmp_path)
    keys, data = _build(path, {"train": 24})["train"]
    tag = Path(path) / "complete" / "tags"
    (tag / "1").unlink()                                          # the tags of rows [8, 16)
    with pytest.raises(StoreCorruptError, match=r"complete/tags/1 .* is missing"):
        open_memorybank(path)
    w = open_memorybank(path, "r+")
    assert w.incomplete_ranges("train") == [(8, 16)]              # a resume redoes the rows without tags
    w.write_rows("train", 8, {f: v[8:16] for f, v in data.items()})
    assert verify_path(path)[0] == []
    raw = bytearray((tag / "2").read_bytes())
    raw[10] ^= 0x20
    (tag / "2").write_bytes(bytes(raw))                           # a damaged tag chunk
    bank = open_memorybank(path)
    _served(bank, keys, data, list(range(16)))
    with pytest.raises(StoreCorruptError, match=r"identity chunk complete/tags/2 .*crc32c") as e:
        bank.get_batch([keys[20]])
    assert e.value.chunk == "complete/tags/2"
    assert any("complete/tags/2" in p for p in verify_path(path)[0])
    assert open_memorybank(path, "r+").incomplete_ranges("train") == [(16, 24)]
    root = Path(path) / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"]["teacher_sha256"] = "ef" * 32               # the attributes now name another teacher
    root.write_text(json.dumps(meta))
    with pytest.raises(StoreCorruptError, match="teacher recorded in the attributes"):
        open_memorybank(path)
    assert main(["verify", path]) == 1 and "teacher recorded" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- object storage
def test_object_storage_refuses_swapped_shards_and_serialises_concurrent_appends(s3, tmp_path):
    local = _fresh(tmp_path)
    keys, data = _build(local, {"train": 24})["train"]
    url = upload_store(local, "ident.zarr")
    fs = s3_fs()
    a, b = fs.cat("bkt/ident.zarr/light/c/0/0/0"), fs.cat("bkt/ident.zarr/light/c/2/0/0")
    fs.pipe("bkt/ident.zarr/light/c/0/0/0", b)
    fs.pipe("bkt/ident.zarr/light/c/2/0/0", a)
    bank = open_memorybank(url, cache_dir=str(tmp_path / "cache"))
    _refused(bank, keys[17], "light/c/2/0/0")
    _served(bank, keys, data, list(range(8, 16)))
    assert main(["verify", url]) == 1
    fs.pipe("bkt/ident.zarr/light/c/0/0/0", a)
    fs.pipe("bkt/ident.zarr/light/c/2/0/0", b)
    barrier = threading.Barrier(2)

    def run(split: str, n: int) -> None:
        bank = open_memorybank(url, mode="r+")
        ks = make_keys(split, n)
        rows = rows_for(tiny_schema(), ks)
        barrier.wait()
        bank.reserve_split(split, ks)
        bank.write_rows(split, 0, rows)
        bank.close()
    assert _in_threads(run, [("alpha", 11), ("beta", 19)], 180) == []
    back = open_memorybank(url)
    for split, n in (("alpha", 11), ("beta", 19), ("train", 24)):
        ks = make_keys(split, n)
        _served(back, ks, rows_for(tiny_schema(), ks), list(range(n)))
    assert not fs.exists("bkt/ident.zarr/e2r.lock") and main(["verify", url]) == 0


@pytest.mark.parametrize("also", ["", "shards swapped", "valid's shard over train's"])
def test_identity_removed_from_a_current_store_is_refused_not_read_unchecked(tmp_path, also):
    path = _fresh(tmp_path)
    built = _build(path, {"train": 16, "valid": 8})
    root = Path(path) / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"].pop("identity")                        # a downgrade: the store would read unchecked
    root.write_text(json.dumps(meta))
    if also == "shards swapped":
        a, b = _shard(path, 0).read_bytes(), _shard(path, 1).read_bytes()
        _shard(path, 0).write_bytes(b)
        _shard(path, 1).write_bytes(a)
    elif also:
        shutil.copyfile(_shard(path, 2), _shard(path, 0))
    for mode in ("r", "r+"):
        with pytest.raises(StoreCorruptError, match="attribute identity is missing, but every schema_version 5"):
            open_memorybank(path, mode)
    problems, _ = verify_path(path)
    assert any("attribute identity is missing" in p for p in problems), problems
    assert main(["verify", path]) == 1
