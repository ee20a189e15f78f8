"""Train the LiDAR teacher (PointPillars BEV + GRU) on ``<data_root>/<train_split>``.

    python -m pipelines.train_teacher --data_root data/synth --preset tiny --epochs 8 \\
        --save_path runs/teacher_best.pt --checkpoint_path runs/teacher_last.pt
    torchrun --nproc_per_node 4 -m pipelines.train_teacher ...        # multi-GPU (DDP), same flags

Actions are normalised with the training split's statistics (stored in the checkpoint); the loss is the
weighted MSE (steering 1.0, speed 0.05) in normalised units. ``--checkpoint_path`` gets the latest state
after every epoch (model, optimizer, scheduler, epoch, best metric, RNG state, history) for
``--resume_path``; ``--save_path`` gets the best model by validation loss. ``--init_path`` loads weights
only (transfer), optionally without the output layer.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from e2r.checkpoints import load_checkpoint
from e2r.data.datasets import LidarSequenceDataset, collate_lidar
from e2r.losses import action_loss, action_weights
from e2r.models.config import TeacherConfig
from e2r.models.teacher import LiDARBEVTeacher
from e2r.training import (DistContext, finish_epoch, make_loader, make_summary_writer, plain_args, prepare_training,
                          resolve_device, seed_everything, setup_distributed, teardown_distributed, train_valid_epoch)
from pipelines._common import (PRESET_DEFAULTS, add_training_data_args, add_training_run_args,  # noqa: F401
                               add_training_window_args, num_features, preset_hparams,
                               train_valid_datasets, training_main)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.train_teacher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_data_args(p, "model")
    add_training_window_args(p)
    p.add_argument("--lidar_num_features", default="auto",
                   help="columns per point in the .bin files: 4, 5, 8 or auto (default: auto-detect)")
    add_training_run_args(p, "seed for init and shuffling (default 0)", "runs/teacher_best.pt")
    return p


def train_teacher(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training described by parsed ``args``; returns ``{"history", "best_metric", "save_path",
    "checkpoint_path", "config"}``. Raises DataError / CheckpointError / ValueError on bad input."""
    epochs, lr, batch_size = preset_hparams(args)
    ctx: DistContext = setup_distributed(args.device)
    try:
        device = resolve_device(args.device, ctx.local_rank)
        seed_everything(args.seed)
        resume = load_checkpoint(args.resume_path, kind="teacher") if args.resume_path else None
        cfg = TeacherConfig.from_dict(resume["config"]) if resume else TeacherConfig.preset_named(args.preset)
        nf = num_features(args.lidar_num_features)
        train_ds, valid_ds = train_valid_datasets(
            args, lambda split: LidarSequenceDataset(args.data_root, split, args.seq_len, args.stride, nf))
        model = LiDARBEVTeacher(cfg)
        net, opt, sched, start_epoch, best, history = prepare_training(
            model, train_ds, resume, init_path=args.init_path, skip_output_layer=args.init_skip_output_layer, lr=lr,
            weight_decay=args.weight_decay, epochs=epochs, resume_path=args.resume_path,
            pipeline_name="train_teacher", ctx=ctx, device=device)
        train_loader, train_sampler = make_loader(train_ds, batch_size, True, args.seed, args.num_workers,
                                                  collate_lidar, ctx)
        valid_loader = (make_loader(valid_ds, batch_size, False, args.seed, args.num_workers, collate_lidar, ctx)[0]
                        if valid_ds is not None and len(valid_ds) else None)
        weights = action_weights(args.steer_loss_weight, args.speed_loss_weight).to(device)

        def step(batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
            pred = net([p.to(device, non_blocking=True) for p in batch["points"]],
                       batch["speed"].to(device), batch["steering"].to(device))
            target = batch["actions"].to(device)
            loss = action_loss(model.normalize_actions(pred), model.normalize_actions(target), weights,
                               args.smooth_weight)
            return loss, int(target.shape[0])

        writer = make_summary_writer(args.tensorboard_dir, ctx)
        show = not args.no_progress
        stop = epochs if args.stop_after_epoch is None else min(epochs, args.stop_after_epoch)
        for epoch in range(start_epoch, stop):
            t0 = time.time()
            train_loss, valid_loss, metric = train_valid_epoch(
                epoch, epochs, net=net, model=model, train_loader=train_loader, train_sampler=train_sampler,
                train_step=step, valid_loader=valid_loader, valid_step=step, opt=opt, sched=sched,
                grad_clip=args.grad_clip, ctx=ctx, show_progress=show)
            lr_now = opt.param_groups[0]["lr"]
            improved, best = finish_epoch(
                epoch, {"epoch": epoch, "train_loss": train_loss, "valid_loss": valid_loss, "lr": lr_now}, metric,
                best, history, ctx=ctx, kind="teacher", net=net, config=cfg.to_dict(), opt=opt, sched=sched,
                train_args=plain_args(args), save_path=args.save_path, checkpoint_path=args.checkpoint_path,
                writer=writer, scalars={"loss/train": train_loss, "loss/valid": valid_loss, "lr": lr_now})
            if ctx.is_main:
                print(f"epoch {epoch + 1}/{epochs}: train {train_loss:.4f}  valid {valid_loss:.4f}  "
                      f"{'(best) ' if improved else ''}{time.time() - t0:.1f}s", flush=True)
        if writer is not None:
            writer.close()
        return {"history": history, "best_metric": best, "save_path": args.save_path,
                "checkpoint_path": args.checkpoint_path, "config": cfg.to_dict()}
    finally:
        teardown_distributed(ctx)


def main(argv: list[str] | None = None) -> int:
    return training_main("train_teacher", build_parser(), train_teacher, argv)


if __name__ == "__main__":
    sys.exit(main())
