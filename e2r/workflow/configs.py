"""Typed run configurations: one dataclass per run kind, passed to the workflow functions
(``train_teacher(cfg)``, ``export_memorybank(cfg)``, ...). Each field is declared once, with its default and
help text (:func:`e2r.cli_config.option`); a pipeline's flags are derived from the fields (``--seq_len`` ->
``seq_len``), so its ``--help`` is the documentation of its config. The demo and tests build configs directly.

Training fields left ``None`` (``epochs``, ``lr``, ``batch_size``) take the preset's defaults
(:data:`PRESET_DEFAULTS`) through :meth:`TrainConfig.hparams`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional, Union

from e2r.cli_config import (command_line, config_from_namespace, device_option, image_size, lidar_num_features_option,
                            option, redefault)
from e2r.errors import ConfigError, check_positive, check_probability, check_weights
from e2r.models.config import TeacherConfig
from e2r.models.policy import DEFAULT_HEAD, RESIDUAL_MODES
from e2r.models.student_config import INPUT_NORMS, NORMS, PRESET_BEV_POOL_GRID

__all__ = ["PRESET_DEFAULTS", "TrainConfig", "TeacherTrainConfig", "StudentTrainConfig", "EvalConfig", "StoreAccess",
           "PairingArgs", "KD_TARGETS_IN",
           "TeacherEvalConfig", "StudentEvalConfig", "check_storage_options", "config_from_namespace", "command_line", "plain_dict",
           "check_output_file", "check_positive", "image_size",
           "NumFeatures"]

#: training defaults per preset (tiny: tuned on the default synthetic dataset, a few CPU minutes)
PRESET_DEFAULTS = {"tiny": {"epochs": 8, "lr": 2e-3, "batch_size": 8},
                   "full": {"epochs": 30, "lr": 1e-3, "batch_size": 4}}

#: ``--lidar_num_features``: "auto" or a column count (4, 5, 8)
NumFeatures = Union[int, str]


def check_output_file(flag: str, value: Optional[str]) -> None:
    """ConfigError naming ``--flag`` when ``value`` (a file the run will write) names a directory, or lies
    under an existing path that is not a directory: found now, not after hours of training."""
    if not value:
        return
    if value.endswith(("/", os.sep)) or os.path.isdir(value):
        raise ConfigError(f"--{flag} {value!r} is a directory; it must name a file to write")
    parent = os.path.dirname(os.path.abspath(value))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
    if parent and not os.path.isdir(parent):
        raise ConfigError(f"--{flag} {value!r}: {parent!r} is not a directory, the file cannot be written there")


def plain_dict(cfg: Any) -> dict[str, Any]:
    """The config's fields with plain values (str/int/float/bool/None, lists of str), as stored in a checkpoint."""
    return {k: v for k, v in asdict(cfg).items() if isinstance(v, (str, int, float, bool)) or v is None
            or (isinstance(v, list) and all(isinstance(x, str) for x in v))}


