"""Crash safety (SIGKILL mid-write, then resume) and concurrent writer processes on shard-aligned ranges."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from stores import create_memorybank, open_memorybank
from tests.store_fixtures import make_keys, rows_for, tiny_prov, tiny_schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 96
SHARD = 16

WRITER = r"""
import sys, time
from stores import create_memorybank
from tests.store_fixtures import rows_for, tiny_prov, tiny_schema
path, a, b, block, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
bank = create_memorybank(path, tiny_schema(bev=True), tiny_prov())
keys = bank.split_keys("train")
todo = [(x, y) for x, y in bank.incomplete_ranges("train") if y > a and x < b]
written = 0
print("ready", flush=True)
for x, y in todo:
    x, y = max(x, a), min(y, b)
    for s in range(x, y, block):
        e = min(s + block, y)
        bank.write_rows("train", s, rows_for(bank.schema, keys[s:e]), keys=keys[s:e])
        written += e - s
        time.sleep(pause)
print("written", written, flush=True)
"""


def _new_store(path: str) -> list[str]:
    bank = create_memorybank(path, tiny_schema(bev=True), tiny_prov(), shard_rows=SHARD)
    keys = make_keys("train", N)
    bank.reserve_split("train", keys)
    return keys


def _writer(path: str, a: int, b: int, block: int, pause: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, path, str(a), str(b), str(block), str(pause)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_content(path: str, keys: list[str], expect_all: bool) -> int:
    bank = open_memorybank(path)
    present = bank.keys("train")
    if expect_all:
        assert present == keys
    out, missing = bank.get_batch(present)
    assert not missing
    ref = rows_for(bank.schema, present)
    for f in bank.schema.fields:
        np.testing.assert_array_equal(out[f], ref[f], err_msg=f"field {f} of a complete row differs")
    return len(present)


def test_sigkill_mid_write_then_resume_redoes_only_incomplete(tmp_path):
    ref_path = str(tmp_path / "ref.zarr")
    keys = _new_store(ref_path)
    p = _writer(ref_path, 0, N, 3)
    assert p.wait(60) == 0, p.stderr.read()
    ref = open_memorybank(ref_path)

    for trial, delay in enumerate([0.15, 0.4]):
        path = str(tmp_path / f"killed{trial}.zarr")
        _new_store(path)
        p = _writer(path, 0, N, 1, pause=0.01)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        done_before = _check_content(path, keys, expect_all=False)   # store reopens; complete rows are right
        incomplete = sum(b - a for a, b in open_memorybank(path, "r+").incomplete_ranges("train"))
        assert done_before + incomplete == N and incomplete > 0, "the kill should land mid-run"
        p = _writer(path, 0, N, 4)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert f"written {incomplete}" in out          # only incomplete rows were redone
        _check_content(path, keys, expect_all=True)
        got, _ = open_memorybank(path).get_batch(keys)
        want, _ = ref.get_batch(keys)
        for f in want:
            np.testing.assert_array_equal(got[f], want[f])


def test_two_concurrent_writers_on_shard_aligned_ranges_lose_nothing(tmp_path):
    path = str(tmp_path / "conc.zarr")
    keys = _new_store(path)
    bank = open_memorybank(path, "r+")
    tasks = bank.task_ranges("train", rows_per_task=N // 2)
    assert tasks == [(0, 48), (48, 96)] and all(a % bank.alignment == 0 for a, _ in tasks)
    # interleave the two halves shard by shard so both processes write at the same time
    procs = [_writer(path, a, b, 2, pause=0.02) for a, b in tasks]
    for p in procs:
        out, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
        assert "written 48" in out
    assert open_memorybank(path, "r+").incomplete_ranges("train") == []
    assert _check_content(path, keys, expect_all=True) == N


# ----- rm-split killed at each step: verify names the leftovers, reindex / the next rm-split / re-export clear them
RM_SPLIT = r"""
import os, signal, sys
import stores.zarr_v3.store as zs
from stores import ZarrMemoryBank, open_memorybank
step = sys.argv[2]
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
if step == "after_entry":
    ZarrMemoryBank._clear_rows = die
elif step == "after_flags":
    zs.drop_files = die
elif step == "after_data":
    real = ZarrMemoryBank._drop_bad_chunks
    ZarrMemoryBank._drop_bad_chunks = lambda self, n, a, b: die() if n == "keys" else real(self, n, a, b)
elif step == "after_keys":
    ZarrMemoryBank._clear_tags = die
elif step == "after_tags":
    ZarrMemoryBank._remove_split_index = die
