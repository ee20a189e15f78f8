"""On-policy distillation: rounds in which the student drives, the teacher labels its drives, and the
student trains on the union (DAgger with a LiDAR teacher as the labeller, as Learning by Cheating does).

    result = run_dagger(DaggerConfig(data_root="data", teacher_ckpt="teacher.pt", student_ckpt="student.pt",
                                     memorybank="mb.zarr", out="runs/dagger", rounds=5))

Round r (1..R):
  1. drive: the round's student shares each car with the teacher on the training tracks (from start points
     shifted round by round, so the rounds cover the lap, or ``record_starts="behind_cars"``: just behind the
     tracks' other cars; ``MixedPolicy``:
     the student drives with probability p_r, rising linearly from ``p_student_first`` to ``p_student_last``;
     the teacher takes over outside the safety envelope), every car's run recorded as a segment of split
     ``<split_prefix>NN`` in ``data_root`` (``e2r.sim.record``);
  2. label: the teacher's outputs for the new split appended to the memorybank (``export --append``: the
     earlier splits' chunks are checked byte-identical), the labelling throughput reported;
  3. train: fine-tune the last round's student on the camera tracks (their expert labels, BC + KD) and the
     recorded splits (the teacher's actions as targets, + KD), ``steps`` optimizer steps; which recorded
     frames is the aggregation rule (``aggregate``): every round's (default), the latest round's, or every
     round's windows where student and teacher disagreed most (``keep_fraction`` of each; Roach keeps such
     frames). ``dagger.csv`` reports each round's disagreement: the mean |student - teacher| wheel angle over
     its frames;
  4. evaluate: drive the new student alone on the held-out tracks (success, progress).
Round 0 is the starting student, evaluated the same way.

The controls of the same command (``mode``), with the same drives per round, steps and evaluation:
``bc_extra`` - the expert drives the same tracks instead (more expert camera frames, its own labels) and the
student fine-tunes on them by BC alone; ``kd_extra`` - the same expert frames, labelled by the expert and
also exported, trained with BC + KD (offline KD with the extra frames); ``oracle`` - the ceiling only a
simulator allows: the rounds driven as ``dagger`` drives them, but their action labels are what the
simulator's expert would have commanded in each recorded state (``e2r.sim.record.label_by_expert``; the KD
terms still come from the teacher). ``dagger`` is the default.

``learner="teacher"`` (with ``mode="oracle"``, simulator only) runs the same rounds for the LiDAR teacher
itself: the teacher drives alone on the training tracks (LiDAR-only ones too), the simulator's expert labels
every recorded state, and the teacher fine-tunes on its training split plus the recorded splits (no
memorybank): a teacher worth imitating, taught to recover from (and brake before) its own mistakes; by
default its rounds are recorded from behind the other cars, with the braking windows repeated
(``LEARNER_DEFAULTS``). Each round is a folder ``round_NN`` under ``out``
whose ``state.json`` records the stages done, so an interrupted run continues where it stopped (a drive
cut short is driven again into a fresh split). ``dagger.csv`` and ``dagger.png`` (success and progress
against round and against camera frames used) are rewritten after every round.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from e2r.atomic import write_text_atomic
from e2r.checkpoints import checkpoint_path
from e2r.cli_config import device_option, option, redefault
from e2r.data.datasets import CameraSequenceDataset, LidarSequenceDataset
from e2r.data.layout import discover_segments, read_segment_table
from e2r.errors import ConfigError, check_positive, check_weights
from e2r.metrics import write_metrics_csv
from e2r.models.policy import RESIDUAL_MODES
from e2r.sim.drive import DriveConfig, drive
from e2r.sim.record import label_by_expert
from e2r.sim.world import MARKER
from e2r.workflow.configs import StudentTrainConfig, TeacherTrainConfig, TrainConfig
from e2r.workflow.export_config import ExportConfig
from e2r.workflow.export_run import export_memorybank
from e2r.workflow.train import train_student, train_teacher
from stores import open_memorybank

__all__ = ["DaggerConfig", "run_dagger", "p_student_of_round", "ROUND_COLUMNS", "MODES"]

MODES = ("dagger", "bc_extra", "kd_extra", "oracle")
AGGREGATES = ("all", "latest", "disagreement")
MIXED_MODES = ("dagger", "oracle")      # the student drives, mixed with the teacher
LEARNERS = ("student", "teacher")
_CKPT = {"student": "student.pt", "teacher": "teacher.pt"}      # each round's checkpoint in round_NN/
RECORD_STARTS = ("shifted", "behind_cars")
#: the round settings whose default depends on --learner: (the teacher's, the student's). The teacher's rounds
#: weigh speed at 1, are recorded from just behind the other cars and repeat the braking windows 5 times: the
#: settings under which its rounds learn to brake (measured in docs/STUDENT.md, "A teacher worth imitating").
#: The student's keep the trainer's defaults and shifted starts.
LEARNER_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "speed_loss_weight": (1.0, TrainConfig.speed_loss_weight),
    "oversample_braking": (5, TrainConfig.oversample_braking),
    "record_starts": ("behind_cars", "shifted"),
}
ROUND_COLUMNS = ("round", "p_student", "recorded_frames", "camera_frames", "success", "progress", "collisions",
                 "disagreement", "label_frames_per_s", "train_loss", "seconds")


@dataclass(kw_only=True)
class DaggerConfig:
    """``python -m pipelines.dagger`` (``--help`` explains each field; field names equal the flags)."""

    data_root: str = option(help="synthetic dataset root; the recorded splits are added to it")
    teacher_ckpt: str = option(help="the LiDAR teacher: labels the drives and shares the car (--learner "
                                    "teacher: the teacher of round 0)")
    student_ckpt: Optional[str] = option(None, help="the camera student of round 0 (required with --learner "
                                                    "student)")
    memorybank: Optional[str] = option(None, help="Zarr store holding the teacher's outputs of the training tracks; "
                                                  "one split is appended per round (required with --learner "
                                                  "student)")
    learner: str = option("student", choices=LEARNERS,
                          help="who drives and learns: the camera student (default), or the LiDAR teacher itself "
                               "(with --mode oracle: the simulator's expert labels the teacher's own drives)")
    out: str = option(help="run folder: round_NN/ (checkpoints, drives, state), dagger.csv, dagger.png")
    rounds: int = option(5, help="rounds (default %(default)s)")
    mode: str = option("dagger", choices=MODES,
                       help="dagger: the student drives (mixed with the teacher), the teacher labels; the controls "
                            "with the same frames and steps: bc_extra: the expert drives, BC on its labels; "
                            "kd_extra: the expert drives, BC + KD with those frames exported; oracle: driven as "
                            "dagger, labelled by the simulator's expert (the ceiling; default %(default)s)")
    train_segments: Optional[list[str]] = option(None, metavar="SEGMENT",
                                                 help="camera tracks driven and trained on (default: every paired "
                                                      "training track of the world)")
    p_student_first: float = option(0.5, help="probability that the student drives a period in round 1 (default "
                                              "%(default)s)")
    p_student_last: float = option(1.0, help="... in the last round, linear in between (default %(default)s)")
    starts: int = option(1, help="cars per track and round (default %(default)s)")
    record_seconds: float = option(15.0, help="seconds driven per car and round (default %(default)s: 300 frames "
                                              "at 20 Hz, one recorded track's worth)")
    record_starts: Optional[str] = option(
        None, choices=RECORD_STARTS,
        help="where each round's recording cars start: shifted (evenly spaced, shifted along the lap round by round) "
             "or behind_cars (just behind one of the track's other cars: round r, car k behind their ((r - 1) * "
             "starts + k)-th, cycled), so the rounds record closing in on slower cars (default: "
             f"{LEARNER_DEFAULTS['record_starts'][0]} with --learner teacher, {LEARNER_DEFAULTS['record_starts'][1]} "
             "with the student)")
    steps: int = option(296, help="fine-tuning optimizer steps per round (default %(default)s)")
    aggregate: str = option("all", choices=AGGREGATES,
                            help="which recorded frames each round trains on: all (every round's, default), latest "
                                 "(the last round's only), disagreement (every round's, the --keep_fraction of each "
                                 "round's windows where student and teacher disagreed most)")
    keep_fraction: float = option(0.5, help="with --aggregate disagreement: the fraction of windows kept per round "
                                            "(default %(default)s)")
    warmup_steps: int = option(50, help="learning-rate warm-up of each round's fine-tuning (default %(default)s)")
    lr: Optional[float] = option(None, help="learning rate (default: the preset's)")
    hflip_prob: float = option(0.5, help="mirror probability while fine-tuning (default %(default)s)")
    speed_loss_weight: Optional[float] = option(
        None, help="loss weight of speed in each round's fine-tuning (default: "
                   f"{LEARNER_DEFAULTS['speed_loss_weight'][0]} with --learner teacher, the weight at which the "
                   "fine-tune teaches the teacher to brake, docs/STUDENT.md; the trainer's "
                   f"{LEARNER_DEFAULTS['speed_loss_weight'][1]} with --learner student)")
    residual_actions: Optional[str] = option(
        None, choices=tuple(RESIDUAL_MODES),
        help="with --learner teacher: the head each round fine-tunes (e.g. scene_only, which does not read the "
             "measured speed; default: the round-0 teacher's own)")
    oversample_braking: Optional[int] = option(
        None, help="repeat each training window whose labels brake (a speed label over 1 m/s below the measured "
                   f"speed) this many times in each round's fine-tuning (default: "
                   f"{LEARNER_DEFAULTS['oversample_braking'][0]} with --learner teacher, the trainer's "
                   f"{LEARNER_DEFAULTS['oversample_braking'][1]} (off) with the student)")
    kd_action_w: float = option(1.0, help="KD weight of the actions, as train_student's (default %(default)s)")
    kd_bevvec_w: float = option(1.0, help="KD weight of bev_vec (default %(default)s)")
    kd_temporal_w: float = option(1.0, help="KD weight of gru_out (default %(default)s)")
    switch_every: int = redefault(DriveConfig, "switch_every", DriveConfig.switch_every)
    envelope_lateral: float = redefault(DriveConfig, "envelope_lateral", DriveConfig.envelope_lateral)
    envelope_heading: float = redefault(DriveConfig, "envelope_heading", DriveConfig.envelope_heading)
    recover_steps: int = redefault(DriveConfig, "recover_steps", DriveConfig.recover_steps)
    eval_split: str = option("test", help="held-out split driven after each round (default %(default)s)")
    eval_starts: int = option(2, help="cars per held-out track (default %(default)s)")
    eval_time_limit: float = option(40.0, help="seconds per held-out run (default %(default)s)")
    split_prefix: Optional[str] = option(None, help="name of the recorded splits before the round number "
                                                    "(default <mode>_s<seed>_r)")
    seed: int = option(0, help="seed of training, drives and mixing (default %(default)s)")
    device: str = device_option()
    no_progress: bool = option(False, help="no progress bars")

    def check(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {MODES}, got {self.mode!r}")
        check_positive(self, ("rounds", "starts", "steps", "eval_starts", "switch_every"))
        if self.oversample_braking is not None:
            check_positive(self, ("oversample_braking",))
        if self.record_starts is not None and self.record_starts not in RECORD_STARTS:
            raise ConfigError(f"--record_starts must be one of {RECORD_STARTS}, got {self.record_starts!r}")
        for name in ("record_seconds", "eval_time_limit", "envelope_lateral", "envelope_heading"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in ("p_student_first", "p_student_last", "hflip_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"--{name} must be in [0, 1], got {getattr(self, name)}")
        check_weights(self, ("kd_action_w", "kd_bevvec_w", "kd_temporal_w", "warmup_steps"))
        if self.speed_loss_weight is not None:
            check_weights(self, ("speed_loss_weight",))
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"--aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if not 0 < self.keep_fraction <= 1:
            raise ConfigError(f"--keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if self.aggregate == "disagreement" and (self.mode not in MIXED_MODES or self.learner != "student"):
            raise ConfigError("--aggregate disagreement needs drives where student and teacher share the car "
                              f"(--mode {' or '.join(MIXED_MODES)} with the student learning)")
        if self.learner not in LEARNERS:
            raise ConfigError(f"--learner must be one of {LEARNERS}, got {self.learner!r}")
        if not checkpoint_path(self.teacher_ckpt).is_file():      # released:NAME resolved (and checked) here
            raise ConfigError(f"--teacher_ckpt {self.teacher_ckpt}: not a file")
        if self.residual_actions is not None and self.learner != "teacher":
            raise ConfigError("--residual_actions is for --learner teacher: the student keeps its own head")
        if self.learner == "teacher":
            if self.mode != "oracle":
                raise ConfigError("--learner teacher needs --mode oracle: only the simulator's expert can label "
                                  "the teacher's drives")
            if self.student_ckpt or self.memorybank:
                raise ConfigError("--learner teacher trains the teacher alone: drop --student_ckpt and --memorybank")
            return
        if not self.student_ckpt or not checkpoint_path(self.student_ckpt).is_file():
            raise ConfigError(f"--student_ckpt {self.student_ckpt}: not a file (the camera student of round 0)")
        if not self.memorybank or not Path(self.memorybank).is_dir():
            raise ConfigError(f"--memorybank {self.memorybank}: not a Zarr store folder (export the training "
                              f"tracks first: python -m pipelines.export ... --split train --split valid)")

    @property
    def start_ckpt(self) -> str:
        """The learner's checkpoint of round 0."""
        return str(self.teacher_ckpt if self.learner == "teacher" else self.student_ckpt)

    def for_learner(self, name: str) -> Any:
        """Setting ``name`` of :data:`LEARNER_DEFAULTS`: its flag's value, else the learner's default."""
        value = getattr(self, name)
        if value is not None:
            return value
        teacher, student = LEARNER_DEFAULTS[name]
        return teacher if self.learner == "teacher" else student

    def training_splits(self, recorded: list[str]) -> tuple[list[str], float]:
        """(the recorded splits a round trains on, the fraction of their windows kept) by ``aggregate``."""
        if self.aggregate == "latest":
            return recorded[-1:], 1.0
        return list(recorded), self.keep_fraction if self.aggregate == "disagreement" else 1.0

    @property
    def prefix(self) -> str:
        return self.split_prefix if self.split_prefix is not None else f"{self.mode}_s{self.seed}_r"


