"""The KD study: does distilling the LiDAR teacher help the camera student, and how much camera data does it
save? One call runs the whole grid, resumably (``python -m pipelines.study`` is its command line):

    world (reused if identical) -> teacher (trained on every LiDAR track: the paired train tracks and the
    LiDAR-only ones; or a given checkpoint, ``--teacher_ckpt``) -> teacher offline + closed loop on the
    held-out test tracks -> memorybank export ->
    for each seed, camera budget (the first ``b`` paired train tracks) and variant: a student trained with
    the same budget, evaluated offline and in closed loop on the same held-out tracks -> report
    (``e2r.workflow.study_report``: CSV, mean +- std table, plot, goals).

Variants (:data:`VARIANTS`): ``bc`` (behaviour cloning only), ``kd`` (BC + all light KD terms: action,
bev_vec, GRU state), and the ablations ``kd_action`` (action only), ``kd_state`` (bev_vec + GRU state only),
``kd_dense`` (light terms + dense bev_feat), ``kd_depth`` (light terms + LiDAR depth supervision of the
student's Lift-Splat depth, the store's ``depth`` group) and ``kd_all`` (light + dense + depth). Every variant of a (budget, seed) sees the same camera tracks,
epochs, seed and flips; only the loss differs.

Resumable: each finished unit writes ``result.json`` in its own folder under ``out`` and is skipped on the
next call; an interrupted training continues from its last state (``*_last.pt``, written every epoch and
every :data:`CHECKPOINT_EVERY` batches: the mid-epoch resume of ``e2r.workflow.trainer``). Changing the study's
settings in a way that changes what a finished unit means (world, epochs, flips) is refused: ``study.json``
records them; use a new ``--out``.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from e2r.atomic import make_dirs, replacing, write_text_atomic
from e2r.checkpoints import checkpoint_path
from e2r.cli_config import device_option, option
from e2r.errors import CheckpointError, ConfigError, check_probability
from e2r.models.policy import DEFAULT_HEAD, RESIDUAL_MODES
from e2r.sim.drive import DriveConfig, drive
from e2r.sim.world import SyntheticConfig, ensure_dataset
from e2r.workflow.configs import (StudentEvalConfig, StudentTrainConfig, TeacherEvalConfig, TeacherTrainConfig,
                                  check_positive, command_line)
from e2r.workflow.evaluate import evaluate_student, evaluate_teacher
from e2r.workflow.export_config import ExportConfig
from e2r.workflow.export_run import export_memorybank, print_export_summary
from e2r.workflow.kd_data import teacher_config_of_checkpoint
from e2r.workflow.train import train_student, train_teacher

__all__ = ["StudyConfig", "VARIANTS", "StudyUnit", "plan_units", "run_study", "camera_train_segments",
           "student_train_config",
           "RESULT_FILE", "read_results"]

#: variant -> KD loss weights (action, bev_vec, temporal, bev_feat, depth); ``bc`` trains without the memorybank
VARIANTS: dict[str, tuple[float, float, float, float, float]] = {
    "bc": (0.0, 0.0, 0.0, 0.0, 0.0),
    "kd": (1.0, 1.0, 1.0, 0.0, 0.0),
    "kd_action": (1.0, 0.0, 0.0, 0.0, 0.0),
    "kd_state": (0.0, 1.0, 1.0, 0.0, 0.0),
    "kd_dense": (1.0, 1.0, 1.0, 1.0, 0.0),
    "kd_depth": (1.0, 1.0, 1.0, 0.0, 1.0),
    "kd_all": (1.0, 1.0, 1.0, 1.0, 1.0),
}
RESULT_FILE = "result.json"
CHECKPOINT_EVERY = 100      # batches between mid-epoch training states
#: settings that change what a finished unit means (recorded in study.json, must not change on resume)
_FIXED = ("camera_tracks", "lidar_only_tracks", "valid_tracks", "test_tracks", "frames", "world_seed",
          "appearance", "teacher_epochs", "teacher_stride", "student_epochs", "student_steps",
          "student_warmup_steps", "hflip_prob", "starts", "time_limit",
          "residual_actions", "teacher_ckpt")


#: the sections of ``pipelines.study --help``
WORLD, GRID, LOOP = "the world", "the grid", "closed loop"


@dataclass(kw_only=True)
class StudyConfig:
    """``python -m pipelines.study`` (``--help`` explains each field; field names equal the flags). The grid
    (budgets, seeds, variants, ablations) may grow between calls; the world and training settings may not."""

    out: str = option("runs/study", help="study folder (default %(default)s)")
    data_root: Optional[str] = option(None, help="the world's folder (default <out>/data); generated if missing, "
                                                 "reused if it holds the same world")
    camera_tracks: int = option(4, group=WORLD, help="paired LiDAR+camera training tracks = the largest budget "
                                                     "(default %(default)s)")
    lidar_only_tracks: int = option(44, group=WORLD, help="more training tracks recorded by the LiDAR only (default "
                                                          "%(default)s)")
    valid_tracks: int = option(2, group=WORLD, help="default %(default)s")
    test_tracks: int = option(4, group=WORLD, help="held out (default %(default)s)")
    frames: int = option(300, group=WORLD, help="frames per track at 20 Hz (default %(default)s)")
    world_seed: int = option(0, group=WORLD, help="seed of the world and the teacher (default %(default)s)")
    appearance: str = option("gap", group=WORLD, choices=("gap", "clean"),
                             help="gap: the camera/LiDAR sensor gap (default); clean: the old uniform look, for "
                                  "comparison")
    budgets: list[int] = option(default_factory=lambda: [1, 2, 4], group=GRID,
                                help="camera training tracks per student (default %(default)s)")
    seeds: list[int] = option(default_factory=lambda: [0, 1, 2], group=GRID, help="student seeds (default %(default)s)")
    variants: list[str] = option(default_factory=lambda: ["bc", "kd_all"], group=GRID, choices=list(VARIANTS),
                                 help="variants at every budget; the first KD one is the one the goals judge "
                                      "(default %(default)s: kd_all, the KD that drove best, docs/STUDENT.md)")
    ablations: list[str] = option(default_factory=lambda: ["kd", "kd_action", "kd_state", "kd_dense", "kd_depth"],
                                  group=GRID,
                                  nargs="*", choices=list(VARIANTS),
                                  help="KD ablations run at --ablation_budgets (default %(default)s; none: "
                                       "--ablations with no value)")
    ablation_budgets: list[int] = option(default_factory=lambda: [1], group=GRID,
                                         help="budgets the ablations run at (default %(default)s)")
    teacher_ckpt: Optional[str] = option(
        None, group=GRID, help="use this teacher (a path or released:NAME) instead of training one: it is copied into "
                               "<out>/teacher, evaluated like a trained one, and labels the memorybank; its head must "
                               "be --residual_actions (default: train the teacher on every LiDAR track)")
    teacher_epochs: int = option(6, group=GRID, help="default %(default)s (unused with --teacher_ckpt)")
    teacher_stride: int = option(2, group=GRID, help="frames between the teacher's training windows (default "
                                                     "%(default)s)")
    student_epochs: int = option(6, group=GRID, help="default %(default)s")
    student_steps: Optional[int] = option(
        None, group=GRID, help="train every student this many optimizer steps instead of --student_epochs: the same "
                               "training whatever the camera budget (default: by epochs)")
    student_warmup_steps: int = option(StudentTrainConfig.warmup_steps, group=GRID,
                                       help="learning-rate warm-up of every student (default %(default)s)")
    residual_actions: Optional[str] = option(
        DEFAULT_HEAD, group=GRID, choices=tuple(RESIDUAL_MODES),
        help="the teacher's (and so every student's) head: what it predicts as a change of its inputs "
             "(pipelines.train_teacher --help; default %(default)s: a teacher that sees its previous command copies "
             "it and drives off the track in closed loop)")
    hflip_prob: float = option(0.5, group=GRID, help="mirroring probability of the teacher's and every student's "
                                                     "training windows (balances turn directions; default %(default)s)")
    starts: int = option(2, group=LOOP, help="start points per test track (default %(default)s)")
    time_limit: float = option(40.0, group=LOOP, help="simulated seconds per run, one lap needs ~30 (default "
                                                      "%(default)s)")
    no_drive: bool = option(False, group=LOOP, help="offline evaluation only")
    device: str = device_option()
    no_progress: bool = option(False, help="hide the progress bars")

    @property
    def data_dir(self) -> str:
        return self.data_root or str(Path(self.out) / "data")

    def world(self) -> SyntheticConfig:
        return SyntheticConfig(tracks=self.camera_tracks + self.valid_tracks + self.test_tracks, frames=self.frames,
                               seed=self.world_seed, valid_tracks=self.valid_tracks, test_tracks=self.test_tracks,
                               lidar_only_tracks=self.lidar_only_tracks, appearance=self.appearance)

    def kd_variant(self) -> str:
        """The KD variant the goals judge against BC: the first of ``variants`` other than bc ("kd" if none)."""
        return next((v for v in self.variants if v != "bc"), "kd")

    def check(self) -> None:
        """ConfigError naming the flag for values that cannot work."""
        check_positive(self, ("camera_tracks", "frames", "teacher_epochs", "teacher_stride", "student_epochs",
                              "student_steps", "starts"))
        if self.student_warmup_steps < 0:
            raise ConfigError(f"--student_warmup_steps must be >= 0, got {self.student_warmup_steps}")
        if self.lidar_only_tracks < 0:
            raise ConfigError(f"--lidar_only_tracks must be >= 0, got {self.lidar_only_tracks}")
        for name in ("budgets", "seeds", "variants"):
            if not getattr(self, name):
                raise ConfigError(f"--{name}: give at least one")
        bad = [b for b in self.budgets + self.ablation_budgets if not 1 <= b <= self.camera_tracks]
        if bad:
            raise ConfigError(f"--budgets/--ablation_budgets {bad}: a budget is a number of camera training tracks, "
                              f"1..--camera_tracks ({self.camera_tracks})")
        unknown = [v for v in self.variants + self.ablations if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"--variants/--ablations {unknown}: choose from {', '.join(VARIANTS)}")
        check_probability(self, ("hflip_prob",))
        if not self.time_limit > 0:
            raise ConfigError(f"--time_limit must be > 0 seconds, got {self.time_limit}")
        try:
            self.world()
        except ValueError as e:
            raise ConfigError(f"the study's world: {e}") from None


@dataclass(frozen=True)
class StudyUnit:
    """One student run: ``variant`` trained on the first ``budget`` camera tracks with ``seed``."""

    budget: int
    variant: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant}-b{self.budget}-s{self.seed}"


def plan_units(cfg: StudyConfig) -> list[StudyUnit]:
    """The student runs in the order they run: the main variants budget by budget from the smallest (the
    budget the study is about), every seed of a budget before the next budget; then the ablations at
    ``ablation_budgets``, likewise. An interrupted study has whole (budget, variant) cells of all seeds."""
    units = [StudyUnit(b, v, s) for b in sorted(set(cfg.budgets)) for s in cfg.seeds for v in cfg.variants]
    units += [StudyUnit(b, v, s) for b in sorted(set(cfg.ablation_budgets)) for s in cfg.seeds
              for v in cfg.ablations if StudyUnit(b, v, s) not in units]
    return units


def camera_train_segments(made: dict[str, Any], budget: int) -> list[str]:
    """The first ``budget`` paired (camera) training segments of the world's marker ``made``: consecutive
    tracks alternate driving direction, so every even budget has both directions equally."""
    paired = [s["segment"] for s in made["segments"] if s["split"] == "train" and s.get("camera", True)]
    if budget > len(paired):
        raise ConfigError(f"budget {budget} > the world's {len(paired)} camera training tracks")
    return paired[:budget]


def _done(folder: Path) -> Optional[dict[str, Any]]:
    path = folder / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _write_result(folder: Path, result: dict[str, Any]) -> None:
    """``result.json`` written atomically: its presence means the unit finished."""
    write_text_atomic(folder / RESULT_FILE, json.dumps(result, indent=1, default=float) + "\n")


def _drive_rows(cfg: StudyConfig, policies: list[str], csv_path: Path) -> list[dict[str, Any]]:
    """Closed loop on every test track: per-run and per-policy rows (empty with ``--no_drive``)."""
    if cfg.no_drive:
        return []
    out = drive(DriveConfig(data_root=cfg.data_dir, split="test", policy=policies, starts=cfg.starts, laps=1,
                            time_limit=cfg.time_limit, seed=cfg.world_seed, device=cfg.device,
                            csv_path=str(csv_path), no_progress=cfg.no_progress))
    return out["rows"] + out["summary"]


def _check_settings(cfg: StudyConfig, out: Path) -> None:
    want = {k: getattr(cfg, k) for k in _FIXED}
    path = out / "study.json"
    if path.is_file():
        have = json.loads(path.read_text()).get("settings", {})
        changed = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if changed:
            raise ConfigError(f"{path}: this study was run with other settings {changed} (recorded, wanted); "
                              f"finished runs would not compare: use another --out")
    path.write_text(json.dumps({"settings": want, "config": asdict(cfg)}, indent=1) + "\n")


def run_study(cfg: StudyConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or finish) the study; returns ``{"teacher": result, "units": [result, ...], "out"}``."""
    cfg.check()
    out = Path(cfg.out)
    given = _given_teacher(cfg)
    make_dirs(out)
    _check_settings(cfg, out)
    log(f"== world: {cfg.camera_tracks} camera + {cfg.lidar_only_tracks} LiDAR-only training tracks, "
        f"{cfg.valid_tracks} valid, {cfg.test_tracks} test, {cfg.frames} frames each ({cfg.appearance})")
    made = ensure_dataset(cfg.data_dir, cfg.world(), progress=not cfg.no_progress)
    teacher = _teacher_unit(cfg, out / "teacher", given, log)
    store = out / "memorybank.zarr"
    _export_unit(cfg, out / "export", store, teacher["checkpoint"], log)
    units = plan_units(cfg)
    results = []
    for i, unit in enumerate(units, 1):
        folder = out / unit.name
        done = _done(folder)
        if done is not None:
            log(f"== [{i}/{len(units)}] {unit.name}: done before, skipped")
        else:
            log(f"== [{i}/{len(units)}] {unit.name}: training on {unit.budget} camera track(s)")
            done = _student_unit(cfg, unit, camera_train_segments(made, unit.budget), folder, store,
                                 teacher["checkpoint"])
            log(f"   test overall {done['test']['overall_weighted_mse']:.4f}"
                + (f", closed-loop success {_success(done):.0%}" if not cfg.no_drive else "")
                + f" ({done['seconds']:.0f} s)")
        results.append(done)
    return {"teacher": teacher, "units": results, "out": str(out)}


