"""The released models (e2r/released, e2r.workflow.release, pipelines.release, drive --list_released): the
manifest's schema and what it records, sha256 and regular-file checks, names refused, float16 storage loaded
back as float32, released:NAME wherever a checkpoint path goes (drive, eval, export, dagger, init), and the
release command's add and measure."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from e2r.checkpoints import (COMPACT_MIN_NUMEL, CheckpointError, checkpoint_path, compact_checkpoint,
                             load_checkpoint, load_init_weights, save_checkpoint)
from e2r.models.config import TeacherConfig
from e2r.models.student import CameraBEVStudent
from e2r.models.student_config import StudentConfig
from e2r.models.teacher import LiDARBEVTeacher
from e2r.released import (ENTRY_KEYS, MANIFEST_NAME, RELEASED_DIR, TRACK_STATUS, check_manifest, listing,
                          load_manifest, resolve)
from e2r.sim.drive import DriveConfig, drive
from e2r.sim.world import generate_dataset
from e2r.workflow.dagger import DaggerConfig
from e2r.workflow.evaluate import evaluate_teacher
from e2r.workflow.configs import TeacherEvalConfig
from e2r.workflow.export_config import ExportConfig
from e2r.workflow.export_run import export_memorybank
from pipelines.drive import main as drive_main
from pipelines.release import main as release_main
from stores import open_memorybank
from tests.fixtures import one_thread  # noqa: F401 (module-scoped autouse fixture)

RELEASED = ("teacher", "teacher_rounds", "student_dagger", "student_bc", "student_kd")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A synthetic world of 3 tracks (train, valid, test), 8 frames each, the released models' sensors."""
    root = tmp_path_factory.mktemp("released") / "world"
    generate_dataset(root, tracks=3, frames=8, seed=5, workers=1, progress=False)
    return root


@pytest.fixture()
def copy(tmp_path) -> Path:
    """A copy of the released folder, to damage."""
    return Path(shutil.copytree(RELEASED_DIR, tmp_path / "released", ignore=shutil.ignore_patterns("*.py", "__pycache__")))


# ------------------------------------------------------------------------------------------------ manifest
def test_manifest_names_small_verified_models_and_how_they_were_made():
    models = load_manifest()["models"]
    assert set(RELEASED) <= set(models)
    assert sum(e["bytes"] for e in models.values()) < 5_000_000, "the released folder stays a few MB"
    for name, e in models.items():
        assert resolve(f"released:{name}") == RELEASED_DIR / e["file"]
        assert set(ENTRY_KEYS) <= set(e)
        made = e["made_by"]
        for key in ("command", "train_command", "commit", "world_seed", "budget", "seed", "source_sha256",
                    "source_result", "release_command"):
            assert made[key] not in ("", None), f"{name}: made_by.{key} is empty"
        assert e["trained_tracks"] and not set(e["trained_tracks"]) & set(e["valid_tracks"])
        assert (e["kind"], e["sensor"]) in (("teacher", "lidar"), ("student", "camera"))


def test_manifest_records_drives_on_fresh_worlds_held_out_for_every_model():
    """The goal's measurement is in the manifest: every released model driven on the study's test tracks and on
    freshly generated worlds of other seeds, whose tracks none of them trained on."""
    for name, e in load_manifest()["models"].items():
        fresh = [r for r in e["results"] if r["world_seed"] != e["made_by"]["world_seed"]]
        assert len({r["world_seed"] for r in fresh}) >= 2, name
        assert all(r["track_status"] == "held out" and r["runs"] == r["tracks"] * r["starts"] for r in fresh), name
        assert any(r["world_seed"] == e["made_by"]["world_seed"] and r["split"] == "test" for r in e["results"]), name


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.update(format="other"), "format"),
    (lambda m: m.update(format_version=99), "format_version"),
    (lambda m: m["models"].update({"Bad-Name": m["models"]["teacher"]}), "name grammar"),
    (lambda m: m["models"]["teacher"].pop("sha256"), "lacks"),
    (lambda m: m["models"]["teacher"].update(file="../teacher.pt"), "plain .pt file name"),
    (lambda m: m["models"]["teacher"].update(file="student_bc.pt"), "another entry"),
    (lambda m: m["models"]["teacher"].update(sha256="abc"), "64 lower-case hex"),
    (lambda m: m["models"]["teacher"].update(kind="critic"), "kind"),
    (lambda m: m["models"]["teacher"]["results"][0].update(successes=99), "is not a count"),
    (lambda m: m["models"]["teacher"]["results"][0].update(success=0.123), "success"),
    (lambda m: m["models"]["teacher"]["results"][0].update(track_status="maybe"), "track_status"),
    (lambda m: m["models"]["teacher"]["results"][0].update(progress=float("nan")), "progress"),
])
def test_a_damaged_manifest_is_refused_naming_the_field(damage, message):
    manifest = json.loads((RELEASED_DIR / MANIFEST_NAME).read_text())
    damage(manifest)
    with pytest.raises(CheckpointError, match=message):
        check_manifest(manifest)


