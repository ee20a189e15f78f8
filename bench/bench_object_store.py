"""Benchmark the memorybank on object storage (a local S3-compatible server: moto's, on 127.0.0.1) next to the
same store on the local disk.

    python bench/bench_object_store.py --n 2000          # N light samples at SPEC sizes (T=5, A=2, D=256, H=640)

Writes one float32 store locally, uploads it to a moto server started by the benchmark, and reads random
batches of 64 shuffled keys through a DataLoader (``--workers`` forked workers, persistent across epochs;
each epoch timed from its first batch) from: the local store; the store URL without a cache (every epoch
fetches every row's inner chunk: ranged GETs, concurrent within a batch); the store URL with ``cache_dir``
(epoch 1 cold: fetched and written to the cache; later epochs read the cache). Then in-process
``get_batch`` rows/s of the local store and of the cached URL (median of 5 passes). Prints a table and the
goal of issue 14: the cached epoch >= 0.8x the local store's rate (the cold epoch is reported).

moto answers from Python on the same (shared) cores, so the cold rate is a floor set by the server, not by
the reader: a real S3 endpoint serves ranged GETs concurrently at network latency.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_store import get_batch_rate, write_store  # noqa: E402
from e2r.data.sampler import EpochBatchSampler  # noqa: E402
from stores import StoreSchema, open_memorybank  # noqa: E402
from stores.local_s3 import moto_s3  # noqa: E402
from stores.torch_data import MemoryBankDataset, make_loader  # noqa: E402


def epoch_rates(path: str, keys: list[str], B: int, workers: int, epochs: int, **open_kw: object) -> list[float]:
    """Rows/s of each epoch of random batches through one DataLoader with persistent workers (each epoch
    timed from its first batch's arrival: worker start-up excluded, the first batch's rows not counted)."""
    ds = MemoryBankDataset(path, keys=keys, **open_kw)
    sampler = EpochBatchSampler(len(keys), B, shuffle=True, seed=1)
    loader = make_loader(ds, sampler, num_workers=workers, persistent_workers=workers > 0)
    out = []
    for e in range(epochs):
        sampler.set_epoch(e)
        it = iter(loader)
        next(it)
        t0, n = time.perf_counter(), 0
        for b in it:
            n += b["actions"].shape[0]
        out.append(n / (time.perf_counter() - t0))
    del loader
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="light samples (default 2000)")
    ap.add_argument("--batch", type=int, default=64, help="keys per batch (default 64)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per configuration (default 3: one cold, two warm)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, deleted)")
    a = ap.parse_args()
    N, B = a.n, a.batch
    tmp = a.dir or tempfile.mkdtemp(prefix="bench_obj_")
    os.makedirs(tmp, exist_ok=True)
    local, cache = os.path.join(tmp, "mb.zarr"), os.path.join(tmp, "cache")
    shutil.rmtree(local, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    schema = StoreSchema(seq_len=5, action_dim=2, bev_dim=256, gru_hidden=640)
    keys = [f"train/seg_{i // 1000:05d}:{i % 1000}" for i in range(N)]
    write_store(local, schema, keys)
    res: dict[str, list[float]] = {}
    try:
        with moto_s3("bench") as endpoint:
            t0 = time.perf_counter()
            fsspec.filesystem("s3", skip_instance_cache=True).put(local, "bench/mb.zarr", recursive=True)
            upload_s = time.perf_counter() - t0
            url = "s3://bench/mb.zarr"
            t0 = time.perf_counter()
            bank = open_memorybank(url)
            open_s, listed = time.perf_counter() - t0, dict(bank.files.counts)
            res["local store"] = epoch_rates(local, keys, B, a.workers, a.epochs)
            res["s3, no cache"] = epoch_rates(url, keys, B, a.workers, min(2, a.epochs))
            res["s3, cache_dir"] = epoch_rates(url, keys, B, a.workers, a.epochs, cache_dir=cache)
            gb_local = get_batch_rate(local, keys, B)
            gb_cached = get_batch_rate_remote(url, keys, B, cache)
    finally:
        if a.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"bench_object_store: N={N} light samples (T=5, A=2, D=256, H=640, float32), batches of {B} random keys, "
          f"DataLoader num_workers={a.workers} (persistent), moto S3 server on 127.0.0.1 ({endpoint})")
    print(f"upload {upload_s:.1f} s; open of the URL {open_s * 1000:.0f} ms ({listed['list']} listing, "
          f"{listed['get']} whole-object GETs: metadata, flag chunks, key index)")
    print(f"{'configuration':<16}{'epoch 1 rows/s':>16}{'later epochs rows/s (best)':>28}")
    for name, r in res.items():
        later = f"{max(r[1:]):.0f}" if len(r) > 1 else "-"
        print(f"{name:<16}{r[0]:>16.0f}{later:>28}")
    print(f"in-process get_batch rows/s: local {gb_local:.0f}, s3 + cache_dir (warm) {gb_cached:.0f} "
          f"({gb_cached / gb_local:.2f}x)")
    cached, loc = max(res["s3, cache_dir"][1:]), max(res["local store"][1:])
    ok = cached >= 0.8 * loc
    print(f"  [{'PASS' if ok else 'FAIL'}] cached epoch >= 0.8x the local store's DataLoader rate ({cached:.0f} vs "
          f"{loc:.0f}, {cached / loc:.2f}x); cold epoch {res['s3, cache_dir'][0]:.0f} rows/s "
          f"({res['s3, cache_dir'][0] / loc:.3f}x)")
    return 0


def get_batch_rate_remote(url: str, keys: list[str], B: int, cache: str) -> float:
    """`get_batch_rate` of the store URL read through the warm cache ``cache`` (filled by a pass first)."""
    bank = open_memorybank(url, cache_dir=cache)
    for i in range(0, len(keys), 512):
        bank.get_batch(keys[i:i + 512])
    return get_batch_rate(url, keys, B, open_kw={"cache_dir": cache})


if __name__ == "__main__":
    sys.exit(main())
