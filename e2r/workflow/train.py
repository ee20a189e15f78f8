"""Teacher and student training runs: a dataset, a model, a :class:`~e2r.workflow.trainer.TrainTask` (the
batch and its loss) and the one :class:`~e2r.workflow.trainer.Trainer`.

    result = train_teacher(TeacherTrainConfig(data_root="data", epochs=8, save_path="runs/teacher.pt"))
    result = train_student(StudentTrainConfig(data_root="data", memorybank="runs/mb.zarr"))

Both return ``{"history", "best_metric", "save_path", "checkpoint_path", "config"}`` (the student also
``"valid_losses"``: per-epoch BC weighted MSE on the valid split, normalised units) and raise DataError /
CheckpointError / ValueError on bad input.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from typing import Any

import torch

from e2r.checkpoints import check_fits, load_checkpoint, save_checkpoint
from e2r.data.augment import photometric_jitter, zoom_crop
from e2r.data.datasets import CameraSequenceDataset, LidarSequenceDataset, collate_lidar
from e2r.errors import ConfigError
from e2r.kd import FovMasks, KDWeights, hflip_lidar, student_losses
from e2r.losses import action_loss, action_weights, braking_weights, weighted_action_mse
from e2r.models.config import TeacherConfig
from e2r.models.policy import DEFAULT_HEAD
from e2r.models.student import CameraBEVStudent
from e2r.models.student_config import StudentConfig
from e2r.models.teacher import LiDARBEVTeacher
from e2r.runtime import DistContext, all_reduce_sums, in_process_group, resolve_device, seed_everything
from e2r.sim.drive import DriveConfig, drive
from e2r.workflow.configs import StudentTrainConfig, TeacherTrainConfig
from e2r.workflow.kd_data import (TeacherTargets, batch_to, hflip_batch, make_kd_loader, read_store_schema,
                                  store_open_kw, teacher_config_of_checkpoint)
from e2r.workflow.retrieval_kd import Retriever, retrieve_for_student
from e2r.workflow.trainer import TrainTask, Trainer, make_window_loader, train_valid_datasets, unwrap
from stores.torch_data import TeacherRowReader

__all__ = ["train_teacher", "train_student", "kd_weights_of", "build_student_config", "student_model_config",
           "STUDENT_MODEL_FLAGS", "PART_NAMES"]

PART_NAMES = ("bc", "kd_action", "kd_bev_vec", "kd_temporal", "kd_bev_feat", "kd_depth", "kd_total")


def drop_steering_input(steering: torch.Tensor, p: float) -> torch.Tensor:
    """The previous-steering input (B, T) with whole windows zeroed with probability ``p`` (global torch RNG:
    part of the checkpointed RNG state), so the policy cannot only copy its last command."""
    if p <= 0:
        return steering
    keep = (torch.rand(steering.shape[0]) >= p).to(steering.dtype)
    return steering * keep[:, None]


class TeacherTask(TrainTask):
    """Weighted MSE of the teacher's actions on a LiDAR batch (normalised units)."""

    def __init__(self, net: torch.nn.Module, model: LiDARBEVTeacher, cfg: TeacherTrainConfig,
                 device: torch.device) -> None:
        self.net, self.model, self.cfg, self.device = net, model, cfg, device
        self.weights = action_weights(cfg.steer_loss_weight, cfg.speed_loss_weight).to(device)

    def train_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        if self.cfg.hflip_prob > 0:   # global torch RNG: part of the checkpointed RNG state
            flip = torch.rand(len(batch["keys"])) < self.cfg.hflip_prob
            points, steering, actions = hflip_lidar(batch["points"], batch["steering"], batch["actions"], flip,
                                                    batch["steering"].shape[1])
            batch = {**batch, "points": points, "steering": steering, "actions": actions}
        return self._loss(batch, self.cfg.steer_input_dropout)

    def valid_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        return self._loss(batch, 0.0)

    def _loss(self, batch: dict[str, Any], steer_dropout: float) -> tuple[torch.Tensor, int]:
        d = self.device
        steering = drop_steering_input(batch["steering"], steer_dropout)
        pred = self.net([p.to(d, non_blocking=True) for p in batch["points"]], batch["speed"].to(d), steering.to(d))
        target = batch["actions"].to(d)
        sample_weights = None
        if self.cfg.brake_weight > 0:           # (B, T, A): steering 1, speed by the m/s its label sheds
            speed_w = braking_weights(batch["speed"].to(d), target[..., 1], self.cfg.brake_weight)
            sample_weights = torch.stack([torch.ones_like(speed_w), speed_w], dim=-1)
        loss = action_loss(self.model.normalize_actions(pred), self.model.normalize_actions(target), self.weights,
                           self.cfg.smooth_weight, sample_weights)
        return loss, int(target.shape[0])


