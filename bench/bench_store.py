"""Benchmark the memorybank against the original npz-per-key cache and a raw np.memmap (the upper bound).

    python bench/bench_store.py                 # N = 20000 light samples at SPEC sizes (T=5, A=2, D=256, H=640)
    python bench/bench_store.py --n 2000 --bev-n 64

For each format: write samples/s, bytes and files on disk, random-batch read samples/s through a
DataLoader (2 workers, batches of 64 shuffled keys; timed after the first batch), and in-process
``get_batch`` samples/s for the store. Then the same for ``bev_feat`` at a pooled size, compressed store vs
an uncompressed memmap. Then the cost of integrity, measured interleaved (alternating rounds, medians, so
that other load on the machine hits both sides alike): write rows/s with and without fsync, and in-process
``get_batch`` rows/s with and without the per-row crc32c check. Prints a table and the goals of issue 5
with PASS/FAIL.

    python bench/bench_store.py --key_index 1e5,1e6,1e7 --dir /tmp/ki    # the key index at scale (issue 14)
    python bench/bench_store.py --write                                   # the write path (issue 14)
    python bench/bench_store.py --streaming [--n 2000]    # local / S3 / memmap / LitData side by side (issue 14)
    python bench/bench_store.py --identity --n 4000 --rounds 9     # the cost of the identity check (issue 25)
    python bench/bench_store.py --against /tmp/before --n 4000 --rounds 9   # this checkout vs another, interleaved

``--against DIR`` (another checkout of this repository, e.g. ``git worktree add /tmp/before <commit>``): each
checkout writes its own SPEC float32 store of N rows, then fresh processes of the two checkouts alternate
(order swapped every round), each measuring in-process ``get_batch`` (1000 batches of 64 random keys) and one
DataLoader epoch (>= 20 000 rows, 2 workers), rows per wall second and per CPU second (main process and
workers; and the workers alone, who read and check the rows); medians, and the median of the per-round ratios
(this / other).

``--identity`` writes one SPEC float32 store of N rows and measures, in alternating rounds with the identity
and generation checks on and off (off = both switched off on the bank class for the measurement: the read
path as before them; medians): in-process ``get_batch`` (1000 batches of 64 random keys a round) rows per
wall second and per CPU second, and a DataLoader epoch (>= 20 000 rows, 2 workers forked after the switch,
batches of 64) rows per wall second, per CPU second of the main process and its workers, and per CPU second of
the workers alone; "paired" is the median over rounds of the cost within a round (on vs off run back to back).

``--write`` measures ``write_rows`` rows/s (fsync on, blocks of one whole shard, as the export writes) at SPEC
sizes (float32 and float16) and at small sizes (T=5, A=2, D=H=8), through zarr-python (``bulk_writes =
False``, the reference path: one inner chunk at a time) and through the bulk shard encoder (the default), in
alternating rounds (medians); then in-process ``get_batch`` rows/s (batches of 64 random keys) on the SPEC
float32 store it wrote.

``--key_index`` writes one store per size (small rows: T=5, A=2, D=H=8; keys ``train/seg_XXXXX:i``, 1000
windows per segment; reused when ``--dir`` already holds it) and measures each in a fresh process: the time
of ``open_memorybank``, the resident memory it added (total, and private = anonymous), ``get_batch`` of 64
random keys: the mean of the first 50 batches after every shard was mapped once ("cold": key index blocks are
checked on first use), then the median of 500 batches after every index block was checked once (what the
first epoch does; "steady"), and the resident memory at the end (mapped shard and index pages included).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from e2r.data.sampler import EpochBatchSampler  # noqa: E402
from stores import Provenance, StoreSchema, create_memorybank, open_memorybank  # noqa: E402
from stores.convert import key_to_filename  # noqa: E402
from stores.torch_data import MemoryBankDataset  # noqa: E402

LIGHT = ("actions", "bev_vec", "gru_out")


def realistic_rows(schema: StoreSchema, start: int, n: int, bev: bool = False) -> dict[str, np.ndarray]:
    """Value distributions like the teacher's: smooth actions (deg, m/s), embedding ~N(0, s_d) with
    per-dimension scales, GRU output = tanh(.) correlated over t, bev_feat = ReLU output (about half zeros)."""
    rng = np.random.default_rng(start)
    T = schema.seq_len
    steer = np.cumsum(rng.normal(0, 1.5, (n, T)), 1) + rng.normal(0, 8, (n, 1))
    speed = np.clip(rng.uniform(5, 25, (n, 1)) + np.cumsum(rng.normal(0, 0.3, (n, T)), 1), 0, None)
    out = {"actions": np.stack([steer, speed], -1)}
    scale = np.random.default_rng(1).uniform(0.2, 2.0, schema.bev_dim)
    base = rng.normal(0, 1, (n, 1, schema.bev_dim))
    out["bev_vec"] = (base + 0.3 * rng.normal(0, 1, (n, T, schema.bev_dim))) * scale
    h = rng.normal(0, 1, (n, 1, schema.gru_hidden)) + 0.5 * np.cumsum(rng.normal(0, 0.5, (n, T, schema.gru_hidden)), 1)
    out["gru_out"] = np.tanh(h)
    if bev:
        C, H, W = schema.bev_feat_shape
        out["bev_feat"] = np.maximum(rng.normal(-0.1, 1, (n, T, C, H, W)).astype(np.float32), 0)
    return {k: v.astype(schema.dtype) for k, v in out.items()}


def dir_usage(path: str) -> tuple[int, int]:
    """(bytes, files) under a path."""
    if os.path.isfile(path):
        return os.path.getsize(path), 1
    b = f = 0
    for root, _, files in os.walk(path):
        for x in files:
            b += os.path.getsize(os.path.join(root, x))
            f += 1
    return b, f


class NpzDataset(Dataset):
    def __init__(self, root: str, keys: list[str]) -> None:
        self.root, self.keys = root, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        with np.load(os.path.join(self.root, key_to_filename(self.keys[i])), allow_pickle=False) as z:
            return {f: torch.from_numpy(z[f].astype(np.float32)) for f in LIGHT}


class MemmapDataset(Dataset):
    """Batch-per-fetch reads of a raw (N, row) memmap, rows sorted for locality like the store does."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype: str) -> None:
        self.path, self.shape, self.dtype, self.mm = path, shape, dtype, None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: list[int]) -> torch.Tensor:
        if self.mm is None:
            self.mm = np.memmap(self.path, dtype=self.dtype, mode="r", shape=self.shape)
        order = np.argsort(idx)
        rows = np.empty((len(idx), *self.shape[1:]), np.float32)
        rows[order] = self.mm[np.asarray(idx)[order]]
        return torch.from_numpy(rows)