@dataclass(kw_only=True)
class TrainConfig:
    """What the teacher and student trainers share (``pipelines.train_teacher --help`` explains each)."""

    data_root: str = option(help="dataset root holding <split>/<segment>/meta/data.csv")
    train_split: str = option("train", help="split to train on (default: %(default)s)")
    train_segments: Optional[list[str]] = option(
        None, metavar="SEGMENT",
        help="train on these segments of --train_split only (default: all of them), e.g. a camera-data budget: "
             "--train_segments segment_0000 segment_0001")
    extra_train_splits: Optional[list[str]] = option(
        None, metavar="SPLIT",
        help="whole splits added to the training set, e.g. drives recorded by pipelines.drive --record (their "
             "windows train on the teacher's actions, not on the commands they executed)")
    extra_keep_fraction: float = option(
        1.0, help="keep this fraction of each --extra_train_splits split's windows: those where the student's and the "
                  "teacher's recorded wheel angles differ most (mixed drives only; 1 keeps all; default %(default)s)")
    oversample_braking: int = option(1, help="repeat each training window whose labels brake (a speed label over 1 "
                                             "m/s below the measured speed) this many times (default %(default)s: off)")
    valid_split: str = option("valid", help="split for the validation loss (per epoch, or every "
                                            "--valid_every_steps) and the best checkpoint; '' to skip validation "
                                            "(best = train loss)")
    preset: str = option("tiny", choices=tuple(PRESET_DEFAULTS), help="model size (default: %(default)s)")
    epochs: Optional[int] = option(None, help="epochs to train (default per preset: tiny 8, full 30)")
    steps: Optional[int] = option(
        None, help="train for this many optimizer steps instead of epochs (the last epoch cut short; the cosine "
                   "decay then runs per step): the same budget whatever the data size")
    valid_every_steps: Optional[int] = option(
        None, metavar="K",
        help="validate every K optimizer steps and once more at the end of training, instead of after every epoch: "
             "each validation (the --valid_split loss and the checkpoint selection, e.g. the student's --select_by "
             "drive) adds a history entry with its step count (train loss: the epoch's mean so far), may replace "
             "--save_path and writes --checkpoint_path, so --resume_path continues from it (default: unset, after "
             "every epoch)")
    warmup_steps: int = option(0, help="linear learning-rate warm-up over the first N steps (default %(default)s)")
    batch_size: Optional[int] = option(None, help="windows per batch (default: tiny 8, full 4)")
    lr: Optional[float] = option(None, help="AdamW learning rate, cosine-decayed (default: tiny 2e-3, full 1e-3)")
    seq_len: int = option(5, help="frames per window T (default: %(default)s)")
    stride: int = option(1, help="step between window starts (default: %(default)s)")
    steer_loss_weight: float = option(1.0, help="loss weight of steering (default %(default)s)")
    speed_loss_weight: float = option(0.05, help="loss weight of speed (default %(default)s)")
    smooth_weight: float = option(0.0, help="weight of a penalty on step-to-step changes of the predicted actions "
                                            "(default %(default)s)")
    steer_input_dropout: float = option(
        0.5, help="probability of hiding a training window's previous-steering input (zeros), so the policy must "
                  "steer from what it sees instead of copying its last command, which fails in closed loop "
                  "(ChauffeurNet's past-motion dropout; default %(default)s, 0 = off)")
    hflip_prob: float = option(
        0.0, help="probability of mirroring a training window left-right with its targets (ego y -> -y, steering "
                  "negated): balances left and right turns (default %(default)s = off)")
    weight_decay: float = option(1e-4, help="AdamW weight decay (default %(default)s)")
    grad_clip: float = option(5.0, help="gradient norm clip, 0 = off (default %(default)s)")
    seed: int = option(0, help="seed for init, shuffling and flips (default %(default)s)")
    device: str = device_option()
    num_workers: int = option(0, help="DataLoader worker processes reading the data windows (default %(default)s: "
                                      "this process)")
    checkpoint_path: Optional[str] = option(None, help="latest full training state, written every epoch (and at "
                                                        "every --valid_every_steps validation)")
    checkpoint_every_steps: int = option(
        0, help="also write --checkpoint_path every N training batches, with the position in the epoch: "
                "--resume_path then continues mid-epoch exactly where it stopped (default %(default)s = per epoch)")
    save_path: Optional[str] = option(None, help="best model by validation loss (default %(default)s)")
    resume_path: Optional[str] = option(None, help="continue a run from its --checkpoint_path file")
    init_path: Optional[str] = option(None, help="initialise weights only from this checkpoint (transfer; "
                                                 "train_teacher builds that checkpoint's model unless "
                                                 "--init_skip_output_layer)")
    init_skip_output_layer: bool = option(
        False, help="with --init_path: keep this model's fresh output layer (e.g. another head shape)")
    tensorboard_dir: Optional[str] = option(None, help="write TensorBoard scalars here (rank 0); off if unset")
    stop_after_epoch: Optional[int] = option(
        None, help="stop once this many epochs are done (the schedule still spans --epochs); continue later with "
                   "--resume_path")
    no_progress: bool = option(False, help="hide the tqdm progress bars")

    def hparams(self) -> tuple[int, float, int]:
        """``(epochs, lr, batch_size)``: the fields, or the preset's defaults where unset."""
        defaults = PRESET_DEFAULTS[self.preset]
        return (self.epochs if self.epochs is not None else defaults["epochs"],
                self.lr if self.lr is not None else defaults["lr"],
                self.batch_size if self.batch_size is not None else defaults["batch_size"])

    def check(self) -> None:
        if self.preset not in PRESET_DEFAULTS:
            raise ConfigError(f"--preset {self.preset!r}: expected one of {sorted(PRESET_DEFAULTS)}")
        check_probability(self, ("steer_input_dropout", "hflip_prob"))
        if not 0 < self.extra_keep_fraction <= 1:
            raise ConfigError(f"--extra_keep_fraction must be in (0, 1], got {self.extra_keep_fraction}")
        check_weights(self, ("steer_loss_weight", "speed_loss_weight", "smooth_weight", "weight_decay", "grad_clip"))
        check_positive(self, ("epochs", "steps", "batch_size", "seq_len", "stride", "valid_every_steps",
                              "oversample_braking"))
        if self.valid_every_steps and not self.valid_split:
            raise ConfigError(f"--valid_every_steps {self.valid_every_steps} validates on --valid_split: give one "
                              f"(it is '')")
        if self.epochs is not None and self.steps is not None:
            raise ConfigError(f"--epochs {self.epochs} and --steps {self.steps}: give one of them (the length of "
                              f"the run in epochs or in optimizer steps)")
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise ConfigError(f"--lr must be a finite number > 0, got {self.lr}")
        if self.num_workers < 0:
            raise ConfigError(f"--num_workers must be >= 0, got {self.num_workers}")
        for flag in ("save_path", "checkpoint_path"):
            check_output_file(flag, getattr(self, flag))
        if self.checkpoint_every_steps < 0 or (self.checkpoint_every_steps and not self.checkpoint_path):
            raise ConfigError(f"--checkpoint_every_steps {self.checkpoint_every_steps}: must be >= 0, and > 0 needs "
                              f"--checkpoint_path (the file the mid-epoch state is written to)")


