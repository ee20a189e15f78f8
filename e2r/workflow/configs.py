"""Typed run configurations: one dataclass per run kind, built from the parsed flags by one function
(:func:`config_from_namespace`) and passed to the workflow functions (``train_teacher(cfg)``,
``export_memorybank(cfg)``, ...). Field names equal the CLI flags (``--seq_len`` -> ``seq_len``), so a
pipeline's ``--help`` is the documentation of its config. The demo and tests build configs directly.

Training fields left ``None`` (``epochs``, ``lr``, ``batch_size``) take the preset's defaults
(:data:`PRESET_DEFAULTS`) through :meth:`TrainConfig.hparams`.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Optional, Sequence, TypeVar, Union

from e2r.errors import ConfigError, check_positive, check_probability
from e2r.models.student_config import PRESET_BEV_POOL_GRID
from stores.remote.objstore import is_remote

__all__ = ["PRESET_DEFAULTS", "TrainConfig", "TeacherTrainConfig", "StudentTrainConfig", "EvalConfig", "StoreAccess",
           "PairingArgs", "KD_TARGETS_IN",
           "TeacherEvalConfig", "StudentEvalConfig", "ExportConfig", "config_from_namespace", "command_line", "plain_dict",
           "check_output_file", "check_positive", "image_size",
           "NumFeatures"]

#: training defaults per preset (tiny: tuned on the default synthetic dataset, a few CPU minutes)
PRESET_DEFAULTS = {"tiny": {"epochs": 8, "lr": 2e-3, "batch_size": 8},
                   "full": {"epochs": 30, "lr": 1e-3, "batch_size": 4}}

#: ``--lidar_num_features``: "auto" or a column count (4, 5, 8)
NumFeatures = Union[int, str]

C = TypeVar("C")


def config_from_namespace(cls: type[C], ns: argparse.Namespace) -> C:
    """The config ``cls`` from parsed flags: every dataclass field is taken from the attribute of that name
    (a flag that a pipeline does not offer keeps the field's default); the config then checks itself."""
    values = {f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)}
    cfg = cls(**values)
    check = getattr(cfg, "check", None)
    if check is not None:
        check()
    return cfg


#: list flags given once per value (``action="append"``); every other list flag takes its values after one flag
REPEATED_FLAGS = frozenset({"split", "policy", "segment"})


def command_line(module: str, cfg: Any, positional: Sequence[str] = ()) -> str:
    """The ``python -m <module> ...`` command that makes ``cfg`` (fields that differ from their defaults;
    ``positional`` fields are written without a flag), for logs: a reader can re-run a stage by hand."""
    words = [f"python -m {module}"]
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if f.name in positional:
            words.append(str(value))
        elif value != default:
            if isinstance(value, bool):
                words.append(f"--{f.name}")
            elif isinstance(value, list) and f.name in REPEATED_FLAGS:
                words += [f"--{f.name} {shlex.quote(str(v))}" for v in value]
            elif isinstance(value, list):                        # nargs="+": --train_segments a b
                words.append(" ".join([f"--{f.name}", *(shlex.quote(str(v)) for v in value)]))
            else:
                words.append(f"--{f.name} {shlex.quote(str(value))}")
    return " ".join(words)


