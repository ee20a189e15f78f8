"""Export pipeline: frame-once equality with the naive per-window forward, bev_feat pooling/dtype, resume
after SIGKILL, append + mismatch refusal + --overwrite, 2-worker dask run equal to the single-process one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zarr
import pytest
import torch

from e2r.data.datasets import LidarSequenceDataset, collate_lidar
from e2r.workflow.export import ExportOptions, export_rows, load_context
from e2r.kd import pool_bev_feat
from e2r.models.teacher import load_teacher
from pipelines.export import main
from stores import Provenance, StoreSchema, create_memorybank, open_memorybank
from tests.export_fixtures import FIELDS, args_for, make_teacher_ckpt, read_all
from tests.fixtures import write_tiny_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = write_tiny_dataset(root / "data", {"train": 2, "valid": 1}, frames=9, camera=False)
    return {"root": root, "data": data, "ckpt": make_teacher_ckpt(root / "teacher.pt"),
            "ckpt2": make_teacher_ckpt(root / "teacher2.pt", seed=1)}


def naive(world, split="train"):
    """The original's computation: one forward(return_aux=True) per window."""
    model, _ = load_teacher(world["ckpt"])
    ds = LidarSequenceDataset(world["data"], split, seq_len=5)
    outs = {k: [] for k in ("actions", "bev_vec", "gru_out", "bev_feat")}
    with torch.inference_mode():
        for i in range(len(ds)):
            b = collate_lidar([ds[i]])
            actions, aux = model(b["points"], b["speed"], b["steering"], return_aux=True)
            for k, v in (("actions", actions), ("bev_vec", aux["bev_vec_seq"]), ("gru_out", aux["gru_out"]),
                         ("bev_feat", aux["bev_feat_seq"])):
                outs[k].append(v[0].numpy())
    return ds.keys, {k: np.stack(v) for k, v in outs.items()}


def test_each_frame_encoded_once_and_equal_to_naive_forward(world, tmp_path):
    store = tmp_path / "mb.zarr"
    schema = StoreSchema(seq_len=5, action_dim=2, bev_dim=64, gru_hidden=128, bev_feat_shape=(48, 32, 32),
                         store_bev_feat=True)
    bank = create_memorybank(store, schema, Provenance(teacher_sha256="x"))
    opts = ExportOptions(str(world["data"]), "train", str(world["ckpt"]), str(store), batch_size=4,
                         window_batch=8, write_rows=3, num_workers=2)
    ctx = load_context(opts, bank.schema.seq_len)
    bank.reserve_split("train", ctx.plan.keys)
    stats = export_rows(ctx, bank, 0, len(ctx.plan.keys), opts)
    # 2 segments x 9 frames: 18 frames, 2 x 5 windows of 5 frames; the naive way encodes 50 frames
    assert (stats.frames_encoded, stats.windows_computed, stats.rows_written) == (18, 10, 10)
    keys, ref = naive(world)
    bank.refresh()
    got, missing = bank.get_batch(keys)
    assert not missing and bank.keys("train") == keys
    for f in ("actions", "bev_vec", "gru_out", "bev_feat"):
        assert got[f].shape == ref[f].shape, f
        np.testing.assert_allclose(got[f], ref[f], rtol=1e-4, atol=1e-5, err_msg=f)
    assert np.abs(ref["gru_out"]).max() > 1e-3 and np.abs(ref["bev_feat"]).max() > 1e-3
    # a second pass over complete rows does nothing
    again = export_rows(ctx, bank, 0, len(keys), opts)
    assert (again.rows_written, again.rows_skipped, again.frames_encoded) == (0, 10, 0)