# ------------------------------------------------------------------------------------------------ resolving
@pytest.mark.parametrize("spec", ["released:", "released:../teacher", "released:Teacher", "released:teacher.pt",
                                  "released:a/b", "released:/etc/passwd", "released:teacher ", "released:nope"])
def test_bad_names_are_refused(spec):
    with pytest.raises(CheckpointError, match="released"):
        checkpoint_path(spec)
    with pytest.raises(CheckpointError):
        load_checkpoint(spec)


def test_a_changed_file_is_refused_before_it_is_read(copy):
    path = copy / "student_bc.pt"
    assert resolve("released:student_bc", copy) == path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF                                   # same size, other bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        resolve("released:student_bc", copy)
    path.write_bytes(bytes(data) + b"\0")                          # other size
    with pytest.raises(CheckpointError, match="bytes"):
        resolve("released:student_bc", copy)
    path.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        resolve("released:student_bc", copy)


@pytest.mark.parametrize("kind", ["symlink", "folder", "fifo"])
def test_anything_but_a_regular_file_is_refused(copy, tmp_path, kind):
    path = copy / "teacher.pt"
    target = tmp_path / "elsewhere.pt"
    shutil.move(path, target)
    if kind == "symlink":
        path.symlink_to(target)                                    # same bytes, but not the file in the folder
    elif kind == "folder":
        path.mkdir()
    else:
        os.mkfifo(path)
    with pytest.raises(CheckpointError, match="not a regular file"):
        resolve("released:teacher", copy)


# ------------------------------------------------------------------------------------------------ float16
def test_released_weights_load_as_float32_without_training_state():
    ckpt = load_checkpoint("released:student_dagger")
    assert ckpt["kind"] == "student" and ckpt["weights_dtype"] == "float16"
    assert all(v.dtype in (torch.float32, torch.int64) for v in ckpt["model"].values())
    assert not {"optimizer", "scheduler", "rng_state"} & set(ckpt)
    raw = torch.load(RELEASED_DIR / "student_dagger.pt", weights_only=True)["model"]
    assert {str(v.dtype) for v in raw.values() if v.numel() >= COMPACT_MIN_NUMEL} == {"torch.float16"}
    assert raw["action_mean"].dtype == torch.float32               # small tensors (statistics) stay exact


def test_compact_checkpoint_rounds_large_tensors_only(tmp_path):
    torch.manual_seed(0)
    cfg = TeacherConfig.preset_named("tiny")
    model = LiDARBEVTeacher(cfg)
    src = save_checkpoint(tmp_path / "t.pt", {"model": model.state_dict(), "config": cfg.to_dict(),
                                              "optimizer": {"state": {}}, "epoch": 3}, kind="teacher")
    out = load_checkpoint(compact_checkpoint(src, tmp_path / "c.pt"))
    assert out["epoch"] == 3 and "optimizer" not in out
    for name, v in model.state_dict().items():
        got = out["model"][name]
        assert got.dtype == v.dtype
        if v.is_floating_point() and v.numel() >= COMPACT_MIN_NUMEL:
            assert torch.allclose(got, v, rtol=2 ** -10, atol=1e-7), name
        else:
            assert torch.equal(got, v), name
    state = model.state_dict()
    big = next(k for k, v in state.items() if v.is_floating_point() and v.numel() >= COMPACT_MIN_NUMEL)
    state[big] = state[big].clone().fill_(1e6)
    save_checkpoint(tmp_path / "big.pt", {"model": state, "config": cfg.to_dict()}, kind="teacher")
    with pytest.raises(CheckpointError, match="float16's range"):
        compact_checkpoint(tmp_path / "big.pt", tmp_path / "c2.pt")


def test_compacting_a_checkpoint_again_gives_the_same_bytes(tmp_path):
    """A released file is reproducible from its source: the bytes do not depend on the temporary file name
    the atomic write used, nor on where the copy is written."""
    cfg = TeacherConfig.preset_named("tiny")
    src = save_checkpoint(tmp_path / "t.pt", {"model": LiDARBEVTeacher(cfg).state_dict(), "config": cfg.to_dict()},
                          kind="teacher")
    first = compact_checkpoint(src, tmp_path / "a.pt")
    second = compact_checkpoint(src, tmp_path / "sub" / "other_name.pt")
    assert first.read_bytes() == second.read_bytes()


# ------------------------------------------------------------------------------------------------ commands
def test_list_released_names_each_model_its_results_and_how_it_was_made(capsys):
    assert drive_main(["--list_released"]) == 0                     # no --data_root needed
    out = capsys.readouterr().out
    assert out == listing() + "\n"
    models = load_manifest()["models"]
    for name, e in models.items():
        assert f"released:{name}  [{e['kind']}" in out and e["description"] in out
        assert e["made_by"]["command"] in out and f"commit {e['made_by']['commit']}" in out
        for r in e["results"]:
            assert f"{r['label']} ({r['track_status']}): {r['successes']}/{r['runs']} laps" in out