def p_student_of_round(cfg: DaggerConfig, r: int) -> float:
    """The probability that the student drives a period in round ``r`` (1..R): linear from first to last."""
    if cfg.rounds == 1:
        return cfg.p_student_last
    return cfg.p_student_first + (cfg.p_student_last - cfg.p_student_first) * (r - 1) / (cfg.rounds - 1)


def _train_segments(data_root: str, paired_only: bool) -> list[str]:
    made = json.loads((Path(data_root) / MARKER).read_text())
    return [s["segment"] for s in made["segments"]
            if s["split"] == "train" and (s.get("camera", True) or not paired_only)]


def _state(folder: Path) -> dict[str, Any]:
    path = folder / "state.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_state(folder: Path, state: dict[str, Any]) -> None:
    write_text_atomic(folder / "state.json", json.dumps(state, indent=1, default=float) + "\n")


def _evaluate(cfg: DaggerConfig, name: str, ckpt: str, csv_path: Path) -> dict[str, float]:
    out = drive(DriveConfig(data_root=cfg.data_root, split=cfg.eval_split, policy=[f"{name}={ckpt}"],
                            starts=cfg.eval_starts, time_limit=cfg.eval_time_limit, seed=cfg.seed, device=cfg.device,
                            csv_path=str(csv_path), no_progress=cfg.no_progress))
    row = out["summary"][0]
    return {k: float(row[k]) for k in ("success", "progress", "collisions")}