def train_teacher(cfg: TeacherTrainConfig) -> dict[str, Any]:
    """Train the LiDAR teacher described by ``cfg`` (see the module docstring)."""
    return in_process_group(cfg.device, lambda ctx: _train_teacher(cfg, ctx))


def _train_teacher(cfg: TeacherTrainConfig, ctx: DistContext) -> dict[str, Any]:
    epochs, lr, batch_size = cfg.hparams()
    device = resolve_device(cfg.device, ctx.local_rank)
    seed_everything(cfg.seed)
    resume = load_checkpoint(cfg.resume_path, kind="teacher") if cfg.resume_path else None
    model_cfg = teacher_model_config(cfg, resume)
    train_ds, valid_ds = train_valid_datasets(
        cfg, lambda split, segments: LidarSequenceDataset(cfg.data_root, split, cfg.seq_len, cfg.stride,
                                                          cfg.lidar_num_features, segments=segments))
    model = LiDARBEVTeacher(model_cfg)
    trainer = Trainer(cfg, "teacher", model, train_ds, resume, ctx, device)
    train_loader, train_sampler = make_window_loader(train_ds, batch_size, True, cfg.seed, cfg.num_workers,
                                                     collate_lidar, ctx)
    valid_loader = (make_window_loader(valid_ds, batch_size, False, cfg.seed, cfg.num_workers, collate_lidar,
                                       ctx)[0] if valid_ds is not None and len(valid_ds) else None)
    task = TeacherTask(trainer.net, model, cfg, device)
    return trainer.fit(task, train_loader, train_sampler, valid_loader, model_cfg.to_dict())


def refuse_differing(path_flag: str, path: str, have: Any, flag: str, value: Any) -> None:
    """A ConfigError naming ``--flag`` when its ``value`` (None: not given) differs from the model config ``have``
    of the checkpoint at ``path`` (given by ``path_flag``): a model flag is honoured or refused, never dropped."""
    if value is not None and value != getattr(have, flag):
        why = "the run continues as it was" if path_flag == "--resume_path" else "its weights fit only that"
        raise ConfigError(f"--{flag} {value}: {path_flag} {path} has {flag}={getattr(have, flag)!r} and {why}; "
                          f"give --{flag} {getattr(have, flag)}")


def teacher_model_config(cfg: TeacherTrainConfig, resume: dict[str, Any] | None) -> TeacherConfig:
    """The teacher a run trains: the resumed run's own (``--residual_actions``/``--bev_pool_grid`` must agree),
    the ``--init_path`` checkpoint's when every weight transfers (its head replaced by ``--residual_actions``
    when given: every head has the same weights; ``--bev_pool_grid`` must agree, it sizes the GRU's input), or
    the preset's with both flags (the head defaulting to ``DEFAULT_HEAD``). A flag that cannot be honoured is a
    ConfigError naming it, never silently dropped."""
    if resume:
        check_fits(cfg.resume_path, resume, lambda c: LiDARBEVTeacher(TeacherConfig.from_dict(c)))
        model_cfg = TeacherConfig.from_dict(resume["config"])
        for flag in ("residual_actions", "bev_pool_grid"):
            refuse_differing("--resume_path", str(cfg.resume_path), model_cfg, flag, getattr(cfg, flag))
        return model_cfg
    if cfg.init_path and not cfg.init_skip_output_layer:     # every weight transferred: that model's config
        model_cfg = TeacherConfig.from_dict(load_checkpoint(cfg.init_path, kind="teacher")["config"])
        refuse_differing("--init_path", str(cfg.init_path), model_cfg, "bev_pool_grid", cfg.bev_pool_grid)
        return model_cfg if cfg.residual_actions is None else replace(model_cfg, residual_actions=cfg.residual_actions)
    return replace(TeacherConfig.preset_named(cfg.preset), residual_actions=cfg.residual_actions or DEFAULT_HEAD,
                   **({} if cfg.bev_pool_grid is None else {"bev_pool_grid": cfg.bev_pool_grid}))


