"""Export on a real dask cluster: a ``dask scheduler`` process and two ``dask worker`` processes (1 thread each,
no nanny) started here, on 127.0.0.1, each worker in its own working directory and without the AWS_*
variables. ``pipelines.export --scheduler ADDRESS`` writes the same bytes as a single-process export, into a
local store (given by relative paths) and into an object store on a local S3 server (moto; endpoint and
credentials travel in ``--storage_options``), with tasks run by both workers. Workers kept between exports
reload a teacher checkpoint or dataset rewritten at the same path, and refuse files other than the export's.
Everything started is stopped and checked gone."""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
from distributed import Client

from e2r.workflow.export import ExportOptions, run_export_task, worker_threads
from pipelines.export import main
from stores.remote.local_s3 import moto_s3
from tests.fixtures import read_csv_rows, write_tiny_dataset
from tests.export_fixtures import FIELDS, args_for, make_teacher_ckpt, read_all

REPO = Path(__file__).resolve().parents[1]
# 15 rows (train 10, valid 5) in shards of 4 rows, one shard per task: 3 + 2 = 5 tasks
COMMON = ["--shard_rows", "4", "--rows_per_task", "4", "--window_batch", "4", "--threads", "1", "--write_rows", "2"]
SPLITS = ("train", "valid")
TASKS = 5


def _start(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:       # the child keeps its own descriptor
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)   # its own process group: stopped as a whole


def _alive(pgids: set[int]) -> list[psutil.Process]:
    """The live (not zombie) processes of the process groups ``pgids``."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) in pgids and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, ProcessLookupError):
            pass
    return out


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group, SIGKILL what is left after 10 s; reap; fail if any member lives on."""
    pgids = {p.pid for p in procs}
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        for g in pgids:
            try:
                os.killpg(g, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for p in procs:
                p.poll()
            if not _alive(pgids):
                break
            time.sleep(0.05)
        else:
            continue
        break
    for p in procs:
        p.wait(5)
    left = _alive(pgids)
    assert not left, f"processes left over after stopping the cluster: {[(p.pid, p.cmdline()) for p in left]}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``{"address", "client"}`` of a scheduler process + 2 worker processes (1 thread each; one without a
    nanny, one under the default nanny)."""
    root = tmp_path_factory.mktemp("cluster")
    sched_file = root / "scheduler.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    dask_cli = [sys.executable, "-m", "dask"]
    procs = [_start([*dask_cli, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                     "--scheduler-file", str(sched_file)], root, env, root / "scheduler.log")]
    client = None
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists() or not sched_file.read_text().strip():
            if procs[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler did not start:\n{(root / 'scheduler.log').read_text()}")
            time.sleep(0.05)
        time.sleep(0.1)                                   # the file is written whole, but be safe
        address = json.loads(sched_file.read_text())["address"]
        for i in range(2):
            wdir = root / f"worker{i}"                    # not the tests' working directory
            wdir.mkdir()
            # w0 without a nanny; w1 under the default nanny, told (docs/SCALE.md) that its worker process may
            # start child processes (the export's DataLoader readers)
            nanny = ["--no-nanny"] if i == 0 else []
            wenv = env if i == 0 else {**env, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
            procs.append(_start([*dask_cli, "worker", address, "--name", f"w{i}", "--nworkers", "1",
                                 "--nthreads", "1", *nanny, "--no-dashboard", "--memory-limit", "0",
                                 "--host", "127.0.0.1", "--local-directory", str(wdir), "--death-timeout", "60"],
                                wdir, wenv, root / f"worker{i}.log"))
        client = Client(address, timeout=30)
        try:
            client.wait_for_workers(2, timeout=90)
        except Exception:
            logs = "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(root.glob("*.log")))
            raise RuntimeError(f"2 dask workers did not connect:\n{logs}") from None
        client.get_task_stream()                          # start recording which worker runs which task
        yield {"address": address, "client": client}
    finally:
        if client is not None:
            client.close()
        _stop(procs)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny dataset and teacher, and the single-process export of train + valid (the reference)."""
    root = tmp_path_factory.mktemp("export_cluster")
    w = {"root": root, "data": write_tiny_dataset(root / "data", {"train": 2, "valid": 1}, frames=9, camera=False),
         "ckpt": make_teacher_ckpt(root / "teacher.pt")}
    assert main(args_for(w, root / "single.zarr", *COMMON, split=SPLITS)) == 0
    w["single"] = read_all(root / "single.zarr")
    assert len(w["single"]["keys"]) == 15
    return w


@pytest.fixture(scope="module")
def s3() -> str:
    with moto_s3("bkt") as endpoint:
        yield endpoint