def _drive_round(cfg: DaggerConfig, r: int, student: str, segments: list[str], split: str) -> int:
    """Record round ``r``'s mixed drives as ``split`` (a stale split of a cut-short drive is removed first)."""
    stale = Path(cfg.data_root) / split
    if stale.exists():
        shutil.rmtree(stale)
    mixed = cfg.mode in MIXED_MODES and cfg.learner == "student"
    behind = cfg.for_learner("record_starts") == "behind_cars"
    policy = f"teacher={student}" if cfg.learner == "teacher" else f"student={student}" if mixed else "expert"
    out = drive(DriveConfig(data_root=cfg.data_root, split="train", segment=segments, policy=[policy],
                            starts=cfg.starts,
                            start_fraction=0.0 if behind else ((r - 1) / cfg.rounds) / cfg.starts,
                            start_behind_car=(r - 1) * cfg.starts if behind else None,
                            time_limit=cfg.record_seconds, seed=cfg.seed * 1000 + r, device=cfg.device,
                            record=cfg.data_root, record_split=split, mix_teacher=cfg.teacher_ckpt if mixed else None,
                            p_student=p_student_of_round(cfg, r),
                            switch_every=cfg.switch_every, envelope_lateral=cfg.envelope_lateral,
                            envelope_heading=cfg.envelope_heading, recover_steps=cfg.recover_steps,
                            no_progress=cfg.no_progress))
    if cfg.mode == "oracle":
        label_by_expert(cfg.data_root, split)
    return int(sum(run.steps for run in out["runs"]))


