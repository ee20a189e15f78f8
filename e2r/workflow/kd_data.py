"""The teacher targets of a student run, read from the memorybank by window key (training and evaluation).

* :class:`TeacherTargets`: built once per run (:meth:`TeacherTargets.for_run`: the store's schema checked
  against the dataset and the student, retrieval, timestamp pairing, the row reader); ``attach(batch)``
  adds a batch's targets with **one** batched memorybank read (``stores.torch_data.TeacherRowReader`` ->
  ``MemoryBank.get_batch_into``).
* :class:`CameraBatches`: a map-style dataset whose item is a whole *batch* of camera windows
  (``ds[[i, j, ...]]``); :func:`make_kd_loader`: the project's one sampler (``training_sampler``: exact rank
  sharding, seed + epoch shuffle) as the DataLoader's sampler with ``batch_size=None``, so every batch is
  fetched whole by one worker. By default the workers deliver the windows only and the rows are read in the
  training process ahead of the step (``e2r.workflow.targets_ahead``). The store is opened read-only,
  lazily in each process that reads; nothing is loaded up front and nothing is written per sample.
* :func:`read_store_schema` / :func:`check_store_fits`: the schema and teacher of a store, and a refusal of
  a store whose seq_len / action size / bev_vec D / gru_out H (or, for dense KD, bev_feat grid; for depth
  supervision, its depth grid) differ from the dataset's and the student's.
* :func:`hflip_batch`: mirror chosen samples of a batch, cached targets included (``e2r.kd.hflip_sample``).

The loss of a batch is ``e2r.kd.student_losses``.
"""
from __future__ import annotations

from dataclasses import fields as dc_fields
from numbers import Integral
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from e2r.checkpoints import load_checkpoint
from e2r.data.datasets import ACTION_SEMANTICS, CameraSequenceDataset, collate_camera
from e2r.data.layout import SegmentTable
from e2r.data.sampler import EpochBatchSampler, training_sampler
from e2r.depth import grid_problems
from e2r.kd import hflip_sample
from e2r.models.config import TeacherConfig
from e2r.models.student_config import StudentConfig
from e2r.runtime import DistContext, die_with_parent
from e2r.workflow.configs import KD_TARGETS_IN, StoreAccess, StudentEvalConfig, StudentTrainConfig
from e2r.workflow.pairing import TimestampPairing
from e2r.workflow.retrieval_kd import Retriever, apply_retrieved
from e2r.workflow.targets_ahead import TargetsAhead
from stores import StoreCorruptError, StoreError, StoreMismatchError, StoreSchema, open_memorybank
from stores.remote.objstore import parse_storage_options
from stores.torch_data import TeacherRowReader, make_loader

__all__ = ["LIGHT_KD_FIELDS", "teacher_config_of_store", "teacher_config_of_checkpoint", "read_store_schema",
           "store_open_kw", "check_store_fits", "TeacherTargets", "CameraBatches", "make_kd_loader",
           "hflip_batch", "batch_to"]

#: memorybank fields read for KD (bev_feat only when dense KD is asked, depth only for --kd_depth_w)
LIGHT_KD_FIELDS = ("actions", "bev_vec", "gru_out")


def teacher_config_of_store(model_config: dict[str, Any] | None) -> TeacherConfig | None:
    """The teacher config recorded in a store's provenance, or None when it is absent or partial (a partial
    dict would silently fill the full preset's grid, so it is not trusted)."""
    if not model_config:
        return None
    names = {f.name for f in dc_fields(TeacherConfig)}
    if not names <= set(model_config):
        return None
    try:
        return TeacherConfig.from_dict({k: model_config[k] for k in names})
    except (ValueError, TypeError):
        return None


def teacher_config_of_checkpoint(path: str) -> TeacherConfig:
    """The model config of a teacher checkpoint (weights-only load; CheckpointError naming the file)."""
    return TeacherConfig.from_dict(dict(load_checkpoint(path, kind="teacher")["config"]))


