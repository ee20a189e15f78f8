"""The end-to-end demo on the embedded synthetic racing world (the README's first command).

    python -m pipelines.demo                 # default world, 1 seed
    python -m pipelines.demo --quick         # smaller world and budgets (a few minutes on 2 CPU cores)
    python -m pipelines.demo --seeds 0,1,2   # the KD-vs-BC comparison averaged over seeds

Stages, each printed as it runs: generate the synthetic dataset (reused when an identical one exists) ->
validate it -> train the tiny LiDAR teacher -> evaluate it on the held-out test track next to trivial
baselines -> export the teacher's outputs and LiDAR depth targets into the memorybank -> train a BC-only and a
BC+KD camera student (teacher outputs + LiDAR depth supervision) with identical budget and seed -> evaluate
all on the held-out test track -> drive every policy in closed loop on the held-out test track (the expert, the teacher, the students and two baselines, from evenly spaced
start points), and beside them the released models shipped in the package (``--released``; trained on the
study's larger world: ``python -m pipelines.drive --list_released``), each marked with whether this track is
held out for it -> the offline and closed-loop tables side by side. Everything lands in one run folder
(checkpoints, memorybank, CSVs, plots, a GIF of the released camera student driving (without released
models: of the KD student), summary.json) named at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from e2r.cli_config import command_line, config_parser, device_option, option, parse_config
from e2r.data.check import DatasetCheck, check_dataset
from e2r.errors import ConfigError
from e2r.metrics import metrics_table, write_metrics_csv
from e2r.released import PREFIX, release_entry, track_status
from e2r.sim.drive import DriveConfig, drive, format_table
from e2r.sim.world import SyntheticConfig, ensure_dataset
from e2r.workflow.configs import StudentEvalConfig, StudentTrainConfig, TeacherEvalConfig, TeacherTrainConfig
from e2r.workflow.evaluate import evaluate_student, evaluate_teacher
from e2r.workflow.export_config import ExportConfig
from e2r.workflow.export_run import export_memorybank, print_export_summary
from e2r.workflow.study_report import epochs_to_reach
from e2r.workflow.train import train_student, train_teacher
from pipelines._common import print_training_summary

#: budgets: the default run (sized to finish within 15 minutes on a 2-core CPU, install included) and --quick
PROFILES = {
    "default": {"tracks": 6, "frames": 300, "teacher_epochs": 7, "student_epochs": 5, "starts": 8,
                "time_limit": 60.0},
    "quick": {"tracks": 4, "frames": 120, "teacher_epochs": 4, "student_epochs": 3, "starts": 4, "time_limit": 30.0},
}
ALL_STAGES = ("data", "teacher", "export", "students", "drive")
#: the released models the demo drives beside the ones it trains (--released), as policy released_<name>
RELEASED = "student_dagger,student_bc,teacher_rounds"
RELEASED_POLICY = "released_"
#: the KD student's LiDAR depth term: the KD that drives (docs/STUDENT.md, "LiDAR depth supervision")
KD_DEPTH_W = 1.0


@dataclass(kw_only=True)
class DemoArgs:
    """The flags of ``python -m pipelines.demo`` (``None``: the profile's value)."""

    quick: bool = option(False, help="smaller world and training budgets")
    out: Optional[str] = option(None, help="run folder (default: runs/demo-<date>-<time>)")
    data_root: Optional[str] = option(
        None, help="synthetic dataset folder; generated there if missing, reused if it holds the same world "
                   "(default: data/synthetic-default or data/synthetic-quick)")
    seed: int = option(0, help="seed of the synthetic world (default %(default)s)")
    seeds: str = option("0", help="comma-separated training seeds for the students (default %(default)s)")
    tracks: Optional[int] = option(None, help="override the profile's number of tracks (>= 3)")
    frames: Optional[int] = option(None, help="override the profile's frames per track")
    teacher_epochs: Optional[int] = option(None, help="override the profile's teacher epochs")
    student_epochs: Optional[int] = option(None, help="override the profile's student epochs")
    starts: Optional[int] = option(None, help="override the closed-loop start points per track")
    time_limit: Optional[float] = option(None, help="override the closed-loop time limit (s) per run")
    device: str = device_option()
    stages: str = option("all", help=f"comma-separated subset of {','.join(ALL_STAGES)} (default %(default)s)")
    released: str = option(RELEASED, help="released models driven beside the trained ones, comma-separated, or "
                                          "'none' (default %(default)s; python -m pipelines.drive --list_released)")
    released_starts: int = option(2, help="start points of the released models (at most --starts; default "
                                          "%(default)s: a lap of camera frames per start)")

    def check(self) -> None:
        """ConfigError naming the flag for values that cannot work."""
        if self.released_starts < 1:
            raise ConfigError(f"--released_starts must be >= 1, got {self.released_starts}")


#: the run config: one flag per field
CONFIG = DemoArgs


def build_parser() -> argparse.ArgumentParser:
    return config_parser(CONFIG, "python -m pipelines.demo", __doc__)


def stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def show(module: str, cfg: Any) -> None:
    """Print the command line that runs this stage by hand."""
    print("$ " + command_line(module, cfg), flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_config(CONFIG, build_parser(), argv)
    except ConfigError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    prof = dict(PROFILES["quick" if args.quick else "default"])
    for name in ("tracks", "frames"):
        if getattr(args, name) is not None:
            prof[name] = getattr(args, name)
    for name in ("teacher_epochs", "student_epochs", "starts", "time_limit"):
        if getattr(args, name) is not None:
            prof[name] = getattr(args, name)
    stages = set(ALL_STAGES) if args.stages == "all" else set(args.stages.split(","))
    run = Path(args.out or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
    run.mkdir(parents=True, exist_ok=True)
    data_root = Path(args.data_root or f"data/synthetic-{'quick' if args.quick else 'default'}")
    t_start = time.perf_counter()
    summary: dict[str, Any] = {"run": str(run), "data_root": str(data_root), "profile": prof}
    try:
        stage("1. synthetic racing world")
        cfg = SyntheticConfig(tracks=prof["tracks"], frames=prof["frames"], seed=args.seed)
        made = ensure_dataset(data_root, cfg)
        summary["splits"] = made.get("splits")
        stage("2. validate the dataset")
        check = DatasetCheck(data_root=str(data_root), no_progress=True)
        show("pipelines.check_dataset", check)
        rc = check_dataset(check)
        if rc != 0:
            raise RuntimeError(f"pipelines.check_dataset failed with exit code {rc}")
        ckpt = run / "teacher.pt"
        if "teacher" in stages:
            summary["teacher"] = teacher_stage(args, prof, data_root, run, ckpt)
        store = run / "memorybank.zarr"
        if "export" in stages:
            stage("5. export the teacher's outputs into the memorybank")
            export = ExportConfig(data_root=str(data_root), split=["train", "valid", "test"], teacher_ckpt=str(ckpt),
                                  store=str(store), store_depth=True, device=args.device, overwrite=True,
                                  no_progress=True)
            show("pipelines.export", export)
            print_export_summary(export, export_memorybank(export))
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        if "students" in stages:
            summary["students"] = students_stage(args, prof, data_root, run, store, seeds)
            print_final_table(summary, run)
        if "drive" in stages:
            summary["closed_loop"], summary["released"] = drive_stage(args, prof, data_root, run, ckpt, seeds)
            if "students" in stages and "teacher" in summary:
                print_offline_vs_closed_loop(summary, run)
            print_released(summary["released"])
    except Exception as e:  # noqa: BLE001 - the demo reports any failure and exits non-zero
        print(f"\ndemo: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    (run / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"\ndemo finished in {summary['seconds']:.0f} s; everything is in {run}/ (summary.json)")
    return 0


def teacher_stage(args: DemoArgs, prof: dict[str, Any], data_root: Path, run: Path, ckpt: Path
                  ) -> dict[str, Any]:
    stage("3. train the tiny LiDAR teacher")
    train = TeacherTrainConfig(data_root=str(data_root), preset="tiny", epochs=prof["teacher_epochs"], seed=args.seed,
                               device=args.device, save_path=str(ckpt),
                               checkpoint_path=str(run / "teacher_last.pt"), no_progress=True)
    show("pipelines.train_teacher", train)
    print_training_summary(train_teacher(train))
    stage("4. evaluate the teacher on the held-out test track")
    out = evaluate_teacher(TeacherEvalConfig(
        data_root=str(data_root), split="test", teacher_ckpt=str(ckpt), device=args.device,
        csv_path=str(run / "eval_teacher_test.csv"), plot_path=str(run / "eval_teacher_test.png"), no_progress=True))
    print(metrics_table(out["results"]))
    return {"checkpoint": str(ckpt), "test": out["results"]}


def students_stage(args: DemoArgs, prof: dict[str, Any], data_root: Path, run: Path, store: Path,
                   seeds: list[int]) -> dict[str, Any]:
    """Train a BC-only and a BC+KD student per seed with the same budget; evaluate both on the test track."""
    out: dict[str, Any] = {}
    for seed in seeds:
        for variant in ("bc", "kd"):
            name = f"student_{variant}_seed{seed}"
            stage(f"6. train the camera student: "
                  f"{'BC + KD from the memorybank (teacher outputs, LiDAR depth)' if variant == 'kd' else 'BC only'}"
                  f" (seed {seed})")
            train = StudentTrainConfig(data_root=str(data_root), preset="tiny", epochs=prof["student_epochs"],
                                       seed=seed, device=args.device, save_path=str(run / f"{name}.pt"),
                                       tensorboard_dir=str(run / "tb" / name), no_progress=True,
                                       memorybank=str(store) if variant == "kd" else None,
                                       kd_depth_w=KD_DEPTH_W if variant == "kd" else 0.0)
            show("pipelines.train_student", train)
            trained = train_student(train)
            stage(f"7. evaluate {name} on the held-out test track")
            ev = evaluate_student(StudentEvalConfig(
                data_root=str(data_root), split="test", student_ckpt=str(run / f"{name}.pt"), memorybank=str(store),
                device=args.device, csv_path=str(run / f"eval_{name}.csv"), plot_path=str(run / f"eval_{name}.png"),
                no_progress=True))
            out[name] = {"variant": variant, "seed": seed, "valid_losses": trained["valid_losses"],
                         "test": ev["results"]["student"], "kd_gap": ev["kd_gap"],
                         "baselines": {k: v for k, v in ev["results"].items() if k != "student"}}
    return out


def released_names(text: str) -> list[str]:
    """The ``--released`` names (``none`` or empty: no released model)."""
    return [] if text.strip() in ("", "none") else [n.strip() for n in text.split(",") if n.strip()]


def drive_stage(args: DemoArgs, prof: dict[str, Any], data_root: Path, run: Path, ckpt: Path,
                seeds: list[int]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Closed loop on the held-out test track: expert, two baselines, the teacher and every student from the
    profile's starts; then the released models from ``--released_starts`` (they finish laps, so each start
    costs a whole lap of camera frames), in one table. Returns (the per-policy rows, one row per released
    model: what it is, whether this track is held out for it, how it drove here, what its manifest measured)."""
    stage("8. drive every policy in closed loop on the held-out test track")
    students = [f"student_{v}_seed{s}" for s in seeds for v in ("bc", "kd")
                if (run / f"student_{v}_seed{s}.pt").is_file()]
    released = {name: release_entry(name) for name in released_names(args.released)}
    cameras = [RELEASED_POLICY + n for n, e in released.items() if e["kind"] == "student"]
    filmed = video_policy(students, cameras)
    base = DriveConfig(data_root=str(data_root), split="test", starts=int(prof["starts"]), laps=1,
                       time_limit=float(prof["time_limit"]), seed=args.seed, device=args.device)
    cfgs = [replace(base, policy=["expert", "constant", f"train_mean={ckpt}", f"teacher={ckpt}",
                                  *(f"{name}={run / (name + '.pt')}" for name in students)],
                    csv_path=str(run / "drive_test.csv"), plot_path=str(run / "drive_test.png"))]
    if released:
        cfgs.append(replace(base, starts=min(base.starts, args.released_starts),
                            policy=[f"{RELEASED_POLICY}{name}={PREFIX}{name}" for name in released],
                            csv_path=str(run / "drive_released.csv"), plot_path=str(run / "drive_released.png")))
    for cfg in cfgs:
        if filmed in [spec.split("=")[0] for spec in cfg.policy]:
            cfg.video, cfg.video_policy = str(run / "drive_student.gif"), filmed
    outs = []
    for cfg in cfgs:
        show("pipelines.drive", cfg)
        outs.append(drive(cfg))
    summary = [r for out in outs for r in out["summary"]]
    print(format_table(summary))
    for out in outs:
        for what in ("csv_path", "plot_path", "video"):
            if out[what]:
                print(f"wrote {out[what]}")
    return summary, released_rows(released, outs[-1]) if released else []


def released_rows(released: dict[str, dict[str, Any]], out: dict[str, Any]) -> list[dict[str, Any]]:
    """Per released model: what it is, what this track is for it (``e2r.released.track_status``), how it drove
    here (``out``: its drive) and what its manifest measured."""
    tracks = sorted({w.track.fingerprint() for w in out["worlds"].values()})
    loop = {r["policy"]: r for r in out["summary"]}
    rows = []
    for name, entry in released.items():
        runs = [r for r in out["runs"] if r.policy == RELEASED_POLICY + name]
        rows.append({"policy": RELEASED_POLICY + name, "released": PREFIX + name, "kind": entry["kind"],
                     "description": entry["description"], "track": track_status(entry, tracks),
                     "successes": sum(1 for r in runs if r.success), "runs": len(runs),
                     "progress": loop[RELEASED_POLICY + name]["progress"], "manifest_results": entry["results"]})
    return rows


def video_policy(students: list[str], released_students: list[str]) -> str | None:
    """The policy filmed: the first released camera student (one that finishes laps), else the KD student."""
    if released_students:
        return released_students[0]
    return next((n for n in students if "_kd_" in n), students[0] if students else None)


def print_released(rows: list[dict[str, Any]]) -> None:
    """Which policies of the closed-loop table are released models, whether this track is held out for each,
    and what each measured on the worlds of its manifest."""
    if not rows:
        return
    stage("released models (shipped in e2r/released, trained on the study's world; not trained by this demo)")
    for r in rows:
        print(f"{r['policy']:<26} = {r['released']} ({r['kind']}): {r['description']}\n"
              f"{'':<29}this track: {r['track']}; here {r['successes']}/{r['runs']} laps, progress "
              f"{r['progress']:.3f}")
        for m in r["manifest_results"]:
            print(f"{'':<29}manifest: {m['label']} ({m['track_status']}): {m['successes']}/{m['runs']} laps, "
                  f"progress {m['progress']:.3f}")
    print("how each was made: python -m pipelines.drive --list_released")


def print_offline_vs_closed_loop(summary: dict[str, Any], run: Path) -> None:
    """Offline weighted MSE beside closed-loop success, progress and lap time (students: mean over seeds), and
    whether ranking the models by offline MSE orders them as the closed loop does."""
    loop = {r["policy"]: r for r in summary["closed_loop"]}
    rows = [("teacher (LiDAR)", [summary["teacher"]["test"]["teacher"]["overall_weighted_mse"]], ["teacher"])]
    for variant, label in (("bc", "student BC (camera)"), ("kd", "student KD (camera)")):
        names = [n for n, v in summary["students"].items() if v["variant"] == variant and n in loop]
        rows.append((label, [summary["students"][n]["test"]["overall_weighted_mse"] for n in names], names))
    table = []
    for label, mses, names in rows:
        if not names:
            continue
        m = {k: float(np.nanmean([loop[n][k] for n in names])) if not all(np.isnan(loop[n][k]) for n in names)
             else float("nan") for k in ("success", "progress", "lap_time", "collisions")}
        table.append({"model": label, "seeds": len(names), "offline_overall_mse": float(np.mean(mses)), **m})
    stage("offline vs closed loop on the held-out test track")
    print(f"{'model':<26}{'seeds':>6}{'offline_mse':>13}{'success':>9}{'progress':>10}{'lap_time_s':>12}")
    for r in table:
        print(f"{r['model']:<26}{r['seeds']:>6}{r['offline_overall_mse']:>13.4f}{r['success']:>9.0%}"
              f"{r['progress']:>10.3f}{r['lap_time']:>12.2f}")
    by_offline = [r["model"] for r in sorted(table, key=lambda r: r["offline_overall_mse"])]
    by_loop = [r["model"] for r in sorted(table, key=lambda r: (-r["success"], -r["progress"]))]
    same = by_offline == by_loop
    print(f"ranking by offline MSE: {' < '.join(by_offline)}\nranking in closed loop: {' > '.join(by_loop)}"
          f"\n-> offline MSE {'orders the models as' if same else 'does NOT order the models as'} the closed loop")
    summary["offline_vs_closed_loop"] = {"table": table, "same_order": same}
    write_metrics_csv(run / "offline_vs_closed_loop.csv", table)


def _first_epoch(losses: list[float], target: float) -> int | None:
    """1-based first epoch whose validation loss is <= target (None if never)."""
    reach = epochs_to_reach(losses, target)
    return None if math.isnan(reach) else int(reach)


def print_final_table(summary: dict[str, Any], run: Path) -> None:
    """One table: teacher, baselines, student BC, student KD (mean over seeds) on the test track."""
    rows: list[dict[str, Any]] = []

    def row(name: str, m: dict[str, float], n: int = 1) -> None:
        rows.append({"model": name, "seeds": n, "steering_mse": m["steering_mse"], "speed_mse": m["speed_mse"],
                     "overall_weighted_mse": m["overall_weighted_mse"]})

    teacher = summary.get("teacher", {}).get("test", {})
    if "teacher" in teacher:
        row("teacher (LiDAR)", teacher["teacher"])
    students = summary["students"]
    first = next(iter(students.values()))
    for b, m in first["baselines"].items():
        row(b, m)
    ratio_epochs = []
    for variant, label in (("bc", "student BC (camera)"), ("kd", "student KD (camera)")):
        runs = [v for v in students.values() if v["variant"] == variant]
        mean = {k: float(np.mean([r["test"][k] for r in runs])) for k in runs[0]["test"]}
        row(label, mean, len(runs))
    for seed in sorted({v["seed"] for v in students.values()}):
        bc, kd = students[f"student_bc_seed{seed}"], students[f"student_kd_seed{seed}"]
        ratio_epochs.append((seed, bc["test"]["overall_weighted_mse"], kd["test"]["overall_weighted_mse"],
                             len(bc["valid_losses"]), _first_epoch(kd["valid_losses"], bc["valid_losses"][-1])))
    stage("results on the held-out test track (steering deg^2, speed (m/s)^2, overall = 1.0*steer + 0.05*speed)")
    print(f"{'model':<26}{'seeds':>6}{'steering_mse':>15}{'speed_mse':>12}{'overall':>12}")
    for r in rows:
        print(f"{r['model']:<26}{r['seeds']:>6}{r['steering_mse']:>15.4f}{r['speed_mse']:>12.4f}"
              f"{r['overall_weighted_mse']:>12.4f}")
    print("\nper seed: overall MSE BC vs KD, and epochs KD needed to reach BC's final validation loss")
    for seed, bc, kd, n_ep, reach in ratio_epochs:
        print(f"  seed {seed}: BC {bc:.4f}  KD {kd:.4f}  (KD/BC {kd / bc:.2f}); KD reached BC's final valid loss "
              f"{'after ' + str(reach) + ' of ' + str(n_ep) + ' epochs' if reach else 'not within the budget'}")
    summary["table"] = rows
    summary["per_seed"] = [dict(zip(("seed", "bc_overall", "kd_overall", "epochs", "kd_epochs_to_bc_final"), t))
                           for t in ratio_epochs]
    write_metrics_csv(run / "results.csv", rows)


if __name__ == "__main__":
    sys.exit(main())