def loader_rate(loader: DataLoader) -> float:
    """Samples/s over one epoch, timed from the first batch's arrival (worker start-up excluded)."""
    it = iter(loader)
    next(it)
    t0, n = time.perf_counter(), 0
    for b in it:
        x = b["actions"] if isinstance(b, dict) else b
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def write_store(path: str, schema: StoreSchema, keys: list[str], bev: bool = False, fsync: bool = True) -> float:
    bank = create_memorybank(path, schema, Provenance(teacher_sha256="0" * 64, model_config={"bench": True}),
                             fsync=fsync)
    bank.reserve_split("train", keys)
    step = bank.alignment if not bev else 32
    t = 0.0
    for a in range(0, len(keys), step):
        b = min(a + step, len(keys))
        rows = realistic_rows(schema, a, b - a, bev=bev)
        t0 = time.perf_counter()
        bank.write_rows("train", a, rows)
        t += time.perf_counter() - t0
    bank.close()
    return len(keys) / t



@contextlib.contextmanager
def _scratch(given: str | None, prefix: str) -> Iterator[str]:
    """``given`` (kept), else a fresh temporary directory removed afterwards."""
    tmp = given or tempfile.mkdtemp(prefix=prefix)
    try:
        yield tmp
    finally:
        if not given:
            shutil.rmtree(tmp, ignore_errors=True)

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20000, help="light samples (default 20000)")
    ap.add_argument("--bev-n", type=int, default=128, help="bev_feat samples (default 128)")
    ap.add_argument("--bev-shape", default="384,31,27", help="pooled bev_feat C,H,W (default: full 384x248x216 pooled 8x)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir, removed after)")
    ap.add_argument("--key_index", default=None, help="sizes, e.g. 1e5,1e6,1e7: the key index at scale (only this)")
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)     # internal: one --key_index measurement
    ap.add_argument("--write", action="store_true", help="the write path: zarr-python vs bulk shards (only this)")
    ap.add_argument("--rounds", type=int, default=3, help="--write: alternating rounds per path (default 3)")
    ap.add_argument("--identity", action="store_true", help="the cost of the identity check, on vs off (only this)")
    ap.add_argument("--against", default=None, help="another checkout: read rates of both, interleaved (only this)")
    ap.add_argument("--streaming", action="store_true",
                    help="the store on disk and on a local S3 server, a memmap and LitData, side by side (only this; "
                         "bench/bench_streaming.py, its flags after --)")
    a, rest = ap.parse_known_args()
    if a.streaming:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_streaming.py")
        return subprocess.call([sys.executable, script, *(["--n", str(a.n)] if a.n != 20000 else []),
                                *[x for x in rest if x != "--"]])
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    if a.probe:
        print(json.dumps(key_index_probe(a.probe)))
        return 0
    if a.write:
        with _scratch(a.dir, "bench_write_") as tmp:
            return write_bench(tmp, a.n if a.n != 20000 else 16384, a.rounds, a.batch)
    if a.against:
        with _scratch(a.dir, "bench_against_") as tmp:
            return against_bench(os.path.abspath(a.against), tmp, a.n if a.n != 20000 else 4000, a.rounds, a.batch)
    if a.identity:
        with _scratch(a.dir, "bench_identity_") as tmp:
            return identity_bench(tmp, a.n if a.n != 20000 else 4000, a.rounds, a.batch, a.workers)
    if a.key_index:
        return key_index_bench([int(float(x)) for x in a.key_index.split(",")], a.dir or tempfile.mkdtemp())
    tmp = a.dir or tempfile.mkdtemp(prefix="bench_store_")
    os.makedirs(tmp, exist_ok=True)
    N, B = a.n, a.batch
    keys = [f"train/seg_{i // 1000:04d}:{i % 1000}" for i in range(N)]
    s32 = StoreSchema(seq_len=5, action_dim=2, bev_dim=256, gru_hidden=640, dtype="float32")
    s16 = StoreSchema(seq_len=5, action_dim=2, bev_dim=256, gru_hidden=640, dtype="float16")
    res: dict[str, dict[str, float]] = {}

    # (a) npz per key ------------------------------------------------------------------------------
    npz = os.path.join(tmp, "npz")
    os.makedirs(npz, exist_ok=True)
    t = 0.0
    for x in range(0, N, 1024):
        rows = realistic_rows(s32, x, min(1024, N - x))
        t0 = time.perf_counter()
        for i in range(len(rows["actions"])):
            np.savez_compressed(os.path.join(npz, key_to_filename(keys[x + i])),
                                **{f: rows[f][i] for f in LIGHT}, key=np.array(keys[x + i]))
        t += time.perf_counter() - t0
    res["npz per key (f32)"] = {"write": N / t, "path": npz}
    # (b) stores ----------------------------------------------------------------------------------
    for name, sch in (("store f32", s32), ("store f16", s16)):
        p = os.path.join(tmp, name.replace(" ", "_") + ".zarr")
        res[name] = {"write": write_store(p, sch, keys), "path": p}
    # (c) memmap ----------------------------------------------------------------------------------
    width = 5 * (2 + 256 + 640)
    mmp = os.path.join(tmp, "light_f32.mm")
    mm = np.memmap(mmp, dtype="float32", mode="w+", shape=(N, width))
    t = 0.0
    for x in range(0, N, 1024):
        rows = realistic_rows(s32, x, min(1024, N - x))
        t0 = time.perf_counter()
        mm[x:x + len(rows["actions"])] = np.concatenate([rows[f].reshape(len(rows[f]), -1) for f in LIGHT], 1)
        mm.flush()
        t += time.perf_counter() - t0
    del mm
    res["memmap f32 (raw)"] = {"write": N / t, "path": mmp}

    # DataLoader reads (each worker maps the shard files it reads) -------------------------------------
    res["npz per key (f32)"]["dl"] = loader_rate(DataLoader(NpzDataset(npz, keys), batch_size=B, shuffle=True,
                                                            num_workers=a.workers))
    for name in ("store f32", "store f16"):
        ds = MemoryBankDataset(res[name]["path"], split="train")
        res[name]["dl"] = loader_rate(DataLoader(ds, sampler=EpochBatchSampler(N, B, seed=1), batch_size=None,
                                                 num_workers=a.workers))
    mds = MemmapDataset(mmp, (N, width), "float32")
    res["memmap f32 (raw)"]["dl"] = loader_rate(DataLoader(mds, sampler=EpochBatchSampler(N, B, seed=1),
                                                           batch_size=None, num_workers=a.workers))
    # bev_feat: compressed store vs uncompressed memmap (DataLoader, batches of 8) --------------------
    C, H, W = (int(v) for v in a.bev_shape.split(","))
    sb = StoreSchema(seq_len=5, action_dim=2, bev_dim=256, gru_hidden=640, dtype="float16",
                     bev_feat_shape=(C, H, W), store_bev_feat=True,
                     bev_feat_pool={"kind": "avg", "factor": 8, "source_shape": [384, 248, 216]})
    bkeys = keys[: a.bev_n]
    bp = os.path.join(tmp, "store_bev_f16.zarr")
    bev_write = write_store(bp, sb, bkeys, bev=True)
    bmp = os.path.join(tmp, "bev_f16.mm")
    bmm = np.memmap(bmp, dtype="float16", mode="w+", shape=(len(bkeys), 5, C, H, W))
    for x in range(0, len(bkeys), 32):
        bmm[x:x + 32] = realistic_rows(sb, x, min(32, len(bkeys) - x), bev=True)["bev_feat"]
    bmm.flush()
    del bmm
    BB = 8
    bds = MemoryBankDataset(bp, split="train", fields=("bev_feat",))
    bev_dl = loader_rate_field(DataLoader(bds, sampler=EpochBatchSampler(len(bkeys), BB, seed=2), batch_size=None,
                                          num_workers=a.workers), "bev_feat")
    bmds = MemmapDataset(bmp, (len(bkeys), 5, C, H, W), "float16")
    bev_mm_dl = loader_rate(DataLoader(bmds, sampler=EpochBatchSampler(len(bkeys), BB, seed=2), batch_size=None,
                                       num_workers=a.workers))
    # in-process get_batch ----------------------------------------------------------------------------
    rng = np.random.default_rng(0)
    for name in ("store f32", "store f16"):
        bank = open_memorybank(res[name]["path"])
        bank.get_batch(keys[:B])
        batches = [[keys[i] for i in rng.integers(0, N, B)] for _ in range(max(50, N // B))]
        t0 = time.perf_counter()
        for kb in batches:
            bank.get_batch(kb)
        res[name]["inproc"] = len(batches) * B / (time.perf_counter() - t0)
    for r in res.values():
        r["bytes"], r["files"] = dir_usage(r["path"])
    fsync_on, fsync_off = fsync_cost(tmp, s32, keys)
    crc_on, crc_off = crc_cost(res["store f32"]["path"], keys, B)

    print(f"\nbench_store: N={N} light samples (T=5, A=2, D=256, H=640), batches of {B} random keys, "
          f"DataLoader num_workers={a.workers}")
    print(f"{'format':<20}{'write/s':>10}{'MiB':>10}{'files':>8}{'DL read/s':>12}{'get_batch/s':>13}")
    for name, r in res.items():
        ip = f"{r['inproc']:>13.0f}" if "inproc" in r else f"{'-':>13}"
        print(f"{name:<20}{r['write']:>10.0f}{r['bytes'] / 2**20:>10.1f}{r['files']:>8}{r['dl']:>12.0f}{ip}")
    bsz, bfiles = dir_usage(os.path.join(bp, "bev_feat"))
    msz, _ = dir_usage(bmp)
    print(f"bev_feat ({len(bkeys)} samples of 5x{C}x{H}x{W} f16, batches of {BB}): store write {bev_write:.0f}/s, "
          f"{bsz / 2**20:.1f} MiB in {bfiles} files (raw {msz / 2**20:.1f} MiB); DataLoader read: store "
          f"{bev_dl:.0f}/s vs uncompressed memmap {bev_mm_dl:.0f}/s")
    print(f"integrity (interleaved, medians): write f32 with fsync {fsync_on:.0f} rows/s, without {fsync_off:.0f} "
          f"rows/s ({100 * (1 - fsync_on / fsync_off):+.1f}% cost); get_batch f32 with crc32c check {crc_on:.0f} "
          f"rows/s, without {crc_off:.0f} rows/s ({100 * (1 - crc_on / crc_off):+.1f}% cost)")
    npz_r, mm_r = res["npz per key (f32)"], res["memmap f32 (raw)"]
    best_dl = max(res["store f32"]["dl"], res["store f16"]["dl"])
    goals = [
        (f"DataLoader read >= 1.0x memmap f32 ({best_dl:.0f} vs {mm_r['dl']:.0f})", best_dl >= mm_r["dl"]),
        (f"DataLoader read >= 10x npz ({best_dl:.0f} vs {npz_r['dl']:.0f})", best_dl >= 10 * npz_r["dl"]),
        (f"in-process get_batch >= 40000/s (f32 {res['store f32']['inproc']:.0f}, f16 {res['store f16']['inproc']:.0f})",
         max(res["store f32"]["inproc"], res["store f16"]["inproc"]) >= 40000),
        ("bytes f32 <= npz", res["store f32"]["bytes"] <= npz_r["bytes"]),
        ("bytes f16 <= 0.5x npz", res["store f16"]["bytes"] <= 0.5 * npz_r["bytes"]),
        (f"files <= 1 per 1000 keys (f32 {res['store f32']['files']}, f16 {res['store f16']['files']}, N={N})",
         max(res["store f32"]["files"], res["store f16"]["files"]) <= max(1, N // 1000)),
        (f"bev_feat read >= 0.5x uncompressed ({bev_dl:.0f} vs {bev_mm_dl:.0f})", bev_dl >= 0.5 * bev_mm_dl),
    ]
    for text, ok in goals:
        print(f"  [{'PASS' if ok else 'FAIL'}] {text}")
    if not a.dir:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def fsync_cost(tmp: str, schema: StoreSchema, keys: list[str], rounds: int = 3) -> tuple[float, float]:
    """Write rows/s of the f32 store with and without fsync: two stores written block by block in turn
    (``rounds`` times each, new stores every round), so both see the same load; medians of the rates."""
    rates: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        banks = {f: create_memorybank(os.path.join(tmp, f"fsync_{f}_{r}.zarr"), schema,
                                      Provenance(teacher_sha256="0" * 64), fsync=f) for f in (True, False)}
        t = {True: 0.0, False: 0.0}
        for b in banks.values():
            b.reserve_split("train", keys)
        step = banks[True].alignment
        for a in range(0, len(keys), step):
            rows = realistic_rows(schema, a, min(step, len(keys) - a))
            for f in ((True, False) if (a // step + r) % 2 == 0 else (False, True)):
                t0 = time.perf_counter()
                banks[f].write_rows("train", a, rows)
                t[f] += time.perf_counter() - t0
        for f, b in banks.items():
            rates[f].append(len(keys) / t[f])
            b.close()
            shutil.rmtree(b.path, ignore_errors=True)
    return float(np.median(rates[True])), float(np.median(rates[False]))


def crc_cost(path: str, keys: list[str], B: int, rounds: int = 15) -> tuple[float, float]:
    """In-process get_batch rows/s with and without the per-row crc32c check, alternating rounds of the same
    batches (the check is switched off on a private reader attribute: for this measurement only)."""
    bank = open_memorybank(path)
    rng = np.random.default_rng(3)
    batches = [[keys[i] for i in rng.integers(0, len(keys), B)] for _ in range(100)]
    reader = bank._reader("light")
    bank.get_batch(batches[0])
    rates: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            reader.crc = on
            t0 = time.perf_counter()
            for kb in batches:
                bank.get_batch(kb)
            rates[on].append(len(batches) * B / (time.perf_counter() - t0))
    reader.crc = True
    return float(np.median(rates[True])), float(np.median(rates[False]))


def write_rate(path: str, schema: StoreSchema, blocks: list[dict[str, np.ndarray]], keys: list[str],
               bulk: bool) -> tuple[float, float]:
    """(rows per wall second, rows per CPU second of this process, all threads) of ``write_rows`` of ``blocks``
    (one whole shard each) into a new store at ``path`` (fsync on); ``bulk=False`` writes through zarr-python.
    The CPU rate is what one free core would give (fsync waits excluded): on a loaded machine the wall rate
    measures the load as much as the writer."""
    bank = create_memorybank(path, schema, Provenance(teacher_sha256="0" * 64, model_config={"bench": "write"}))
    bank.bulk_writes = bulk
    bank.reserve_split("train", keys)
    t, c, a = 0.0, 0.0, 0
    for rows in blocks:
        t0, c0 = time.perf_counter(), time.process_time()
        bank.write_rows("train", a, rows)
        t, c = t + time.perf_counter() - t0, c + time.process_time() - c0
        a += len(rows["actions"])
    bank.close()
    return len(keys) / t, len(keys) / c


def get_batch_rate(path: str, keys: list[str], B: int, rounds: int = 5, open_kw: dict | None = None) -> float:
    """In-process ``get_batch`` rows/s, batches of ``B`` random keys (median of ``rounds`` passes);
    ``open_kw``: `open_memorybank`'s object-store arguments."""
    bank = open_memorybank(path, **(open_kw or {}))
    rng = np.random.default_rng(0)
    batches = [[keys[i] for i in rng.integers(0, len(keys), B)] for _ in range(max(50, len(keys) // B))]
    bank.get_batch(batches[0])
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for kb in batches:
            bank.get_batch(kb)
        rates.append(len(batches) * B / (time.perf_counter() - t0))
    return float(np.median(rates))


def write_bench(tmp: str, n_spec: int, rounds: int, B: int) -> int:
    """``--write``: zarr-python vs bulk shard writes, alternating rounds, medians; then get_batch."""
    os.makedirs(tmp, exist_ok=True)
    cases = [("SPEC f32 (T=5, 898 ch)", StoreSchema(seq_len=5, action_dim=2, bev_dim=256, gru_hidden=640), n_spec),
             ("SPEC f16 (T=5, 898 ch)", StoreSchema(seq_len=5, action_dim=2, bev_dim=256, gru_hidden=640,
                                                    dtype="float16"), n_spec),
             ("small f32 (T=5, 18 ch)", StoreSchema(seq_len=5, action_dim=2, bev_dim=8, gru_hidden=8), 2 * n_spec)]
    print(f"write_rows rows/s (fsync on, blocks of one shard, {rounds} alternating rounds, median), scratch {tmp}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'rows':<24}{'n':>8}{'zarr-python':>13}{'bulk':>10}{'bulk/zarr':>11}{'bulk per CPU-s':>16}")
    spec_path = ""
    for ci, (label, schema, n) in enumerate(cases):
        keys = [f"train/seg_{i // 1000:05d}:{i % 1000}" for i in range(n)]
        S = 4096
        blocks = [realistic_rows(schema, a, min(S, n - a)) for a in range(0, n, S)]
        rates: dict[bool, list[float]] = {True: [], False: []}
        cpu: list[float] = []
        for r in range(rounds):
            for bulk in ((False, True) if r % 2 == 0 else (True, False)):
                p = os.path.join(tmp, f"w_{ci}_{r}_{int(bulk)}.zarr")
                wall, per_cpu = write_rate(p, schema, blocks, keys, bulk)
                rates[bulk].append(wall)
                if bulk:
                    cpu.append(per_cpu)
                if bulk and label.startswith("SPEC f32") and not spec_path:
                    spec_path = p
                else:
                    shutil.rmtree(p, ignore_errors=True)
        z, b = float(np.median(rates[False])), float(np.median(rates[True]))
        print(f"{label:<24}{n:>8}{z:>13.0f}{b:>10.0f}{b / z:>10.1f}x{np.median(cpu):>16.0f}", flush=True)
    keys = [f"train/seg_{i // 1000:05d}:{i % 1000}" for i in range(n_spec)]
    print(f"in-process get_batch (SPEC f32, N={n_spec}, batches of {B} random keys, median of 5): "
          f"{get_batch_rate(spec_path, keys, B):.0f} rows/s")
    return 0


def loader_rates(loader: DataLoader) -> tuple[float, float, float]:
    """``(rows per wall second after the first batch, rows per CPU second of this process and its DataLoader
    workers over the whole epoch, rows per CPU second of the workers alone)``: the CPU rates are what free
    cores would give, whatever the load (the workers read and check the rows; the main process receives them)."""
    cpu = lambda who: sum(getattr(resource.getrusage(who), f) for f in ("ru_utime", "ru_stime"))  # noqa: E731
    c0 = cpu(resource.RUSAGE_SELF) + cpu(resource.RUSAGE_CHILDREN)
    w0 = cpu(resource.RUSAGE_CHILDREN)
    it = iter(loader)
    n = next(it)["actions"].shape[0]
    t0, first = time.perf_counter(), n
    for b in it:
        n += b["actions"].shape[0]
    wall = (n - first) / (time.perf_counter() - t0)
    del it                                    # workers exit and are joined: their CPU time is counted
    gc.collect()
    workers = cpu(resource.RUSAGE_CHILDREN) - w0
    return wall, n / (cpu(resource.RUSAGE_SELF) + cpu(resource.RUSAGE_CHILDREN) - c0), n / max(workers, 1e-9)


_PROBE = r"""
import json, os, resource, sys, time
import numpy as np
root, path, n, B, make = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "make"
sys.path[:0] = [root, os.path.join(root, "bench")]
from bench_store import write_store
from e2r.data.sampler import EpochBatchSampler
from stores import StoreSchema, open_memorybank
from stores.torch_data import MemoryBankDataset
from torch.utils.data import DataLoader
keys = [f"train/seg_{i // 1000:04d}:{i % 1000}" for i in range(n)]
if make:
    write_store(path, StoreSchema(seq_len=5, action_dim=2, bev_dim=256, gru_hidden=640), keys)
    sys.exit(0)
cpu = lambda who: sum(getattr(resource.getrusage(who), f) for f in ("ru_utime", "ru_stime"))
bank = open_memorybank(path)
rng = np.random.default_rng(5)
batches = [[keys[i] for i in rng.integers(0, n, B)] for _ in range(1000)]
bank.get_batch(batches[0])
t0, c0 = time.perf_counter(), time.process_time()
for kb in batches:
    bank.get_batch(kb)
gb, gbcpu = len(batches) * B / (time.perf_counter() - t0), len(batches) * B / (time.process_time() - c0)
epoch = [b for s in range(-(-20000 // n)) for b in EpochBatchSampler(n, B, seed=s)]
c0, w0 = cpu(resource.RUSAGE_SELF) + cpu(resource.RUSAGE_CHILDREN), cpu(resource.RUSAGE_CHILDREN)
it = iter(DataLoader(MemoryBankDataset(path, split="train"), sampler=epoch, batch_size=None, num_workers=2))
rows = next(it)["actions"].shape[0]
t0, first = time.perf_counter(), rows
for b in it:
    rows += b["actions"].shape[0]
dl = (rows - first) / (time.perf_counter() - t0)
del it
dlcpu = rows / (cpu(resource.RUSAGE_SELF) + cpu(resource.RUSAGE_CHILDREN) - c0)
dlw = rows / max(cpu(resource.RUSAGE_CHILDREN) - w0, 1e-9)
print(json.dumps({"gb": gb, "gbcpu": gbcpu, "dl": dl, "dlcpu": dlcpu, "dlw": dlw}))
"""


def against_bench(other: str, tmp: str, n: int, rounds: int, B: int) -> int:
    """``--against``: this checkout's and another's read rates, fresh processes alternating (module docstring)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    roots = {"this": here, "other": other}
    os.makedirs(tmp, exist_ok=True)
    paths = {k: os.path.join(tmp, f"{k}.zarr") for k in roots}

    def probe(k: str, make: bool = False) -> dict[str, float]:
        out = subprocess.run([sys.executable, "-c", _PROBE, roots[k], paths[k], str(n), str(B),
                              "make" if make else "read"], capture_output=True, text=True, check=True, cwd=roots[k])
        return json.loads(out.stdout.strip().splitlines()[-1]) if not make else {}
    for k in roots:
        if not os.path.exists(paths[k]):
            probe(k, make=True)
    res: dict[str, list[dict[str, float]]] = {k: [] for k in roots}
    print(f"this checkout {here} vs {other}: SPEC f32 stores of {n} rows, {rounds} rounds, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    for r in range(rounds):
        for k in (("this", "other") if r % 2 == 0 else ("other", "this")):
            res[k].append(probe(k))
    print(f"{'rows/s':<32}{'this':>10}{'other':>10}{'this/other':>12}{'per-round ratio':>17}")
    for key, name in (("gb", "get_batch (wall)"), ("gbcpu", "get_batch (CPU)"), ("dl", "DataLoader, 2 workers (wall)"),
                      ("dlcpu", "DataLoader (CPU)"), ("dlw", "DataLoader (workers' CPU)")):
        a_, b_ = [x.get(key, np.nan) for x in res["this"]], [x.get(key, np.nan) for x in res["other"]]
        ratio = float(np.median([x / y for x, y in zip(a_, b_)]))
        print(f"{name:<32}{np.median(a_):>10.0f}{np.median(b_):>10.0f}{np.median(a_) / np.median(b_):>12.3f}"
              f"{ratio:>17.3f}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


def identity_bench(tmp: str, n: int, rounds: int, B: int, workers: int) -> int:
    """``--identity``: get_batch and DataLoader epochs with the identity check on and off, alternating rounds."""
    os.makedirs(tmp, exist_ok=True)
    keys = [f"train/seg_{i // 1000:04d}:{i % 1000}" for i in range(n)]
    schema = StoreSchema(seq_len=5, action_dim=2, bev_dim=256, gru_hidden=640, dtype="float32")
    path = os.path.join(tmp, "identity_f32.zarr")
    if not os.path.exists(path):
        write_store(path, schema, keys)
    bank = open_memorybank(path)
    assert bank.has_identity, f"{path} has no identity tags (written before them?)"
    rng = np.random.default_rng(5)
    batches = [[keys[i] for i in rng.integers(0, n, B)] for _ in range(1000)]
    epoch = [b for s in range(-(-20000 // n)) for b in EpochBatchSampler(n, B, seed=s)]    # >= 20 000 rows
    bank.get_batch(batches[0])
    cls, checked, generation = type(bank), type(bank)._identity, type(bank)._check_generation
    res: dict[str, dict[bool, list[float]]] = {k: {True: [], False: []}
                                               for k in ("gb", "gbcpu", "dl", "dlcpu", "dlw")}
    print(f"identity cost: SPEC f32 store of {n} rows, batches of {B}, {rounds} alternating rounds, DataLoader "
          f"epochs of {len(epoch) * B} rows, load average {os.getloadavg()[0]:.1f}", flush=True)
    for r in range(rounds):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            if on:                          # the checks as shipped / switched off for this measurement only
                cls._identity, cls._check_generation = checked, generation
            else:                           # no identity tags checked, no generation stat: the code before
                cls._identity, cls._check_generation = (lambda self: None), (lambda self, *a, **k: None)
            t0, c0 = time.perf_counter(), time.process_time()
            for kb in batches:
                bank.get_batch(kb)
            res["gb"][on].append(len(batches) * B / (time.perf_counter() - t0))
            res["gbcpu"][on].append(len(batches) * B / (time.process_time() - c0))
            ds = MemoryBankDataset(path, split="train")            # workers fork now: they inherit the switch
            wall, per_cpu, per_worker = loader_rates(DataLoader(ds, sampler=epoch, batch_size=None,
                                                                num_workers=workers))
            res["dl"][on].append(wall)
            res["dlcpu"][on].append(per_cpu)
            res["dlw"][on].append(per_worker)
    cls._identity, cls._check_generation = checked, generation
    print(f"{'path':<38}{'median: on':>12}{'off':>9}{'cost':>8}{'best: on':>11}{'off':>9}{'cost':>8}"
          f"{'paired':>9}")
    for name, key in (("get_batch rows/s", "gb"), ("get_batch rows per CPU-second", "gbcpu"),
                      (f"DataLoader ({workers} workers) rows/s", "dl"),
                      ("DataLoader rows per CPU-second", "dlcpu"),
                      ("DataLoader rows per worker CPU-second", "dlw")):
        on, off = float(np.median(res[key][True])), float(np.median(res[key][False]))
        bon, boff = max(res[key][True]), max(res[key][False])     # the least disturbed round of each
        paired = float(np.median([1 - x / y for x, y in zip(res[key][True], res[key][False])]))   # same round
        print(f"{name:<38}{on:>12.0f}{off:>9.0f}{100 * (1 - on / off):>7.1f}%{bon:>11.0f}{boff:>9.0f}"
              f"{100 * (1 - bon / boff):>7.1f}%{100 * paired:>8.1f}%")
    for key in res:
        print(f"  {key} rounds, on:  {[round(x) for x in res[key][True]]}\n  {key} rounds, off: "
              f"{[round(x) for x in res[key][False]]}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


def loader_rate_field(loader: DataLoader, field: str) -> float:
    it = iter(loader)
    next(it)
    t0, n = time.perf_counter(), 0
    for b in it:
        n += b[field].shape[0]
    return n / (time.perf_counter() - t0)


def _ki_key(i: int) -> str:
    return f"train/seg_{i // 1000:05d}:{i % 1000}"


def _rss_mib() -> dict[str, float]:
    """VmRSS / RssAnon / RssFile of this process in MiB (/proc/self/status)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                out[name] = int(value.split()[0]) / 1024
    return out


def key_index_store(path: str, n: int) -> float:
    """A store of ``n`` complete small rows (T=5, A=2, D=H=8; row i holds (i % S) % 1000); seconds taken.
    Shard 0 and the last shard are written by ``write_rows``; the full shards between are byte copies of shard
    0 with their completion flags set (zarr-python encoded ~0.5 ms per row: 1e7 rows took 1.5 h; the bulk write
    path, ~25 us per small row, would take ~4 min; the copies keep the stores of earlier runs comparable).
    Every shard is still its own file, mapped and checksummed on its own when read."""
    schema = StoreSchema(seq_len=5, action_dim=2, bev_dim=8, gru_hidden=8)
    t0 = time.perf_counter()
    bank = create_memorybank(path, schema, Provenance(teacher_sha256="0" * 64, model_config={"bench": "key_index"}),
                             fsync=False)
    bank.reserve_split("train", [_ki_key(i) for i in range(n)])
    S = bank.alignment

    def block(a: int, b: int) -> dict[str, np.ndarray]:
        v = ((np.arange(a, b) % S) % 1000).astype(np.float32)[:, None, None]
        return {f: np.broadcast_to(v, (b - a, *schema.row_shape(f))) for f in LIGHT}
    bank.write_rows("train", 0, block(0, min(S, n)))
    full = n // S
    first = os.path.join(path, "light", "c", "0", "0", "0")
    for i in range(1, full):
        os.makedirs(os.path.join(path, "light", "c", str(i), "0"), exist_ok=True)
        shutil.copyfile(first, os.path.join(path, "light", "c", str(i), "0", "0"))
    if full > 1:
        bank._write_complete(S, full * S, True)        # the copied shards' rows (a bench shortcut)
    if n > max(full, 1) * S:
        bank.write_rows("train", full * S, block(full * S, n))
    bank.close()
    return time.perf_counter() - t0


def key_index_probe(path: str, B: int = 64) -> dict[str, float]:
    """Open ``path`` and read random batches in this (fresh) process; checks the values served."""
    gc.collect()
    before = _rss_mib()
    t0 = time.perf_counter()
    bank = open_memorybank(path)
    t_open = time.perf_counter() - t0
    after = _rss_mib()
    n, S = bank.splits["train"][1], bank.alignment
    for a in range(0, n, B * S):                       # map every shard once: what is timed is lookup + decode
        bank.get_batch([_ki_key(i) for i in range(a, min(n, a + B * S), S)])
    rng = np.random.default_rng(0)
    picks = [rng.integers(0, n, B) for _ in range(550)]
    batches = [[_ki_key(int(i)) for i in p] for p in picks]
    times = []
    for i, (p, kb) in enumerate(zip(picks, batches)):
        if i == 50:                                    # every index block checked once, as an epoch does
            for split_index in getattr(bank._index, "splits", {}).values():
                split_index.check_all()
        t0 = time.perf_counter()
        out, missing = bank.get_batch(kb)
        times.append(time.perf_counter() - t0)
        assert not missing and (out["actions"][:, 0, 0] == (p % S) % 1000).all(), "wrong rows served"
    end = _rss_mib()
    return {"n": n, "open_s": t_open, "rss_mib": after["VmRSS"] - before["VmRSS"],
            "anon_mib": after["RssAnon"] - before["RssAnon"], "cold_us": 1e6 * float(np.mean(times[:50])),
            "steady_us": 1e6 * float(np.median(times[50:])), "rss_end_mib": end["VmRSS"] - before["VmRSS"],
            "anon_end_mib": end["RssAnon"] - before["RssAnon"]}


def key_index_bench(sizes: list[int], tmp: str) -> int:
    """``--key_index``: one store per size (reused when present), each measured by ``--probe`` in a new process."""
    os.makedirs(tmp, exist_ok=True)
    print(f"key index: T=5 A=2 D=H=8 float32, get_batch of 64 random keys, scratch {tmp}")
    print(f"{'keys':>10}{'build s':>9}{'open s':>8}{'RSS +MiB':>10}{'anon +MiB':>10}{'cold us':>9}"
          f"{'steady us':>10}{'end RSS/anon +MiB':>19}")
    for n in sizes:
        path = os.path.join(tmp, f"ki_{n}.zarr")
        t_write = key_index_store(path, n) if not os.path.exists(path) else float("nan")
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe", path], capture_output=True,
                           text=True, check=True)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{n:>10}{t_write:>9.0f}{m['open_s']:>8.2f}{m['rss_mib']:>10.1f}{m['anon_mib']:>10.1f}"
              f"{m['cold_us']:>9.0f}{m['steady_us']:>10.0f}{m['rss_end_mib']:>12.0f} /{m['anon_end_mib']:>5.0f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
