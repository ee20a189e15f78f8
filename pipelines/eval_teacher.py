"""Offline evaluation of a LiDAR teacher checkpoint on one split, next to two trivial baselines.

    python -m pipelines.eval_teacher --data_root data/synth --split valid --teacher_ckpt runs/teacher_best.pt \\
        --overall_weights 1.0,0.05 --csv_path runs/eval_teacher.csv --plot_path runs/eval_teacher.png

Prints per-action MSE / MAE / RMSE (degrees, m/s) over every (window, step) of the split and the weighted
overall ``sum_a w_a * MSE_a``, for:
  teacher                 the checkpoint (architecture and normalisation come from the checkpoint);
  baseline_train_mean     always the training split's mean action (stored in the checkpoint);
  baseline_prev_steering  steering = the previous command (the model's steering input, wheel_angle[t-1]),
                          speed = the current speed input (velocity[t]).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from e2r.data.datasets import LidarSequenceDataset, collate_lidar
from e2r.keys import parse_key
from e2r.metrics import ActionErrorAccumulator, parse_overall_weights, plot_segment, segment_series, write_metrics_csv
from e2r.models.teacher import load_teacher
from e2r.training import DistContext, make_loader, resolve_device, run_epoch
from pipelines._common import add_eval_input_args, add_eval_output_args, add_eval_window_args, eval_main, num_features

PREDICTORS = ("teacher", "baseline_train_mean", "baseline_prev_steering")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.eval_teacher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_input_args(p, "teacher")
    add_eval_window_args(p)
    p.add_argument("--lidar_num_features", default="auto", help="columns per point: 4, 5, 8 or auto")
    add_eval_output_args(p)
    return p


def evaluate_teacher(args: argparse.Namespace) -> dict[str, Any]:
    """Returns ``{"results": {predictor: metrics}, "plot_path", "csv_path", "num_windows"}``."""
    weights = parse_overall_weights(args.overall_weights)
    device = resolve_device(args.device)
    model, ckpt = load_teacher(args.teacher_ckpt, device)
    nf = num_features(args.lidar_num_features)
    ds = LidarSequenceDataset(args.data_root, args.split, args.seq_len, args.stride, nf)
    if len(ds) == 0:
        raise ValueError(f"{args.data_root}/{args.split}: no windows of seq_len={args.seq_len}")
    loader, _ = make_loader(ds, args.batch_size, False, 0, args.num_workers, collate_lidar, DistContext())
    accs = {name: ActionErrorAccumulator(weights) for name in PREDICTORS}
    keys: list[str] = []
    preds, targets = [], []
    mean = model.action_mean.cpu()

    def step(batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        target = batch["actions"]
        pred = model([p.to(device) for p in batch["points"]], batch["speed"].to(device),
                     batch["steering"].to(device)).cpu()
        prev = torch.stack([batch["steering"], batch["speed"]], dim=-1)
        accs["teacher"].update(pred, target)
        accs["baseline_train_mean"].update(mean.expand_as(target), target)
        accs["baseline_prev_steering"].update(prev, target)
        keys.extend(batch["keys"])
        preds.append(pred)
        targets.append(target)
        return ((pred - target) ** 2).mean(), int(target.shape[0])

    run_epoch(loader, step, None, desc=f"eval {args.split}", show_progress=not args.no_progress)
    results = {name: acc.compute() for name, acc in accs.items()}
    if args.csv_path:
        write_metrics_csv(args.csv_path, [{"predictor": name, "split": args.split, "checkpoint": args.teacher_ckpt,
                                           **r} for name, r in results.items()])
    if args.plot_path:
        segment = args.plot_segment or parse_key(ds.keys[0]).segment
        pred_all, target_all = torch.cat(preds), torch.cat(targets)
        frames, pred_series, target_series = segment_series(keys, pred_all, target_all, segment)
        plot_segment(args.plot_path, frames, {"teacher": pred_series}, target_series,
                     f"teacher on {args.split}/{segment} ({ckpt['config'].get('preset', '?')} preset)")
    return {"results": results, "plot_path": args.plot_path, "csv_path": args.csv_path, "num_windows": len(ds)}


def main(argv: list[str] | None = None) -> int:
    return eval_main("eval_teacher", build_parser(), evaluate_teacher, argv)


if __name__ == "__main__":
    sys.exit(main())
