"""Command-line pieces shared by the pipelines: argument groups (same flags, defaults and help text in every
pipeline that has them; each flag is a field of a run config in ``e2r.workflow.configs``) and the ``main``
bodies of the training and evaluation pipelines (error handling and the final summary)."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, TypeVar

import torch

from e2r.errors import E2RError
from e2r.metrics import metrics_table
from e2r.workflow.configs import KD_TARGETS_IN, config_from_namespace
from stores import StoreError

__all__ = ["training_main", "eval_main", "print_training_summary", "num_features", "add_store_access_args",
           "add_training_data_args", "add_training_window_args",
           "add_training_run_args", "add_eval_input_args", "add_eval_window_args", "add_eval_output_args"]

C = TypeVar("C")


def num_features(text: str) -> int | str:
    """``--lidar_num_features``: ``"auto"`` or a column count (4, 5, 8)."""
    if text == "auto":
        return text
    if text in ("4", "5", "8"):
        return int(text)
    raise argparse.ArgumentTypeError(f"--lidar_num_features must be 4, 5, 8 or auto, got {text!r}")


def add_store_access_args(p: argparse.ArgumentParser) -> None:
    """``--storage_options``, ``--store_cache_dir``, ``--store_cache_gb``: how a memorybank URL is reached;
    ``--kd_targets``: which process reads its rows."""
    p.add_argument("--storage_options", default=None,
                   help="a --memorybank on object storage (s3://bucket/mb.zarr): fsspec options as JSON, e.g. "
                        "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}' (default: the AWS_* environment variables)")
    p.add_argument("--store_cache_dir", default=None,
                   help="a --memorybank URL: keep fetched chunks in this local directory (LRU, checked on every read) "
                        "so later epochs read them locally")
    p.add_argument("--store_cache_gb", type=float, default=20.0, help="size cap of --store_cache_dir (GiB, default 20)")
    p.add_argument("--kd_targets", choices=KD_TARGETS_IN, default="main",
                   help="where the teacher rows are read: 'main' = this process, by key, a batch ahead of the step "
                        "(the DataLoader workers send camera windows only), 'worker' = the workers, with the windows "
                        "(their rows then cross to this process through shared memory). Same batches either way "
                        "(default: main)")


def add_pairing_args(p: argparse.ArgumentParser) -> None:
    """--pair_lidar_root / --pair_tolerance_ms (`e2r.workflow.configs.PairingArgs`): KD pairs by timestamp."""
    p.add_argument("--pair_lidar_root", default=None, metavar="DIR",
                   help="camera and LiDAR recorded apart (--data_root = the camera root, e.g. make_dataset "
                        "--camera_root): pair each camera window with the LiDAR window of the same split/segment in "
                        "DIR (the root the memorybank was exported from) whose last frame's timestamp is nearest to "
                        "the camera window's last frame's; both roots' data.csv need a timestamp column. Default: off "
                        "(windows pair by key)")
    p.add_argument("--pair_tolerance_ms", type=float, default=50.0,
                   help="with --pair_lidar_root: no pair (BC only) when the two last frames are more than this apart; "
                        "a pair's KD terms are weighted by its confidence 1 - |dt|/tolerance (default 50)")


def add_training_data_args(p: argparse.ArgumentParser, model_word: str) -> None:
    """``--data_root``, ``--train_split``, ``--train_segments``, ``--valid_split``, ``--preset`` (help: "<model_word> size")."""
    p.add_argument("--data_root", required=True, help="dataset root holding <split>/<segment>/meta/data.csv")
    p.add_argument("--train_split", default="train", help="split to train on (default: train)")
    p.add_argument("--train_segments", nargs="+", default=None, metavar="SEGMENT",
                   help="train on these segments of --train_split only (default: all of them), e.g. a camera-data "
                        "budget: --train_segments segment_0000 segment_0001")
    p.add_argument("--extra_train_splits", nargs="+", default=None, metavar="SPLIT",
                   help="whole splits added to the training set, e.g. drives recorded by pipelines.drive --record "
                        "(their windows train on the teacher's actions, not on the commands they executed)")
    p.add_argument("--valid_split", default="valid", help="split for the per-epoch validation loss and the best "
                                                          "checkpoint; '' to skip validation (best = train loss)")
    p.add_argument("--preset", choices=("tiny", "full"), default="tiny", help=f"{model_word} size (default: tiny)")


def add_training_window_args(p: argparse.ArgumentParser, warmup_steps: int) -> None:
    """``--epochs``, ``--steps``, ``--warmup_steps`` (default ``warmup_steps``), ``--batch_size``, ``--seq_len``,
    ``--stride``."""
    p.add_argument("--epochs", type=int, default=None, help="epochs to train (default per preset: tiny 8, full 30)")
    p.add_argument("--steps", type=int, default=None,
                   help="train for this many optimizer steps instead of epochs (the last epoch cut short; the "
                        "cosine decay then runs per step): the same budget whatever the data size")
    p.add_argument("--warmup_steps", type=int, default=warmup_steps,
                   help=f"linear learning-rate warm-up over the first N optimizer steps (default {warmup_steps})")
    p.add_argument("--batch_size", type=int, default=None, help="windows per batch (default: tiny 8, full 4)")
    p.add_argument("--seq_len", type=int, default=5, help="frames per window T (default: 5)")
    p.add_argument("--stride", type=int, default=1, help="step between window starts (default: 1)")


def add_training_run_args(p: argparse.ArgumentParser, seed_help: str, save_path: str) -> None:
    """Loss weights, optimizer, seed (``seed_help``), device, workers, checkpoints (``--save_path`` default
    ``save_path``), resume/init, TensorBoard, ``--stop_after_epoch``, ``--no_progress``."""
    p.add_argument("--steer_loss_weight", type=float, default=1.0, help="loss weight of steering (default 1.0)")
    p.add_argument("--speed_loss_weight", type=float, default=0.05, help="loss weight of speed (default 0.05)")
    p.add_argument("--steer_input_dropout", type=float, default=0.5,
                   help="probability of hiding a training window's previous-steering input (zeros), so the policy "
                        "must steer from what it sees instead of copying its last command, which fails in closed "
                        "loop (ChauffeurNet's past-motion dropout; default 0.5, 0 = off)")
    p.add_argument("--hflip_prob", type=float, default=0.0,
                   help="probability of mirroring a training window left-right with its targets (ego y -> -y, "
                        "steering negated): balances left and right turns (default 0 = off)")
    p.add_argument("--smooth_weight", type=float, default=0.0,
                   help="weight of a penalty on step-to-step changes of the predicted actions (default 0)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate, cosine-decayed (default: tiny "
                                                          "2e-3, full 1e-3)")
    p.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    p.add_argument("--grad_clip", type=float, default=5.0, help="gradient norm clip, 0 = off (default 5)")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--checkpoint_path", default=None, help="latest full training state, written every epoch")
    p.add_argument("--checkpoint_every_steps", type=int, default=0,
                   help="also write --checkpoint_path every N training batches, with the position in the epoch: "
                        "--resume_path then continues mid-epoch exactly where it stopped (default 0 = per epoch)")
    p.add_argument("--save_path", default=save_path, help="best model by validation loss")
    p.add_argument("--resume_path", default=None, help="continue a run from its --checkpoint_path file")
    p.add_argument("--init_path", default=None, help="initialise weights only from this checkpoint (transfer)")
    p.add_argument("--init_skip_output_layer", action="store_true",
                   help="with --init_path: keep this model's fresh output layer (e.g. another head shape)")
    p.add_argument("--tensorboard_dir", default=None, help="write TensorBoard scalars here (rank 0); off if unset")
    p.add_argument("--stop_after_epoch", type=int, default=None,
                   help="stop once this many epochs are done (the schedule still spans --epochs); continue "
                        "later with --resume_path")
    p.add_argument("--no_progress", action="store_true", help="hide the tqdm progress bars")


def add_eval_input_args(p: argparse.ArgumentParser, kind: str) -> None:
    """``--data_root``, ``--split``, ``--<kind>_ckpt`` (written by ``pipelines.train_<kind>``)."""
    p.add_argument("--data_root", required=True, help="dataset root holding <split>/<segment>/meta/data.csv")
    p.add_argument("--split", default="valid", help="split to evaluate (default: valid)")
    p.add_argument(f"--{kind}_ckpt", required=True, help=f"checkpoint written by pipelines.train_{kind}")


def add_eval_window_args(p: argparse.ArgumentParser) -> None:
    """``--seq_len``, ``--stride``, ``--batch_size``."""
    p.add_argument("--seq_len", type=int, default=5, help="frames per window T (default: 5)")
    p.add_argument("--stride", type=int, default=1, help="step between window starts (default: 1)")
    p.add_argument("--batch_size", type=int, default=8, help="windows per batch (default: 8)")


def add_eval_output_args(p: argparse.ArgumentParser) -> None:
    """``--overall_weights``, ``--csv_path``, ``--plot_path``, ``--plot_segment``, ``--device``,
    ``--num_workers``, ``--no_progress``."""
    p.add_argument("--overall_weights", default="1.0,0.05",
                   help="weights of steering,speed MSE in the overall score (default 1.0,0.05)")
    p.add_argument("--csv_path", default=None, help="write one metrics row per predictor to this CSV")
    p.add_argument("--plot_path", default=None, help="PNG of predicted vs true steering and speed along a segment")
    p.add_argument("--plot_segment", default=None, help="segment to plot (default: the split's first)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")


def training_main(name: str, parser: argparse.ArgumentParser, config_cls: type[C], train: Callable[[C], dict[str, Any]],
                  argv: list[str] | None, summary_extra: Callable[[dict[str, Any]], str] = lambda last: "") -> int:
    """Parse ``argv`` into ``config_cls``, run ``train``; print ``<name>: error: ...`` (exit 1) on bad input,
    else the ``done:`` summary (``summary_extra(last history entry)`` inserted before the paths); return 0."""
    try:
        result = train(config_from_namespace(config_cls, parser.parse_args(argv)))
    except (E2RError, StoreError, ValueError, FloatingPointError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    print_training_summary(result, summary_extra)
    return 0


def print_training_summary(result: dict[str, Any], summary_extra: Callable[[dict[str, Any]], str] = lambda last: ""
                           ) -> None:
    """The ``done:`` line of a training run (``summary_extra(last history entry)`` before the paths)."""
    h = result["history"]
    last = h[-1] if h else {}
    print(f"done: {len(h)} epochs, last train {last.get('train_loss', float('nan')):.4f}, "
          f"last valid {last.get('valid_loss', float('nan')):.4f}, best {result['best_metric']:.4f}; "
          f"{summary_extra(last)}best model: {result['save_path']}, last state: {result['checkpoint_path']}")


def eval_main(name: str, parser: argparse.ArgumentParser, config_cls: type[C], evaluate: Callable[[C], dict[str, Any]],
              argv: list[str] | None, report_extra: Callable[[dict[str, Any]], None] | None = None) -> int:
    """Parse ``argv`` into ``config_cls``, run ``evaluate`` without gradients; print ``<name>: error: ...``
    (exit 1) on bad input, else the metrics table, ``report_extra(result)`` and the written files; return 0."""
    args = parser.parse_args(argv)
    try:
        cfg = config_from_namespace(config_cls, args)
        with torch.no_grad():
            out = evaluate(cfg)
    except (E2RError, StoreError, ValueError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    print(f"{cfg.split}: {out['num_windows']} windows, overall = weighted MSE with weights {cfg.overall_weights}")
    print(metrics_table(out["results"]))
    if report_extra is not None:
        report_extra(out)
    for what in ("csv_path", "plot_path"):
        if out[what]:
            print(f"wrote {out[what]}")
    return 0
