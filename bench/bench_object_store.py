"""Benchmark the memorybank on object storage (a local S3-compatible server: moto's, on 127.0.0.1) next to the
same store on the local disk.

    python bench/bench_object_store.py --n 2000          # N light samples at SPEC sizes (T=5, A=2, D=256, H=640)

Writes one float32 store locally, uploads it to a moto server started by the benchmark, and reads random
batches of 64 shuffled keys through DataLoaders (``--workers`` forked workers, persistent; each epoch timed
from its first batch's arrival):

* cold: one epoch over the N keys from the store URL without a cache (every epoch is like this one: each row's
  inner chunk is fetched, ranged GETs concurrent within a batch), and one from the URL with ``cache_dir``
  (fetched and written into the empty cache);
* cached: the URL with the now warm ``cache_dir`` against the local store, over the N keys repeated
  ``--reps`` times per epoch, ``--rounds`` alternating rounds (medians, so that other load on the machine hits
  both alike);

then in-process ``get_batch`` rows/s of the local store and of the cached URL. Prints a table and the goal of
issue 14: the cached epoch >= 0.8x the local store's rate (the cold epoch is reported).

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
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.bench_store import get_batch_rate, write_store  # noqa: E402
from e2r.data.sampler import EpochBatchSampler  # noqa: E402
from stores import StoreSchema, open_memorybank  # noqa: E402
from stores.local_s3 import moto_s3  # noqa: E402
from stores.torch_data import MemoryBankDataset, make_loader  # noqa: E402


def timed_epoch(loader: DataLoader, sampler: EpochBatchSampler, epoch: int) -> float:
    """Rows/s of one epoch (timed from its first batch: worker start-up and the first batch not counted)."""
    sampler.set_epoch(epoch)
    it = iter(loader)
    next(it)
    t0, n = time.perf_counter(), 0
    for b in it:
        n += b["actions"].shape[0]
    return n / (time.perf_counter() - t0)


def loader(path: str, keys: list[str], B: int, workers: int, **open_kw: object
           ) -> tuple[DataLoader, EpochBatchSampler]:
    sampler = EpochBatchSampler(len(keys), B, shuffle=True, seed=1)
    ds = MemoryBankDataset(path, keys=keys, **open_kw)
    return make_loader(ds, sampler, num_workers=workers, persistent_workers=workers > 0), sampler


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="light samples (default 2000)")
    ap.add_argument("--batch", type=int, default=64, help="keys per batch (default 64)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    ap.add_argument("--reps", type=int, default=5, help="passes over the N keys per cached epoch (default 5)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating cached rounds (default 5)")
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
    try:
        with moto_s3("bench") as endpoint:
            t0 = time.perf_counter()
            fsspec.filesystem("s3", skip_instance_cache=True).put(local, "bench/mb.zarr", recursive=True)
            upload_s = time.perf_counter() - t0
            url = "s3://bench/mb.zarr"
            t0 = time.perf_counter()
            bank = open_memorybank(url)
            open_s, listed = time.perf_counter() - t0, dict(bank.files.counts)
            cold_plain = timed_epoch(*loader(url, keys, B, a.workers), 0)
            cold_cache = timed_epoch(*loader(url, keys, B, a.workers, cache_dir=cache), 0)
            loaders = {"local store": loader(local, keys * a.reps, B, a.workers),
                       "s3 + cache_dir": loader(url, keys * a.reps, B, a.workers, cache_dir=cache)}
            warm: dict[str, list[float]] = {k: [] for k in loaders}
            for r in range(a.rounds + 1):                 # round 0 starts the workers: not counted
                for name, (ld, sampler) in loaders.items():
                    rate = timed_epoch(ld, sampler, r)
                    if r:
                        warm[name].append(rate)
            gb_local = get_batch_rate(local, keys, B)
            gb_cached = get_batch_rate(url, keys, B, open_kw={"cache_dir": cache})
    finally:
        if a.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    loc, cached = float(np.median(warm["local store"])), float(np.median(warm["s3 + cache_dir"]))
    print(f"bench_object_store: N={N} light samples (T=5, A=2, D=256, H=640, float32), batches of {B} random keys, "
          f"DataLoader num_workers={a.workers} (persistent), moto S3 server on 127.0.0.1 ({endpoint})")
    print(f"upload {upload_s:.1f} s; open of the URL {open_s * 1000:.0f} ms ({listed['list']} listing, "
          f"{listed['get']} whole-object GETs: metadata, flag chunks, key index)")
    print(f"{'configuration':<32}{'rows/s':>10}")
    print(f"{'s3, no cache (every epoch)':<32}{cold_plain:>10.0f}")
    print(f"{'s3 + cache_dir, cold epoch':<32}{cold_cache:>10.0f}")
    print(f"{'s3 + cache_dir, cached epochs':<32}{cached:>10.0f}   median of {a.rounds} (of {N * a.reps} rows each)")
    print(f"{'local store':<32}{loc:>10.0f}   median of {a.rounds}, alternating with the row above")
    print(f"in-process get_batch rows/s: local {gb_local:.0f}, s3 + cache_dir (warm) {gb_cached:.0f} "
          f"({gb_cached / gb_local:.2f}x)")
    ok = cached >= 0.8 * loc
    print(f"  [{'PASS' if ok else 'FAIL'}] cached epoch >= 0.8x the local store's DataLoader rate ({cached:.0f} vs "
          f"{loc:.0f}, {cached / loc:.2f}x); cold epoch {cold_cache:.0f} rows/s ({cold_cache / loc:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