def _label_round(cfg: DaggerConfig, split: str, seq_len: int) -> float:
    """The teacher's outputs for ``split`` appended to the memorybank -> labelling frames/s (of the rows this run
    wrote; NaN when a resumed append found them all written)."""
    result = export_memorybank(ExportConfig(data_root=cfg.data_root, split=[split], store=cfg.memorybank,
                                            teacher_ckpt=cfg.teacher_ckpt, seq_len=seq_len, append=True,
                                            device=cfg.device, no_progress=cfg.no_progress))
    done = result.splits[0]
    st = done.stats          # a resumed append skips the rows written before: count the frames of this run's rows
    rows = st.rows_written + st.rows_skipped
    frames = done.num_frames * st.rows_written / rows if rows else 0.0
    return float(frames / max(st.wall_s, 1e-9)) if frames else float("nan")


def _round_disagreement(cfg: DaggerConfig, split: str) -> float:
    """Mean |student - teacher| wheel angle (deg) over the frames of a recorded round (NaN: nobody proposed)."""
    tables = [read_segment_table(cfg.data_root, split, seg) for seg in discover_segments(cfg.data_root, split)]
    gaps = [t.disagreement for t in tables if t.disagreement is not None]
    return float(np.concatenate(gaps).mean()) if gaps else float("nan")


