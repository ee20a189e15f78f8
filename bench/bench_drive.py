"""Benchmark closed-loop racing: simulated car-steps per second, sensors rendered every step.

    python bench/bench_drive.py                     # default world size (256x128 camera), 4 cars, 3 s
    python bench/bench_drive.py --cars 8 --seconds 5 --threads 0 --image_size 128x64

A small synthetic world (3 tracks, 2 frames each: only its tracks and configs matter) is generated in a
temporary folder; on its test track ``--cars`` cars drive for ``--seconds`` simulated seconds (20 Hz) with
``e2r.sim.closed_loop.run_closed_loop``. Policies: the expert from its pose only, the expert with both sensors
rendered anyway (the rendering cost alone), a teacher and a student (tiny presets, untrained weights: the speed
does not depend on them). A car-step = one car's sensors rendered, its policy evaluated and its vehicle
advanced. Prints, for each, the car-steps per wall-clock second and per CPU-second of this process (user + sys,
``time.process_time``: the figure to compare on a machine shared with other work) and CPU ms per car-step.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from e2r.checkpoints import save_checkpoint  # noqa: E402
from e2r.models.config import TeacherConfig  # noqa: E402
from e2r.models.student import CameraBEVStudent  # noqa: E402
from e2r.models.student_config import StudentConfig  # noqa: E402
from e2r.models.teacher import LiDARBEVTeacher  # noqa: E402
from e2r.sim.closed_loop import ClosedLoopConfig, load_world, run_closed_loop, start_indices  # noqa: E402
from e2r.sim.policies import ExpertPolicy, Observation, Policy, StudentPolicy, TeacherPolicy  # noqa: E402
from e2r.sim.world import generate_dataset  # noqa: E402
from e2r.workflow.configs import image_size  # noqa: E402


class RenderingExpert(ExpertPolicy):
    """The expert, with both sensors rendered for it (their cost, without a model)."""

    needs_lidar = True
    needs_camera = True

    def __init__(self, image_size: tuple[int, int]) -> None:
        super().__init__("expert+sensors")
        self.image_size = image_size

    def act(self, obs: Observation) -> tuple[np.ndarray, np.ndarray]:
        return super().act(obs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cars", type=int, default=4, help="cars driven at once (default 4)")
    p.add_argument("--seconds", type=float, default=3.0, help="simulated seconds per policy (default 3)")
    p.add_argument("--image_size", type=lambda t: image_size(t, 8), default=(256, 128), help="world camera WxH (default 256x128)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as pipelines.drive; 0 = torch's "
                                                          "default)")
    p.add_argument("--device", default="cpu", help="device of the models (default cpu)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        generate_dataset(work / "world", tracks=3, frames=2, image_size=args.image_size, workers=1, progress=False)
        world = load_world(work / "world", "test", "segment_0002")
        torch.manual_seed(0)
        tc = TeacherConfig.preset_named("tiny")
        sc = StudentConfig.preset_named("tiny", tc)
        save_checkpoint(work / "t.pt", {"model": LiDARBEVTeacher(tc).state_dict(), "config": tc.to_dict()}, "teacher")
        save_checkpoint(work / "s.pt", {"model": CameraBEVStudent(sc).state_dict(), "config": sc.to_dict()}, "student")
        policies: list[Policy] = [ExpertPolicy(), RenderingExpert(tuple(sc.image_size)),
                                  TeacherPolicy("teacher (tiny)", work / "t.pt", device),
                                  StudentPolicy("student (tiny)", work / "s.pt", device)]
        starts = start_indices(world.track, args.cars)
        cfg = ClosedLoopConfig(time_limit=args.seconds, laps=100)
        print(f"track {world.track.length:.0f} m, {args.cars} cars x {args.seconds:g} s at {world.rate_hz:g} Hz, "
              f"camera {args.image_size[0]}x{args.image_size[1]}, torch threads {torch.get_num_threads()}, "
              f"{os.cpu_count()} CPUs")
        print(f"{'policy':<18}{'car-steps':>10}{'wall s':>8}{'steps/s':>9}{'cpu s':>8}{'steps/cpu-s':>12}"
              f"{'cpu ms/step':>12}")
        for policy in policies:
            with torch.no_grad():
                run_closed_loop(policy, world, starts[:1], ClosedLoopConfig(time_limit=0.1))   # warm-up
                t0, c0 = time.perf_counter(), time.process_time()
                runs = run_closed_loop(policy, world, starts, cfg)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            steps = sum(r.steps for r in runs)
            print(f"{policy.name:<18}{steps:>10d}{wall:>8.2f}{steps / wall:>9.1f}{cpu:>8.2f}{steps / cpu:>12.1f}"
                  f"{1000 * cpu / steps:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