def _success(result: dict[str, Any]) -> float:
    rows = [r for r in result["closed_loop"] if r["row"] == "aggregate" and r["policy"] == result["name"]]
    return float(rows[0]["success"]) if rows else float("nan")


def _resumable(last: Path, log: Callable[[str], None]) -> Optional[str]:
    """``last`` when an interrupted training left it (then training continues from it), else None."""
    if not last.is_file():
        return None
    log(f"   continuing the interrupted training from {last}")
    return str(last)


def _given_teacher(cfg: StudyConfig) -> Optional[Path]:
    """The file ``--teacher_ckpt`` names (None without it); ConfigError when it is no readable teacher
    checkpoint (`e2r.checkpoints.load_checkpoint`'s checks) or its head is not ``--residual_actions`` (the
    students follow the teacher's head)."""
    if cfg.teacher_ckpt is None:
        return None
    path = checkpoint_path(cfg.teacher_ckpt)
    try:
        head = teacher_config_of_checkpoint(str(path)).residual_actions
    except CheckpointError as e:
        raise ConfigError(f"--teacher_ckpt: {e}") from None
    if head != cfg.residual_actions:
        raise ConfigError(f"--teacher_ckpt {cfg.teacher_ckpt}: its head is residual_actions={head!r}, the study's "
                          f"--residual_actions is {cfg.residual_actions!r}: give --residual_actions {head}")
    return path


