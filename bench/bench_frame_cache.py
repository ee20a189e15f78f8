"""Reading a camera split's windows with and without the frame cache (e2r/data/frame_cache.py).

    python bench/bench_frame_cache.py --data_root DATA [--segments segment_0000 ...] [--image_size 128x64]

Builds ``CameraSequenceDataset`` of the train split (seq_len 5, stride 1) with ``image_cache_mb`` 0 and 512,
reads every window once (``ds[i]``: decode, resize, stack), twice each in turn, and prints windows per CPU
second and the cache's size. Run with ``OMP_NUM_THREADS=1`` for the per-core figure.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from e2r.cli_config import image_size  # noqa: E402
from e2r.data.datasets import CameraSequenceDataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_root", required=True, help="dataset root (pipelines.make_dataset)")
    ap.add_argument("--segments", nargs="+", default=None, help="train segments (default: all with a camera)")
    ap.add_argument("--image_size", type=image_size, default=(128, 64), help="WxH read (default 128x64, tiny)")
    a = ap.parse_args(argv)
    for mb in (0, 512, 0, 512):
        ds = CameraSequenceDataset(a.data_root, "train", 5, 1, a.image_size, segments=a.segments, image_cache_mb=mb)
        t0, w0 = time.process_time(), time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        cpu = time.process_time() - t0
        print(f"image_cache_mb {mb:>3}: {len(ds)} windows in {cpu:.1f} CPU-s ({time.perf_counter() - w0:.1f} s wall): "
              f"{len(ds) / cpu:.0f} windows per CPU-s; cache holds {ds.frame_cache.nbytes / 2 ** 20:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
