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
from pathlib import Path
from typing import Any

import torch

from e2r.checkpoints import CheckpointError, load_checkpoint, load_init_weights, save_checkpoint
from e2r.data.datasets import LidarSequenceDataset, collate_lidar
from e2r.data.readers import DataError
from e2r.losses import action_loss, action_weights
from e2r.models.config import TeacherConfig
from e2r.models.teacher import LiDARBEVTeacher
from e2r.training import (ActionNormalizer, DistContext, capture_rng_state, make_loader, make_summary_writer,
                          resolve_device, restore_rng_state, run_epoch, seed_everything, setup_distributed,
                          teardown_distributed, unwrap)

#: training defaults per preset (tiny: tuned on the default synthetic dataset, a few CPU minutes)
PRESET_DEFAULTS = {"tiny": {"epochs": 8, "lr": 2e-3, "batch_size": 8},
                   "full": {"epochs": 30, "lr": 1e-3, "batch_size": 4}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.train_teacher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", required=True, help="dataset root holding <split>/<segment>/meta/data.csv")
    p.add_argument("--train_split", default="train", help="split to train on (default: train)")
    p.add_argument("--valid_split", default="valid", help="split for the per-epoch validation loss and the best "
                                                          "checkpoint; '' to skip validation (best = train loss)")
    p.add_argument("--preset", choices=("tiny", "full"), default="tiny", help="model size (default: tiny)")
    p.add_argument("--epochs", type=int, default=None, help="epochs to train (default per preset: tiny 8, full 30)")
    p.add_argument("--batch_size", type=int, default=None, help="windows per batch (default: tiny 8, full 4)")
    p.add_argument("--seq_len", type=int, default=5, help="frames per window T (default: 5)")
    p.add_argument("--stride", type=int, default=1, help="step between window starts (default: 1)")
    p.add_argument("--lidar_num_features", default="auto",
                   help="columns per point in the .bin files: 4, 5, 8 or auto (default: auto-detect)")
    p.add_argument("--steer_loss_weight", type=float, default=1.0, help="loss weight of steering (default 1.0)")
    p.add_argument("--speed_loss_weight", type=float, default=0.05, help="loss weight of speed (default 0.05)")
    p.add_argument("--smooth_weight", type=float, default=0.0,
                   help="weight of a penalty on step-to-step changes of the predicted actions (default 0)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate, cosine-decayed (default: tiny "
                                                          "2e-3, full 1e-3)")
    p.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    p.add_argument("--grad_clip", type=float, default=5.0, help="gradient norm clip, 0 = off (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed for init and shuffling (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--checkpoint_path", default=None, help="latest full training state, written every epoch")
    p.add_argument("--save_path", default="runs/teacher_best.pt", help="best model by validation loss")
    p.add_argument("--resume_path", default=None, help="continue a run from its --checkpoint_path file")
    p.add_argument("--init_path", default=None, help="initialise weights only from this checkpoint (transfer)")
    p.add_argument("--init_skip_output_layer", action="store_true",
                   help="with --init_path: keep this model's fresh output layer (e.g. another head shape)")
    p.add_argument("--tensorboard_dir", default=None, help="write TensorBoard scalars here (rank 0); off if unset")
    p.add_argument("--stop_after_epoch", type=int, default=None,
                   help="stop once this many epochs are done (the schedule still spans --epochs); continue "
                        "later with --resume_path")
    p.add_argument("--no_progress", action="store_true", help="hide the tqdm progress bars")
    return p


def _num_features(text: str) -> int | str:
    return text if text == "auto" else int(text)


def train_teacher(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training described by parsed ``args``; returns ``{"history", "best_metric", "save_path",
    "checkpoint_path", "config"}``. Raises DataError / CheckpointError / ValueError on bad input."""
    defaults = PRESET_DEFAULTS[args.preset]
    epochs = args.epochs if args.epochs is not None else defaults["epochs"]
    lr = args.lr if args.lr is not None else defaults["lr"]
    batch_size = args.batch_size if args.batch_size is not None else defaults["batch_size"]
    ctx: DistContext = setup_distributed(args.device)
    try:
        device = resolve_device(args.device, ctx.local_rank)
        seed_everything(args.seed)
        resume = load_checkpoint(args.resume_path, kind="teacher") if args.resume_path else None
        cfg = TeacherConfig.from_dict(resume["config"]) if resume else TeacherConfig.preset_named(args.preset)
        nf = _num_features(args.lidar_num_features)
        train_ds = LidarSequenceDataset(args.data_root, args.train_split, args.seq_len, args.stride, nf)
        if len(train_ds) == 0:
            raise ValueError(f"{args.data_root}/{args.train_split}: no windows of seq_len={args.seq_len}")
        valid_ds = (LidarSequenceDataset(args.data_root, args.valid_split, args.seq_len, args.stride, nf)
                    if args.valid_split else None)
        model = LiDARBEVTeacher(cfg)
        norm = ActionNormalizer.from_dataset(train_ds)
        model.set_action_stats(norm.mean, norm.std)
        if args.init_path and not resume:
            report = load_init_weights(model, args.init_path, args.init_skip_output_layer,
                                       model.output_layer_prefix, keep_prefixes=("action_mean", "action_std"))
            if ctx.is_main:
                print(f"init from {args.init_path}: {len(report['loaded'])} tensors loaded, "
                      f"skipped {report['skipped']}")
        model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1), eta_min=lr * 0.05)
        start_epoch, best, history = 0, float("inf"), []
        if resume:
            try:
                model.load_state_dict(resume["model"])
                opt.load_state_dict(resume["optimizer"])
                sched.load_state_dict(resume["scheduler"])
                start_epoch, best = int(resume["epoch"]) + 1, float(resume["best_metric"])
                history = list(resume.get("history", []))
            except (KeyError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{args.resume_path}: cannot resume from it ({type(e).__name__}: {e}); "
                                      f"resume needs a --checkpoint_path file of train_teacher") from None
            restore_rng_state(resume["rng_state"])
        net = model
        if ctx.enabled:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
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
            train_sampler.set_epoch(epoch)
            net.train()
            train_loss = run_epoch(train_loader, step, opt, model.parameters(), args.grad_clip,
                                   f"epoch {epoch + 1}/{epochs} train", ctx, show)
            valid_loss = float("nan")
            if valid_loader is not None:
                net.eval()
                valid_loss = run_epoch(valid_loader, step, None, desc=f"epoch {epoch + 1}/{epochs} valid", ctx=ctx,
                                       show_progress=show)
            sched.step()
            metric = valid_loss if valid_loader is not None else train_loss
            improved = metric < best
            best = min(best, metric)
            history.append({"epoch": epoch, "train_loss": train_loss, "valid_loss": valid_loss,
                            "lr": opt.param_groups[0]["lr"]})
            if ctx.is_main:
                state = {"model": unwrap(net).state_dict(), "config": cfg.to_dict(), "epoch": epoch,
                         "best_metric": best, "history": history, "train_args": _plain_args(args),
                         "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "rng_state": capture_rng_state()}
                if improved and args.save_path:
                    save_checkpoint(args.save_path, state, kind="teacher")
                if args.checkpoint_path:
                    save_checkpoint(args.checkpoint_path, state, kind="teacher")
                if writer is not None:
                    writer.add_scalar("loss/train", train_loss, epoch)
                    writer.add_scalar("loss/valid", valid_loss, epoch)
                    writer.add_scalar("lr", history[-1]["lr"], epoch)
                print(f"epoch {epoch + 1}/{epochs}: train {train_loss:.4f}  valid {valid_loss:.4f}  "
                      f"{'(best) ' if improved else ''}{time.time() - t0:.1f}s", flush=True)
        if writer is not None:
            writer.close()
        return {"history": history, "best_metric": best, "save_path": args.save_path,
                "checkpoint_path": args.checkpoint_path, "config": cfg.to_dict()}
    finally:
        teardown_distributed(ctx)


def _plain_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool)) or v is None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = train_teacher(args)
    except (DataError, CheckpointError, ValueError, FloatingPointError) as e:
        print(f"train_teacher: error: {e}", file=sys.stderr)
        return 1
    h = result["history"]
    last = h[-1] if h else {}
    print(f"done: {len(h)} epochs, last train {last.get('train_loss', float('nan')):.4f}, "
          f"last valid {last.get('valid_loss', float('nan')):.4f}, best {result['best_metric']:.4f}; "
          f"best model: {result['save_path']}, last state: {result['checkpoint_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
