"""Camera windows + memorybank targets (e2r.kd_data): streamed batches equal direct reads through 2 DataLoader
workers, store/dataset mismatches are refused, a student distilled from its own stored outputs has ~0 KD,
samples without targets get BC only, and mirrored samples keep their cached targets valid."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from e2r.kd import FovMasks, KDWeights, student_losses
from e2r.workflow.configs import StudentEvalConfig, StudentTrainConfig
from e2r.workflow.kd_data import (LIGHT_KD_FIELDS, CameraBatches, TeacherTargets, batch_to, check_store_fits,
                                  hflip_batch, make_kd_loader, teacher_config_of_store)
from e2r.losses import action_weights
from e2r.models.config import TeacherConfig
from e2r.models.student import CameraBEVStudent
from e2r.runtime import DistContext
from e2r.workflow.targets_ahead import TargetsAhead
from stores import StoreMismatchError, open_memorybank
from tests.fixtures import write_tiny_dataset
from tests.kd_fixtures import SEQ, STRIDE, TEACHER, camera_ds, fake_rows, student_cfg, write_bank

@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("kd"), splits={"train": 2, "valid": 1}, frames=8,
                              points_per_frame=(100, 200))


def test_streamed_batches_equal_direct_reads_with_two_workers(data_root, tmp_path):
    ds = camera_ds(data_root)
    stored = ds.keys[::2]                                   # half the windows have teacher targets
    path = write_bank(tmp_path / "mb.zarr", fake_rows(stored))
    targets = TeacherTargets(path, ("actions", "bev_vec", "gru_out", "bev_feat"))
    loader, sampler = make_kd_loader(ds, targets, batch_size=4, shuffle=True, seed=1, num_workers=2, ctx=DistContext())
    sampler.set_epoch(3)
    bank = open_memorybank(path, mode="r")
    seen = []
    for batch in loader:
        assert batch["images"].shape[:2] == (len(batch["keys"]), SEQ)
        for i, key in enumerate(batch["keys"]):
            seen.append(key)
            assert bool(batch["has_kd"][i]) == (key in stored) == bank.has(key)
            np.testing.assert_array_equal(batch["actions"][i].numpy(), ds[ds.keys.index(key)]["actions"].numpy())
            if key in stored:
                direct = bank.get(key)
                for f in ("actions", "bev_vec", "gru_out", "bev_feat"):
                    np.testing.assert_array_equal(batch["teacher"][f][i].numpy(), direct[f])
            else:
                assert not batch["teacher"]["gru_out"][i].any()
    assert sorted(seen) == sorted(ds.keys)                  # every window once, no padding single-process
    # two DDP ranks: disjoint shards covering the split
    shards = []
    for rank in range(2):
        _, s = make_kd_loader(ds, targets, 2, True, 1, 0, DistContext(True, rank, 2, 0))
        shards.append({i for batch in s for i in batch})
    assert shards[0] | shards[1] == set(range(len(ds))) and not (shards[0] & shards[1])


def test_targets_read_in_main_equal_targets_read_in_workers(data_root, tmp_path):
    """--kd_targets main (rows read by this process ahead of the step) and worker give the same batches."""
    ds = camera_ds(data_root)
    path = write_bank(tmp_path / "mb.zarr", fake_rows(ds.keys[1::2], seed=4))
    targets = TeacherTargets(path, ("actions", "bev_vec", "gru_out"))
    runs = {}
    for where in ("main", "worker"):
        loader, sampler = make_kd_loader(ds, targets, 2, True, 7, 2, DistContext(), targets_in=where)
        sampler.set_epoch(2)
        runs[where] = list(loader)
    assert isinstance(make_kd_loader(ds, targets, 3, True, 7, 2, DistContext())[0], TargetsAhead)     # the default
    assert len(runs["main"]) == len(runs["worker"]) == len(loader) >= 3
    for a, b in zip(runs["main"], runs["worker"]):
        assert a["keys"] == b["keys"] and set(a) == set(b)
        for name, value in a.items():
            if name == "teacher":
                assert set(value) == set(b[name])
                for f in value:
                    torch.testing.assert_close(value[f], b[name][f], rtol=0, atol=0)
            elif isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, b[name], rtol=0, atol=0)
    assert sum(int(b["has_kd"].sum()) for b in runs["main"]) == len(ds.keys[1::2])
    with pytest.raises(ValueError, match="targets_in"):
        make_kd_loader(ds, targets, 3, True, 7, 0, DistContext(), targets_in="gpu")


def test_targets_ahead_raises_at_the_failing_batch_and_stops_when_closed():
    def fill(batch):
        if batch["i"] == 3:
            raise RuntimeError("row 3 damaged")
        batch["teacher"] = {"x": torch.full((2,), float(batch["i"]))}

    got = []
    with pytest.raises(RuntimeError, match="row 3 damaged"):
        for batch in TargetsAhead([{"i": i} for i in range(6)], fill, depth=2):
            got.append(int(batch["teacher"]["x"][0]))
    assert got == [0, 1, 2]                                  # every batch before the failing one, in order
    passed = [b for b in TargetsAhead([None, {"i": 0}], fill)]
    assert passed[0] is None and passed[1]["teacher"]["x"].tolist() == [0.0, 0.0]
    it = iter(TargetsAhead([{"i": i} for i in (0, 1, 2, 4, 5, 6, 7)], fill, depth=1))
    assert int(next(it)["teacher"]["x"][0]) == 0
    it.close()                                               # the consumer left mid-epoch: the thread ends
    assert not it._thread.is_alive()
    with pytest.raises(StopIteration):
        next(it)
    it = iter(TargetsAhead([{"i": i} for i in range(50)], fill, depth=1))
    next(it)
    thread = it._thread
    del it                                                   # dropped without close (an error in the step)
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_store_mismatch_refused_with_clear_messages(data_root, tmp_path):
    cfg = student_cfg()
    keys = camera_ds(data_root).keys
    p = write_bank(tmp_path / "t4.zarr", fake_rows(keys, T=4), seq_len=4)
    schema = open_memorybank(p).schema
    with pytest.raises(StoreMismatchError, match=r"seq_len: store 4, dataset --seq_len 3"):
        check_store_fits(p, schema, SEQ, 2, cfg, False, TEACHER)
    p = write_bank(tmp_path / "a3.zarr", fake_rows(keys, A=3), action_dim=3)
    with pytest.raises(StoreMismatchError, match=r"action size: store 3, dataset 2"):
        check_store_fits(p, open_memorybank(p).schema, SEQ, 2, cfg, False, TEACHER)
    p = write_bank(tmp_path / "light.zarr", fake_rows(keys), bev_feat=False)
    check_store_fits(p, open_memorybank(p).schema, SEQ, 2, cfg, False, TEACHER)       # fine without dense KD
    with pytest.raises(StoreMismatchError, match="does not hold"):
        check_store_fits(p, open_memorybank(p).schema, SEQ, 2, cfg, True, TEACHER)
    other = TeacherConfig.preset_named("tiny")
    other.voxel_size = (0.4, 0.8, 4.0)                                           # another grid
    with pytest.raises(StoreMismatchError, match="teacher BEV grid differs"):
        p = write_bank(tmp_path / "g.zarr", fake_rows(keys))
        check_store_fits(p, open_memorybank(p).schema, SEQ, 2, cfg, True, other)
    with pytest.raises(StoreMismatchError, match="pass --teacher_ckpt"):
        check_store_fits(p, open_memorybank(p).schema, SEQ, 2, cfg, True, None)
    assert teacher_config_of_store({"preset": "tiny", "bev_dim": 8}) is None     # partial: not trusted
    assert teacher_config_of_store(TEACHER.to_dict()) == TEACHER


def test_teacher_targets_for_run_checks_the_store_and_reads_what_the_run_needs(data_root, tmp_path):
    """One object builds a run's targets (training and evaluation call it alike): the store is checked against
    the dataset and student, dense KD adds bev_feat, KD off or no store gives batches without targets."""
    ds = camera_ds(data_root)
    path = write_bank(tmp_path / "mb.zarr", fake_rows(ds.keys[:3]))
    cfg = StudentTrainConfig(data_root=str(data_root), memorybank=path, seq_len=SEQ, stride=STRIDE)
    targets = TeacherTargets.for_run(cfg, ds, student_cfg())
    assert targets.fields == LIGHT_KD_FIELDS and targets.pairing is None and targets.retriever is None
    batch = CameraBatches(ds, targets)[[0, 1, 2, 3]]
    assert batch["has_kd"].tolist() == [True, True, True, False] and set(batch["teacher"]) == set(LIGHT_KD_FIELDS)
    dense = TeacherTargets.for_run(cfg, ds, student_cfg(), need_bev_feat=True)
    assert dense.fields == (*LIGHT_KD_FIELDS, "bev_feat")
    for off in (TeacherTargets.for_run(cfg, ds, student_cfg(), kd_on=False),
                TeacherTargets.for_run(StudentEvalConfig(data_root=str(data_root), student_ckpt="s.pt", seq_len=SEQ),
                                       ds, student_cfg())):
        assert off.reader is None and CameraBatches(ds, off)[[0]]["has_kd"].tolist() == [False]
    with pytest.raises(StoreMismatchError, match="seq_len: store 3, dataset --seq_len 4"):
        TeacherTargets.for_run(StudentTrainConfig(data_root=str(data_root), memorybank=path, seq_len=4), ds,
                               student_cfg())


def test_student_distilled_from_its_own_outputs_has_zero_kd_and_missing_keys_get_bc_only(data_root, tmp_path):
    torch.manual_seed(0)
    cfg = student_cfg()
    model = CameraBEVStudent(cfg).eval()
    ds = camera_ds(data_root)
    keys = ds.keys
    stored = keys[:4]
    with torch.no_grad():
        b = CameraBatches(ds, TeacherTargets())[list(range(len(ds)))]
        pred, aux = model(b["images"], b["intrinsics"], b["cam2ego"], b["speed"], b["steering"], return_aux=True)
    rows = {k: {"actions": pred[i].numpy(), "bev_vec": aux["bev_vec_seq"][i].numpy(),
                "gru_out": aux["gru_out"][i].numpy(), "bev_feat": aux["bev_feat_seq"][i].numpy()}
            for i, k in enumerate(keys) if k in stored}
    path = write_bank(tmp_path / "self.zarr", rows)
    data = CameraBatches(ds, TeacherTargets(path, ("actions", "bev_vec", "gru_out", "bev_feat")))
    batch = batch_to(data[list(range(len(ds)))], torch.device("cpu"))
    assert batch["has_kd"].tolist() == [k in stored for k in keys]
    w = action_weights(1.0, 0.05)
    kd = KDWeights(action=1.0, bev_vec=1.0, temporal=1.0, bev_feat=1.0)
    fov = FovMasks(cfg)
    with torch.no_grad():
        loss, parts = student_losses(model, model.normalize_actions, batch, w, kd, fov)
        bc_only, bc_parts = student_losses(model, model.normalize_actions, batch, w, KDWeights(0, 0, 0, 0), fov)
    for name in ("kd_action", "kd_bev_vec", "kd_temporal", "kd_bev_feat"):
        assert float(parts[name]) < 1e-5, (name, float(parts[name]))
    assert float(parts["bc"]) > 1e-3                                  # untrained: BC is not ~0
    assert torch.allclose(loss, bc_only, atol=1e-5)
    assert parts["kd_samples"] == 4 and parts["bc_only_samples"] == len(keys) - 4
    # a perturbed teacher target on one stored sample gives KD > 0; on a missing key it changes nothing
    batch["teacher"]["gru_out"][0] += 1.0
    batch["teacher"]["gru_out"][len(keys) - 1] += 100.0               # not in the store: ignored
    with torch.no_grad():
        _, p2 = student_losses(model, model.normalize_actions, batch, w, kd, fov)
    assert abs(float(p2["kd_temporal"]) - 1.0 / 4) < 1e-4
    # FOV: the front camera sees ahead (x > 0 near the centre line), not the cells behind/beside at the edge
    m = fov(batch["intrinsics"][:1], batch["cam2ego"][:1])[0]
    assert m.shape == (cfg.bev_H, cfg.bev_W) and 0 < float(m.mean()) < 1
    assert m[cfg.bev_H // 2, cfg.bev_W // 2] == 1 and m[0, 0] == 0


def test_hflip_batch_flips_inputs_and_cached_targets_and_drops_embedding_kd(data_root, tmp_path):
    ds = camera_ds(data_root)
    path = write_bank(tmp_path / "f.zarr", fake_rows(ds.keys))
    data = CameraBatches(ds, TeacherTargets(path, ("actions", "bev_vec", "gru_out", "bev_feat")))
    orig = data[[0, 1]]
    batch = hflip_batch(data[[0, 1]], torch.tensor([True, False]), student_cfg().bev_grid)
    assert torch.equal(batch["images"][0], orig["images"][0].flip(-1))
    assert torch.equal(batch["images"][1], orig["images"][1])
    assert torch.equal(batch["actions"][0, :, 0], -orig["actions"][0, :, 0])
    assert torch.equal(batch["actions"][0, :, 1], orig["actions"][0, :, 1])
    assert torch.equal(batch["teacher"]["actions"][0, :, 0], -orig["teacher"]["actions"][0, :, 0])
    assert torch.equal(batch["teacher"]["bev_feat"][0], orig["teacher"]["bev_feat"][0].flip(-2))
    assert torch.equal(batch["steering"][0], -orig["steering"][0])
    assert torch.equal(batch["teacher"]["bev_vec"], orig["teacher"]["bev_vec"])
    model = CameraBEVStudent(student_cfg()).eval()
    kd = KDWeights(action=0.0, bev_vec=1.0, temporal=1.0)
    with torch.no_grad():
        _, both = student_losses(model, model.normalize_actions, orig, action_weights(1, 0.05), kd)
        _, first_flipped = student_losses(model, model.normalize_actions, orig, action_weights(1, 0.05), kd,
                                          flipped=torch.tensor([True, False]))
        _, one = student_losses(model, model.normalize_actions, {**orig, "has_kd": torch.tensor([False, True])},
                                action_weights(1, 0.05), kd)
    assert float(both["kd_temporal"]) != pytest.approx(float(first_flipped["kd_temporal"]))
    assert float(first_flipped["kd_temporal"]) == pytest.approx(float(one["kd_temporal"]), rel=1e-6)