def _teacher_unit(cfg: StudyConfig, folder: Path, given: Optional[Path],
                  log: Callable[[str], None]) -> dict[str, Any]:
    """The study's teacher: trained on every LiDAR training track, or the ``given`` checkpoint copied in;
    then evaluated offline and in closed loop on the test tracks."""
    done = _done(folder)
    ckpt = folder / "teacher.pt"
    if done is not None:
        log("== teacher: done before, skipped")
        return done
    make_dirs(folder)
    t0 = time.perf_counter()
    if given is not None:
        log(f"== teacher: given ({cfg.teacher_ckpt}), copied to {ckpt}")
        with replacing(ckpt) as tmp:
            shutil.copyfile(given, tmp)
        valid_losses = []
    else:
        log(f"== teacher: training on every LiDAR training track, {cfg.teacher_epochs} epochs, windows every "
            f"{cfg.teacher_stride} frames")
        last = folder / "teacher_last.pt"
        trained = train_teacher(TeacherTrainConfig(
            data_root=cfg.data_dir, preset="tiny", epochs=cfg.teacher_epochs, stride=cfg.teacher_stride,
            seed=cfg.world_seed, device=cfg.device, save_path=str(ckpt), checkpoint_path=str(last),
            checkpoint_every_steps=CHECKPOINT_EVERY, resume_path=_resumable(last, log),
            residual_actions=cfg.residual_actions, hflip_prob=cfg.hflip_prob, no_progress=cfg.no_progress))
        valid_losses = [h["valid_loss"] for h in trained["history"]]
    ev = evaluate_teacher(TeacherEvalConfig(data_root=cfg.data_dir, split="test", teacher_ckpt=str(ckpt),
                                            device=cfg.device, csv_path=str(folder / "eval_test.csv"),
                                            no_progress=cfg.no_progress))
    log(f"   teacher test overall {ev['results']['teacher']['overall_weighted_mse']:.4f}; closed loop ...")
    rows = _drive_rows(cfg, ["expert", "constant", f"train_mean={ckpt}", f"teacher={ckpt}"],
                       folder / "drive_test.csv")
    result = {"name": "teacher", "checkpoint": str(ckpt), "given": cfg.teacher_ckpt, "valid_losses": valid_losses,
              "test": ev["results"]["teacher"], "baselines": {k: v for k, v in ev["results"].items() if k != "teacher"},
              "per_segment": ev["per_segment"], "closed_loop": rows, "seconds": round(time.perf_counter() - t0, 1)}
    _write_result(folder, result)
    return result