def kd_weights_of(cfg: StudentTrainConfig) -> KDWeights:
    """KDWeights from the ``kd_*`` fields (all 0 without a memorybank)."""
    on = bool(cfg.memorybank)
    return KDWeights(action=cfg.kd_action_w * on, bev_vec=cfg.kd_bevvec_w * on, temporal=cfg.kd_temporal_w * on,
                     bev_feat=cfg.kd_bevfeat_w * on, depth=cfg.kd_depth_w * on, steer_weight=cfg.steer_loss_weight,
                     speed_weight=cfg.speed_loss_weight, bev_feat_background=cfg.kd_bevfeat_background)


#: the train_student flags that are fields of the student's model config
STUDENT_MODEL_FLAGS = ("view_transform", "splat_pool", "bev_pool_grid", "norm", "input_norm")


def build_student_config(cfg: StudentTrainConfig, teacher_cfg: TeacherConfig | None) -> StudentConfig:
    """Student preset ``cfg.preset`` on the teacher's grid/sizes and head (``cfg.preset``'s teacher with the
    default teacher head, ``DEFAULT_HEAD``, when there is no teacher)."""
    teacher = teacher_cfg if teacher_cfg is not None else replace(
        TeacherConfig.preset_named(cfg.preset), residual_actions=DEFAULT_HEAD)
    return StudentConfig.from_teacher(teacher, cfg.preset, **{f: getattr(cfg, f) for f in STUDENT_MODEL_FLAGS})


def student_model_config(cfg: StudentTrainConfig, teacher_cfg: TeacherConfig | None,
                         resume: dict[str, Any] | None) -> StudentConfig:
    """The student a run trains: the flags' (:func:`build_student_config`), or the resumed run's own, where every
    model flag (:data:`STUDENT_MODEL_FLAGS`) must agree with that run's: a ConfigError names the one that does
    not, never silently dropped."""
    if not resume:
        return build_student_config(cfg, teacher_cfg)
    have = StudentConfig.from_dict(dict(resume["config"]))
    for flag in STUDENT_MODEL_FLAGS:
        refuse_differing("--resume_path", str(cfg.resume_path), have, flag, getattr(cfg, flag))
    return have


