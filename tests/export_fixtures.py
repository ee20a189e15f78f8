"""Helpers shared by the export tests: a tiny teacher checkpoint with non-trivial statistics, the export flags
for a test world, and a whole store read back."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from e2r.checkpoints import save_checkpoint
from e2r.models.config import TeacherConfig
from e2r.models.teacher import LiDARBEVTeacher
from stores import open_memorybank

FIELDS = ("actions", "bev_vec", "gru_out")


def make_teacher_ckpt(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = TeacherConfig.preset_named("tiny")
    model = LiDARBEVTeacher(cfg)
    model.set_action_stats(torch.tensor([1.0, 8.0]), torch.tensor([3.0, 1.5]))
    with torch.no_grad():  # non-trivial BatchNorm statistics so eval mode differs from identity
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict()}, kind="teacher")


def args_for(world, store, *extra, split=("train",)):
    a = ["--data_root", str(world["data"]), "--teacher_ckpt", str(world["ckpt"]), "--store", str(store),
         "--seq_len", "5", "--batch_size", "3", "--num_workers", "0", "--no_progress", "--device", "cpu"]
    for s in split:
        a += ["--split", s]
    return a + list(extra)


def read_all(store) -> dict[str, np.ndarray]:
    bank = open_memorybank(store)
    out = {"keys": np.array(bank.keys())}
    arrays, missing = bank.get_batch(bank.keys())
    assert not missing
    out.update(arrays)
    return out