def _export_unit(cfg: StudyConfig, folder: Path, store: Path, teacher_ckpt: str, log: Callable[[str], None]) -> None:
    dense = any(VARIANTS[v][3] > 0 for v in cfg.variants + cfg.ablations)
    depth = any(VARIANTS[v][4] > 0 for v in cfg.variants + cfg.ablations)
    done = _done(folder)
    if done is not None and done.get("bev_feat", False) >= dense and done.get("depth", False) >= depth:
        log(f"== memorybank: done before ({store}), skipped")
        return
    make_dirs(folder)          # (a store without a group a variant now needs is exported again)
    log(f"== memorybank: exporting the teacher's outputs{' with dense bev_feat' if dense else ''}"
        f"{' with LiDAR depth targets' if depth else ''} -> {store}")
    t0 = time.perf_counter()
    export = ExportConfig(data_root=cfg.data_dir, split=["train", "valid", "test"], teacher_ckpt=teacher_ckpt,
                          store=str(store), save_bev_feat=dense, store_depth=depth, device=cfg.device, overwrite=True,
                          no_progress=cfg.no_progress)
    result = export_memorybank(export)
    print_export_summary(export, result)
    _write_result(folder, {"name": "export", "store": str(store), "bev_feat": dense, "depth": depth,
                           "rows": len(result.bank),
                           "seconds": round(time.perf_counter() - t0, 1)})


