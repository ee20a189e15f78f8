"""The GPU check: one short run a person with a GPU does to time the parts that a GPU changes, printed as one
table (``bench/gpu_check.sh`` runs it with the defaults).

    python bench/gpu_check.py                       # --device auto: CUDA when present
    python bench/gpu_check.py --device cpu --small  # a smoke run on a CPU (tiny models, a few steps)

Rows: export frames/s (the whole export of a generated LiDAR dataset into a fresh memorybank, AMP off and,
on CUDA, bf16 and fp16), teacher and student training steps/s (forward + backward + AdamW step on random
inputs of the preset's sizes, after warm-up), and memorybank reads through a 2-worker DataLoader with pinned
memory copied to the device (samples/s). Presets: ``full`` (SPEC sizes) unless ``--small``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from e2r.checkpoints import save_checkpoint  # noqa: E402
from e2r.data.sampler import EpochBatchSampler  # noqa: E402
from e2r.models.config import TeacherConfig  # noqa: E402
from e2r.models.student import CameraBEVStudent  # noqa: E402
from e2r.models.student_config import StudentConfig  # noqa: E402
from e2r.models.teacher import LiDARBEVTeacher  # noqa: E402
from e2r.runtime import resolve_device  # noqa: E402
from e2r.sim.tiny import write_tiny_dataset  # noqa: E402
from e2r.workflow.export_config import ExportConfig  # noqa: E402
from e2r.workflow.export_run import export_memorybank  # noqa: E402
from stores.torch_data import MemoryBankDataset, make_loader  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_export(work: Path, preset: str, amp: str | None, device: torch.device, frames: int, points: int) -> float:
    """Frames/s of a whole export (read, voxelise, encode each frame once, GRU, write) of one segment."""
    data = work / "data"
    if not data.exists():
        write_tiny_dataset(data, {"train": 1}, frames=frames, camera=False, points_per_frame=(points, points + 1))
    ckpt = work / f"teacher_{preset}.pt"
    if not ckpt.exists():
        cfg = TeacherConfig.preset_named(preset)
        save_checkpoint(ckpt, {"model": LiDARBEVTeacher(cfg).state_dict(), "config": cfg.to_dict()}, kind="teacher")
    store = work / f"mb_{amp or 'fp32'}.zarr"
    t0 = time.perf_counter()
    export_memorybank(ExportConfig(data_root=str(data), split=["train"], teacher_ckpt=str(ckpt), store=str(store),
                                   device=str(device), amp=amp, overwrite=True, no_progress=True, no_fsync=True))
    return frames / (time.perf_counter() - t0)


def time_teacher_steps(preset: str, device: torch.device, steps: int, batch: int, points: int) -> float:
    cfg = TeacherConfig.preset_named(preset)
    model = LiDARBEVTeacher(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    T, lo, hi = 5, cfg.point_cloud_range[:3], cfg.point_cloud_range[3:]
    pts = [torch.cat([torch.rand(points, 3) * (torch.tensor(hi) - torch.tensor(lo)) + torch.tensor(lo),
                      torch.rand(points, 1)], 1).to(device) for _ in range(batch * T)]
    speed, steering = torch.rand(batch, T, device=device) * 10, torch.randn(batch, T, device=device)
    return _steps(lambda: model(pts, speed, steering).square().mean(), opt, device, steps)


def time_student_steps(preset: str, device: torch.device, steps: int, batch: int) -> float:
    cfg = StudentConfig.preset_named(preset, TeacherConfig.preset_named(preset))
    model = CameraBEVStudent(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    W, H = cfg.image_size
    T = 5
    images = torch.rand(batch, T, 1, 3, H, W, device=device)
    K = torch.tensor([[W / 2, 0, W / 2], [0, W / 2, H / 2], [0, 0, 1.0]], device=device).expand(batch, 1, 3, 3)
    cam2ego = torch.tensor([[0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 1.5], [0, 0, 0, 1.0]], device=device)
    cam2ego = cam2ego.expand(batch, 1, 4, 4)
    speed, steering = torch.rand(batch, T, device=device) * 10, torch.randn(batch, T, device=device)
    return _steps(lambda: model(images, K, cam2ego, speed, steering).square().mean(), opt, device, steps)


def _steps(loss_fn, opt: torch.optim.Optimizer, device: torch.device, steps: int) -> float:
    for _ in range(2):                                   # warm-up (cuDNN autotune, allocator)
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
    _sync(device)
    return steps / (time.perf_counter() - t0)


def time_reads(store: Path, device: torch.device, batch: int) -> float:
    """Samples/s of shuffled memorybank batches through 2 workers, pinned, copied to ``device``."""
    ds = MemoryBankDataset(str(store))
    loader = make_loader(ds, EpochBatchSampler(len(ds), batch, shuffle=True, seed=0), num_workers=2,
                         pin_memory=device.type == "cuda")
    n, t0 = 0, time.perf_counter()
    for b in loader:
        for name, value in b.items():
            if isinstance(value, torch.Tensor):
                value.to(device, non_blocking=True)
        n += len(b["keys"])
    _sync(device)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda[:N]")
    p.add_argument("--small", action="store_true", help="tiny presets and a few steps (a smoke run)")
    p.add_argument("--steps", type=int, default=0, help="timed training steps (default 20, --small 3)")
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    preset = "tiny" if a.small else "full"
    steps = a.steps or (3 if a.small else 20)
    frames, points = (24, 2000) if a.small else (200, 60000)
    rows: list[tuple[str, str]] = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check on {device} ({name}), torch {torch.__version__}, preset {preset}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        for amp in [None] + (["bf16", "fp16"] if device.type == "cuda" else []):
            rows.append((f"export frames/s ({preset}, AMP {amp or 'off'})",
                         f"{time_export(work, preset, amp, device, frames, points):.1f}"))
            print(f"  {rows[-1][0]}: {rows[-1][1]}", flush=True)
        rows.append((f"teacher train steps/s ({preset}, batch 4, T 5)",
                     f"{time_teacher_steps(preset, device, steps, 4, points):.2f}"))
        rows.append((f"student train steps/s ({preset}, batch 4, T 5)",
                     f"{time_student_steps(preset, device, steps, 4):.2f}"))
        rows.append(("memorybank reads samples/s (2 workers, pinned, batch 64)",
                     f"{time_reads(work / 'mb_fp32.zarr', device, 64):.0f}"))
    width = max(len(r[0]) for r in rows) + 2
    print("\n| measurement | value |\n|---|---|")
    for label, value in rows:
        print(f"| {label.ljust(width)} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