def image_size(text: str, minimum: int = 1) -> tuple[int, int]:
    """``--image_size``: ``"256x128"`` -> (256, 128) = (W, H); ArgumentTypeError unless both are integers
    >= ``minimum``."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image_size must look like WxH, e.g. 256x128; got {text!r}") from None
    if w < minimum or h < minimum:
        raise argparse.ArgumentTypeError(f"--image_size must be at least {minimum}x{minimum}, got {text!r}")
    return w, h


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

    data_root: str
    train_split: str = "train"
    train_segments: Optional[list[str]] = None
    valid_split: str = "valid"
    preset: str = "tiny"
    epochs: Optional[int] = None
    steps: Optional[int] = None
    warmup_steps: int = 0
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    seq_len: int = 5
    stride: int = 1
    steer_loss_weight: float = 1.0
    speed_loss_weight: float = 0.05
    smooth_weight: float = 0.0
    steer_input_dropout: float = 0.5
    hflip_prob: float = 0.0
    weight_decay: float = 1e-4
    grad_clip: float = 5.0
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    checkpoint_path: Optional[str] = None
    checkpoint_every_steps: int = 0
    save_path: Optional[str] = None
    resume_path: Optional[str] = None
    init_path: Optional[str] = None
    init_skip_output_layer: bool = False
    tensorboard_dir: Optional[str] = None
    stop_after_epoch: Optional[int] = None
    no_progress: bool = False

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
        check_positive(self, ("epochs", "steps", "batch_size", "seq_len", "stride"))
        if self.epochs is not None and self.steps is not None:
            raise ConfigError(f"--epochs {self.epochs} and --steps {self.steps}: give one of them (the length of "
                              f"the run in epochs or in optimizer steps)")
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
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

    save_path: Optional[str] = "runs/teacher_best.pt"
    lidar_num_features: NumFeatures = "auto"
    residual_actions: Optional[str] = "scene"     # the head that drives (README: 62 % laps vs 0 % for "all")


#: where the teacher rows of a KD batch are read (``--kd_targets``; `e2r.workflow.kd_data.make_kd_loader`)
KD_TARGETS_IN = ("main", "worker")


@dataclass(kw_only=True)
class StoreAccess:
    """How a store URL (``s3://bucket/mb.zarr``) is reached: fsspec options (JSON) and a local cache of fetched
    chunks (``store_cache_dir``, at most ``store_cache_gb`` GiB; unused for a local store); and which process
    reads the teacher rows (``kd_targets``, `e2r.workflow.kd_data.make_kd_loader`)."""

    storage_options: Optional[str] = None
    store_cache_dir: Optional[str] = None
    store_cache_gb: float = 20.0
    kd_targets: str = "main"      # where teacher rows are read: "main" (ahead of the step) or "worker"

    def check(self) -> None:
        check_storage_options(self.storage_options)
        if self.kd_targets not in KD_TARGETS_IN:
            raise ConfigError(f"--kd_targets must be one of {KD_TARGETS_IN}, got {self.kd_targets!r}")
        if not self.store_cache_gb > 0:
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

    pair_lidar_root: Optional[str] = None
    pair_tolerance_ms: float = 50.0

    def check_pairing(self, memorybank: Optional[str]) -> None:
        if not self.pair_tolerance_ms >= 0:
            raise ConfigError(f"--pair_tolerance_ms must be >= 0, got {self.pair_tolerance_ms}")
        if self.pair_lidar_root and not memorybank:
            raise ConfigError("--pair_lidar_root needs --memorybank (the store of the LiDAR root's windows)")
        if self.pair_lidar_root and not os.path.isdir(self.pair_lidar_root):
            raise ConfigError(f"--pair_lidar_root {self.pair_lidar_root!r} is not a directory")


@dataclass(kw_only=True)
class StudentTrainConfig(PairingArgs, StoreAccess, TrainConfig):
    """``python -m pipelines.train_student``: BC, plus KD for the keys in ``memorybank``."""

    save_path: Optional[str] = "runs/student_best.pt"
    warmup_steps: int = 150       # without it the tiny camera student can stay at the label mean (docs/STUDENT.md)
    view_transform: str = "lss"
    splat_pool: str = "sum"
    bev_pool_grid: int = PRESET_BEV_POOL_GRID
    photometric: float = 0.0      # strength of e2r.data.augment.photometric_jitter on training windows
    select_by: str = "loss"       # what picks --save_path: the valid loss, or driving the valid tracks
    select_starts: int = 2
    select_time_limit: float = 30.0
    memorybank: Optional[str] = None
    teacher_ckpt: Optional[str] = None
    kd_action_w: float = 1.0
    kd_bevvec_w: float = 1.0
    kd_temporal_w: float = 1.0
    kd_bevfeat_w: float = 0.0
    kd_bevfeat_background: float = 0.05
    skip_damaged: bool = False
    kd_retrieval: Optional[str] = None
    kd_retrieval_k: int = 8
    kd_retrieval_tau: float = 0.05
    kd_retrieval_min_sim: float = 0.9
    kd_unpaired: bool = False

    def check(self) -> None:
        StoreAccess.check(self)
        TrainConfig.check(self)
        check_probability(self, ("photometric",))
        if self.select_by not in ("loss", "drive"):
            raise ConfigError(f"--select_by must be 'loss' or 'drive', got {self.select_by!r}")
        if self.select_by == "drive" and not self.valid_split:
            raise ConfigError("--select_by drive drives the --valid_split tracks: give one")
        check_positive(self, ("select_starts",))
        if not self.select_time_limit > 0:
            raise ConfigError(f"--select_time_limit must be > 0 seconds, got {self.select_time_limit}")
        if self.kd_retrieval and not self.memorybank:
            raise ConfigError("--kd_retrieval needs --memorybank (the store holding the retrieval index)")
        if self.kd_unpaired and not self.kd_retrieval:
            raise ConfigError("--kd_unpaired needs --kd_retrieval (unpaired windows get KD only by retrieval)")
        self.check_pairing(self.memorybank)
        if self.kd_unpaired and self.pair_lidar_root:
            raise ConfigError("--kd_unpaired ignores every window's own pair: it cannot go with --pair_lidar_root")
        check_positive(self, ("kd_retrieval_k", "bev_pool_grid"))
        if not self.kd_retrieval_tau > 0:
            raise ConfigError(f"--kd_retrieval_tau must be > 0, got {self.kd_retrieval_tau}")


@dataclass(kw_only=True)
class EvalConfig:
    """What the offline evaluations share (``pipelines.eval_teacher --help`` explains each)."""

    data_root: str
    split: str = "valid"
    seq_len: int = 5
    stride: int = 1
    batch_size: int = 8
    overall_weights: str = "1.0,0.05"
    csv_path: Optional[str] = None
    plot_path: Optional[str] = None
    plot_segment: Optional[str] = None
    device: str = "auto"
    num_workers: int = 0
    no_progress: bool = False

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

    teacher_ckpt: str
    lidar_num_features: NumFeatures = "auto"


@dataclass(kw_only=True)
class StudentEvalConfig(PairingArgs, StoreAccess, EvalConfig):
    """``python -m pipelines.eval_student``: with ``memorybank``, also the KD gap to the teacher."""

    student_ckpt: str
    memorybank: Optional[str] = None
    skip_damaged: bool = False
    kd_retrieval: Optional[str] = None
    kd_retrieval_k: int = 8
    kd_retrieval_tau: float = 0.05

    def check(self) -> None:
        StoreAccess.check(self)
        EvalConfig.check(self)
        self.check_pairing(self.memorybank)


@dataclass(kw_only=True)
class ExportConfig:
    """``python -m pipelines.export``. ``seq_len``, ``dtype``, ``save_bev_feat`` and ``bev_feat_pool`` shape
    the store: they become its schema (``e2r.workflow.export.store_schema``) once, and from then on the
    store's schema is the only source every export task reads them from (an existing store whose schema
    differs is refused, or replaced with ``overwrite``)."""

    data_root: str
    split: list[str] = field(default_factory=list)
    store: str
    teacher_ckpt: Optional[str] = None
    seq_len: int = 5
    stride: int = 1
    save_bev_feat: bool = False
    bev_feat_pool: int = 1
    dtype: str = "float32"
    batch_size: int = 16
    window_batch: int = 64
    write_rows: int = 1024
    device: str = "auto"
    amp: Optional[str] = None
    num_workers: int = 2
    workers: int = 0
    scheduler: Optional[str] = None
    threads: int = 0
    rows_per_task: int = 0
    shard_rows: int = 0
    lidar_num_features: NumFeatures = "auto"
    overwrite: bool = False
    no_fsync: bool = False
    no_progress: bool = False
    storage_options: Optional[str] = None
    retrieval_index: list[str] = field(default_factory=list)    # query kinds indexed after the export

    def check(self) -> None:
        """ConfigError naming the flag for values that cannot work (the teacher checkpoint is checked by
        the export itself, which prints how to train one)."""
        if self.retrieval_index and is_remote(self.store):
            raise ConfigError(f"--retrieval_index: retrieval indexes are built in local stores only, not {self.store}; "
                              f"build it on a local copy (python -m pipelines.retrieval_index)")
        check_positive(self, ("seq_len", "stride", "batch_size", "window_batch", "write_rows", "bev_feat_pool"))
        check_storage_options(self.storage_options)
        if self.window_batch & (self.window_batch - 1):
            raise ConfigError(f"--window_batch must be a power of two, got {self.window_batch}")
        if self.workers < 0 or self.threads < 0 or self.num_workers < 0:
            raise ConfigError("--workers, --threads and --num_workers must be >= 0")
        if not self.split:
            raise ConfigError("--split: name at least one split to export")
