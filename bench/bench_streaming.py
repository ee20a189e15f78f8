"""Streaming the same samples from every source side by side: the memorybank on the local disk and on object
storage (a local S3-compatible server: moto's, on 127.0.0.1), a raw float32 memmap (the upper bound of a local
read) and LitData's ``StreamingDataset`` (the streaming anchor; ``pip install torch==2.13.0 -e '.[bench]'``:
keep torch pinned, or litdata's torchvision pulls another torch).

    python bench/bench_streaming.py --n 2000      # N light samples at SPEC sizes (T=5, A=2, D=256, H=640)
    python bench/bench_store.py --streaming       # the same

Writes one float32 store locally, uploads it to a moto server started by the benchmark, writes the same rows
(read back from the store) as a memmap and as a LitData dataset (``litdata.optimize``, one worker), and reads
random batches of 64 through DataLoaders (``--workers`` forked workers, persistent; each epoch timed from its
first batch's arrival):

* cold: one epoch over the N keys from the store URL without a cache (every epoch is like this one: each row's
  inner chunk is fetched, ranged GETs concurrent within a batch), and one from the URL with ``cache_dir``
  (fetched and written into the empty cache);
* warm: the URL with the now warm ``cache_dir``, the local store, the memmap and LitData, over the N keys
  repeated ``--reps`` times per epoch, ``--rounds`` alternating rounds (medians, so that other load on the
  machine hits all alike). LitData shuffles chunk by chunk (its ``shuffle=True``: chunks in random order,
  rows shuffled within the chunks in flight), the others draw fully random batches of 64 keys;

and the local store as ``--kd_targets main`` delivers it (the workers send keys, this process reads the rows
by key ahead of the consumer: `e2r.workflow.targets_ahead`); then in-process ``get_batch`` rows/s of the local
store and of the cached URL. Prints a table and the goals of issue 14: the cached epoch >= 0.8x the local
store's rate (the cold epoch is reported), targets delivered to the loop >= 1.2x the memmap's rate.

moto answers from Python on the same (shared) cores, so the cold rate is a floor set by that server, not by
the reader: a real S3 endpoint serves concurrent ranged GETs at network latency.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_store import LIGHT, MemmapDataset, get_batch_rate, loader_rate, write_store  # noqa: E402
from e2r.data.sampler import EpochBatchSampler  # noqa: E402
from stores import StoreSchema, open_memorybank  # noqa: E402
from stores.remote.local_s3 import moto_s3  # noqa: E402
from e2r.workflow.targets_ahead import TargetsAhead  # noqa: E402
from stores.torch_data import MemoryBankDataset, TeacherRowReader, make_loader  # noqa: E402


def timed_epoch(loader: DataLoader, sampler: EpochBatchSampler | None, epoch: int) -> float:
    """Rows/s of one epoch (timed from its first batch: worker start-up and the first batch not counted)."""
    if sampler is not None:
        sampler.set_epoch(epoch)
    return loader_rate(loader)


def loader(path: str, keys: list[str], B: int, workers: int, **open_kw: object
           ) -> tuple[DataLoader, EpochBatchSampler]:
    sampler = EpochBatchSampler(len(keys), B, shuffle=True, seed=1)
    ds = MemoryBankDataset(path, keys=keys, **open_kw)
    return make_loader(ds, sampler, num_workers=workers, persistent_workers=workers > 0), sampler


def ahead_loader(path: str, keys: list[str], B: int, workers: int) -> tuple[TargetsAhead, EpochBatchSampler]:
    """The rows as ``--kd_targets main`` delivers them: the workers send each batch's keys only, and a thread
    of this process reads the rows by key, ahead of the consumer (`e2r.workflow.targets_ahead`)."""
    sampler = EpochBatchSampler(len(keys), B, shuffle=True, seed=1)
    reader = TeacherRowReader(path, LIGHT)
    ld = make_loader(_Keys(keys), sampler, num_workers=workers, persistent_workers=workers > 0)
    return TargetsAhead(ld, lambda batch: batch.update(reader.read(batch["keys"]))), sampler


def write_memmap(store: str, keys: list[str], path: str) -> tuple[int, int]:
    """The store's light rows of ``keys``, in key order, as one raw float32 (N, row) file; returns its shape."""
    bank = open_memorybank(store)
    parts = []
    for a in range(0, len(keys), 1024):
        rows, missing = bank.get_batch(keys[a:a + 1024], fields=LIGHT)
        assert not missing, missing[:3]
        parts.append(np.concatenate([np.asarray(rows[f], np.float32).reshape(len(rows[f]), -1) for f in LIGHT], 1))
    data = np.concatenate(parts)
    mm = np.memmap(path, dtype="float32", mode="w+", shape=data.shape)
    mm[:] = data
    mm.flush()
    return data.shape