def test_released_models_drive_by_name(world, capsys):
    out = drive(DriveConfig(data_root=str(world), policy=["kd=released:student_dagger", "t=released:teacher"],
                            starts=1, time_limit=0.5, no_progress=True))
    assert [r.policy for r in out["runs"]] == ["kd", "t"] and all(r.steps == 10 for r in out["runs"])
    assert drive_main(["--data_root", str(world), "--policy", "bc=released:student_bc", "--starts", "1",
                       "--time_limit", "0.2", "--no_progress"]) == 0
    assert drive_main(["--data_root", str(world), "--policy", "x=released:nope", "--no_progress"]) == 1
    assert "no released model of that name" in capsys.readouterr().err


def test_released_names_go_wherever_a_checkpoint_path_goes(world, tmp_path):
    """eval (load_model), export (the store's teacher sha256 is the released file's), dagger's check, init."""
    sha = load_manifest()["models"]["teacher"]["sha256"]
    ev = evaluate_teacher(TeacherEvalConfig(data_root=str(world), split="test", teacher_ckpt="released:teacher",
                                            no_progress=True))
    assert ev["num_windows"] > 0
    store = tmp_path / "mb.zarr"
    export_memorybank(ExportConfig(data_root=str(world), split=["test"], teacher_ckpt="released:teacher",
                                   store=str(store), no_progress=True))
    assert open_memorybank(str(store)).provenance.teacher_sha256 == sha
    store.with_name("x.zarr").mkdir()
    DaggerConfig(data_root=str(world), teacher_ckpt="released:teacher", student_ckpt="released:student_bc",
                 memorybank=str(store.with_name("x.zarr")), out=str(tmp_path / "d")).check()
    with pytest.raises(CheckpointError):
        DaggerConfig(data_root=str(world), teacher_ckpt="released:teachr", student_ckpt="released:student_bc",
                     memorybank=str(store.with_name("x.zarr")), out=str(tmp_path / "d")).check()
    student_cfg = StudentConfig.from_dict(load_checkpoint("released:student_bc")["config"])
    report = load_init_weights(CameraBEVStudent(student_cfg), "released:student_bc", False, "head.2.")
    assert report["loaded"] and not report["skipped"]


def test_release_add_then_measure_records_held_out_results(world, tmp_path, capsys):
    torch.manual_seed(0)
    cfg = TeacherConfig.preset_named("tiny")
    model = LiDARBEVTeacher(cfg)
    with torch.no_grad():
        model.head[2].weight.normal_(0.0, 0.05)
    src = save_checkpoint(tmp_path / "teacher.pt", {"model": model.state_dict(), "config": cfg.to_dict(),
                                                    "train_args": {"data_root": str(world), "seed": 7}},
                          kind="teacher")
    rel = tmp_path / "rel"
    add = ["add", "--released_dir", str(rel), "--name", "tiny_teacher", "--ckpt", str(src), "--commit", "abc1234",
           "--description", "an untrained teacher", "--made_with", "python make_it.py"]
    assert release_main(add) == 0, capsys.readouterr().err
    entry = load_manifest(rel)["models"]["tiny_teacher"]
    marker = json.loads((world / "synthetic_dataset.json").read_text())
    by_split = {g["split"]: g["track_fingerprint"] for g in marker["segments"]}
    assert entry["trained_tracks"] == [by_split["train"]] and entry["valid_tracks"] == [by_split["valid"]]
    assert entry["made_by"]["world_seed"] == 5 and entry["made_by"]["seed"] == 7
    assert entry["made_by"]["budget"] == "1 LiDAR tracks" and "pipelines.train_teacher" in entry["made_by"]["train_command"]
    assert resolve("tiny_teacher", rel).stat().st_size == entry["bytes"] < src.stat().st_size
    assert release_main(add) == 1 and "already released" in capsys.readouterr().err
    for split, status in (("test", "held out"), ("valid", "valid only"), ("train", "trained on"), ("test", "held out")):
        measure = ["measure", "--released_dir", str(rel), "--data_root", str(world), "--split", split, "--label",
                   f"tiny {split}", "--starts", "2", "--time_limit", "0.3", "--no_progress"]
        assert release_main(measure) == 0
        assert f"tracks {status}" in capsys.readouterr().out
    results = load_manifest(rel)["models"]["tiny_teacher"]["results"]
    assert [r["label"] for r in results] == ["tiny valid", "tiny train", "tiny test"]      # same label: replaced
    r = results[-1]
    assert r["runs"] == 2 and r["world"]["seed"] == 5 and r["track_status"] in TRACK_STATUS
    assert r["command"].startswith("python -m pipelines.release measure --released_dir")