def student_train_config(cfg: StudyConfig, unit: StudyUnit, segments: list[str], folder: Path, store: Path,
                         teacher_ckpt: str) -> StudentTrainConfig:
    """The training run of ``unit``: what ``python -m pipelines.train_student`` with the same flags trains
    (the study prints that command; a test checks that it parses back to this config)."""
    action, bev_vec, temporal, bev_feat, depth = VARIANTS[unit.variant]
    last = folder / "student_last.pt"
    return StudentTrainConfig(
        data_root=cfg.data_dir, train_segments=segments, preset="tiny", seed=unit.seed,
        epochs=None if cfg.student_steps else cfg.student_epochs, steps=cfg.student_steps,
        warmup_steps=cfg.student_warmup_steps, device=cfg.device, save_path=str(folder / "student.pt"),
        checkpoint_path=str(last), checkpoint_every_steps=CHECKPOINT_EVERY, resume_path=_resumable(last, print),
        memorybank=str(store) if unit.variant != "bc" else None, teacher_ckpt=teacher_ckpt, kd_action_w=action,
        kd_bevvec_w=bev_vec, kd_temporal_w=temporal, kd_bevfeat_w=bev_feat, kd_depth_w=depth, hflip_prob=cfg.hflip_prob,
        no_progress=cfg.no_progress)