@dataclass(kw_only=True)
class TeacherTrainConfig(TrainConfig):
    """``python -m pipelines.train_teacher``."""

    save_path: Optional[str] = redefault(TrainConfig, "save_path", "runs/teacher_best.pt")
    lidar_num_features: NumFeatures = lidar_num_features_option()
    residual_actions: Optional[str] = option(
        None, choices=tuple(RESIDUAL_MODES),
        help="what the head predicts as a change w.r.t. its inputs: all (steering and speed), steering (the speed "
             f"command outright), none, scene (none, and the previous-steering input unused: the head that drives, "
             f"the default of a new teacher, {DEFAULT_HEAD}; a head that sees its previous command learns to repeat "
             "it and leaves the road), scene_only (as scene, and the measured speed unused too: the speed command "
             "cannot copy the current speed); with --init_path the default is that checkpoint's head (the weights "
             "fit every head), with --resume_path it must be the run's own; the student follows")
    bev_pool_grid: Optional[int] = option(
        None, help="bev_vec reads a k x k average pool of the BEV features (default: the preset's, 1 = the global "
                   "mean, which keeps no layout: where a car ahead is; docs/STUDENT.md)")
    brake_weight: float = option(
        0.0, metavar="PER_MPS",
        help="weigh each frame's speed loss by 1 + PER_MPS x the m/s its label asks the car to shed (measured speed "
             "- speed command, when positive): the frames of braking behind a slower car count more (default "
             "%(default)s = off: at 1 it did not beat off over 3 seeds, docs/STUDENT.md)")

    def check(self) -> None:
        super().check()
        check_weights(self, ("brake_weight",))
        if self.bev_pool_grid is not None:
            try:
                replace(TeacherConfig.preset_named(self.preset), bev_pool_grid=self.bev_pool_grid).validate()
            except ValueError as e:
                raise ConfigError(f"--bev_pool_grid {self.bev_pool_grid}: {e}") from None


