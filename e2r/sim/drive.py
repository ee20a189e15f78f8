"""Closed-loop evaluation as a function: drive policies on the recorded tracks of a synthetic split.

    cfg = DriveConfig(data_root="data/synth", split="test", policy=["expert", "teacher=runs/teacher.pt"])
    out = drive(cfg)             # {"runs": [RunResult], "summary": [row per policy], "csv_path", ...}
    print(format_table(out["summary"]))

Every segment of the split is one track (rebuilt from the world's marker); each policy drives ``starts``
cars at once on it, starting at evenly spaced centre-line points. Policy specs (``--policy``): ``expert``,
``constant`` (repeat the previous steering, keep the speed), ``train_mean=CKPT`` (steer the training mean of a
checkpoint's ``action_mean``, keep the speed), ``NAME=CKPT`` (a teacher or student checkpoint, told apart by
the checkpoint's ``kind``; CKPT may be ``released:<name>``, a model shipped in ``e2r/released/``).
``pipelines.drive`` is the command line of this module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from e2r.checkpoints import load_checkpoint
from e2r.cli_config import device_option, option
from e2r.errors import ConfigError, check_positive
from e2r.metrics import write_metrics_csv
from e2r.runtime import resolve_device
from e2r.sim.closed_loop import ClosedLoopConfig, RunResult, SimWorld, load_world, run_closed_loop, start_indices
from e2r.sim.drive_plots import plot_trajectories, write_video
from e2r.sim.policies import (ConstantPolicy, ExpertPolicy, MixedPolicy, Policy, StudentPolicy, TeacherPolicy,
                              TrainMeanPolicy)
from e2r.sim.record import DriveRecorder
from e2r.sim.world import MARKER, read_marker

__all__ = ["DriveConfig", "parse_policy_spec", "build_policy", "split_segments", "drive", "summarize",
           "format_table", "CSV_COLUMNS"]

PLAIN_POLICIES = ("expert", "constant")
RECORDING = "recording and mixed control (on-policy data)"
CSV_COLUMNS = ("row", "policy", "split", "segment", "start_index", "runs", "end", "success", "laps", "progress",
               "collisions", "lap_time", "mean_abs_lateral", "max_abs_lateral", "mean_speed", "sim_time", "steps",
               "steps_per_s")


@dataclass(kw_only=True)
class DriveConfig:
    """``python -m pipelines.drive`` (``--help`` explains each field; field names equal the flags)."""

    data_root: str = option(help="synthetic dataset root (with synthetic_dataset.json)")
    split: str = option("test", help="split whose tracks are driven (default: %(default)s, the held-out one)")
    policy: list[str] = option(default_factory=lambda: ["expert"], repeat=True, metavar="SPEC",
                               help="expert | constant | train_mean=CKPT | NAME=CKPT (teacher or student; CKPT a path or "
                                    "released:<name>, see --list_released); repeat for several (default: %(default)s)")
    segment: list[str] = option(default_factory=list, repeat=True,
                                help="drive only this segment (repeatable; default: all)")
    starts: int = option(8, help="cars (start points evenly spaced along the lap) per track (default %(default)s)")
    start_fraction: float = option(0.0, help="where along the lap the first car starts, as a fraction of the lap "
                                             "(default %(default)s)")
    start_behind_car: Optional[int] = option(None, metavar="C",
                                             help="start car k just behind the track's other car C + k (mod their "
                                                  "number) instead, the closest start that keeps clear of it: runs "
                                                  "that close in on a slower car (tracks without other cars keep the "
                                                  "even starts; default: even starts)")
    laps: int = option(1, help="laps to complete for a success (default %(default)s)")
    time_limit: float = option(120.0, help="simulated seconds per run (default %(default)s)")
    seq_len: int = option(5, help="frames per model window T, as in training (default %(default)s)")
    seed: int = option(0, help="seed of the LiDAR noise; same seed -> same results")
    device: str = device_option()
    threads: int = option(1, help="torch intra-op threads while driving (default %(default)s: each step's batch is "
                                  "small, and a thread pool on a busy CPU was 30-80x slower); 0 = torch's default")
    csv_path: Optional[str] = option(None, help="write one row per run plus one aggregated row per policy")
    plot_path: Optional[str] = option(None, help="PNG of the trajectories over the track map (x = collision)")
    video: Optional[str] = option(None, metavar="GIF", help="GIF of one run: camera view beside the car on the map")
    video_policy: Optional[str] = option(None, help="policy of the video run (default: the last --policy)")
    video_start: int = option(0, help="which start (0-based) of the first track to film")
    no_progress: bool = option(False, help="hide the progress bar")
    record: Optional[str] = option(None, metavar="ROOT", group=RECORDING,
                                   help="write every car's run as a dataset segment under ROOT/<record_split> "
                                        "(one --policy)")
    record_split: str = option("recorded", group=RECORDING,
                               help="split name of the recorded segments (default %(default)s)")
    mix_teacher: Optional[str] = option(None, metavar="CKPT", group=RECORDING,
                                        help="teacher checkpoint sharing each student's car")
    p_student: float = option(1.0, group=RECORDING,
                              help="probability that the student drives a period (default %(default)s)")
    switch_every: int = option(10, group=RECORDING, help="steps per drawn period (default %(default)s = 0.5 s)")
    envelope_lateral: float = option(1.5, group=RECORDING,
                                     help="teacher takeover beyond this |lateral offset| m (default %(default)s)")
    envelope_heading: float = option(30.0, group=RECORDING,
                                     help="teacher takeover beyond this |heading error| deg (default %(default)s)")
    recover_steps: int = option(20, group=RECORDING, help="steps the teacher keeps the car after it is back inside "
                                                          "the envelope (default %(default)s)")

    def check(self) -> None:
        """ConfigError naming the flag for values that cannot work (checkpoints are checked when loaded)."""
        check_positive(self, ("starts", "laps", "seq_len"))
        if self.threads < 0:
            raise ConfigError(f"--threads must be >= 0, got {self.threads}")
        if not self.time_limit > 0:
            raise ConfigError(f"--time_limit must be > 0 seconds, got {self.time_limit}")
        if not self.policy:
            raise ConfigError("--policy: name at least one policy (e.g. --policy expert)")
        names = [parse_policy_spec(s)[0] for s in self.policy]
        if len(set(names)) != len(names):
            raise ConfigError(f"--policy: names must be unique, got {names}")
        if self.record is not None and len(self.policy) != 1:
            raise ConfigError(f"--record: drive one policy at a time (got {len(self.policy)}: {names})")
        if not 0.0 <= self.p_student <= 1.0:
            raise ConfigError(f"--p_student must be in [0, 1], got {self.p_student}")
        check_positive(self, ("switch_every",))
        if not (self.envelope_lateral > 0 and self.envelope_heading > 0):
            raise ConfigError(f"--envelope_lateral and --envelope_heading must be > 0, got {self.envelope_lateral}, "
                              f"{self.envelope_heading}")
        if not 0.0 <= self.start_fraction < 1.0:
            raise ConfigError(f"--start_fraction must be in [0, 1), got {self.start_fraction}")
        if self.start_behind_car is not None and self.start_behind_car < 0:
            raise ConfigError(f"--start_behind_car must be >= 0, got {self.start_behind_car}")
        if self.start_behind_car is not None and self.start_fraction != 0.0:
            raise ConfigError("--start_behind_car places the starts itself: drop --start_fraction")
        if self.recover_steps < 0:
            raise ConfigError(f"--recover_steps must be >= 0, got {self.recover_steps}")
        if self.video is not None:
            if not self.video.lower().endswith(".gif"):
                raise ConfigError(f"--video must be a .gif path, got {self.video!r}")
            if self.video_policy is not None and self.video_policy not in names:
                raise ConfigError(f"--video_policy {self.video_policy!r} is not one of the policies {names}")
            if not 0 <= self.video_start < self.starts:
                raise ConfigError(f"--video_start must be in [0, {self.starts}), got {self.video_start}")


def parse_policy_spec(spec: str) -> tuple[str, Optional[str]]:
    """``"expert"`` -> ("expert", None); ``"NAME=PATH"`` -> (NAME, PATH). ConfigError for anything else."""
    if "=" in spec:
        name, path = spec.split("=", 1)
        if not name or not path:
            raise ConfigError(f"--policy {spec!r}: expected NAME=CHECKPOINT with both parts")
        if name in PLAIN_POLICIES:
            raise ConfigError(f"--policy {spec!r}: {name!r} takes no checkpoint (write --policy {name})")
        return name, path
    if spec not in PLAIN_POLICIES:
        raise ConfigError(f"--policy {spec!r}: unknown policy; expected one of {', '.join(PLAIN_POLICIES)}, "
                          f"train_mean=CKPT, or NAME=CKPT for a teacher or student checkpoint")
    return spec, None


def build_policy(spec: str, device: torch.device) -> Policy:
    """The policy of one ``--policy`` spec (checkpoints loaded weights-only; CheckpointError when unusable)."""
    name, path = parse_policy_spec(spec)
    if path is None:
        return ExpertPolicy(name) if name == "expert" else ConstantPolicy(name)
    if name == "train_mean":
        return TrainMeanPolicy(name, path)
    kind = load_checkpoint(path).get("kind")
    if kind == "teacher":
        return TeacherPolicy(name, path, device)
    if kind == "student":
        return StudentPolicy(name, path, device)
    raise ConfigError(f"--policy {spec!r}: checkpoint {path} is a {kind!r} checkpoint; expected a teacher or student")


def split_segments(data_root: str | Path, split: str) -> list[str]:
    """The segments of ``split`` listed in the synthetic world's marker (ValueError when there is no marker,
    the world is incomplete, or the split has no segment made by the synthetic world)."""
    made = read_marker(data_root)
    if made is None:
        raise ValueError(f"{data_root} has no {MARKER}: closed-loop driving needs a dataset made by the synthetic "
                         f"world (python -m pipelines.make_dataset), whose tracks can be rebuilt")
    segments = made.get("splits", {}).get(split, [])
    if not segments:
        raise ValueError(f"split {split!r} of {data_root} was not made by the synthetic world (it has "
                         f"{sorted(made.get('splits', {}))})")
    return list(segments)


def _row(kind: str, policy: str, split: str, segment: str, start: Any, runs: int, end: str,
         metrics: dict[str, float], hit: str = "") -> dict[str, Any]:
    return {"row": kind, "policy": policy, "split": split, "segment": segment, "start_index": start, "runs": runs,
            "end": end, "collision_with": hit, **{k: metrics[k] for k in RunResult.METRICS}}


def summarize(runs: list[RunResult]) -> list[dict[str, Any]]:
    """One aggregated row per policy (in first-seen order): success rate, mean laps/progress, total collisions,
    mean lap time of the runs that finished a lap (NaN if none), mean of mean |lateral|, max of max |lateral|,
    mean speed, total simulated time and steps, steps per wall-clock second over all its batches."""
    out = []
    for name in dict.fromkeys(r.policy for r in runs):
        rs = [r for r in runs if r.policy == name]
        lap_times = [r.lap_time for r in rs if not math.isnan(r.lap_time)]
        wall = sum(r.steps / r.steps_per_s for r in rs if r.steps_per_s > 0)
        steps = sum(r.steps for r in rs)
        metrics = {"success": float(np.mean([r.success for r in rs])), "laps": float(np.mean([r.laps for r in rs])),
                   "progress": float(np.mean([r.progress for r in rs])), "collisions": sum(r.collisions for r in rs),
                   "lap_time": float(np.mean(lap_times)) if lap_times else float("nan"),
                   "mean_abs_lateral": float(np.mean([r.mean_abs_lateral for r in rs])),
                   "max_abs_lateral": float(np.max([r.max_abs_lateral for r in rs])),
                   "mean_speed": float(np.mean([r.mean_speed for r in rs])),
                   "sim_time": float(sum(r.sim_time for r in rs)), "steps": steps,
                   "steps_per_s": steps / wall if wall > 0 else float("nan")}
        ends = ",".join(f"{e}:{sum(r.end == e for r in rs)}" for e in ("laps", "collision", "time")
                        if any(r.end == e for r in rs))
        hits = ",".join(f"{h}:{sum(r.collision_with == h for r in rs)}" for h in ("wall", "car")
                        if any(r.collision_with == h for r in rs))
        out.append(_row("aggregate", name, rs[0].split, "ALL", "", len(rs), ends, metrics, hits))
    return out


def format_table(summary: list[dict[str, Any]]) -> str:
    """Fixed-width text table of :func:`summarize`'s rows."""
    cols = [("runs", "runs", "{:d}"), ("success", "success", "{:.0%}"), ("laps", "laps", "{:.2f}"),
            ("progress", "progress", "{:.3f}"), ("collisions", "collisions", "{:d}"),
            ("lap_time", "lap_time_s", "{:.2f}"), ("mean_abs_lateral", "mean|lat|_m", "{:.2f}"),
            ("max_abs_lateral", "max|lat|_m", "{:.2f}"), ("mean_speed", "speed_m/s", "{:.2f}"),
            ("steps_per_s", "steps/s", "{:.0f}")]
    width = max([len("policy")] + [len(r["policy"]) for r in summary]) + 2
    lines = ["policy".ljust(width) + "".join(h.rjust(13) for _, h, _ in cols)]
    for r in summary:
        cells = []
        for key, _, fmt in cols:
            v = r[key]
            cells.append(("nan" if isinstance(v, float) and math.isnan(v) else fmt.format(v)).rjust(13))
        lines.append(r["policy"].ljust(width) + "".join(cells))
    return "\n".join(lines)


