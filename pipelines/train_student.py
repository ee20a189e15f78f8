"""Train the camera student (image CNN -> Lift-Splat -> BEV CNN -> GRU) by behaviour cloning plus knowledge
distillation from the LiDAR teacher's outputs stored in a memorybank.

    python -m pipelines.train_student --data_root data/synth --preset tiny --memorybank runs/mb.zarr \\
        --kd_action_w 1 --kd_bevvec_w 0.5 --kd_temporal_w 0.5 --save_path runs/student_best.pt
    torchrun --nproc_per_node 4 -m pipelines.train_student ...        # multi-GPU (DDP), same flags

Loss = BC (weighted MSE, steering 1.0 / speed 0.05, on actions normalised with the training split's
statistics, stored in the checkpoint) + for the samples whose key is in the memorybank the weighted KD
terms (e2r.kd: action MSE, bev_vec 1 - cosine, GRU-out MSE, dense bev_feat masked to the camera FOV and
weighted towards teacher-occupied cells). Samples without teacher targets get BC only; each epoch logs how
many samples had KD and how many BC only. Teacher targets are streamed: DataLoader workers read each batch's
keys with one batched read of the store (opened read-only), sharded across workers and DDP ranks. Without
--memorybank (or with all KD weights 0) this is the BC-only student.

The validation loss (the best-checkpoint metric, listed per epoch in the checkpoint's ``valid_losses``) is
the BC weighted MSE on --valid_split, in the same normalised units as the teacher's. ``--hflip_prob`` (off by
default) mirrors samples left-right together with their cached targets (steering negated, teacher bev_feat
flipped); the bev_vec and temporal KD terms are dropped for mirrored samples (their targets cannot be mirrored).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from e2r.checkpoints import load_checkpoint
from e2r.data.datasets import CameraSequenceDataset
from e2r.kd import KDWeights
from e2r.kd_data import (LIGHT_KD_FIELDS, FovMasks, KDCameraBatches, batch_to, check_store, hflip_batch,
                         make_kd_loader, student_losses, teacher_config_of_store)
from e2r.losses import action_weights, weighted_action_mse
from e2r.models.config import TeacherConfig
from e2r.models.student import CameraBEVStudent
from e2r.models.student_config import StudentConfig
from e2r.training import (DistContext, finish_epoch, make_summary_writer, plain_args, prepare_training,
                          resolve_device, seed_everything, setup_distributed, teardown_distributed, train_valid_epoch)
from pipelines._common import (add_training_data_args, add_training_run_args, add_training_window_args,
                               preset_hparams, train_valid_datasets, training_main)

PART_NAMES = ("bc", "kd_action", "kd_bev_vec", "kd_temporal", "kd_bev_feat", "kd_total")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.train_student", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_data_args(p, "student")
    p.add_argument("--view_transform", choices=("lss", "identity"), default="lss",
                   help="camera -> BEV: lss (Lift-Splat, default) or identity (resize placeholder, ablation)")
    p.add_argument("--memorybank", "--teacher_cache_dir", dest="memorybank", default=None,
                   help="memorybank of teacher outputs (pipelines.export); KD for the keys it holds. Unset: BC only")
    p.add_argument("--teacher_ckpt", default=None,
                   help="teacher checkpoint, only for its config (BEV grid) when the memorybank does not record it")
    p.add_argument("--kd_action_w", type=float, default=1.0, help="weight of action KD (default 1.0)")
    p.add_argument("--kd_bevvec_w", type=float, default=1.0, help="weight of bev_vec 1-cosine KD (default 1.0)")
    p.add_argument("--kd_temporal_w", type=float, default=1.0, help="weight of GRU-out MSE KD (default 1.0)")
    p.add_argument("--kd_bevfeat_w", type=float, default=0.0,
                   help="weight of dense bev_feat KD (needs bev_feat in the store; default 0 = off)")
    p.add_argument("--kd_bevfeat_background", type=float, default=0.05,
                   help="dense KD weight of cells the teacher finds unoccupied (default 0.05)")
    p.add_argument("--hflip_prob", type=float, default=0.0,
                   help="probability of mirroring a training sample left-right with its targets (default 0 = off)")
    add_training_window_args(p)
    add_training_run_args(p, "seed for init, shuffling and flips (default 0)", "runs/student_best.pt")
    return p


def kd_weights_of(args: argparse.Namespace) -> KDWeights:
    """KDWeights from the ``--kd_*`` flags (all 0 without ``--memorybank``)."""
    on = bool(args.memorybank)
    return KDWeights(action=args.kd_action_w * on, bev_vec=args.kd_bevvec_w * on, temporal=args.kd_temporal_w * on,
                     bev_feat=args.kd_bevfeat_w * on, steer_weight=args.steer_loss_weight,
                     speed_weight=args.speed_loss_weight, bev_feat_background=args.kd_bevfeat_background)


def _teacher_config(store_model_config: dict | None, teacher_ckpt: str | None) -> TeacherConfig | None:
    """The teacher that made the store: its recorded config, else ``teacher_ckpt``'s, else None."""
    cfg = teacher_config_of_store(store_model_config)
    if cfg is None and teacher_ckpt:
        cfg = TeacherConfig.from_dict(dict(load_checkpoint(teacher_ckpt, kind="teacher")["config"]))
    return cfg