#: where the teacher rows of a KD batch are read (``--kd_targets``; `e2r.workflow.kd_data.make_kd_loader`)
KD_TARGETS_IN = ("main", "worker")


@dataclass(kw_only=True)
class StoreAccess:
    """How a store URL (``s3://bucket/mb.zarr``) is reached: fsspec options (JSON) and a local cache of fetched
    chunks (``store_cache_dir``, at most ``store_cache_gb`` GiB; unused for a local store); and which process
    reads the teacher rows (``kd_targets``, `e2r.workflow.kd_data.make_kd_loader`)."""

    storage_options: Optional[str] = option(
        None, help="a --memorybank on object storage (s3://bucket/mb.zarr): fsspec options as JSON, e.g. "
                   "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}' (default: the AWS_* environment variables)")
    store_cache_dir: Optional[str] = option(
        None, help="a --memorybank URL: keep fetched chunks in this local directory (LRU, checked on every read) so "
                   "later epochs read them locally")
    store_cache_gb: float = option(20.0, help="size cap of --store_cache_dir (GiB, default %(default)s)")
    kd_targets: str = option(
        "main", choices=KD_TARGETS_IN,
        help="where the teacher rows are read: 'main' = this process, by key, on a thread up to two batches ahead of "
             "the step (the DataLoader workers send camera windows and keys only), 'worker' = the workers, with the "
             "windows (their rows then cross to this process through shared memory). Same batches either way "
             "(default: %(default)s)")

    def check(self) -> None:
        check_storage_options(self.storage_options)
        if self.kd_targets not in KD_TARGETS_IN:
            raise ConfigError(f"--kd_targets must be one of {KD_TARGETS_IN}, got {self.kd_targets!r}")
        if not 0 < self.store_cache_gb < math.inf:
            raise ConfigError(f"--store_cache_gb must be > 0, got {self.store_cache_gb}")


def check_storage_options(text: Optional[str]) -> None:
    """ConfigError unless ``--storage_options`` is empty or a JSON object."""
    if not text:
        return
    try:
        ok = isinstance(json.loads(text), dict)
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"--storage_options must be a JSON object, e.g. '{{\"endpoint_url\": "
                          f"\"http://127.0.0.1:9000\"}}', got {text!r}")


@dataclass(kw_only=True)
class PairingArgs:
    """Camera and LiDAR recorded apart (``e2r.workflow.pairing``): ``pair_lidar_root`` is the LiDAR data root
    the memorybank was exported from (same split/segment names as ``data_root``, the camera root); each
    camera window reads the row of the LiDAR window whose last frame is nearest in time, within
    ``pair_tolerance_ms``, its KD weighted by the pair's confidence."""

    pair_lidar_root: Optional[str] = option(
        None, metavar="DIR",
        help="camera and LiDAR recorded apart (--data_root = the camera root, e.g. make_dataset --camera_root): pair "
             "each camera window with the LiDAR window of the same split/segment in DIR (the root the memorybank "
             "was exported from) whose last frame's timestamp is nearest to the camera window's last frame's; both "
             "roots' data.csv need a timestamp column. Default: off (windows pair by key)")
    pair_tolerance_ms: float = option(
        50.0, help="with --pair_lidar_root: no pair (BC only) when the two last frames are more than this apart; a "
                   "pair's KD terms are weighted by its confidence 1 - |dt|/tolerance (default %(default)s)")

    def check_pairing(self, memorybank: Optional[str]) -> None:
        if not self.pair_tolerance_ms >= 0:
            raise ConfigError(f"--pair_tolerance_ms must be >= 0, got {self.pair_tolerance_ms}")
        if self.pair_lidar_root and not memorybank:
            raise ConfigError("--pair_lidar_root needs --memorybank (the store of the LiDAR root's windows)")
        if self.pair_lidar_root and not os.path.isdir(self.pair_lidar_root):
            raise ConfigError(f"--pair_lidar_root {self.pair_lidar_root!r} is not a directory")