def store_open_kw(cfg: StoreAccess) -> dict[str, Any]:
    """`stores.open_memorybank`'s object-store arguments from a run config's ``--storage_options``,
    ``--store_cache_dir``, ``--store_cache_gb`` (ignored by a local store)."""
    return {"storage_options": parse_storage_options(cfg.storage_options), "cache_dir": cfg.store_cache_dir,
            "cache_bytes": int(cfg.store_cache_gb * 2**30)}


def read_store_schema(path: str, **open_kw: Any) -> tuple[StoreSchema, TeacherConfig | None]:
    """Open a memorybank read-only (``open_kw``: `store_open_kw`) -> ``(schema, the teacher config it records
    or None)``. ValueError naming the path when it cannot be opened."""
    try:
        bank = open_memorybank(path, mode="r", **open_kw)
    except (OSError, ValueError, KeyError, StoreError) as e:
        raise ValueError(f"--memorybank {path}: cannot open it read-only ({type(e).__name__}: {e})") from None
    schema, prov = bank.schema, bank.provenance
    bank.close()
    return schema, teacher_config_of_store(prov.model_config)


def check_store_fits(path: str, schema: StoreSchema, seq_len: int, action_dim: int, student_cfg: StudentConfig,
                     need_bev_feat: bool, teacher_cfg: TeacherConfig | None, need_depth: bool = False,
                     n_cam: int | None = None) -> None:
    """Raise ``stores.StoreMismatchError`` naming the store and every mismatch with the dataset/student.

    ``schema``: the store's ``StoreSchema``; ``teacher_cfg``: the teacher that made it (from its provenance or
    ``--teacher_ckpt``), needed to check the BEV grid when ``need_bev_feat`` (dense KD); ``need_depth``
    (``--kd_depth_w``): the store's depth targets must be for this student's input size, feature map and depth
    bins (``e2r.depth.grid_problems``) and the dataset's ``n_cam`` cameras, on a Lift-Splat student."""
    problems = []
    if need_depth:
        if not schema.store_depth:
            problems.append("LiDAR depth supervision (--kd_depth_w > 0) needs depth targets, which this store does "
                            "not hold: export it with `python -m pipelines.export ... --store_depth`")
        else:
            problems += grid_problems(schema.depth_grid, schema.depth_shape, student_cfg, n_cam)
        if student_cfg.view_transform != "lss":
            problems.append(f"--kd_depth_w needs a Lift-Splat student (--view_transform lss), not "
                            f"{student_cfg.view_transform!r}")
    if schema.action_semantics not in ("", ACTION_SEMANTICS):
        problems.append(f"actions mean {schema.action_semantics!r} in the store, {ACTION_SEMANTICS!r} in this "
                        f"version: re-export the store (python -m pipelines.export ... --overwrite)")
    if schema.seq_len != seq_len:
        problems.append(f"seq_len: store {schema.seq_len}, dataset --seq_len {seq_len}")
    if schema.action_dim != action_dim:
        problems.append(f"action size: store {schema.action_dim}, dataset {action_dim}")
    if schema.bev_dim != student_cfg.bev_dim:
        problems.append(f"bev_vec D: store {schema.bev_dim}, student {student_cfg.bev_dim}")
    if schema.gru_hidden != student_cfg.gru_hidden:
        problems.append(f"gru_out H: store {schema.gru_hidden}, student {student_cfg.gru_hidden}")
    if need_bev_feat:
        if not schema.store_bev_feat:
            problems.append("dense KD (--kd_bevfeat_w > 0) needs bev_feat, which this store does not hold")
        else:
            C, h, w = schema.bev_feat_shape
            k = student_cfg.bev_H // h if h else 0
            if C != student_cfg.teacher_bev_channels or k < 1 or (student_cfg.bev_H // k, student_cfg.bev_W // k) != (h, w):
                problems.append(f"bev_feat (C, H, W): store {tuple(schema.bev_feat_shape)} is not the student's "
                                f"teacher grid {student_cfg.bev_feat_shape} (or an integer pooling of it)")
        if teacher_cfg is None:
            problems.append("dense KD needs the teacher's BEV grid: the store records no full teacher config; "
                            "pass --teacher_ckpt")
        else:
            try:
                student_cfg.check_matches_teacher(teacher_cfg)
            except ValueError as e:
                problems.append(f"teacher BEV grid differs: {e}")
    if problems:
        raise StoreMismatchError(f"memorybank {path} does not fit this dataset/student: " + "; ".join(problems))


def camera_count(camera: CameraSequenceDataset) -> int | None:
    """The cameras of the dataset's segments (None when they differ or there is no segment)."""
    counts = {len(t.cameras) for t in camera.tables.values()}
    return counts.pop() if len(counts) == 1 else None


class TeacherTargets:
    """The teacher targets of one run, by window key: which store and fields, how an unpaired window gets
    targets (retrieval), how camera windows find their LiDAR rows (timestamp pairing), what a damaged row does.

    Built once per run by :meth:`for_run` (training and evaluation alike); ``attach(batch)`` adds a batch's
    targets in place. ``TeacherTargets()`` (no store) gives every batch ``has_kd`` all False and no targets.
    ``attach`` adds ``"has_kd"`` (B,) bool, ``"kd_weight"`` (B,) float32, ``"damaged"`` (B,) bool and
    ``"teacher": {field: float32 (B, T, ...)}``; rows of keys absent from the store are zeros (``has_kd``
    False). A damaged row (its bytes fail their checksum or its shard is missing: StoreCorruptError) stops
    the run unless ``skip_damaged``: then the batch is re-read key by key and the damaged rows get no KD,
    counted in ``"damaged"``: never zeros as targets. ``retriever``: windows without their own row get the
    targets of the most similar stored situations (``e2r.workflow.retrieval_kd``); ``unpaired``: ignore every
    window's own row (retrieval only). ``tables``: the windows' segment tables (the camera dataset's ``tables``), which pose retrieval reads.
    ``pairing``: camera and LiDAR recorded apart: each window reads the row
    of its paired LiDAR window (``"store_keys"``: list[B], None where unpaired -> ``has_kd`` False) and
    ``"kd_weight"`` is the pair's confidence (1 otherwise). ``open_kw``: how a store URL is reached
    (`store_open_kw`). The row reader is fork-safe (no threads, files mapped lazily per process)."""

    def __init__(self, memorybank: str | None = None, fields: Sequence[str] = LIGHT_KD_FIELDS,
                 skip_damaged: bool = False, retriever: Retriever | None = None, unpaired: bool = False,
                 pairing: TimestampPairing | None = None, tables: Mapping[str, SegmentTable] | None = None,
                 **open_kw: Any) -> None:
        self.memorybank = str(memorybank) if memorybank else None
        self.reader = TeacherRowReader(self.memorybank, tuple(fields), **open_kw) if memorybank else None
        self.open_kw = open_kw
        self.skip_damaged = bool(skip_damaged)
        self.retriever = retriever if memorybank else None
        self.unpaired = bool(unpaired)
        self.pairing = pairing if memorybank else None
        self.tables = tables          # the windows' segment tables {segment: table}, for pose retrieval

    @classmethod
    def for_run(cls, cfg: StudentTrainConfig | StudentEvalConfig, camera: CameraSequenceDataset,
                student_cfg: StudentConfig, *, kd_on: bool = True, need_bev_feat: bool = False,
                need_depth: bool = False,
                store: tuple[StoreSchema, TeacherConfig | None] | None = None, min_similarity: float = -1.0,
                unpaired: bool = False, log: Callable[[str], None] | None = None) -> "TeacherTargets":
        """The targets of a run on ``camera``'s windows: ``cfg.memorybank`` (none when unset or ``kd_on``
        False) checked against the dataset and ``student_cfg`` (`check_store_fits`), with ``bev_feat`` when
        ``need_bev_feat`` and the ``depth`` targets when ``need_depth``; ``store``: its ``(schema, teacher
        config)`` when the caller has read them (`read_store_schema`); ``--kd_retrieval`` (``min_similarity``, ``unpaired``: the training run's
        settings) and ``--pair_lidar_root`` from ``cfg``; ``log`` gets the pairing summary."""
        if not cfg.memorybank:
            return cls()
        schema, teacher_cfg = store if store is not None else read_store_schema(cfg.memorybank, **store_open_kw(cfg))
        check_store_fits(cfg.memorybank, schema, cfg.seq_len, camera.frame_actions().shape[1], student_cfg,
                         need_bev_feat, teacher_cfg, need_depth, camera_count(camera) if need_depth else None)
        if not kd_on:
            return cls()
        retriever = None
        if cfg.kd_retrieval:
            retriever = Retriever(cfg.memorybank, cfg.kd_retrieval, cfg.kd_retrieval_k, cfg.kd_retrieval_tau,
                                  min_similarity, whole_segment=unpaired)
            retriever.check(cfg.seq_len)
        pairing = (TimestampPairing.build(camera, cfg.pair_lidar_root, cfg.pair_tolerance_ms)
                   if cfg.pair_lidar_root else None)
        if pairing is not None and log is not None:
            log(pairing.describe(camera.keys, cfg.pair_lidar_root))
        fields = LIGHT_KD_FIELDS + (("bev_feat",) if need_bev_feat else ()) + (("depth",) if need_depth else ())
        return cls(cfg.memorybank, fields, cfg.skip_damaged, retriever, unpaired, pairing, camera.tables,
                   **store_open_kw(cfg))

    @property
    def fields(self) -> tuple[str, ...]:
        return self.reader.fields if self.reader is not None else ()

    def row_reader(self) -> TeacherRowReader:
        """A reader of its own over the same store and fields (for a second thread of the same process)."""
        return TeacherRowReader(str(self.memorybank), self.fields, **self.open_kw)

    def attach(self, batch: dict[str, Any]) -> None:
        """Add the teacher targets of ``batch``'s windows (by ``batch["keys"]``), in place (class docstring)."""
        B = len(batch["keys"])
        batch["damaged"] = torch.zeros(B, dtype=torch.bool)
        batch["kd_weight"] = torch.ones(B, dtype=torch.float32)
        if self.reader is None:
            batch["has_kd"], batch["teacher"] = torch.zeros(B, dtype=torch.bool), {}
            return
        if self.unpaired:            # the unpaired experiment: no window has its own row; retrieval only
            batch["has_kd"] = torch.zeros(B, dtype=torch.bool)
            batch["teacher"] = {f: self.reader.zeros(f, B) for f in self.reader.fields}
            self._retrieve(batch)
            return
        if self.pairing is None:
            rows, batch["damaged"] = self._read_rows(batch["keys"])
        else:
            rows, batch["damaged"] = self._read_paired(batch)
        rows.pop("keys")
        batch["has_kd"] = rows.pop("found").to(torch.bool)
        batch["teacher"] = rows
        if self.retriever is not None:
            self._retrieve(batch)

    def _retrieve(self, batch: dict[str, Any]) -> None:
        """Fill the unpaired (not damaged) windows' targets from the retrieved rows; sets ``"retrieved"`` (B,)
        bool and ``"retrieval_similarity"`` (B,) best similarity (NaN where no retrieval was tried), and what
        the query kind needs from the windows' data.csv (``pose``: "pose" (B, T, 3), "map" [B]). A retriever
        whose query needs the model (``at_load`` False: ``student``) is left to the training step."""
        B = len(batch["keys"])
        batch["retrieved"] = torch.zeros(B, dtype=torch.bool)
        batch["retrieval_similarity"] = torch.full((B,), float("nan"))
        if not self.retriever.at_load:
            return
        batch.update(self.retriever.window_inputs(self.tables, batch["keys"]))
        idx = torch.nonzero(~batch["has_kd"] & ~batch["damaged"]).flatten()
        if len(idx) == 0:
            return
        query = {n: (v[idx] if isinstance(v, Tensor) else [v[i] for i in idx.tolist()]) for n, v in batch.items()
                 if n in ("speed", "steering", "pose", "map")}
        rows, used, best = self.retriever.targets(self.reader, query, [batch["keys"][i] for i in idx.tolist()])
        apply_retrieved(batch, idx, rows, used, best)

    def _read_rows(self, keys: list[str]) -> tuple[dict[str, Any], Tensor]:
        """Rows of ``keys`` with one batched read (key by key after a StoreCorruptError with ``skip_damaged``)
        -> (rows as :meth:`TeacherRowReader.read` gives them, damaged (B,) bool)."""
        try:
            rows = dict(self.reader.read(keys))     # one get_batch_into for the whole batch, by key
        except StoreCorruptError as e:
            if not self.skip_damaged:
                raise StoreCorruptError(f"{e} -- to train or evaluate on the intact rows only (the damaged ones "
                                        f"without KD, counted), pass --skip_damaged; `python -m stores verify` "
                                        f"lists all the damage") from e
            return self._read_intact(keys)
        return rows, torch.zeros(len(keys), dtype=torch.bool)

    def _read_paired(self, batch: dict[str, Any]) -> tuple[dict[str, Any], Tensor]:
        """Rows of the windows' paired LiDAR keys (``self.pairing``); unpaired windows get zeros and ``found``
        False. Sets ``batch["store_keys"]`` and the paired windows' ``batch["kd_weight"]`` (confidence)."""
        store_keys, conf = self.pairing.pair(batch["keys"])
        batch["store_keys"] = store_keys
        B = len(store_keys)
        sel = [i for i, k in enumerate(store_keys) if k is not None]
        rows: dict[str, Any] = {f: self.reader.zeros(f, B) for f in self.reader.fields}
        rows["found"], rows["keys"] = torch.zeros(B, dtype=torch.bool), list(batch["keys"])
        damaged = torch.zeros(B, dtype=torch.bool)
        if sel:
            got, bad = self._read_rows([store_keys[i] for i in sel])
            idx = torch.tensor(sel, dtype=torch.long)
            for name in (*self.reader.fields, "found"):
                rows[name][idx] = got[name]
            damaged[idx] = bad
            batch["kd_weight"][idx] = torch.from_numpy(conf[sel])
        return rows, damaged

    def _read_intact(self, keys: list[str]) -> tuple[dict[str, Any], Tensor]:
        """Rows of ``keys`` read one by one: intact ones as stored, damaged ones zeros with ``found`` False;
        returns (rows as :meth:`TeacherRowReader.read` gives them, damaged (B,) bool)."""
        reader = self.reader
        B = len(keys)
        rows: dict[str, Any] = {f: reader.zeros(f, B) for f in reader.fields}
        rows["found"], rows["keys"] = torch.zeros(B, dtype=torch.bool), list(keys)
        damaged = torch.zeros(B, dtype=torch.bool)
        for i, key in enumerate(keys):
            try:
                one = reader.read([key])
            except StoreCorruptError:
                damaged[i] = True
                continue
            for name in (*reader.fields, "found"):
                rows[name][i] = one[name][0]
        return rows, damaged


class CameraBatches(Dataset):
    """Item = a batch: ``ds[indices]`` -> the camera windows of those indices (`collate_camera`: ``"keys"``
    list[B], "images" (B,T,Ncam,3,H,W), "intrinsics" (B,Ncam,3,3), "cam2ego" (B,Ncam,4,4), "speed" (B,T),
    "steering" (B,T), "actions" (B,T,A)), plus their teacher targets when ``targets`` is given
    (`TeacherTargets.attach`: read in the DataLoader worker); windows skipped as bad are dropped, a batch of
    only bad windows is ``None``."""

    def __init__(self, camera: CameraSequenceDataset, targets: TeacherTargets | None = None) -> None:
        self.camera, self.targets = camera, targets

    def __len__(self) -> int:
        return len(self.camera)

    def __getitem__(self, indices: int | Sequence[int]) -> dict[str, Any] | None:
        idx = [int(indices)] if isinstance(indices, Integral) else [int(i) for i in indices]
        batch = collate_camera([self.camera[i] for i in idx])
        if batch is not None and self.targets is not None:
            self.targets.attach(batch)
        return batch


def make_kd_loader(camera: CameraSequenceDataset, targets: TeacherTargets, batch_size: int, shuffle: bool,
                   seed: int, num_workers: int, ctx: DistContext, targets_in: str = "main"
                   ) -> tuple[Iterable, EpochBatchSampler]:
    """(loader over this rank's batches of ``camera`` windows with their ``targets``, its sampler): one whole
    batch per worker fetch; call ``sampler.set_epoch(e)`` before each epoch. ``targets_in``: where a store's
    teacher rows are read: ``"main"`` - this process, ahead of the step (`TargetsAhead`; the workers send
    camera windows only), ``"worker"`` - the DataLoader workers, with the windows. Both give the same batches
    in the same order."""
    if targets_in not in KD_TARGETS_IN:
        raise ValueError(f"targets_in must be one of {KD_TARGETS_IN}, got {targets_in!r}")
    sampler = training_sampler(len(camera), batch_size, shuffle, seed, ctx.rank, ctx.world_size)
    ahead = targets_in == "main" and targets.reader is not None
    pin = torch.cuda.is_available()
    loader = make_loader(CameraBatches(camera, None if ahead else targets), sampler, num_workers=num_workers,
                         pin_memory=pin, worker_init_fn=die_with_parent if num_workers else None)
    return (TargetsAhead(loader, targets.attach, pin=pin) if ahead else loader), sampler


def hflip_batch(batch: dict[str, Any], flip: Tensor, bev_grid: dict[str, Any]) -> dict[str, Any]:
    """Mirror the samples where ``flip`` (B,) is True, in place, keeping cached targets valid: images,
    intrinsics, cam2ego, steering input, ground-truth and teacher actions (steering negated), the
    teacher's ``bev_feat`` (flipped along y) and the depth targets ``depth`` (B, T, Ncam, h, w) (flipped along
    the feature map's width, as the image). The teacher's ``bev_vec``/``gru_out`` cannot be mirrored: the
    caller drops those KD terms for flipped samples. Returns ``batch``."""
    if not bool(flip.any()):
        return batch
    teacher = batch["teacher"]
    actions = batch["actions"][flip]
    if "actions" in teacher:
        actions = torch.stack([actions, teacher["actions"][flip]])       # both negate steering alike
    feat = teacher["bev_feat"][flip] if "bev_feat" in teacher else None
    images, K, c2e, steering, actions, feat = hflip_sample(batch["images"][flip], batch["intrinsics"][flip],
                                                           batch["cam2ego"][flip], batch["steering"][flip],
                                                           actions, bev_grid, feat)
    for name, value in (("images", images), ("intrinsics", K), ("cam2ego", c2e), ("steering", steering)):
        batch[name] = batch[name].clone()
        batch[name][flip] = value
    batch["actions"] = batch["actions"].clone()
    if "actions" in teacher:
        batch["actions"][flip] = actions[0]
        teacher["actions"] = teacher["actions"].clone()
        teacher["actions"][flip] = actions[1]
    else:
        batch["actions"][flip] = actions
    if feat is not None:
        teacher["bev_feat"] = teacher["bev_feat"].clone()
        teacher["bev_feat"][flip] = feat
    if "depth" in teacher:
        teacher["depth"] = teacher["depth"].clone()
        teacher["depth"][flip] = teacher["depth"][flip].flip(-1)
    return batch


def batch_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of a `CameraBatches` batch (teacher targets included) moved to ``device``."""
    out = {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}
    out["teacher"] = {k: v.to(device, non_blocking=True) for k, v in batch["teacher"].items()}
    return out