def _litdata_row(i: int, path: str, shape: tuple[int, int], schema: dict[str, int]) -> dict[str, np.ndarray]:
    """Row ``i % N`` of the memmap as LitData sample fields (top level: ``optimize`` pickles it to workers)."""
    row = np.memmap(path, dtype="float32", mode="r", shape=shape)[i % shape[0]]
    T, A, D, H = schema["T"], schema["A"], schema["D"], schema["H"]
    return {"actions": row[:T * A].reshape(T, A).copy(), "bev_vec": row[T * A:T * (A + D)].reshape(T, D).copy(),
            "gru_out": row[T * (A + D):].reshape(T, H).copy()}


def litdata_loader(out: str, mm_path: str, shape: tuple[int, int], rows: int, B: int, workers: int,
                   schema: StoreSchema) -> tuple[DataLoader, float]:
    """Write ``rows`` samples (row i = memmap row i % N) with ``litdata.optimize`` and return a shuffled
    StreamingDataLoader over them and the write rate (rows/s)."""
    import functools

    from litdata import StreamingDataLoader, StreamingDataset, optimize

    dims = {"T": schema.seq_len, "A": schema.action_dim, "D": schema.bev_dim, "H": schema.gru_hidden}
    t0 = time.perf_counter()
    optimize(fn=functools.partial(_litdata_row, path=mm_path, shape=shape, schema=dims), inputs=list(range(rows)),
             output_dir=out, chunk_bytes="64MB", num_workers=1, mode="overwrite")
    rate = rows / (time.perf_counter() - t0)
    ds = StreamingDataset(input_dir=out, shuffle=True, seed=1)
    return StreamingDataLoader(ds, batch_size=B, num_workers=workers), rate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="light samples (default 2000)")
    ap.add_argument("--batch", type=int, default=64, help="keys per batch (default 64)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    ap.add_argument("--reps", type=int, default=5, help="passes over the N keys per cached epoch (default 5)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating cached rounds (default 5)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, deleted)")
    a = ap.parse_args(argv)
    N, B = a.n, a.batch
    tmp = a.dir or tempfile.mkdtemp(prefix="bench_streaming_")
    os.makedirs(tmp, exist_ok=True)
    local, cache, mmp, lit = (os.path.join(tmp, x) for x in ("mb.zarr", "cache", "light_f32.mm", "litdata"))
    for p in (local, cache, lit):
        shutil.rmtree(p, ignore_errors=True)
    schema = StoreSchema(seq_len=5, action_dim=2, bev_dim=256, gru_hidden=640)
    keys = [f"train/seg_{i // 1000:05d}:{i % 1000}" for i in range(N)]
    print(f"writing {N} rows: local store, memmap, LitData ({N * a.reps} rows, --reps {a.reps}) ...", flush=True)
    write_store(local, schema, keys)
    shape = write_memmap(local, keys, mmp)
    try:
        lit_loader, lit_write = litdata_loader(lit, mmp, shape, N * a.reps, B, a.workers, schema)
    except ImportError as e:
        print(f"  LitData rows skipped: {e} (pip install torch==<your torch> -e '.[bench]')")
        lit_loader, lit_write = None, float("nan")
    try:
        with moto_s3("bench") as endpoint:
            print(f"moto S3 server at {endpoint}: upload, cold epochs, then {a.rounds} warm rounds ...", flush=True)
            t0 = time.perf_counter()
            fsspec.filesystem("s3", skip_instance_cache=True).put(local, "bench/mb.zarr", recursive=True)
            upload_s = time.perf_counter() - t0
            url = "s3://bench/mb.zarr"
            t0 = time.perf_counter()
            bank = open_memorybank(url)
            open_s, listed = time.perf_counter() - t0, dict(bank.files.counts)
            cold_plain = timed_epoch(*loader(url, keys, B, a.workers), 0)
            cold_cache = timed_epoch(*loader(url, keys, B, a.workers, cache_dir=cache), 0)
            mm_sampler = EpochBatchSampler(N * a.reps, B, shuffle=True, seed=1)
            mm_ds = MemmapDataset(mmp, shape, "float32")
            loaders = {"local store": loader(local, keys * a.reps, B, a.workers),
                       "local store, read in main": ahead_loader(local, keys * a.reps, B, a.workers),
                       "s3 + cache_dir": loader(url, keys * a.reps, B, a.workers, cache_dir=cache),
                       "memmap f32 (raw)": (make_loader(_Repeated(mm_ds, a.reps), mm_sampler, num_workers=a.workers,
                                                        persistent_workers=a.workers > 0), mm_sampler)}
            if lit_loader is not None:
                loaders["LitData StreamingDataset"] = (lit_loader, None)
            warm: dict[str, list[float]] = {k: [] for k in loaders}
            for r in range(a.rounds + 1):                 # round 0 starts the workers: not counted
                for name, (ld, sampler) in loaders.items():
                    rate = timed_epoch(ld, sampler, r)
                    if r:
                        warm[name].append(rate)
                print(f"  round {r}/{a.rounds}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in warm.items() if v),
                      flush=True)
            gb_local = get_batch_rate(local, keys, B)
            gb_cached = get_batch_rate(url, keys, B, open_kw={"cache_dir": cache})
    finally:
        if a.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    med = {k: float(np.median(v)) for k, v in warm.items()}
    loc, cached = med["local store"], med["s3 + cache_dir"]
    print(f"bench_streaming: N={N} light samples (T=5, A=2, D=256, H=640, float32), batches of {B}, "
          f"DataLoader num_workers={a.workers}, moto S3 server on 127.0.0.1 ({endpoint}), load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"upload {upload_s:.1f} s; open of the URL {open_s * 1000:.0f} ms ({listed['list']} listing, "
          f"{listed['get']} whole-object GETs: metadata, flag chunks, key index); LitData optimize "
          f"{lit_write:.0f} rows/s")
    print(f"{'source':<34}{'rows/s':>10}  {'vs local store':>14}")
    print(f"{'s3, no cache (every epoch)':<34}{cold_plain:>10.0f}  {cold_plain / loc:>13.3f}x")
    print(f"{'s3 + cache_dir, cold epoch':<34}{cold_cache:>10.0f}  {cold_cache / loc:>13.3f}x")
    for name, rate in med.items():
        print(f"{name:<34}{rate:>10.0f}  {rate / loc:>13.2f}x   median of {a.rounds} alternating epochs of "
              f"{N * a.reps} rows")
    print(f"in-process get_batch rows/s: local {gb_local:.0f}, s3 + cache_dir (warm) {gb_cached:.0f} "
          f"({gb_cached / gb_local:.2f}x)")
    ok = cached >= 0.8 * loc
    print(f"  [{'PASS' if ok else 'FAIL'}] cached epoch >= 0.8x the local store's DataLoader rate ({cached:.0f} vs "
          f"{loc:.0f}, {cached / loc:.2f}x); cold epoch {cold_cache:.0f} rows/s ({cold_cache / loc:.3f}x)")
    ahead, mm = med["local store, read in main"], med["memmap f32 (raw)"]
    print(f"  [{'PASS' if ahead >= 1.2 * mm else 'FAIL'}] KD targets delivered to the loop >= 1.2x a float32 memmap "
          f"through the same {a.workers}-worker DataLoader ({ahead:.0f} vs {mm:.0f}, {ahead / mm:.2f}x; "
          f"--kd_targets main: keys from the workers, rows read by key in this process ahead of the consumer)")
    return 0


class _Keys(torch.utils.data.Dataset):
    """Batch-per-fetch dataset of keys only: ``ds[[i, ...]] -> {"keys": [...]}`` (what the workers send when the
    rows are read in the main process)."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, idx: list[int]) -> dict[str, list[str]]:
        return {"keys": [self.keys[int(i)] for i in idx]}


class _Repeated(torch.utils.data.Dataset):
    """Index i -> row i % n of a batch-per-fetch dataset (``--reps`` passes per epoch, like the stores' key lists)."""

    def __init__(self, ds: MemmapDataset, reps: int) -> None:
        self.ds, self.n, self.reps = ds, len(ds), reps

    def __len__(self) -> int:
        return self.n * self.reps

    def __getitem__(self, idx: list[int]) -> torch.Tensor:
        return self.ds[[int(i) % self.n for i in idx]]


if __name__ == "__main__":
    sys.exit(main())