def skip_damaged_option() -> Any:
    """The ``skip_damaged`` field of the configs that read a memorybank."""
    return option(False, help="a damaged memorybank (rows failing their checksums, missing shards) stops the run by "
                              "default; with this flag the damaged rows are left without KD and counted")


def kd_retrieval_k_option() -> Any:
    """The ``kd_retrieval_k`` field of the configs that retrieve teacher rows."""
    return option(8, help="rows retrieved per window (default %(default)s)")


@dataclass(kw_only=True)
class StudentTrainConfig(PairingArgs, StoreAccess, TrainConfig):
    """``python -m pipelines.train_student``: BC, plus KD for the keys in ``memorybank``."""

    save_path: Optional[str] = redefault(TrainConfig, "save_path", "runs/student_best.pt")
    # without a warm-up the tiny camera student can stay at the label mean (docs/STUDENT.md)
    warmup_steps: int = redefault(TrainConfig, "warmup_steps", 150)
    view_transform: str = option("lss", choices=("lss", "identity"),
                                 help="camera -> BEV: lss (Lift-Splat, default) or identity (resize placeholder, "
                                      "ablation)")
    splat_pool: str = option(
        "sum", choices=("sum", "mean"),
        help="Lift-Splat: sum the frustum points falling in a BEV cell (as LSS) or average them, so the cells next "
             "to the camera do not outweigh the image (default %(default)s)")
    bev_pool_grid: int = option(
        PRESET_BEV_POOL_GRID,
        help="bev_vec reads a k x k average pool of the BEV features (default %(default)s; 1 = their global mean, "
             "which keeps what is seen but not where: the tiny student then often never leaves the label mean, "
             "docs/STUDENT.md)")
    norm: str = option(
        "batch", choices=NORMS,
        help="normalisation in the image and BEV CNNs: batch (BatchNorm, statistics over the B x T x Ncam frames of a "
             "batch, default) or group (GroupNorm per frame)")
    input_norm: str = option(
        "fixed", choices=INPUT_NORMS,
        help="image input to the CNN: fixed ((x - 0.45) / 0.225, default) or per_image (each image and channel "
             "standardised by its own mean and std)")
    photometric: float = option(
        0.0, help="strength in [0, 1] of the photometric augmentation of training windows: brightness, contrast, "
                  "gamma, colour and noise, one draw per window (e2r/data/augment.py; default %(default)s = off: no "
                  "measured gain at 4 tracks, docs/STUDENT.md)")
    image_cache_mb: float = option(
        512.0, help="decoded camera frames kept in memory per process (each DataLoader worker has its own), so an "
                    "epoch decodes each frame once; bit-identical to decoding (default %(default)s MB; 0 = off)")
    crop_zoom: float = option(
        0.0, help="zoom-crop augmentation of training windows: a crop of s x the image (s ~ U(1 - Z, 1), one per "
                  "window and camera) resized back, the intrinsics adjusted so the Lift-Splat geometry stays right "
                  "(e2r/data/augment.py; default %(default)s = off)")
    select_by: str = option(
        "loss", choices=("loss", "drive"),
        help="what picks the kept checkpoint (--save_path) at each validation (after each epoch, or every "
             "--valid_every_steps): the BC loss on --valid_split "
             "(default), or driving the --valid_split tracks in closed loop (synthetic worlds only; most success + "
             "progress in laps)")
    select_starts: int = option(2, help="with --select_by drive: start points per valid track (default %(default)s)")
    select_time_limit: float = option(30.0, help="with --select_by drive: seconds of simulated driving per start "
                                                 "(default %(default)s)")
    memorybank: Optional[str] = option(
        None, flags=("--teacher_cache_dir",),
        help="memorybank of teacher outputs (pipelines.export); KD for the keys it holds. Unset: BC only")
    teacher_ckpt: Optional[str] = option(
        None, help="teacher checkpoint, only for its config (BEV grid) when the memorybank does not record it")
    kd_action_w: float = option(1.0, help="weight of action KD (default %(default)s)")
    kd_bevvec_w: float = option(1.0, help="weight of bev_vec 1-cosine KD (default %(default)s)")
    kd_temporal_w: float = option(1.0, help="weight of GRU-out MSE KD (default %(default)s)")
    kd_bevfeat_w: float = option(0.0, help="weight of dense bev_feat KD (needs bev_feat in the store; default "
                                           "%(default)s = off)")
    kd_depth_w: float = option(0.0, help="weight of LiDAR depth supervision of the Lift-Splat depth distribution "
                                         "(BEVDepth-style cross-entropy against the store's depth targets: export "
                                         "with --store_depth; default %(default)s = off)")
    kd_bevfeat_background: float = option(0.05, help="dense KD weight of cells the teacher finds unoccupied "
                                                     "(default %(default)s)")
    skip_damaged: bool = skip_damaged_option()
    kd_retrieval: Optional[str] = option(
        None, metavar="INDEX",
        help="KD for windows without a row in the memorybank from the teacher rows of the most similar "
             "situations, found in this retrieval index of the store (python -m pipelines.retrieval_index build, e.g. "
             "state); paired windows keep their own targets. Default: off")
    kd_retrieval_k: int = kd_retrieval_k_option()
    kd_retrieval_tau: float = option(0.05, help="temperature of the softmax over similarities that mixes the k rows "
                                                "(default %(default)s)")
    kd_retrieval_min_sim: float = option(0.9, help="no KD for a window whose best cosine similarity is below this "
                                                   "(default %(default)s)")
    kd_unpaired: bool = option(
        False, help="with --kd_retrieval: ignore every window's own row and its whole segment (the unpaired-data "
                    "experiment: camera drives that share no key with the LiDAR drives)")

    def check(self) -> None:
        StoreAccess.check(self)
        TrainConfig.check(self)
        check_probability(self, ("photometric", "kd_bevfeat_background"))
        if not self.image_cache_mb >= 0:
            raise ConfigError(f"--image_cache_mb must be >= 0, got {self.image_cache_mb}")
        if not 0.0 <= self.crop_zoom < 1.0:                  # NaN fails too
            raise ConfigError(f"--crop_zoom must be in [0, 1), got {self.crop_zoom}")
        check_weights(self, ("kd_action_w", "kd_bevvec_w", "kd_temporal_w", "kd_bevfeat_w", "kd_depth_w"))
        if self.select_by not in ("loss", "drive"):
            raise ConfigError(f"--select_by must be 'loss' or 'drive', got {self.select_by!r}")
        if self.select_by == "drive" and not self.valid_split:
            raise ConfigError("--select_by drive drives the --valid_split tracks: give one")
        check_positive(self, ("select_starts",))
        if not 0 < self.select_time_limit < math.inf:
            raise ConfigError(f"--select_time_limit must be > 0 seconds, got {self.select_time_limit}")
        if self.kd_retrieval and not self.memorybank:
            raise ConfigError("--kd_retrieval needs --memorybank (the store holding the retrieval index)")
        if self.kd_unpaired and not self.kd_retrieval:
            raise ConfigError("--kd_unpaired needs --kd_retrieval (unpaired windows get KD only by retrieval)")
        self.check_pairing(self.memorybank)
        if self.kd_depth_w > 0 and (self.kd_retrieval or self.pair_lidar_root):
            raise ConfigError(f"--kd_depth_w supervises a window's images with the depth of its own LiDAR frames: it "
                              f"cannot go with {'--kd_retrieval' if self.kd_retrieval else '--pair_lidar_root'} "
                              f"(another situation's or another recording's frames)")
        if self.kd_unpaired and self.pair_lidar_root:
            raise ConfigError("--kd_unpaired ignores every window's own pair: it cannot go with --pair_lidar_root")
        if self.extra_train_splits and self.pair_lidar_root:
            raise ConfigError("--extra_train_splits with --pair_lidar_root: timestamp pairing reads one camera split; "
                              "train the recorded splits (which hold their own LiDAR) without it")
        check_positive(self, ("kd_retrieval_k", "bev_pool_grid"))
        if not 0 < self.kd_retrieval_tau < math.inf:
            raise ConfigError(f"--kd_retrieval_tau must be a finite number > 0, got {self.kd_retrieval_tau}")
        if math.isnan(self.kd_retrieval_min_sim):       # would gate every window off silently
            raise ConfigError(f"--kd_retrieval_min_sim must be a number, got {self.kd_retrieval_min_sim}")


