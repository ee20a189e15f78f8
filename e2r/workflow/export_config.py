"""The export's run config (``python -m pipelines.export``; ``e2r.workflow.export_run.export_memorybank``):
what shapes the store (seq_len, dtype, bev_feat and its pooling), where it is, and how the work is spread."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from e2r.cli_config import device_option, lidar_num_features_option, option
from e2r.errors import ConfigError, check_positive
from e2r.workflow.configs import NumFeatures, check_storage_options
from e2r.workflow.retrieval_queries import QUERY_KINDS
from stores.errors import StoreError
from stores.paths import check_new_path
from stores.remote.objstore import is_remote

__all__ = ["ExportConfig"]


@dataclass(kw_only=True)
class ExportConfig:
    """``python -m pipelines.export``. ``seq_len``, ``dtype``, ``save_bev_feat``, ``bev_feat_pool``, ``store_depth``
    and ``depth_preset`` shape the store: they become its schema (``e2r.workflow.export_run.store_schema``) once,
    and from then on the store's schema is the only source every export task reads them from (an existing store
    whose schema differs is refused, or replaced with ``overwrite``)."""

    data_root: str = option(help="dataset root: <root>/<split>/<segment>/meta/data.csv")
    split: list[str] = option(default_factory=list, repeat=True, required=True,
                              help="split to export (repeat for several); each becomes its own row range in the store")
    store: str = option(flags=("--cache_dir",), help="memorybank path: a .zarr directory (default back end) or .h5 "
                                                     "file; --cache_dir is the original's name for it")
    teacher_ckpt: Optional[str] = option(None, help="teacher checkpoint (from pipelines.train_teacher); required")
    seq_len: int = option(5, help="T, frames per window/sample (default %(default)s)")
    stride: int = option(1, help="frames between window starts (default %(default)s)")
    save_bev_feat: bool = option(False, help="also store the dense bev_feat (T, C, H, W) per sample in its own chunk "
                                             "group")
    bev_feat_pool: int = option(1, help="average-pool bev_feat by K x K cells before storing (e2r.kd.pool_bev_feat; "
                                        "default %(default)s)")
    store_depth: bool = option(False, help="also store each window's LiDAR depth targets (T, Ncam, h, w) uint8 in its "
                                           "own chunk group: the depth bin per camera feature pixel of the "
                                           "--depth_preset student (e2r.depth; for --kd_depth_w)")
    depth_preset: str = option("tiny", choices=("tiny", "full"),
                               help="with --store_depth: the student preset whose input size, feature map and depth "
                                    "bins the targets are for (default %(default)s)")
    dtype: str = option("float32", choices=("float32", "float16"), help="stored dtype")
    batch_size: int = option(16, help="frames per encoder batch (default %(default)s)")
    window_batch: int = option(64, help="windows per GRU batch, a power of two (capped at the store's shard rows)")
    write_rows: int = option(1024, help="rows per store write (default %(default)s)")
    device: str = device_option()
    amp: Optional[str] = option(None, choices=("bf16", "fp16"), help="autocast the encoder on CUDA")
    num_workers: int = option(2, help="DataLoader processes reading and voxelising point clouds (default "
                                      "%(default)s; 0 = inline)")
    workers: int = option(0, exclusive="scale",
                          help="start a local dask cluster of N worker processes (1 thread each)")
    scheduler: Optional[str] = option(None, exclusive="scale",
                                      help="address of a running dask scheduler, e.g. tcp://10.0.0.1:8786")
    threads: int = option(
        0, help="torch threads per process (default: all cores; cores // N with --workers N; with --scheduler each "
                "task takes its worker machine's cores // the worker's --nthreads). Results are bit-identical across "
                "runs only with equal --threads, batch sizes and device")
    rows_per_task: int = option(0, help="rows per task (rounded up to whole shards; default one shard)")
    shard_rows: int = option(0, help="rows per shard when creating a store (power of two; default: the store's "
                                     "choice)")
    lidar_num_features: NumFeatures = lidar_num_features_option()
    overwrite: bool = option(False, help="replace a store made with another schema/teacher, or rewrite the named "
                                         "splits")
    append: bool = option(False, help="add the named splits to an existing local Zarr store and check that every "
                                      "chunk file and key of its earlier splits is byte-identical afterwards (e.g. a "
                                      "DAgger round's drives)")
    no_fsync: bool = option(
        False, help="skip fsync of written data before rows are flagged complete (faster; a power loss may then lose "
                    "recent rows, which verify reports and a re-run redoes)")
    no_progress: bool = option(False, help="no tqdm bar")
    storage_options: Optional[str] = option(
        None, help="--store on object storage (s3://bucket/mb.zarr): fsspec options as JSON, e.g. "
                   "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}' (default: the AWS_* environment variables)")
    retrieval_index: list[str] = option(
        default_factory=list, nargs="+", choices=QUERY_KINDS, metavar="QUERY",
        help=f"after the export, (re)build the store's retrieval index of each query kind ({', '.join(QUERY_KINDS)}; "
             f"default none) with its default settings, as `python -m pipelines.retrieval_index build --query QUERY "
             f"--replace` would")

    def check(self) -> None:
        """ConfigError naming the flag for values that cannot work (the teacher checkpoint is checked by
        the export itself, which prints how to train one)."""
        if self.retrieval_index and is_remote(self.store):
            raise ConfigError(f"--retrieval_index: retrieval indexes are built in local stores only, not {self.store}; "
                              f"build it on a local copy (python -m pipelines.retrieval_index build)")
        check_positive(self, ("seq_len", "stride", "batch_size", "window_batch", "write_rows", "bev_feat_pool"))
        check_storage_options(self.storage_options)
        if self.store is not None and not is_remote(self.store):      # "" too: it would name the working dir
            try:
                check_new_path(self.store)       # a file where a folder should be, /proc: before the teacher loads
            except StoreError as e:
                raise ConfigError(f"--store: {e}") from None
        if self.window_batch & (self.window_batch - 1):
            raise ConfigError(f"--window_batch must be a power of two, got {self.window_batch}")
        if self.workers < 0 or self.threads < 0 or self.num_workers < 0:
            raise ConfigError("--workers, --threads and --num_workers must be >= 0")
        if not self.split:
            raise ConfigError("--split: name at least one split to export")
        if self.append and self.overwrite:
            raise ConfigError("--append and --overwrite: give one (--append only adds splits to an existing store)")
        if self.append and is_remote(self.store):
            raise ConfigError(f"--append checks the earlier splits' chunk files byte by byte, on a local store only, "
                              f"not {self.store}; export without --append (new splits are appended anyway)")
