"""The end-to-end demo on the embedded synthetic racing world (the README's first command).

    python -m pipelines.demo                 # default world, 1 seed
    python -m pipelines.demo --quick         # smaller world and budgets (a few minutes on 2 CPU cores)
    python -m pipelines.demo --seeds 0,1,2   # the KD-vs-BC comparison averaged over seeds

Stages, each printed as it runs: generate the synthetic dataset (reused when an identical one exists) ->
validate it -> train the tiny LiDAR teacher -> evaluate it on the held-out test track next to trivial
baselines -> export the teacher's outputs into the memorybank -> train a BC-only and a BC+KD camera student
with identical budget and seed -> evaluate all on the held-out test track -> one table. Everything lands in
one run folder (checkpoints, memorybank, CSVs, plots, summary.json) named at the end.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from e2r.data.synthetic import MARKER, SyntheticConfig, config_dict, generate_dataset

#: budgets: the default run and --quick
PROFILES = {
    "default": {"tracks": 6, "frames": 300, "teacher_epochs": 8, "student_epochs": 6},
    "quick": {"tracks": 4, "frames": 120, "teacher_epochs": 4, "student_epochs": 3},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller world and training budgets")
    p.add_argument("--out", default=None, help="run folder (default: runs/demo-<date>-<time>)")
    p.add_argument("--data_root", default=None,
                   help="synthetic dataset folder; generated there if missing, reused if it holds the same world "
                        "(default: data/synthetic-default or data/synthetic-quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic world (default 0)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds for the students (default 0)")
    p.add_argument("--teacher_epochs", type=int, default=None, help="override the profile's teacher epochs")
    p.add_argument("--student_epochs", type=int, default=None, help="override the profile's student epochs")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    p.add_argument("--stages", default="all",
                   help="comma-separated subset of data,teacher,export,students (default all)")
    return p


def stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def ensure_dataset(data_root: Path, cfg: SyntheticConfig) -> dict[str, Any]:
    """Generate the synthetic world into ``data_root`` unless an identical complete one is there."""
    marker = data_root / MARKER
    want = config_dict(cfg)
    if marker.is_file():
        made = json.loads(marker.read_text())
        if made.get("status") == "complete" and made.get("config") == want:
            print(f"reusing {data_root} (same world, seed {cfg.seed})")
            return made
        print(f"{data_root} holds a different or incomplete world: regenerating")
    t0 = time.perf_counter()
    summary = generate_dataset(data_root, config=cfg, overwrite=True)
    print(f"generated {cfg.tracks} tracks x {cfg.frames} frames in {time.perf_counter() - t0:.1f} s -> {data_root}")
    return summary


def run_stage(name: str, main, argv: list[str]) -> None:
    """Run a pipeline's ``main(argv)`` in-process; raise if it fails."""
    print("$ python -m pipelines." + name + " " + " ".join(argv), flush=True)
    rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"pipelines.{name} failed with exit code {rc}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prof = dict(PROFILES["quick" if args.quick else "default"])
    if args.teacher_epochs is not None:
        prof["teacher_epochs"] = args.teacher_epochs
    if args.student_epochs is not None:
        prof["student_epochs"] = args.student_epochs
    stages = {"data", "teacher", "export", "students"} if args.stages == "all" else set(args.stages.split(","))
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
        from pipelines import check_dataset
        run_stage("check_dataset", check_dataset.main, [str(data_root), "--no_progress"])
        if "teacher" in stages:
            summary["teacher"] = teacher_stage(args, prof, data_root, run)
    except Exception as e:  # noqa: BLE001 - the demo reports any failure and exits non-zero
        print(f"\ndemo: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    (run / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"\ndemo finished in {summary['seconds']:.0f} s; everything is in {run}/ (summary.json)")
    return 0


def teacher_stage(args: argparse.Namespace, prof: dict[str, Any], data_root: Path, run: Path) -> dict[str, Any]:
    from pipelines import eval_teacher, train_teacher
    stage("3. train the tiny LiDAR teacher")
    ckpt = run / "teacher.pt"
    run_stage("train_teacher", train_teacher.main,
              ["--data_root", str(data_root), "--preset", "tiny", "--epochs", str(prof["teacher_epochs"]),
               "--seed", str(args.seed), "--device", args.device, "--save_path", str(ckpt),
               "--checkpoint_path", str(run / "teacher_last.pt"), "--no_progress"])
    stage("4. evaluate the teacher on the held-out test track")
    out = eval_teacher.evaluate_teacher(eval_teacher.build_parser().parse_args(
        ["--data_root", str(data_root), "--split", "test", "--teacher_ckpt", str(ckpt), "--device", args.device,
         "--csv_path", str(run / "eval_teacher_test.csv"), "--plot_path", str(run / "eval_teacher_test.png"),
         "--no_progress"]))
    from e2r.metrics import metrics_table
    print(metrics_table(out["results"]))
    return {"checkpoint": str(ckpt), "test": out["results"]}


if __name__ == "__main__":
    sys.exit(main())