@dataclass(kw_only=True)
class EvalConfig:
    """What the offline evaluations share (``pipelines.eval_teacher --help`` explains each)."""

    data_root: str = option(help="dataset root holding <split>/<segment>/meta/data.csv")
    split: str = option("valid", help="split to evaluate (default: %(default)s)")
    seq_len: int = option(5, help="frames per window T (default: %(default)s)")
    stride: int = option(1, help="step between window starts (default: %(default)s)")
    batch_size: int = option(8, help="windows per batch (default: %(default)s)")
    overall_weights: str = option("1.0,0.05", help="weights of steering,speed MSE in the overall score (default "
                                                   "%(default)s)")
    csv_path: Optional[str] = option(None, help="write one metrics row per predictor to this CSV")
    plot_path: Optional[str] = option(None, help="PNG of predicted vs true steering and speed along a segment")
    plot_segment: Optional[str] = option(None, help="segment to plot (default: the split's first)")
    device: str = device_option()
    num_workers: int = option(0, help="DataLoader worker processes (default %(default)s)")
    no_progress: bool = option(False, help="hide the progress bar")

    def check(self) -> None:
        """ConfigError naming the flag for values that cannot work, before any data is read."""
        check_positive(self, ("seq_len", "stride", "batch_size"))
        if self.num_workers < 0:
            raise ConfigError(f"--num_workers must be >= 0, got {self.num_workers}")
        for flag in ("csv_path", "plot_path"):
            check_output_file(flag, getattr(self, flag))


