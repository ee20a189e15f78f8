"""The pipelines with a memorybank on object storage (moto's S3 server on 127.0.0.1): export writes the same
rows as to a local store (resume skips them, --overwrite replaces the store), and student training / evaluation
read it through forked DataLoader workers and the local cache exactly as they read the local store."""
from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest
import torch

from e2r.checkpoints import load_checkpoint
from pipelines import eval_student, export, train_student
from stores import open_memorybank
from stores.remote.local_s3 import moto_s3
from tests.export_fixtures import FIELDS, args_for, make_teacher_ckpt, read_all
from tests.kd_fixtures import make_kd_world, student_args as _args
from tests.fixtures import write_tiny_dataset


@pytest.fixture(scope="module")
def s3() -> str:
    with moto_s3("bkt") as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return make_kd_world(tmp_path_factory.mktemp("student"))


def test_export_to_object_storage_equals_the_local_export_and_resumes(s3, tmp_path, capsys):
    world = {"data": write_tiny_dataset(tmp_path / "data", {"train": 2, "valid": 1}, frames=9, camera=False),
             "ckpt": make_teacher_ckpt(tmp_path / "teacher.pt")}
    common = ["--shard_rows", "4", "--window_batch", "4", "--threads", "1", "--write_rows", "2"]
    url, opts = "s3://bkt/export.zarr", ["--storage_options", json.dumps({"endpoint_url": s3})]
    assert export.main(args_for(world, tmp_path / "l.zarr", *common, split=("train", "valid"))) == 0
    assert export.main(args_for(world, url, *common, *opts, split=("train", "valid"))) == 0
    a, b = read_all(tmp_path / "l.zarr"), read_all(url)
    assert list(a["keys"]) == list(b["keys"]) and len(a["keys"]) == 15
    for f in FIELDS:
        assert a[f].tobytes() == b[f].tobytes(), f
    assert f"memorybank {url}" in capsys.readouterr().out
    assert export.main(args_for(world, url, *common, *opts, split=("train",))) == 0
    assert "resume" in capsys.readouterr().out
    assert export.main(args_for(world, url, *common, *opts, "--dtype", "float16", "--overwrite", split=("train",))) == 0
    bank = open_memorybank(url)
    assert bank.schema.dtype == "float16" and sorted(bank.splits) == ["train"] and len(bank) == 10


def test_student_training_and_eval_read_the_store_from_object_storage(s3, setup, tmp_path, capsys):
    fsspec.filesystem("s3", skip_instance_cache=True).put(str(setup["bank"]), "bkt/kd.zarr", recursive=True)
    remote = ["--memorybank", "s3://bkt/kd.zarr", "--store_cache_dir", str(tmp_path / "cache"),
              "--storage_options", json.dumps({"endpoint_url": s3})]
    runs = {}
    for name, store in (("local", ["--memorybank", str(setup["bank"])]), ("remote", remote)):
        last = tmp_path / f"{name}.pt"
        assert train_student.main(_args(setup, tmp_path, "--epochs", "1", "--num_workers", "2", "--save_path", "",
                                        "--checkpoint_path", str(last), *store)) == 0
        runs[name] = load_checkpoint(last, kind="student")
    assert runs["remote"]["history"][0]["kd_samples"] == runs["local"]["history"][0]["kd_samples"] > 0
    for k, v in runs["local"]["model"].items():          # same KD targets, same trajectory
        torch.testing.assert_close(runs["remote"]["model"][k], v, rtol=0, atol=0)
    capsys.readouterr()
    argv = ["--data_root", str(setup["root"]), "--split", "valid", "--student_ckpt", str(tmp_path / "local.pt"),
            "--seq_len", "3", "--stride", "2", "--device", "cpu", "--no_progress"]
    gaps = []
    for store in (["--memorybank", str(setup["bank"])], remote):
        assert eval_student.main(argv + store) == 0
        gaps.append([line for line in capsys.readouterr().out.splitlines() if "KD gap" in line or "kd_" in line])
    assert gaps[0] == gaps[1] and gaps[0]
    assert np.isfinite(runs["remote"]["history"][0]["train_bc"])