def test_bev_feat_pool_and_float16_and_summary(world, tmp_path, capsys):
    store = tmp_path / "mb.zarr"
    assert main(args_for(world, store, "--save_bev_feat", "--bev_feat_pool", "4", "--dtype", "float16")) == 0
    out = capsys.readouterr().out
    assert "bev_feat per sample: shape (5, 48, 8, 8) float16 = 30,720 bytes" in out
    bank = open_memorybank(store)
    assert bank.schema.bev_feat_pool["kind"] == "avg" and bank.schema.bev_feat_pool["factor"] == 4
    keys, ref = naive(world)
    got, _ = bank.get_batch(keys)
    assert got["bev_feat"].dtype == np.float16 and got["bev_feat"].shape == (10, 5, 48, 8, 8)
    want = pool_bev_feat(torch.from_numpy(ref["bev_feat"]), 4).numpy()
    np.testing.assert_allclose(got["bev_feat"].astype(np.float32), want, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(got["gru_out"].astype(np.float32), ref["gru_out"], rtol=2e-3, atol=2e-3)


def test_sigkill_then_resume_equals_uninterrupted(world, tmp_path):
    ref_store, store = tmp_path / "ref.zarr", tmp_path / "killed.zarr"
    common = ["--shard_rows", "2", "--write_rows", "1", "--batch_size", "1", "--num_workers", "2"]
    assert main(args_for(world, ref_store, *common) + ["--num_workers", "0"]) == 0
    cmd = [sys.executable, "-m", "pipelines.export", *args_for(world, store, *common)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done_at_kill = None
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            done = int((np.asarray(zarr.open_array(store / "complete", mode="r")[:]) == 1).sum())   # 255: no chunk
        except Exception:  # noqa: BLE001 - not created yet / being written
            done = 0
        if done >= 2:
            proc.send_signal(signal.SIGKILL)
            done_at_kill = done
            break
        time.sleep(0.02)
    proc.wait()
    assert done_at_kill is not None, f"export finished or failed before it could be killed: {proc.stderr.read()}"
    assert proc.returncode == -signal.SIGKILL
    partial = open_memorybank(store)
    assert 0 < len(partial) < 10, "the kill should leave the store incomplete"
    assert main(args_for(world, store, *common)) == 0
    a, b = read_all(ref_store), read_all(store)
    assert list(a["keys"]) == list(b["keys"]) and len(a["keys"]) == 10
    for f in FIELDS:
        assert np.array_equal(a[f], b[f]), f


def test_append_split_mismatch_refused_and_overwrite(world, tmp_path, capsys):
    store = tmp_path / "mb.zarr"
    assert main(args_for(world, store)) == 0
    train_before = read_all(store)
    assert main(args_for(world, store, split=("valid",))) == 0          # append
    bank = open_memorybank(store)
    assert set(bank.splits) == {"train", "valid"} and len(bank.keys("valid")) == 5
    after = read_all(store)
    for f in FIELDS:
        assert np.array_equal(after[f][:10], train_before[f]), f
    capsys.readouterr()
    other = args_for(world, store, split=("valid",))
    other[other.index("--teacher_ckpt") + 1] = str(world["ckpt2"])
    assert main(other) == 1
    err = capsys.readouterr().err
    assert "teacher_sha256" in err and "--overwrite" in err
    assert main(args_for(world, store, "--dtype", "float16")) == 1
    assert "dtype: store='float32', given='float16'" in capsys.readouterr().err
    assert main(other + ["--overwrite"]) == 0
    bank = open_memorybank(store)
    assert set(bank.splits) == {"valid"}
    from e2r.checkpoints import file_sha256
    assert bank.provenance.teacher_sha256 == file_sha256(world["ckpt2"])


def test_two_dask_workers_equal_single_process(world, tmp_path):
    single, dist = tmp_path / "single.zarr", tmp_path / "dask.zarr"
    common = ["--shard_rows", "4", "--window_batch", "4", "--threads", "1"]  # bit-identity needs equal threads
    assert main(args_for(world, single, *common, split=("train", "valid"))) == 0
    assert main(args_for(world, dist, *common, "--workers", "2", split=("train", "valid"))) == 0
    a, b = read_all(single), read_all(dist)
    assert list(a["keys"]) == list(b["keys"]) and len(a["keys"]) == 15
    for f in FIELDS:
        assert np.array_equal(a[f], b[f]), f


def test_no_teacher_and_bad_file_exit_nonzero(world, tmp_path, capsys):
    argv = args_for(world, tmp_path / "mb.zarr")
    i = argv.index("--teacher_ckpt")
    assert main(argv[:i] + argv[i + 2:]) == 2
    assert "python -m pipelines.train_teacher" in capsys.readouterr().err
    data = write_tiny_dataset(tmp_path / "bad", {"train": 1}, frames=6, camera=False)
    victim = sorted((data / "train" / "segment_0000" / "lidar").glob("*.bin"))[3]
    victim.write_bytes(b"\x00" * 10)   # not a whole number of float32 values
    argv[argv.index("--data_root") + 1] = str(data)
    assert main(argv) == 1
    assert victim.name in capsys.readouterr().err


def test_an_export_task_in_the_callers_process_restores_its_thread_count(tmp_path):
    """run_export_task sets torch's thread count for its work (dask workers); run in the caller's process, it
    puts the caller's count back, also when it fails."""
    from e2r.workflow.export import run_export_task

    before = torch.get_num_threads()
    opts = ExportOptions(str(tmp_path), "train", str(tmp_path / "t.pt"), str(tmp_path / "missing.zarr"),
                         torch_threads=before + 1)
    with pytest.raises(RuntimeError, match="export task train"):
        run_export_task(opts, 0, 1)
    assert torch.get_num_threads() == before


def test_retrieval_indexes_built_after_the_export(world, tmp_path, capsys):
    """--retrieval_index builds the named query kinds' indexes over every exported row (state from data.csv,
    student from the store); a remote store is refused before anything is exported."""
    from stores.retrieval import RetrievalIndex

    store = tmp_path / "mb.zarr"
    assert main(args_for(world, store, "--retrieval_index", "state", "student", split=("train", "valid"))) == 0
    out = capsys.readouterr().out
    rows = len(open_memorybank(str(store)))
    for query in ("state", "student"):
        index = RetrievalIndex.open(str(store), query)
        assert len(index) == rows and f"retrieval index {query!r}" in out
        assert index.attrs["meta"]["query"] == query
    assert main(args_for(world, "s3://bucket/mb.zarr", "--retrieval_index", "state")) == 2
    assert "local stores only" in capsys.readouterr().err
    assert main(args_for(world, store, "--retrieval_index", "pose")) == 1       # the tiny data has no pose columns
    assert "pose" in capsys.readouterr().err and len(RetrievalIndex.open(str(store), "state")) == rows