@dataclass(kw_only=True)
class TeacherEvalConfig(EvalConfig):
    """``python -m pipelines.eval_teacher``."""

    teacher_ckpt: str = option(help="checkpoint written by pipelines.train_teacher")
    lidar_num_features: NumFeatures = lidar_num_features_option()


@dataclass(kw_only=True)
class StudentEvalConfig(PairingArgs, StoreAccess, EvalConfig):
    """``python -m pipelines.eval_student``: with ``memorybank``, also the KD gap to the teacher."""

    student_ckpt: str = option(help="checkpoint written by pipelines.train_student")
    memorybank: Optional[str] = option(
        None, flags=("--teacher_cache_dir",),
        help="memorybank of teacher outputs: also report the KD gap to the teacher on its keys")
    skip_damaged: bool = skip_damaged_option()
    kd_retrieval: Optional[str] = option(
        None, metavar="INDEX",
        help="also check retrieval from this index of the store: the similarity of windows without a row, and for "
             "windows with one how close the retrieved targets come to their own")
    kd_retrieval_k: int = kd_retrieval_k_option()
    kd_retrieval_tau: float = option(0.05, help="mixing temperature (default %(default)s)")

    def check(self) -> None:
        StoreAccess.check(self)
        EvalConfig.check(self)
        self.check_pairing(self.memorybank)