def _export_on(cluster, argv: list[str]) -> Counter:
    """Run the export with ``argv``; the number of its tasks each worker ran (from the scheduler's task stream)."""
    client = cluster["client"]
    seen = len(client.get_task_stream())
    assert main(argv + ["--scheduler", cluster["address"]]) == 0
    runs = [r for r in client.get_task_stream()[seen:] if str(r["key"]).startswith("run_export_task")]
    assert all(r["status"] == "OK" for r in runs)
    return Counter(r["worker"] for r in runs)


def _same_rows(want: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
    assert list(got["keys"]) == list(want["keys"])
    for f in FIELDS:
        assert got[f].dtype == want[f].dtype and got[f].shape == want[f].shape, f
        assert got[f].tobytes() == want[f].tobytes(), f


def test_export_on_a_scheduler_and_two_worker_processes_equals_the_single_process_store(
        cluster, world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)             # relative --data_root / --teacher_ckpt / --store: workers run elsewhere
    rel = {"data": os.path.relpath(world["data"]), "ckpt": os.path.relpath(world["ckpt"])}
    # --num_workers 2: each task's frames are read by DataLoader processes forked from the (non-daemon) worker
    assert not any(cluster["client"].run(lambda: multiprocessing.current_process().daemon).values())
    # without --threads a task takes its worker machine's cores / the worker's task threads (1 here)
    cores = cluster["client"].run(lambda: len(os.sched_getaffinity(0)))
    assert cluster["client"].submit(worker_threads, pure=False).result() in set(cores.values())
    per_worker = _export_on(cluster, args_for(rel, "cluster.zarr", *COMMON, "--num_workers", "2", split=SPLITS))
    assert sum(per_worker.values()) == TASKS and len(per_worker) == 2, per_worker
    _same_rows(world["single"], read_all(tmp_path / "cluster.zarr"))


def test_export_to_object_storage_through_the_cluster_equals_the_local_single_process_store(cluster, world, s3):
    url = "s3://bkt/cluster.zarr"
    opts = {"endpoint_url": s3, "key": "testing", "secret": "testing"}   # the workers have no AWS_* variables
    per_worker = _export_on(cluster, args_for(world, url, *COMMON, "--storage_options", json.dumps(opts),
                                              split=SPLITS))
    assert sum(per_worker.values()) == TASKS and len(per_worker) == 2, per_worker
    _same_rows(world["single"], read_all(url))


def _scale_velocity(csv_path: Path, factor: float) -> None:
    rows = read_csv_rows(csv_path)
    for r in rows:
        r["velocity"] = f"{float(r['velocity']) * factor:.4f}"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_long_lived_workers_use_the_teacher_and_dataset_of_each_export(cluster, world, tmp_path):
    """The workers keep a loaded teacher and split plan between tasks; a teacher checkpoint or a data.csv
    rewritten at the same path is the next export's, not the one the workers saw first."""
    run = {"data": tmp_path / "data", "ckpt": make_teacher_ckpt(tmp_path / "teacher.pt")}
    shutil.copytree(world["data"] / "valid", run["data"] / "valid")
    first = _export_on(cluster, args_for(run, tmp_path / "first.zarr", *COMMON, split=("valid",)))
    assert len(first) == 2, first                       # both workers now hold this teacher and plan
    make_teacher_ckpt(run["ckpt"], seed=1)
    _scale_velocity(run["data"] / "valid" / "segment_0000" / "meta" / "data.csv", 1.5)
    _export_on(cluster, args_for(run, tmp_path / "second.zarr", *COMMON, split=("valid",)))
    assert main(args_for(run, tmp_path / "single.zarr", *COMMON, split=("valid",))) == 0
    want = read_all(tmp_path / "single.zarr")
    _same_rows(want, read_all(tmp_path / "second.zarr"))
    assert read_all(tmp_path / "first.zarr")["actions"].tobytes() != want["actions"].tobytes()


def test_a_worker_refuses_a_teacher_or_dataset_other_than_the_exports(world, tmp_path):
    """What a worker on a machine with other files does: names the checkpoint or split that differs."""
    store = str(world["root"] / "single.zarr")
    opts = ExportOptions(str(world["data"]), "valid", str(make_teacher_ckpt(tmp_path / "other.pt", seed=1)), store)
    with pytest.raises(RuntimeError, match="teacher checkpoint .*other.pt has sha256 .* the store's teacher"):
        run_export_task(opts, 0, 4)
    opts = replace(opts, teacher_ckpt=str(world["ckpt"]), plan_digest="0" * 64)
    with pytest.raises(RuntimeError, match="split 'valid' under .* differs from the one the export started with"):
        run_export_task(opts, 0, 4)
    stats = run_export_task(replace(opts, plan_digest=""), 0, 4)       # the export's own files: nothing to redo
    assert (stats.rows_skipped, stats.rows_written) == (4, 0)
