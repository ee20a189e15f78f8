"""Offline evaluation of a teacher or student checkpoint on one split, next to two trivial baselines, and for
the student (with a memorybank) the KD gap to the teacher whose outputs the store holds.

    out = evaluate_teacher(TeacherEvalConfig(data_root="data", split="test", teacher_ckpt="runs/teacher.pt"))
    out = evaluate_student(StudentEvalConfig(data_root="data", split="test", student_ckpt="runs/s.pt",
                                             memorybank="runs/mb.zarr"))

Per-action MSE / MAE / RMSE (degrees, m/s) over every (window, step) of the split and the weighted overall
``sum_a w_a * MSE_a``, for the model and:
  baseline_train_mean     always the training split's mean action (stored in the checkpoint);
  baseline_prev_steering  steering = the previous command (the model's steering input, wheel_angle[t-1]),
                          speed = keep the current speed (the speed input velocity[t]) as the command.
Each returns ``{"results": {predictor: metrics}, "per_segment": {segment: the model's metrics}, "segment_light",
"per_look", "plot_path", "csv_path", "num_windows"}`` (the student also ``"kd_gap"``); the CSV and plot are
written when their paths are set.

Per segment, beside the physical metrics, the loss in normalised units (:func:`segment_report`):
``loss_norm`` = ``sum_a w_a * MSE_a`` of the actions normalised by the checkpoint's training mean/std (the
training loss without its extra terms, at the overall weights), ``baseline_mean_loss_norm`` the same for
always predicting the training mean, ``loss_vs_mean`` their ratio (1.0 = no better than the mean). On a
synthetic world ``segment_light`` gives each segment's light (noon / dusk / night, the world's own rule:
``e2r.sim.world.segment_lights``) and ``per_look`` the mean of every per-segment metric over the segments of
each light (``"segments"``: how many); on real data without a look ``{}`` and None.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from e2r.data.datasets import CameraSequenceDataset, LidarSequenceDataset, collate_lidar
from stores.keys import parse_key
from e2r.metrics import (ActionErrorAccumulator, parse_overall_weights, per_segment_metrics, plot_segment,
                         segment_series, write_metrics_csv)
from e2r.models.policy import TemporalPolicy
from e2r.models.student import load_student
from e2r.models.teacher import load_teacher
from e2r.runtime import DistContext, resolve_device
from e2r.sim.appearance import LIGHTS
from e2r.sim.world import segment_lights
from e2r.workflow.configs import StudentEvalConfig, TeacherEvalConfig
from e2r.workflow.kd_data import TeacherTargets, batch_to, make_kd_loader
from e2r.workflow.retrieval_kd import RetrievalCheck
from e2r.workflow.trainer import make_window_loader, run_epoch

__all__ = ["TEACHER_PREDICTORS", "STUDENT_PREDICTORS", "evaluate_teacher", "evaluate_student", "KDGapAccumulator",
           "print_kd_gap", "segment_report", "per_look_summary", "print_per_look"]

TEACHER_PREDICTORS = ("teacher", "baseline_train_mean", "baseline_prev_steering")
STUDENT_PREDICTORS = ("student", "baseline_train_mean", "baseline_prev_steering")


def evaluate_teacher(cfg: TeacherEvalConfig) -> dict[str, Any]:
    """Returns ``{"results": {predictor: metrics}, "per_segment", "segment_light", "per_look", "plot_path",
    "csv_path", "num_windows"}``."""
    weights = parse_overall_weights(cfg.overall_weights)
    device = resolve_device(cfg.device)
    model, ckpt = load_teacher(cfg.teacher_ckpt, device)
    nf = cfg.lidar_num_features
    ds = LidarSequenceDataset(cfg.data_root, cfg.split, cfg.seq_len, cfg.stride, nf)
    if len(ds) == 0:
        raise ValueError(f"{cfg.data_root}/{cfg.split}: no windows of seq_len={cfg.seq_len}")
    loader, _ = make_window_loader(ds, cfg.batch_size, False, 0, cfg.num_workers, collate_lidar, DistContext())
    accs = {name: ActionErrorAccumulator(weights) for name in TEACHER_PREDICTORS}
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

    run_epoch(loader, step, None, desc=f"eval {cfg.split}", show_progress=not cfg.no_progress)
    results = {name: acc.compute() for name, acc in accs.items()}
    segments = segment_report(cfg.data_root, cfg.split, keys, torch.cat(preds), torch.cat(targets), model, weights)
    if cfg.csv_path:
        write_metrics_csv(cfg.csv_path, [{"predictor": name, "split": cfg.split, "checkpoint": cfg.teacher_ckpt,
                                           **r} for name, r in results.items()])
    if cfg.plot_path:
        segment = cfg.plot_segment or parse_key(ds.keys[0]).segment
        pred_all, target_all = torch.cat(preds), torch.cat(targets)
        frames, pred_series, target_series = segment_series(keys, pred_all, target_all, segment)
        plot_segment(cfg.plot_path, frames, {"teacher": pred_series}, target_series,
                     f"teacher on {cfg.split}/{segment} ({ckpt['config'].get('preset', '?')} preset)")
    return {"results": results, **segments, "plot_path": cfg.plot_path, "csv_path": cfg.csv_path,
            "num_windows": len(ds)}


def segment_report(data_root: str, split: str, keys: list[str], pred: torch.Tensor, target: torch.Tensor,
                   model: TemporalPolicy, weights: tuple[float, ...]) -> dict[str, Any]:
    """``{"per_segment": {segment: metrics + loss_norm, baseline_mean_loss_norm, loss_vs_mean}, "segment_light":
    {segment: light} (the segments the synthetic world made; {} on real data), "per_look": per_look_summary or
    None}`` (module docstring).

    keys: N window keys; pred, target (N, T, A) physical actions on the CPU; ``model`` holds the training split's
    action mean/std."""
    per_segment = per_segment_metrics(keys, pred, target, weights)
    mean, std = model.action_mean.detach().cpu(), model.action_std.detach().cpu()
    norm = per_segment_metrics(keys, (pred - mean) / std, (target - mean) / std, weights)
    base = per_segment_metrics(keys, torch.zeros_like(target), (target - mean) / std, weights)
    for seg, m in per_segment.items():
        m["loss_norm"] = norm[seg]["overall_weighted_mse"]
        m["baseline_mean_loss_norm"] = base[seg]["overall_weighted_mse"]
        m["loss_vs_mean"] = m["loss_norm"] / max(m["baseline_mean_loss_norm"], 1e-12)
    known = segment_lights(data_root, split)     # segments the world did not make (a recorded drive) have none
    lights = {seg: known[seg] for seg in per_segment if seg in known}
    return {"per_segment": per_segment, "segment_light": lights,
            "per_look": per_look_summary(per_segment, lights) if lights else None}


def per_look_summary(per_segment: dict[str, dict[str, float]], lights: dict[str, str]
                     ) -> dict[str, dict[str, float]]:
    """``{light: {metric: mean over the light's segments, "segments": count}}`` in ``LIGHTS`` order (lights
    with no segment, and segments without a light in ``lights``, left out)."""
    out: dict[str, dict[str, float]] = {}
    for light in LIGHTS:
        rows = [m for seg, m in per_segment.items() if lights.get(seg) == light]
        if rows:
            out[light] = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
            out[light]["segments"] = float(len(rows))
    return out


def print_per_look(out: dict[str, Any]) -> None:
    """Each segment's light, then the per-look table (nothing when the data has no look)."""
    if not out.get("per_look"):
        return
    lights = out["segment_light"]
    print("light per segment: " + ", ".join(f"{seg} {light}" for seg, light in lights.items()))
    cols = ("steering_mse", "speed_mse", "overall_weighted_mse", "loss_norm", "baseline_mean_loss_norm",
            "loss_vs_mean")
    print("per look (mean over its segments)".ljust(36) + "".join(c.rjust(24) for c in ("segments",) + cols))
    for light, m in out["per_look"].items():
        print(light.ljust(36) + f"{int(m['segments']):24d}" + "".join(f"{m[c]:24.5f}" for c in cols))


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


def evaluate_student(cfg: StudentEvalConfig) -> dict[str, Any]:
    """Returns ``{"results": {predictor: metrics}, "per_segment", "segment_light", "per_look", "kd_gap": dict or
    None, "damaged_keys" (with ``skip_damaged``: keys whose teacher row is damaged, left out of the KD gap),
    "plot_path", "csv_path", "num_windows"}``; raises DataError / CheckpointError / ValueError on bad input."""
    weights = parse_overall_weights(cfg.overall_weights)
    device = resolve_device(cfg.device)
    model, ckpt = load_student(cfg.student_ckpt, device)
    model_cfg = model.cfg
    ds = CameraSequenceDataset(cfg.data_root, cfg.split, cfg.seq_len, cfg.stride, tuple(model_cfg.image_size))
    if len(ds) == 0:
        raise ValueError(f"{cfg.data_root}/{cfg.split}: no windows of seq_len={cfg.seq_len}")
    teacher = TeacherTargets.for_run(cfg, ds, model_cfg)
    retriever, pairing = teacher.retriever, teacher.pairing
    check = RetrievalCheck(weights) if retriever is not None else None
    loader, _ = make_kd_loader(ds, teacher, cfg.batch_size, False, 0, cfg.num_workers, DistContext(), cfg.kd_targets)
    accs = {name: ActionErrorAccumulator(weights) for name in STUDENT_PREDICTORS}
    gap = KDGapAccumulator(weights) if cfg.memorybank else None
    keys: list[str] = []
    damaged: list[str] = []          # with --skip_damaged: windows whose teacher row failed its checks
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
        if gap is not None:     # the gap to the teacher's own rows (retrieved targets are checked apart)
            gap.update(pred, aux, b["teacher"], b["has_kd"] & ~b.get("retrieved", torch.zeros_like(b["has_kd"])))
        if check is not None:
            check.update(retriever, teacher.reader, batch, aux)
        keys.extend(batch["keys"])
        damaged.extend(k for k, d in zip(batch["keys"], batch["damaged"].tolist()) if d)
        preds.append(pred.cpu())
        targets.append(target)
        return ((pred.cpu() - target) ** 2).mean(), int(target.shape[0])

    run_epoch(loader, step, None, desc=f"eval {cfg.split}", show_progress=not cfg.no_progress)
    results = {name: acc.compute() for name, acc in accs.items()}
    segments = segment_report(cfg.data_root, cfg.split, keys, torch.cat(preds), torch.cat(targets), model, weights)
    kd_gap = gap.compute() if gap is not None else None
    if cfg.csv_path:
        rows = [{"predictor": name, "split": cfg.split, "checkpoint": cfg.student_ckpt, **r,
                 **(kd_gap if kd_gap is not None and name == "student" else {})} for name, r in results.items()]
        write_metrics_csv(cfg.csv_path, rows)
    if cfg.plot_path:
        segment = cfg.plot_segment or parse_key(ds.keys[0]).segment
        frames, pred_series, target_series = segment_series(keys, torch.cat(preds), torch.cat(targets), segment)
        plot_segment(cfg.plot_path, frames, {"student": pred_series}, target_series,
                     f"student on {cfg.split}/{segment} ({ckpt['config'].get('preset', '?')} preset, "
                     f"{model_cfg.view_transform})")
    return {"results": results, **segments, "kd_gap": kd_gap, "damaged_keys": damaged,
            "retrieval": check.compute() if check is not None else None,
            "pairing": pairing.describe(ds.keys, cfg.pair_lidar_root) if pairing is not None else None,
            "plot_path": cfg.plot_path, "csv_path": cfg.csv_path, "num_windows": len(ds)}


def print_kd_gap(out: dict[str, Any]) -> None:
    gap = out["kd_gap"]
    if gap is not None:
        print(f"KD gap to the teacher on {int(gap['kd_n'])} of {out['num_windows']} windows (keys in the store): "
              f"action MSE steering {gap['kd_steering_mse']:.5f}, speed {gap['kd_speed_mse']:.5f}, "
              f"overall {gap['kd_overall_weighted_mse']:.5f}; bev_vec cosine {gap['kd_bev_vec_cosine']:.4f}; "
              f"gru_out MSE {gap['kd_gru_out_mse']:.5f}")
    if out.get("pairing"):
        print(out["pairing"])
    r = out.get("retrieval")
    if r is not None:
        print(f"retrieval ({int(r['retrieved_n'])} windows without a row): best similarity p10/p50/p90 "
              f"{r['similarity_p10']:.3f}/{r['similarity_p50']:.3f}/{r['similarity_p90']:.3f}; on "
              f"{int(r['pairs_n'])} windows with a true pair (own segment +-T excluded): retrieved vs true targets "
              f"action MSE {r['pairs_action_overall_mse']:.5f}, bev_vec cosine {r['pairs_bev_vec_cosine']:.4f}")
    if out.get("damaged_keys"):
        keys = out["damaged_keys"]
        print(f"--skip_damaged: {len(keys)} window(s) whose teacher row is damaged were left out of the KD gap "
              f"(first: {', '.join(keys[:3])}); `python -m stores verify` lists the damage")
