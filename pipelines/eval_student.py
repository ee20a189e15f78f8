"""Offline evaluation of a camera student checkpoint on one split, next to two trivial baselines, and (with
``--memorybank``) the KD gap to the teacher whose outputs the store holds.

    python -m pipelines.eval_student --data_root data/synth --split test --student_ckpt runs/student_best.pt \\
        --memorybank runs/mb.zarr --overall_weights 1.0,0.05 --csv_path runs/eval_student.csv \\
        --plot_path runs/eval_student.png

Prints per-action MSE / MAE / RMSE (degrees, m/s) over every (window, step) of the split and the weighted
overall ``sum_a w_a * MSE_a``, for:
  student                 the checkpoint (architecture, image size and normalisation come from it);
  baseline_train_mean     always the training split's mean action (stored in the checkpoint);
  baseline_prev_steering  steering = the previous command (wheel_angle[t-1]), speed = the speed input.
KD gap (windows whose key is in the store): per-action MSE and weighted overall between the student's and
the teacher's actions, mean bev_vec cosine similarity, gru_out MSE. In the CSV the gap is extra columns
(``kd_*``) of the student row.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import torch.nn.functional as F

from e2r.data.datasets import CameraSequenceDataset
from e2r.kd_data import LIGHT_KD_FIELDS, KDCameraBatches, batch_to, check_store, make_kd_loader
from e2r.keys import parse_key
from e2r.metrics import ActionErrorAccumulator, parse_overall_weights, plot_segment, segment_series, write_metrics_csv
from e2r.models.student import load_student
from e2r.training import DistContext, resolve_device, run_epoch
from pipelines._common import add_eval_input_args, add_eval_output_args, add_eval_window_args, eval_main
from pipelines.train_student import open_memorybank

PREDICTORS = ("student", "baseline_train_mean", "baseline_prev_steering")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.eval_student", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_input_args(p, "student")
    p.add_argument("--memorybank", "--teacher_cache_dir", dest="memorybank", default=None,
                   help="memorybank of teacher outputs: also report the KD gap to the teacher on its keys")
    add_eval_window_args(p)
    add_eval_output_args(p)
    return p


class KDGapAccumulator:
    """Student vs teacher over the windows with teacher targets: ``update(pred (B,T,A), aux, teacher, has_kd)``
    then ``compute()`` -> ``{"kd_n", "kd_<action>_mse", "kd_overall_weighted_mse", "kd_bev_vec_cosine",
    "kd_gru_out_mse"}`` (``kd_n``: windows; all NaN when no window had targets)."""

    def __init__(self, overall_weights: tuple[float, ...]) -> None:
        self.actions = ActionErrorAccumulator(overall_weights)
        self.cos_sum, self.cos_n, self.gru_sum, self.gru_n, self.windows = 0.0, 0, 0.0, 0, 0

    def update(self, pred: torch.Tensor, aux: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
               has_kd: torch.Tensor) -> None:
        m = has_kd.to(pred.device, torch.bool)
        if not bool(m.any()):
            return
        self.windows += int(m.sum())
        self.actions.update(pred[m], teacher["actions"][m].to(pred))
        cos = F.cosine_similarity(aux["bev_vec_seq"][m], teacher["bev_vec"][m].to(pred), dim=-1, eps=1e-8)
        self.cos_sum += float(cos.double().sum())
        self.cos_n += cos.numel()
        err = (aux["gru_out"][m] - teacher["gru_out"][m].to(pred)) ** 2
        self.gru_sum += float(err.double().sum())
        self.gru_n += err.numel()

    def compute(self) -> dict[str, float]:
        nan = float("nan")
        if self.windows == 0:
            return {"kd_n": 0.0, "kd_steering_mse": nan, "kd_speed_mse": nan, "kd_overall_weighted_mse": nan,
                    "kd_bev_vec_cosine": nan, "kd_gru_out_mse": nan}
        a = self.actions.compute()
        out = {"kd_n": float(self.windows)}
        out.update({f"kd_{k}": v for k, v in a.items() if k.endswith("_mse")})
        out["kd_bev_vec_cosine"] = self.cos_sum / self.cos_n
        out["kd_gru_out_mse"] = self.gru_sum / self.gru_n
        return out


def evaluate_student(args: argparse.Namespace) -> dict[str, Any]:
    """Returns ``{"results": {predictor: metrics}, "kd_gap": dict or None, "plot_path", "csv_path",
    "num_windows"}``; raises DataError / CheckpointError / ValueError on bad input."""
    weights = parse_overall_weights(args.overall_weights)
    device = resolve_device(args.device)
    model, ckpt = load_student(args.student_ckpt, device)
    cfg = model.cfg
    ds = CameraSequenceDataset(args.data_root, args.split, args.seq_len, args.stride, tuple(cfg.image_size))
    if len(ds) == 0:
        raise ValueError(f"{args.data_root}/{args.split}: no windows of seq_len={args.seq_len}")
    if args.memorybank:
        schema, teacher_cfg = open_memorybank(args.memorybank)
        check_store(args.memorybank, schema, args.seq_len, ds.frame_actions().shape[1], cfg, False, teacher_cfg)
    data = KDCameraBatches(ds, args.memorybank, LIGHT_KD_FIELDS)
    loader, _ = make_kd_loader(data, args.batch_size, False, 0, args.num_workers, DistContext())
    accs = {name: ActionErrorAccumulator(weights) for name in PREDICTORS}
    gap = KDGapAccumulator(weights) if args.memorybank else None
    keys: list[str] = []
    preds, targets = [], []
    mean = model.action_mean.cpu()

    def step(batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        b = batch_to(batch, device)
        pred, aux = model(b["images"], b["intrinsics"], b["cam2ego"], b["speed"], b["steering"], return_aux=True)
        target = batch["actions"]
        prev = torch.stack([batch["steering"], batch["speed"]], dim=-1)
        accs["student"].update(pred.cpu(), target)
        accs["baseline_train_mean"].update(mean.expand_as(target), target)
        accs["baseline_prev_steering"].update(prev, target)
        if gap is not None:
            gap.update(pred, aux, b["teacher"], b["has_kd"])
        keys.extend(batch["keys"])
        preds.append(pred.cpu())
        targets.append(target)
        return ((pred.cpu() - target) ** 2).mean(), int(target.shape[0])

    run_epoch(loader, step, None, desc=f"eval {args.split}", show_progress=not args.no_progress)
    results = {name: acc.compute() for name, acc in accs.items()}
    kd_gap = gap.compute() if gap is not None else None
    if args.csv_path:
        rows = [{"predictor": name, "split": args.split, "checkpoint": args.student_ckpt, **r,
                 **(kd_gap if kd_gap is not None and name == "student" else {})} for name, r in results.items()]
        write_metrics_csv(args.csv_path, rows)
    if args.plot_path:
        segment = args.plot_segment or parse_key(ds.keys[0]).segment
        frames, pred_series, target_series = segment_series(keys, torch.cat(preds), torch.cat(targets), segment)
        plot_segment(args.plot_path, frames, {"student": pred_series}, target_series,
                     f"student on {args.split}/{segment} ({ckpt['config'].get('preset', '?')} preset, "
                     f"{cfg.view_transform})")
    return {"results": results, "kd_gap": kd_gap, "plot_path": args.plot_path, "csv_path": args.csv_path,
            "num_windows": len(ds)}


def _print_kd_gap(out: dict[str, Any]) -> None:
    gap = out["kd_gap"]
    if gap is not None:
        print(f"KD gap to the teacher on {int(gap['kd_n'])} of {out['num_windows']} windows (keys in the store): "
              f"action MSE steering {gap['kd_steering_mse']:.5f}, speed {gap['kd_speed_mse']:.5f}, "
              f"overall {gap['kd_overall_weighted_mse']:.5f}; bev_vec cosine {gap['kd_bev_vec_cosine']:.4f}; "
              f"gru_out MSE {gap['kd_gru_out_mse']:.5f}")


def main(argv: list[str] | None = None) -> int:
    return eval_main("eval_student", build_parser(), evaluate_student, argv, _print_kd_gap)


if __name__ == "__main__":
    sys.exit(main())