def _train_round(cfg: DaggerConfig, folder: Path, init: str, segments: list[str], recorded: list[str]) -> float:
    splits, keep = cfg.training_splits(recorded)
    if cfg.learner == "teacher":           # its whole training split + the recorded rounds, expert-labelled
        trained = train_teacher(TeacherTrainConfig(
            data_root=cfg.data_root, extra_train_splits=splits, init_path=init, steps=cfg.steps,
            warmup_steps=cfg.warmup_steps, lr=cfg.lr, hflip_prob=cfg.hflip_prob,
            residual_actions=cfg.residual_actions,
            speed_loss_weight=cfg.for_learner("speed_loss_weight"),
            oversample_braking=cfg.for_learner("oversample_braking"),
            seed=cfg.seed, device=cfg.device,
            save_path=str(folder / _CKPT[cfg.learner]), no_progress=cfg.no_progress))
        return float(trained["history"][-1]["train_loss"])
    trained = train_student(StudentTrainConfig(
        data_root=cfg.data_root, train_segments=segments, extra_train_splits=splits, extra_keep_fraction=keep,
        memorybank=None if cfg.mode == "bc_extra" else cfg.memorybank,
        teacher_ckpt=cfg.teacher_ckpt, init_path=init, steps=cfg.steps, warmup_steps=cfg.warmup_steps, lr=cfg.lr,
        hflip_prob=cfg.hflip_prob, speed_loss_weight=cfg.for_learner("speed_loss_weight"),
        oversample_braking=cfg.for_learner("oversample_braking"), kd_action_w=cfg.kd_action_w,
        kd_bevvec_w=cfg.kd_bevvec_w,
        kd_temporal_w=cfg.kd_temporal_w, seed=cfg.seed, device=cfg.device, save_path=str(folder / "student.pt"),
        no_progress=cfg.no_progress))
    return float(trained["history"][-1]["train_loss"])


def _round_zero_frames(cfg: DaggerConfig, segments: list[str]) -> tuple[int, int]:
    """(window length, labelled frames of the learner's training set before any round)."""
    if cfg.learner == "teacher":
        seq_len = TeacherTrainConfig.seq_len
        tables = LidarSequenceDataset(cfg.data_root, "train", seq_len).tables
    else:
        bank = open_memorybank(str(cfg.memorybank), mode="r")
        seq_len = bank.schema.seq_len
        bank.close()
        tables = CameraSequenceDataset(cfg.data_root, "train", seq_len, segments=segments).tables
    return seq_len, sum(t.num_frames for t in tables.values())


def _report(cfg: DaggerConfig, rows: list[dict[str, Any]]) -> None:
    out = Path(cfg.out)
    write_metrics_csv(out / "dagger.csv", rows)
    import matplotlib            # optional heavy import, only for the picture
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, x, label in ((axes[0], "round", "round"), (axes[1], "camera_frames", "camera frames used")):
        ax.plot([r[x] for r in rows], [r["success"] for r in rows], "o-", label="lap success")
        ax.plot([r[x] for r in rows], [r["progress"] for r in rows], "s--", label="progress (laps)")
        ax.set_xlabel(label)
        ax.set_ylim(0, max(1.05, max(r["progress"] for r in rows) + 0.05))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{cfg.mode}: held-out {cfg.eval_split} tracks (seed {cfg.seed})")
    fig.tight_layout()
    fig.savefig(out / "dagger.png", dpi=100)
    plt.close(fig)