def drive(cfg: DriveConfig) -> dict[str, Any]:
    """Run every policy on every segment of ``cfg.split`` (or ``cfg.segment``) from ``cfg.starts`` start points.

    Returns ``{"runs": [RunResult], "rows": per-run CSV rows, "summary": per-policy rows, "worlds":
    {segment: SimWorld}, "csv_path", "plot_path", "video"}`` (paths None when not written). Raises ValueError
    (ConfigError, CheckpointError) on bad input before any driving starts. ``cfg.threads`` > 0: torch's
    intra-op threads while driving (restored afterwards); each step's batch is small, and on a busy CPU a
    thread pool made the tiny models 30-80x slower than one thread."""
    cfg.check()
    device = resolve_device(cfg.device)
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _drive(cfg, device)
    finally:
        torch.set_num_threads(threads_before)


def _drive(cfg: DriveConfig, device: torch.device) -> dict[str, Any]:
    segments = split_segments(cfg.data_root, cfg.split)
    if cfg.segment:
        unknown = [s for s in cfg.segment if s not in segments]
        if unknown:
            raise ConfigError(f"--segment {unknown}: not in split {cfg.split!r} (segments: {segments})")
        segments = list(cfg.segment)
    worlds: dict[str, SimWorld] = {s: load_world(cfg.data_root, cfg.split, s) for s in segments}
    policies = [build_policy(spec, device) for spec in cfg.policy]
    if cfg.mix_teacher:
        policies = [_mixed(p, cfg, device) if isinstance(p, StudentPolicy) else p for p in policies]
    video_policy = cfg.video_policy or policies[-1].name
    base = ClosedLoopConfig(laps=cfg.laps, time_limit=cfg.time_limit, seq_len=cfg.seq_len, seed=cfg.seed)
    steps_per_batch = cfg.starts * max(1, int(round(cfg.time_limit * worlds[segments[0]].rate_hz)))
    bar = tqdm(total=len(policies) * len(segments) * steps_per_batch, unit="step", desc="closed loop",
               disable=cfg.no_progress)
    runs: list[RunResult] = []
    recorded: list[str] = []
    with torch.no_grad():
        for policy in policies:
            for seg in segments:
                world = worlds[seg]
                record = cfg.video is not None and policy.name == video_policy and seg == segments[0]
                loop_cfg = replace(base, record_camera=cfg.video_start if record else None)
                bar.set_postfix_str(f"{policy.name} {seg}")
                before = bar.n
                recorder = (DriveRecorder(cfg.record, cfg.record_split, world, policy.name, _record_info(cfg),
                                          expert_drives=isinstance(policy, ExpertPolicy)) if cfg.record else None)
                first = int(round(cfg.start_fraction * len(world.track.centre)))
                starts = start_indices(world.track, cfg.starts, first, cfg.start_behind_car)
                runs += run_closed_loop(policy, world, starts, loop_cfg, bar.update, recorder)
                recorded += recorder.segments if recorder is not None else []
                bar.update(before + steps_per_batch - bar.n)      # cars that stopped early
    bar.close()
    rows = [_row("run", r.policy, r.split, r.segment, r.start_index, 1, r.end,
                 {k: getattr(r, k) for k in RunResult.METRICS}, r.collision_with) for r in runs]
    summary = summarize(runs)
    out: dict[str, Any] = {"runs": runs, "rows": rows, "summary": summary, "worlds": worlds,
                           "csv_path": None, "plot_path": None, "video": None, "recorded": recorded}
    if cfg.csv_path:
        out["csv_path"] = str(write_metrics_csv(cfg.csv_path, rows + summary))
    if cfg.plot_path:
        out["plot_path"] = str(plot_trajectories(cfg.plot_path, runs, worlds))
    if cfg.video:
        chosen = [r for r in runs if r.camera_frames]
        if chosen:
            out["video"] = str(write_video(cfg.video, chosen[0], worlds[chosen[0].segment]))
    return out


def _mixed(student: StudentPolicy, cfg: DriveConfig, device: torch.device) -> MixedPolicy:
    """``student`` sharing each car with the ``--mix_teacher`` checkpoint (``e2r.sim.policies.MixedPolicy``)."""
    teacher = build_policy(f"teacher={cfg.mix_teacher}", device)
    if not isinstance(teacher, TeacherPolicy):
        raise ConfigError(f"--mix_teacher {cfg.mix_teacher}: expected a teacher checkpoint")
    return MixedPolicy(student.name, student, teacher, cfg.p_student, switch_every=cfg.switch_every,
                       max_lateral=cfg.envelope_lateral, max_heading_deg=cfg.envelope_heading,
                       recover_steps=cfg.recover_steps, seed=cfg.seed)


def _record_info(cfg: DriveConfig) -> dict[str, Any]:
    """What each recorded segment's recorded.json says about the run that made it."""
    return {"policy_spec": cfg.policy[0], "mix_teacher": cfg.mix_teacher,
            "p_student": cfg.p_student if cfg.mix_teacher else None, "seed": cfg.seed, "time_limit": cfg.time_limit}