class StudentTask(TrainTask):
    """BC + KD loss of a camera batch (optionally mirrored); per-epoch KD/BC-only counts and loss parts."""

    def __init__(self, net: torch.nn.Module, model: CameraBEVStudent, cfg: StudentTrainConfig, kd: KDWeights,
                 device: torch.device) -> None:
        self.net, self.model, self.cfg, self.kd, self.device = net, model, cfg, kd, device
        self.weights = action_weights(cfg.steer_loss_weight, cfg.speed_loss_weight).to(device)
        self.fov_masks = FovMasks(model.cfg)
        self.sums: dict[str, float] = {}
        self.retrieval: tuple[Retriever, TeacherRowReader] | None = None   # set for --kd_retrieval of kind student

    def begin_epoch(self) -> None:
        self.sums.clear()

    def train_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        flip = torch.zeros(len(batch["keys"]), dtype=torch.bool)
        if self.cfg.hflip_prob > 0:   # global torch RNG: part of the checkpointed RNG state
            flip = torch.rand(len(batch["keys"])) < self.cfg.hflip_prob
            batch = hflip_batch(batch, flip, self.model.cfg.bev_grid)
        batch["steering"] = drop_steering_input(batch["steering"], self.cfg.steer_input_dropout)
        batch["images"], batch["intrinsics"] = zoom_crop(batch["images"], batch["intrinsics"], self.cfg.crop_zoom)
        batch["images"] = photometric_jitter(batch["images"], self.cfg.photometric)   # global RNG, like the flips
        batch = batch_to(batch, self.device)
        retrieval = self.retrieval        # student-kind retrieval: the query is the loss forward's own bev_vec
        after = (lambda b, aux: retrieve_for_student(*retrieval, b, aux)) if retrieval is not None else None
        loss, parts = student_losses(self.net, self.model.normalize_actions, batch, self.weights, self.kd,
                                     self.fov_masks, flip.to(self.device), self.cfg.smooth_weight, after)
        n = len(batch["keys"])
        n_kd = float(parts["kd_samples"])
        sums = self.sums
        for name in PART_NAMES:   # bc averaged over samples, kd terms over KD samples
            sums[name] = sums.get(name, 0.0) + float(parts[name]) * (n if name == "bc" else n_kd)
        sums["kd_samples"] = sums.get("kd_samples", 0.0) + n_kd
        sums["bc_only_samples"] = sums.get("bc_only_samples", 0.0) + float(parts["bc_only_samples"])
        sums["flipped_samples"] = sums.get("flipped_samples", 0.0) + float(flip.sum())
        sums["damaged_samples"] = sums.get("damaged_samples", 0.0) + float(batch["damaged"].sum())
        if "retrieved" in batch:
            sums["retrieved_samples"] = sums.get("retrieved_samples", 0.0) + float(batch["retrieved"].sum())
        if "store_keys" in batch:     # timestamp pairing (--pair_lidar_root): windows with a pair, their confidence
            paired = [i for i, k in enumerate(batch["store_keys"]) if k is not None]
            sums["paired_samples"] = sums.get("paired_samples", 0.0) + len(paired)
            sums["unpaired_samples"] = sums.get("unpaired_samples", 0.0) + n - len(paired)
            sums["pair_confidence_sum"] = (sums.get("pair_confidence_sum", 0.0)
                                           + (float(batch["kd_weight"][paired].sum()) if paired else 0.0))
        return loss, n

    def valid_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        batch = batch_to(batch, self.device)
        pred = self.net(batch["images"], batch["intrinsics"], batch["cam2ego"], batch["speed"], batch["steering"])
        loss = weighted_action_mse(self.model.normalize_actions(pred),
                                   self.model.normalize_actions(batch["actions"]), self.weights)
        return loss, len(batch["keys"])

    def epoch_stats(self, ctx: DistContext) -> dict[str, Any]:
        stats = all_reduce_sums(self.sums, ctx)
        n_all = stats.get("kd_samples", 0.0) + stats.get("bc_only_samples", 0.0)
        entry = {"kd_samples": int(stats.get("kd_samples", 0)),
                 "bc_only_samples": int(stats.get("bc_only_samples", 0)),
                 "flipped_samples": int(stats.get("flipped_samples", 0)),
                 "damaged_samples": int(stats.get("damaged_samples", 0)),
                 "retrieved_samples": int(stats.get("retrieved_samples", 0)),
                 "train_bc": stats.get("bc", 0.0) / max(n_all, 1)}
        if "paired_samples" in stats:
            entry.update(paired_samples=int(stats["paired_samples"]), unpaired_samples=int(stats["unpaired_samples"]),
                         pair_confidence_mean=stats["pair_confidence_sum"] / max(stats["paired_samples"], 1))
        for name in PART_NAMES[1:]:
            entry[f"train_{name}"] = stats.get(name, 0.0) / max(stats.get("kd_samples", 0.0), 1)
        return entry

    def scalars(self, entry: dict[str, Any]) -> dict[str, float]:
        return {k.replace("_", "/", 1) if k.startswith(("train_", "valid_")) else k: entry[k]
                for k in ("train_loss", "valid_loss", "lr", "kd_samples", "bc_only_samples", "train_bc",
                          *(f"train_{n}" for n in PART_NAMES[1:]))}

    def notes(self, entry: dict[str, Any]) -> tuple[str, str]:
        driven = (f"valid tracks driven: success {entry['drive_success']:.0%}, progress {entry['drive_progress']:.3f}  "
                  if "drive_success" in entry else "")
        depth = f", depth {entry['train_kd_depth']:.4f}" if self.kd.depth > 0 else ""
        return (f" (bc {entry['train_bc']:.4f}, kd {entry['train_kd_total']:.4f}{depth})", driven +
                f"samples kd {entry['kd_samples']} bc-only {entry['bc_only_samples']}"
                + (f" (of them retrieved {entry['retrieved_samples']})" if entry["retrieved_samples"] else "")
                + (f"; pairs by time {entry['paired_samples']} (mean confidence {entry['pair_confidence_mean']:.3f}) "
                   f"unpaired {entry['unpaired_samples']}" if "paired_samples" in entry else "")
                + (f" (damaged rows skipped {entry['damaged_samples']})" if entry["damaged_samples"] else "") + "  ")

    def extra_state(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        return {"valid_losses": [e["valid_loss"] for e in history]}

    def selection_metric(self, entry: dict[str, Any], model_config: dict[str, Any]) -> float | None:
        """With ``--select_by drive``: drive this epoch's weights on the valid tracks in closed loop and keep
        the checkpoint with the most success + progress (laps); entry gets ``drive_success`` and
        ``drive_progress``. Deterministic, so every rank computes the same value."""
        cfg = self.cfg
        if cfg.select_by != "drive":
            return None
        with tempfile.TemporaryDirectory(prefix="e2r_select_") as tmp:
            path = save_checkpoint(os.path.join(tmp, "candidate.pt"),
                                   {"model": unwrap(self.net).state_dict(), "config": model_config}, kind="student")
            out = drive(DriveConfig(data_root=cfg.data_root, split=cfg.valid_split, policy=[f"candidate={path}"],
                                    starts=cfg.select_starts, time_limit=cfg.select_time_limit, seed=cfg.seed,
                                    device=cfg.device, no_progress=True))
        row = next(r for r in out["summary"] if r["policy"] == "candidate")
        entry["drive_success"], entry["drive_progress"] = float(row["success"]), float(row["progress"])
        return -(entry["drive_success"] + entry["drive_progress"])

    def running_state(self) -> dict[str, float]:
        return dict(self.sums)

    def load_running_state(self, state: dict[str, float]) -> None:
        self.sums = dict(state)


def train_student(cfg: StudentTrainConfig) -> dict[str, Any]:
    """Train the camera student described by ``cfg`` (see the module docstring)."""
    return in_process_group(cfg.device, lambda ctx: _train_student(cfg, ctx))


def _train_student(cfg: StudentTrainConfig, ctx: DistContext) -> dict[str, Any]:
    epochs, lr, batch_size = cfg.hparams()
    kd = kd_weights_of(cfg)
    device = resolve_device(cfg.device, ctx.local_rank)
    seed_everything(cfg.seed)
    resume = load_checkpoint(cfg.resume_path, kind="student") if cfg.resume_path else None
    if resume:
        check_fits(cfg.resume_path, resume, lambda c: CameraBEVStudent(StudentConfig.from_dict(c)))
    schema, teacher_cfg = (read_store_schema(cfg.memorybank, **store_open_kw(cfg)) if cfg.memorybank
                           else (None, None))
    if teacher_cfg is None and cfg.teacher_ckpt:     # the store records none (or there is no store)
        teacher_cfg = teacher_config_of_checkpoint(cfg.teacher_ckpt)
    model_cfg = student_model_config(cfg, teacher_cfg, resume)
    image_size = tuple(model_cfg.image_size)
    train_ds, valid_ds = train_valid_datasets(
        cfg, lambda split, segments: CameraSequenceDataset(cfg.data_root, split, cfg.seq_len, cfg.stride,
                                                           image_size, segments=segments,
                                                           image_cache_mb=cfg.image_cache_mb))
    kd_on = kd.action + kd.bev_vec + kd.temporal + kd.bev_feat + kd.depth > 0
    targets = TeacherTargets.for_run(cfg, train_ds, model_cfg, kd_on=kd_on, need_bev_feat=kd.bev_feat > 0,
                                     need_depth=kd.depth > 0,
                                     store=(schema, teacher_cfg) if schema is not None else None,
                                     min_similarity=cfg.kd_retrieval_min_sim, unpaired=cfg.kd_unpaired,
                                     log=(lambda text: print(text, flush=True)) if ctx.rank == 0 else None)
    model = CameraBEVStudent(model_cfg)
    trainer = Trainer(cfg, "student", model, train_ds, resume, ctx, device)
    train_loader, train_sampler = make_kd_loader(train_ds, targets, batch_size, True, cfg.seed, cfg.num_workers,
                                                 ctx, cfg.kd_targets)
    valid_loader = (make_kd_loader(valid_ds, TeacherTargets(), batch_size, False, cfg.seed, cfg.num_workers,
                                   ctx)[0] if valid_ds is not None and len(valid_ds) else None)
    task = StudentTask(trainer.net, model, cfg, kd, device)
    if targets.retriever is not None and not targets.retriever.at_load:
        task.retrieval = (targets.retriever, targets.row_reader())
    result = trainer.fit(task, train_loader, train_sampler, valid_loader, model_cfg.to_dict())
    return {**result, "valid_losses": [h["valid_loss"] for h in result["history"]]}