def run_dagger(cfg: DaggerConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or finish) the rounds of ``cfg`` (module docstring) -> ``{"rounds": [row per round], "student": the
    last round's checkpoint, "csv_path", "plot_path"}``."""
    cfg.check()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "dagger.json", json.dumps(asdict(cfg), indent=1) + "\n")
    segments = list(cfg.train_segments or _train_segments(cfg.data_root, paired_only=cfg.learner == "student"))
    seq_len, base_frames = _round_zero_frames(cfg, segments)
    log(f"== on-policy distillation ({cfg.mode}, the {cfg.learner} learns): {cfg.rounds} round(s) on "
        f"{len(segments)} track(s) ({base_frames} labelled frames), {cfg.starts} car(s) x {cfg.record_seconds:g} s "
        f"per track and round")
    rows: list[dict[str, Any]] = []
    folder0 = out / "round_00"
    folder0.mkdir(exist_ok=True)
    state = _state(folder0)
    if "eval" not in state:
        log(f"== round 0: the starting {cfg.learner} on the held-out tracks")
        state["eval"] = _evaluate(cfg, "round_00", cfg.start_ckpt, folder0 / "drive.csv")
        _save_state(folder0, state)
    rows.append({"round": 0, "p_student": float("nan"), "recorded_frames": 0, "camera_frames": base_frames,
                 **state["eval"], "disagreement": float("nan"), "label_frames_per_s": float("nan"),
                 "train_loss": float("nan"), "seconds": 0.0})
    student, splits, recorded = cfg.start_ckpt, [], 0
    for r in range(1, cfg.rounds + 1):
        folder = out / f"round_{r:02d}"
        folder.mkdir(exist_ok=True)
        state, split, t0 = _state(folder), f"{cfg.prefix}{r:02d}", time.perf_counter()
        p = p_student_of_round(cfg, r)
        if "recorded_frames" not in state:
            log(f"== round {r}: " + ("the teacher drives" if cfg.learner == "teacher" else
                                     f"the student drives with p = {p:.2f}" if cfg.mode in MIXED_MODES
                                     else "the expert drives")
                + f" on the training tracks, recorded as {split}")
            state["recorded_frames"] = _drive_round(cfg, r, student, segments, split)
            _save_state(folder, state)
        if "label_frames_per_s" not in state:
            if cfg.mode == "bc_extra" or cfg.learner == "teacher":      # expert labels only: no teacher outputs
                state["label_frames_per_s"] = float("nan")
            else:
                log(f"   labelling {split} with the teacher -> {cfg.memorybank}")
                state["label_frames_per_s"] = _label_round(cfg, split, seq_len)
            _save_state(folder, state)
        splits.append(split)
        if "train_loss" not in state:
            used, keep = cfg.training_splits(splits)
            log(f"   fine-tuning on {len(segments)} camera track(s) + {len(used)} recorded split(s)"
                + (f" (the {keep:.0%} of their windows where student and teacher disagreed most)" if keep < 1 else "")
                + f", {cfg.steps} steps")
            state["train_loss"] = _train_round(cfg, folder, student, segments, splits)
            _save_state(folder, state)
        student = str(folder / _CKPT[cfg.learner])
        if "eval" not in state:
            state["eval"] = _evaluate(cfg, f"round_{r:02d}", student, folder / "drive.csv")
            state["seconds"] = state.get("seconds", 0.0) + time.perf_counter() - t0
            _save_state(folder, state)
        recorded += state["recorded_frames"]
        rows.append({"round": r, "p_student": p, "recorded_frames": state["recorded_frames"],
                     "camera_frames": base_frames + recorded, **state["eval"],
                     "disagreement": _round_disagreement(cfg, split),
                     "label_frames_per_s": state["label_frames_per_s"], "train_loss": state["train_loss"],
                     "seconds": state.get("seconds", float("nan"))})
        speed = state["label_frames_per_s"]      # NaN: the expert's labels were recorded, nothing was exported
        labelled = "expert labels" if math.isnan(speed) else f"labelled at {speed:.0f} frames/s"
        log(f"   round {r}: success {state['eval']['success']:.0%}, progress {state['eval']['progress']:.3f} "
            f"({state['recorded_frames']} frames recorded, {labelled})")
        _report(cfg, rows)
    return {"rounds": rows, "student": student, "csv_path": str(out / "dagger.csv"),
            "plot_path": str(out / "dagger.png")}