def _student_unit(cfg: StudyConfig, unit: StudyUnit, segments: list[str], folder: Path, store: Path,
                  teacher_ckpt: str) -> dict[str, Any]:
    """One student; BC ones read the teacher checkpoint for their architecture only (the same head as the KD
    students: the student follows the teacher's config), never its outputs."""
    make_dirs(folder)
    t0 = time.perf_counter()
    ckpt = folder / "student.pt"
    train_cfg = student_train_config(cfg, unit, segments, folder, store, teacher_ckpt)
    print(f"   {command_line('pipelines.train_student', train_cfg)}", flush=True)
    trained = train_student(train_cfg)
    ev = evaluate_student(StudentEvalConfig(data_root=cfg.data_dir, split="test", student_ckpt=str(ckpt),
                                            memorybank=str(store), device=cfg.device,
                                            csv_path=str(folder / "eval_test.csv"), no_progress=cfg.no_progress))
    rows = _drive_rows(cfg, [f"{unit.name}={ckpt}"], folder / "drive_test.csv")
    result = {"name": unit.name, **asdict(unit), "segments": segments, "checkpoint": str(ckpt),
              "valid_losses": [h["valid_loss"] for h in trained["history"]],
              "train_losses": [h["train_loss"] for h in trained["history"]],
              "test": ev["results"]["student"], "kd_gap": ev["kd_gap"], "per_segment": ev["per_segment"],
              "baselines": {k: v for k, v in ev["results"].items() if k != "student"},
              "closed_loop": rows, "seconds": round(time.perf_counter() - t0, 1)}
    _write_result(folder, result)
    return result


def read_results(out: str | Path) -> dict[str, Any]:
    """Every finished unit under ``out``: ``{"teacher": result or None, "units": [result, ...]}``."""
    out = Path(out)
    units = []
    for path in sorted(out.glob(f"*-b*-s*/{RESULT_FILE}")):
        units.append(json.loads(path.read_text()))
    return {"teacher": _done(out / "teacher"), "units": units}