def open_memorybank(path: str, teacher_ckpt: str | None = None) -> tuple[Any, TeacherConfig | None]:
    """Open a memorybank read-only -> ``(StoreSchema, teacher config or None)``; the teacher config is the one
    the store records, else ``teacher_ckpt``'s. ValueError naming the path when it cannot be opened."""
    from stores import MemoryBank

    try:
        bank = MemoryBank.open(path, mode="r")
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--memorybank {path}: cannot open it read-only ({type(e).__name__}: {e})") from None
    schema, prov = bank.schema, bank.provenance
    bank.close()
    return schema, _teacher_config(prov.model_config, teacher_ckpt)


def build_student_config(args: argparse.Namespace, teacher_cfg: TeacherConfig | None) -> StudentConfig:
    """Student preset ``--preset`` on the teacher's grid/sizes (``--preset``'s teacher when unknown)."""
    teacher = teacher_cfg if teacher_cfg is not None else TeacherConfig.preset_named(args.preset)
    return StudentConfig.from_teacher(teacher, args.preset, view_transform=args.view_transform)


def train_student(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training described by parsed ``args``; returns ``{"history", "valid_losses", "best_metric",
    "save_path", "checkpoint_path", "config"}`` (``valid_losses``: per-epoch BC weighted MSE on the valid
    split, normalised units). Raises DataError / CheckpointError / ValueError on bad input."""
    epochs, lr, batch_size = preset_hparams(args)
    if not 0.0 <= args.hflip_prob <= 1.0:
        raise ValueError(f"--hflip_prob must be in [0, 1], got {args.hflip_prob}")
    kd = kd_weights_of(args)
    ctx: DistContext = setup_distributed(args.device)
    try:
        device = resolve_device(args.device, ctx.local_rank)
        seed_everything(args.seed)
        resume = load_checkpoint(args.resume_path, kind="student") if args.resume_path else None
        schema, teacher_cfg = (open_memorybank(args.memorybank, args.teacher_ckpt) if args.memorybank
                                else (None, None))
        if resume:
            cfg = StudentConfig.from_dict(dict(resume["config"]))
        else:
            cfg = build_student_config(args, teacher_cfg if teacher_cfg is not None
                                       else _teacher_config(None, args.teacher_ckpt))
        image_size = tuple(cfg.image_size)
        train_ds, valid_ds = train_valid_datasets(
            args, lambda split: CameraSequenceDataset(args.data_root, split, args.seq_len, args.stride, image_size))
        fields = LIGHT_KD_FIELDS + (("bev_feat",) if kd.bev_feat > 0 else ())
        if schema is not None:
            check_store(args.memorybank, schema, args.seq_len, train_ds.frame_actions().shape[1], cfg,
                        kd.bev_feat > 0, teacher_cfg)
        model = CameraBEVStudent(cfg)
        net, opt, sched, start_epoch, best, history = prepare_training(
            model, train_ds, resume, init_path=args.init_path, skip_output_layer=args.init_skip_output_layer, lr=lr,
            weight_decay=args.weight_decay, epochs=epochs, resume_path=args.resume_path,
            pipeline_name="train_student", ctx=ctx, device=device)
        bank = args.memorybank if kd.action + kd.bev_vec + kd.temporal + kd.bev_feat > 0 else None
        train_loader, train_sampler = make_kd_loader(KDCameraBatches(train_ds, bank, fields), batch_size, True,
                                                     args.seed, args.num_workers, ctx)
        valid_loader = (make_kd_loader(KDCameraBatches(valid_ds), batch_size, False, args.seed, args.num_workers,
                                       ctx)[0] if valid_ds is not None and len(valid_ds) else None)
        weights = action_weights(args.steer_loss_weight, args.speed_loss_weight).to(device)
        fov_masks = FovMasks(cfg)
        sums: dict[str, float] = {}

        def train_step(batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
            flip = torch.zeros(len(batch["keys"]), dtype=torch.bool)
            if args.hflip_prob > 0:   # global torch RNG: part of the checkpointed RNG state
                flip = torch.rand(len(batch["keys"])) < args.hflip_prob
                batch = hflip_batch(batch, flip, cfg.bev_grid)
            batch = batch_to(batch, device)
            loss, parts = student_losses(net, model.normalize_actions, batch, weights, kd, fov_masks,
                                         flip.to(device), args.smooth_weight)
            n = len(batch["keys"])
            n_kd = float(parts["kd_samples"])
            for name in PART_NAMES:   # bc averaged over samples, kd terms over KD samples
                sums[name] = sums.get(name, 0.0) + float(parts[name]) * (n if name == "bc" else n_kd)
            sums["kd_samples"] = sums.get("kd_samples", 0.0) + n_kd
            sums["bc_only_samples"] = sums.get("bc_only_samples", 0.0) + float(parts["bc_only_samples"])
            sums["flipped_samples"] = sums.get("flipped_samples", 0.0) + float(flip.sum())
            return loss, n

        def valid_step(batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
            batch = batch_to(batch, device)
            pred = net(batch["images"], batch["intrinsics"], batch["cam2ego"], batch["speed"], batch["steering"])
            loss = weighted_action_mse(model.normalize_actions(pred), model.normalize_actions(batch["actions"]),
                                       weights)
            return loss, len(batch["keys"])

        writer = make_summary_writer(args.tensorboard_dir, ctx)
        show = not args.no_progress
        stop = epochs if args.stop_after_epoch is None else min(epochs, args.stop_after_epoch)
        for epoch in range(start_epoch, stop):
            t0 = time.time()
            sums.clear()
            train_loss, valid_loss, metric = train_valid_epoch(
                epoch, epochs, net=net, model=model, train_loader=train_loader, train_sampler=train_sampler,
                train_step=train_step, valid_loader=valid_loader, valid_step=valid_step, opt=opt, sched=sched,
                grad_clip=args.grad_clip, ctx=ctx, show_progress=show)
            stats = _reduce_sums(sums, ctx)   # train_step's counters (valid_step does not touch them)
            n_all = stats.get("kd_samples", 0.0) + stats.get("bc_only_samples", 0.0)
            entry = {"epoch": epoch, "train_loss": train_loss, "valid_loss": valid_loss,
                     "lr": opt.param_groups[0]["lr"], "kd_samples": int(stats.get("kd_samples", 0)),
                     "bc_only_samples": int(stats.get("bc_only_samples", 0)),
                     "flipped_samples": int(stats.get("flipped_samples", 0)),
                     "train_bc": stats.get("bc", 0.0) / max(n_all, 1)}
            for name in PART_NAMES[1:]:
                entry[f"train_{name}"] = stats.get(name, 0.0) / max(stats.get("kd_samples", 0.0), 1)
            scalars = {k.replace("_", "/", 1) if k.startswith(("train_", "valid_")) else k: entry[k]
                       for k in ("train_loss", "valid_loss", "lr", "kd_samples", "bc_only_samples", "train_bc",
                                 *(f"train_{n}" for n in PART_NAMES[1:]))}
            improved, best = finish_epoch(
                epoch, entry, metric, best, history, ctx=ctx, kind="student", net=net, config=cfg.to_dict(),
                opt=opt, sched=sched, train_args=plain_args(args), save_path=args.save_path,
                checkpoint_path=args.checkpoint_path, writer=writer, scalars=scalars,
                extra_state=lambda h: {"valid_losses": [e["valid_loss"] for e in h]})
            if ctx.is_main:
                print(f"epoch {epoch + 1}/{epochs}: train {train_loss:.4f} (bc {entry['train_bc']:.4f}, "
                      f"kd {entry['train_kd_total']:.4f})  valid {valid_loss:.4f}  samples kd {entry['kd_samples']} "
                      f"bc-only {entry['bc_only_samples']}  {'(best) ' if improved else ''}{time.time() - t0:.1f}s",
                      flush=True)
        if writer is not None:
            writer.close()
        return {"history": history, "valid_losses": [h["valid_loss"] for h in history], "best_metric": best,
                "save_path": args.save_path, "checkpoint_path": args.checkpoint_path, "config": cfg.to_dict()}
    finally:
        teardown_distributed(ctx)


def _reduce_sums(sums: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Sum the per-epoch counters over DDP ranks (identity single-process)."""
    if not ctx.enabled:
        return dict(sums)
    import torch.distributed as dist

    names = sorted(sums)
    dev = torch.device("cuda", ctx.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([sums[n] for n in names], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return {n: float(v) for n, v in zip(names, t.tolist())}


def main(argv: list[str] | None = None) -> int:
    return training_main("train_student", build_parser(), train_student, argv,
                         lambda last: f"KD samples/epoch {last.get('kd_samples', 0)}, "
                                      f"BC-only {last.get('bc_only_samples', 0)}; ")


if __name__ == "__main__":
    sys.exit(main())