open_memorybank(sys.argv[1], "r+").remove_split("train")
"""
RM_STEPS = ["after_entry", "after_flags", "after_data", "after_keys", "after_tags"]


def _store_files(path: str) -> list[str]:
    """Chunk, shard, tag and index files of the store (not its metadata)."""
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs
                  if f != "zarr.json")


@pytest.mark.parametrize("remedy", ["reindex", "rm_split", "export_again"])
@pytest.mark.parametrize("step", RM_STEPS)
def test_rm_split_killed_at_each_step_leaves_only_named_leftovers_that_are_cleared(tmp_path, step, remedy):
    from stores.verify import verify_path
    path = str(tmp_path / "mb.zarr")
    schema = tiny_schema(bev=True)
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=8)
    keys = {"train": make_keys("train", 25), "valid": make_keys("valid", 10), "test": make_keys("test", 5)}
    data = {s: rows_for(schema, k) for s, k in keys.items()}
    for s in keys:
        bank.reserve_split(s, keys[s])
        bank.write_rows(s, 0, data[s])
    bank.close()
    clean = _store_files(path)
    r = subprocess.run([sys.executable, "-c", RM_SPLIT, path, step], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr

    problems, _ = verify_path(path)
    assert problems                                            # something is left, and said so ...
    for p in problems:                                         # ... as a leftover of no split, never as damage
        assert re.search(r"belongs? to no split|key index of no split", p) and "reindex" in p, p
    served = open_memorybank(path)                             # the other splits are served as they were
    assert "train" not in served.splits and not served.damage
    for s in ("valid", "test"):
        out, missing = served.get_batch(keys[s])
        assert not missing
        np.testing.assert_array_equal(out["bev_vec"], data[s]["bev_vec"])

    w = open_memorybank(path, "r+")
    if remedy == "reindex":
        w.reindex()
    elif remedy == "rm_split":
        w.remove_split("test")
    else:
        w.reserve_split("train", keys["train"][:12])
        w.write_rows("train", 0, {f: a[:12] for f, a in data["train"].items()})
    assert verify_path(path)[0] == []
    blocks = {0, 1, 2, 3} if remedy != "export_again" else {2, 3}       # rows [0, 16): the new train's
    gone = [f for f in clean if any(f.startswith(p) for b in blocks for p in
                                    (f"light/c/{b}/", f"bev_feat/bev_feat/c/{b}/", f"complete/tags/{b}"))]
    assert len(gone) == 3 * len(blocks)
    files = _store_files(path)
    assert not set(gone) & set(files), sorted(set(gone) & set(files))
    assert ("keys/index/train.idx" in files) == (remedy == "export_again")
    bank = open_memorybank(path)
    out, _ = bank.get_batch(keys["valid"])
    np.testing.assert_array_equal(out["gru_out"], data["valid"]["gru_out"])


# ----- convert killed while it creates the new store or copies rows: the rerun removes what it left, and says so
CONVERT = r"""
import os, signal, sys
import stores.convert as cv
from stores import HDF5MemoryBank, ZarrMemoryBank
src, dst, where = sys.argv[1:4]
cls = HDF5MemoryBank if dst.endswith(".h5") else ZarrMemoryBank
name = "_create_new" if where == "create" else "write_rows"
real = getattr(cls, name)
def die(self, *a, **k):
    real(self, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(cls, name, die)
cv.convert(src, dst)
"""


@pytest.mark.parametrize("where", ["create", "rows"])
@pytest.mark.parametrize("dst_name", ["out.zarr", "out.h5"])
def test_convert_killed_mid_way_then_rerun_removes_its_temporaries_and_says_so(tmp_path, where, dst_name):
    from stores.__main__ import main
    from stores.verify import verify_path
    from tests.store_fixtures import filled
    src = str(tmp_path / "src.zarr")
    _, keys, data = filled(src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = str(out_dir / dst_name)
    r = subprocess.run([sys.executable, "-c", CONVERT, src, dst, where], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = sorted(os.listdir(out_dir))
    assert left and all(".e2r-tmp-" in n for n in left)         # nothing at dst, only temporaries
    assert any(n.startswith("..") for n in left) == (where == "create")   # the creation's own, inside convert's
    proc = subprocess.run([sys.executable, "-m", "stores", "convert", src, dst], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    for n in left:
        assert f"removed {out_dir / n}: the temporary store of a conversion" in proc.stdout, proc.stdout
    assert sorted(os.listdir(out_dir)) == [dst_name]
    assert verify_path(dst)[0] == []
    out, _ = open_memorybank(dst).get_batch(keys)
    np.testing.assert_array_equal(out["gru_out"], data["gru_out"])
    assert main(["convert", src, str(out_dir / "again.zarr")]) == 0   # nothing more to remove
