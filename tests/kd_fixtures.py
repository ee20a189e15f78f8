"""Helpers shared by the KD tests: a tiny teacher config, camera windows, memorybanks of teacher rows (real or
fake), and a tiny KD world (dataset + teacher checkpoint + its memorybank) with the train_student flags for it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from e2r.checkpoints import file_sha256, save_checkpoint
from e2r.data.datasets import CameraSequenceDataset, LidarSequenceDataset, collate_lidar
from e2r.models.config import TeacherConfig
from e2r.models.student_config import StudentConfig
from e2r.models.teacher import LiDARBEVTeacher
from e2r.workflow.trainer import ActionNormalizer
from stores import Provenance, StoreSchema, create_memorybank
from tests.fixtures import write_tiny_dataset

SEQ, STRIDE = 3, 2
TEACHER = TeacherConfig.preset_named("tiny")


def student_cfg() -> StudentConfig:
    return StudentConfig.preset_named("tiny", TEACHER)


def camera_ds(root: Path, split: str = "train") -> CameraSequenceDataset:
    return CameraSequenceDataset(root, split, SEQ, STRIDE, tuple(student_cfg().image_size))


def write_bank(path: Path, rows: dict[str, dict[str, np.ndarray]], seq_len: int = SEQ, action_dim: int = 2,
               bev_feat: bool = True, model_config: dict | None = None, teacher_sha: str = "cd" * 32) -> str:
    """A memorybank holding ``rows = {key: {field: (T, ...)}}`` (keys may span splits)."""
    any_row = next(iter(rows.values()))
    schema = StoreSchema(seq_len=seq_len, action_dim=action_dim, bev_dim=any_row["bev_vec"].shape[-1],
                         gru_hidden=any_row["gru_out"].shape[-1],
                         bev_feat_shape=tuple(any_row["bev_feat"].shape[1:]) if bev_feat else None,
                         store_bev_feat=bev_feat)
    prov = Provenance(teacher_sha256=teacher_sha, model_config=model_config if model_config is not None
                      else TEACHER.to_dict(), dataset_root="test")
    bank = create_memorybank(str(path), schema, prov, shard_rows=16)
    by_split: dict[str, list[str]] = {}
    for k in rows:
        by_split.setdefault(k.split("/")[0], []).append(k)
    for split, keys in by_split.items():
        bank.reserve_split(split, keys)
        bank.write_rows(split, 0, {f: np.stack([rows[k][f] for k in keys]) for f in schema.fields}, keys=keys)
    return str(path)


def teacher_rows(root: Path, model: LiDARBEVTeacher, splits=("train", "valid")) -> dict[str, dict[str, np.ndarray]]:
    """Run the teacher over every window of ``splits`` -> memorybank rows by key."""
    out = {}
    with torch.no_grad():
        for split in splits:
            ds = LidarSequenceDataset(root, split, SEQ, STRIDE)
            batch = collate_lidar([ds[i] for i in range(len(ds))])
            actions, aux = model(batch["points"], batch["speed"], batch["steering"], return_aux=True)
            for i, k in enumerate(batch["keys"]):
                out[k] = {"actions": actions[i].numpy(), "bev_vec": aux["bev_vec_seq"][i].numpy(),
                          "gru_out": aux["gru_out"][i].numpy(), "bev_feat": aux["bev_feat_seq"][i].numpy()}
    return out


def fake_rows(keys, seed=0, T=SEQ, A=2, D=64, H=128, bev=(48, 32, 32)) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {k: {"actions": rng.standard_normal((T, A)).astype(np.float32),
                "bev_vec": rng.standard_normal((T, D)).astype(np.float32),
                "gru_out": rng.standard_normal((T, H)).astype(np.float32),
                "bev_feat": rng.standard_normal((T, *bev)).astype(np.float32)} for k in keys}


def make_kd_world(tmp: Path) -> dict:
    """Dataset, a tiny (untrained, normalised) teacher checkpoint and a memorybank of its outputs for every
    valid window and all train windows but one segment's last window (so some samples are BC-only)."""
    root = write_tiny_dataset(tmp / "data", splits={"train": 2, "valid": 1, "test": 1}, frames=8,
                              points_per_frame=(100, 200))
    torch.manual_seed(0)
    teacher = LiDARBEVTeacher(TEACHER)
    norm = ActionNormalizer.from_dataset(camera_ds(root))
    teacher.set_action_stats(norm.mean, norm.std)
    ckpt = save_checkpoint(tmp / "teacher.pt", {"model": teacher.state_dict(), "config": TEACHER.to_dict()},
                           kind="teacher")
    rows = teacher_rows(root, teacher.eval())
    dropped = camera_ds(root).keys[-1]
    del rows[dropped]
    bank = write_bank(tmp / "mb.zarr", rows, teacher_sha=file_sha256(ckpt))
    return {"root": root, "ckpt": ckpt, "bank": bank, "dropped": dropped, "rows": rows}


def student_args(setup: dict, tmp: Path, *extra: str) -> list[str]:
    """train_student flags for the KD world ``setup`` (``make_kd_world``) plus ``extra``."""
    return ["--data_root", str(setup["root"]), "--preset", "tiny", "--batch_size", "4", "--seq_len", str(SEQ),
            "--stride", str(STRIDE), "--device", "cpu", "--no_progress", "--lr", "3e-3", *extra]
