"""Benchmark the export: the original's method vs ours, same dataset and teacher, on the CPU.

    python bench/bench_export.py                           # tiny and full presets, modest sizes
    python bench/bench_export.py --presets full --frames 120 --naive_windows 10 --points 60000

Original: one ``forward(return_aux=True)`` per batch of windows (every frame re-encoded in each of the up to
T windows it belongs to) and one ``np.savez_compressed`` file per key. Ours: ``e2r.workflow.export.export_rows``
(frames read + voxelised in DataLoader workers, each frame encoded once, GRU per window, Zarr store).
Prints windows/s for both and their ratio, and the share of our export's wall time not spent in the
teacher's forward pass (reading, voxelising in the loader, window assembly, store writes), against the goals
of issue 6 (>= 4x at seq_len 5 with the full preset; overhead <= 15%). The original is timed on its first
``--naive_windows`` windows (its cost per window does not depend on how many there are).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from e2r.checkpoints import file_sha256, save_checkpoint  # noqa: E402
from e2r.data.datasets import LidarSequenceDataset, collate_lidar  # noqa: E402
from e2r.workflow.export import ExportOptions, export_rows, load_context  # noqa: E402
from e2r.models.config import TeacherConfig  # noqa: E402
from e2r.models.teacher import LiDARBEVTeacher, load_teacher  # noqa: E402
from stores import Provenance, StoreSchema, create_memorybank, open_memorybank  # noqa: E402
from e2r.sim.tiny import write_tiny_dataset  # noqa: E402


def make_world(work: Path, preset: str, frames: int, segments: int, points: int) -> tuple[Path, Path]:
    data = write_tiny_dataset(work / "data", {"train": segments}, frames=frames, camera=False,
                              points_per_frame=(points, points + 1))
    torch.manual_seed(0)
    cfg = TeacherConfig.preset_named(preset)
    ckpt = save_checkpoint(work / "teacher.pt", {"model": LiDARBEVTeacher(cfg).state_dict(),
                                                 "config": cfg.to_dict()}, kind="teacher")
    return data, ckpt


def run_original(data: Path, ckpt: Path, out: Path, seq_len: int, n_windows: int, batch: int) -> tuple[int, float]:
    """One forward per batch of windows + one np.savez_compressed per key; returns (windows, seconds)."""
    model, _ = load_teacher(ckpt)
    ds = LidarSequenceDataset(data, "train", seq_len=seq_len)
    n = min(n_windows, len(ds)) if n_windows > 0 else len(ds)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, n, batch):
            b = collate_lidar([ds[i] for i in range(s, min(s + batch, n))])
            actions, aux = model(b["points"], b["speed"], b["steering"], return_aux=True)
            for j, key in enumerate(b["keys"]):
                np.savez_compressed(out / (key.replace("/", "__").replace(":", "_") + ".npz"),
                                    actions=actions[j].numpy(), bev_vec=aux["bev_vec_seq"][j].numpy(),
                                    gru_out=aux["gru_out"][j].numpy())
    return n, time.perf_counter() - t0


def run_ours(data: Path, ckpt: Path, store: Path, seq_len: int, batch: int, num_workers: int):
    opts = ExportOptions(str(data), "train", str(ckpt), str(store), batch_size=batch,
                         num_workers=num_workers, device="cpu")
    ctx = load_context(opts, seq_len)
    cfg = ctx.teacher.cfg
    schema = StoreSchema(seq_len=seq_len, action_dim=cfg.action_dim, bev_dim=cfg.bev_dim, gru_hidden=cfg.gru_hidden)
    bank = create_memorybank(store, schema, Provenance(file_sha256(ckpt), cfg.to_dict()))
    bank.reserve_split("train", ctx.plan.keys)
    opts.window_batch = min(opts.window_batch, bank.alignment)
    return export_rows(ctx, bank, 0, len(ctx.plan.keys), opts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,full", help="comma-separated presets (default tiny,full)")
    p.add_argument("--seq_len", type=int, default=5)
    p.add_argument("--frames", type=int, default=0, help="frames per segment (default: tiny 120, full 32)")
    p.add_argument("--segments", type=int, default=1)
    p.add_argument("--points", type=int, default=20000, help="points per LiDAR frame (default 20000)")
    p.add_argument("--naive_windows", type=int, default=0,
                   help="windows the original is timed on (default: tiny all, full 3)")
    p.add_argument("--naive_batch", type=int, default=1, help="windows per forward of the original")
    p.add_argument("--batch_size", type=int, default=0, help="our frames per batch (default tiny 16, full 8)")
    p.add_argument("--num_workers", type=int, default=2, help="our DataLoader workers")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    rows = []
    for preset in args.presets.split(","):
        frames = args.frames or (120 if preset == "tiny" else 32)
        naive_n = args.naive_windows or (0 if preset == "tiny" else 3)
        batch = args.batch_size or (16 if preset == "tiny" else 8)
        work = Path(tempfile.mkdtemp(prefix=f"bench_export_{preset}_"))
        try:
            data, ckpt = make_world(work, preset, frames, args.segments, args.points)
            n_orig, t_orig = run_original(data, ckpt, work / "npz", args.seq_len, naive_n, args.naive_batch)
            s = run_ours(data, ckpt, work / "mb.zarr", args.seq_len, batch, args.num_workers)
            npz_bytes = sum(f.stat().st_size for f in (work / "npz").iterdir())
            store_bytes = sum(f.stat().st_size for f in (work / "mb.zarr").rglob("*") if f.is_file())
            rows.append((preset, frames * args.segments, n_orig, n_orig / t_orig, s.rows_written,
                         s.rows_written / s.wall_s, s, npz_bytes / n_orig, store_bytes / s.rows_written))
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    print(f"\nexport benchmark, CPU, torch threads {torch.get_num_threads()}, seq_len {args.seq_len}, "
          f"{args.points} points/frame")
    print(f"{'preset':<7}{'frames':>7}{'orig win':>9}{'orig win/s':>11}{'our win':>8}{'our win/s':>10}{'ratio':>7}"
          f"{'fwd s':>8}{'write s':>8}{'wall s':>8}{'non-fwd':>8}{'B/key npz':>10}{'B/key zarr':>11}")
    ok = True
    for preset, fr, n_o, wps_o, n_s, wps_s, s, b_npz, b_store in rows:
        ratio, overhead = wps_s / wps_o, 1 - s.forward_s / s.wall_s
        print(f"{preset:<7}{fr:>7}{n_o:>9}{wps_o:>11.2f}{n_s:>8}{wps_s:>10.2f}{ratio:>6.2f}x{s.forward_s:>8.2f}"
              f"{s.write_s:>8.2f}{s.wall_s:>8.2f}{overhead:>7.1%}{b_npz:>10.0f}{b_store:>11.0f}")
        if preset == "full" and args.seq_len == 5:
            g1, g2 = ratio >= 4.0, overhead <= 0.15
            ok &= g1 and g2
            print(f"goal full preset throughput >= 4x the original: {ratio:.2f}x {'PASS' if g1 else 'FAIL'}; "
                  f"time outside the teacher's forward <= 15%: {overhead:.1%} {'PASS' if g2 else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
