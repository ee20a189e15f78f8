"""KD from retrieved teacher situations (e2r.workflow.retrieval_kd): the state and pose indexes are built from the
dataset the store came from, the student index from the store's bev_vec; unpaired windows get the softmax mix
of their retrieved rows (never their own segment), pose vectors match the same place on the same track only,
training counts paired / retrieved / BC-only windows (student kind: retrieved in the train step), eval reports
how close retrieval comes to true pairs."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stores.keys import parse_key
from e2r.models.teacher import LiDARBEVTeacher
from e2r.workflow.configs import StudentEvalConfig
from e2r.workflow.evaluate import evaluate_student
from e2r.workflow.retrieval_kd import Retriever
from e2r.workflow.retrieval_queries import POSE_DEFAULTS, pose_vectors, segment_map
from e2r.workflow.train import train_student as run_train_student
from pipelines import retrieval_index, train_student
from stores.retrieval import RetrievalIndex
from stores.torch_data import TeacherRowReader
from tests.fixtures import write_tiny_dataset
from tests.kd_fixtures import SEQ, STRIDE, TEACHER, camera_ds, teacher_rows, write_bank


STEP_M = 2.0       # metres per frame of the test drives


def add_poses(root, rng) -> None:
    """Pose columns and a track: train segment_0000 and segment_0001 drive the same line on track A (0001 a
    few cm off), valid segment_0000 the same coordinates on track B."""
    for seg, track in (("train/segment_0000", "A"), ("train/segment_0001", "A"), ("valid/segment_0000", "B")):
        meta = root / seg / "meta"
        lines = (meta / "data.csv").read_text().splitlines()
        noise = 0.0 if seg == "train/segment_0000" else 0.05
        rows = [f"{line},{STEP_M * i + rng.normal(0, noise):.4f},{rng.normal(0, noise):.4f},0.1"
                for i, line in enumerate(lines[1:])]
        (meta / "data.csv").write_text("\n".join([lines[0] + ",x,y,yaw", *rows]) + "\n")
        (meta / "track.json").write_text(json.dumps({"track_fingerprint": track}))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Teacher rows for train segment_0000 (and valid) only: segment_0001's camera windows are unpaired.
    Indexes state, pose and student."""
    tmp = tmp_path_factory.mktemp("rkd")
    root = write_tiny_dataset(tmp / "data", splits={"train": 2, "valid": 1}, frames=10, points_per_frame=(100, 200))
    add_poses(root, np.random.default_rng(0))
    torch.manual_seed(0)
    rows = teacher_rows(root, LiDARBEVTeacher(TEACHER).eval())
    rows = {k: v for k, v in rows.items() if parse_key(k).segment != "segment_0001" or k.startswith("valid/")}
    bank = write_bank(tmp / "mb.zarr", rows)
    assert retrieval_index.main(["build", "--store", bank, "--data_root", str(root)]) == 0
    assert retrieval_index.main(["build", "--store", bank, "--data_root", str(root), "--query", "pose"]) == 0
    assert retrieval_index.main(["build", "--store", bank, "--query", "student"]) == 0
    return {"root": root, "bank": bank, "rows": rows}


def test_index_holds_every_row_and_unpaired_windows_get_the_mix_of_their_neighbours(setup):
    index = RetrievalIndex.open(setup["bank"], "state")
    assert len(index) == len(setup["rows"]) and index.attrs["meta"]["seq_len"] == SEQ
    reader = TeacherRowReader(setup["bank"], ("actions", "bev_vec", "gru_out"))
    ds = camera_ds(setup["root"])
    items = [ds[i] for i in range(len(ds))]
    speed, steering = torch.stack([x["speed"] for x in items]), torch.stack([x["steering"] for x in items])
    keys = [x["key"] for x in items]
    one = Retriever(setup["bank"], "state", k=1, tau=0.05, min_similarity=-1.0)
    q = {"speed": speed, "steering": steering}
    mixed, used, best = one.targets(reader, q, keys)
    nearest, sims = index.retrieve(one.query(q), 1, exclude=keys)
    assert used.all() and np.allclose(best.numpy(), sims[:, 0], atol=1e-6)
    for i, key in enumerate(nearest[:, 0]):
        assert parse_key(key).segment != parse_key(keys[i]).segment or \
            abs(parse_key(key).start - parse_key(keys[i]).start) > SEQ    # never its own window
        torch.testing.assert_close(mixed["actions"][i], reader.read([key])["actions"][0])
    three = Retriever(setup["bank"], "state", k=3, tau=1e3, min_similarity=-1.0)     # tau large: plain mean
    q1 = {"speed": speed[:1], "steering": steering[:1]}
    mixed3, _, _ = three.targets(reader, q1, keys[:1])
    got, _ = index.retrieve(three.query(q1), 3, exclude=keys[:1])
    torch.testing.assert_close(mixed3["bev_vec"][0], reader.read(list(got[0]))["bev_vec"].mean(0), atol=1e-3,
                               rtol=1e-3)
    gated = Retriever(setup["bank"], "state", k=2, min_similarity=1.01).targets(reader, q, keys)
    assert not gated[1].any() and float(gated[0]["actions"].abs().sum()) == 0.0


def _args(setup, tmp_path, *extra):
    return ["--data_root", str(setup["root"]), "--preset", "tiny", "--batch_size", "4", "--seq_len", str(SEQ),
            "--stride", str(STRIDE), "--device", "cpu", "--no_progress", "--epochs", "1", "--memorybank",
            setup["bank"], "--save_path", str(tmp_path / "s.pt"), *extra]


def test_training_counts_paired_retrieved_and_bc_only_and_eval_checks_retrieval(setup, tmp_path, capsys):
    n = len(camera_ds(setup["root"]))
    unpaired = sum(parse_key(k).segment == "segment_0001" for k in camera_ds(setup["root"]).keys)
    assert 0 < unpaired < n
    out = run_train_student(train_student.parse_config(
        _args(setup, tmp_path, "--kd_retrieval", "state", "--kd_retrieval_min_sim", "-1")))
    h = out["history"][0]
    assert h["retrieved_samples"] == unpaired and h["kd_samples"] == n and h["bc_only_samples"] == 0
    out = run_train_student(train_student.parse_config(
        _args(setup, tmp_path, "--kd_retrieval", "state", "--kd_retrieval_min_sim", "1.01")))
    h = out["history"][0]
    assert h["retrieved_samples"] == 0 and h["kd_samples"] == n - unpaired and h["bc_only_samples"] == unpaired
    ev = evaluate_student(StudentEvalConfig(data_root=str(setup["root"]), split="train", seq_len=SEQ, stride=STRIDE,
                                            student_ckpt=str(tmp_path / "s.pt"), memorybank=setup["bank"],
                                            kd_retrieval="state", device="cpu", no_progress=True))
    r = ev["retrieval"]
    assert r["retrieved_n"] == unpaired and r["pairs_n"] == n - unpaired and r["pairs_used"] == n - unpaired
    assert -1.0 <= r["similarity_p10"] <= r["similarity_p50"] <= r["similarity_p90"] <= 1.0 + 1e-6
    assert np.isfinite(r["pairs_action_overall_mse"]) and -1.0 <= r["pairs_bev_vec_cosine"] <= 1.0
    assert ev["kd_gap"]["kd_n"] == n - unpaired          # the gap is measured on true pairs only
    assert train_student.main(_args(setup, tmp_path, "--kd_retrieval", "nosuch")) == 1
    assert "nosuch" in capsys.readouterr().err
    rc = train_student.main(["--data_root", str(setup["root"]), "--kd_retrieval", "state", "--device", "cpu"])
    assert rc == 1 and "--kd_retrieval needs --memorybank" in capsys.readouterr().err


def test_unpaired_training_never_uses_a_windows_own_segment(setup, tmp_path, monkeypatch):
    seen = []
    real = Retriever.targets

    def spy(self, reader, batch, exclude):
        out = real(self, reader, batch, exclude)
        keys, _ = self.index.retrieve(self.query(batch), self.k, exclude=list(exclude),
                                      exclude_frames=10 ** 9)
        seen.extend((parse_key(q).segment, parse_key(str(k)).segment) for q, row in zip(exclude, keys) for k in row
                    if k)
        return out
    monkeypatch.setattr(Retriever, "targets", spy)
    n = len(camera_ds(setup["root"]))
    out = run_train_student(train_student.parse_config(
        _args(setup, tmp_path, "--kd_retrieval", "state", "--kd_unpaired", "--kd_retrieval_min_sim", "-1")))
    h = out["history"][0]
    # segment_0000's windows have no candidate left (the rows named segment_0000, train and valid, are their own
    # segment's name: excluded); segment_0001's retrieve from segment_0000 although their own rows are absent
    assert h["retrieved_samples"] == h["kd_samples"] == n // 2 and h["bc_only_samples"] == n // 2
    assert seen and all(q != r for q, r in seen)


def test_stores_cli_queries_the_index_and_verify_checks_it(setup, tmp_path, capsys):
    import shutil
    from pathlib import Path

    from stores.__main__ import main as stores_main

    bank = tmp_path / "copy.zarr"
    shutil.copytree(setup["bank"], bank)
    key = sorted(setup["rows"])[0]
    assert retrieval_index.main(["query", "--store", str(bank), "--key", key, "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert f"query {key}: 3 neighbours" in out and key not in out.split("query")[0]
    assert retrieval_index.main(["verify", "--store", str(bank)]) == 0 and stores_main(["verify", str(bank)]) == 0
    capsys.readouterr()
    chunk = next(p for p in sorted((Path(bank) / "retrieval" / "state").rglob("*")) if p.is_file()
                 and "vectors" in p.parts and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[0] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    assert stores_main(["verify", str(bank)]) == 1
    assert str(chunk) in capsys.readouterr().out


def test_pose_vectors_match_the_same_place_and_heading_on_the_same_track_only(tmp_path):
    params = dict(POSE_DEFAULTS)
    g = torch.Generator().manual_seed(1)
    pose = torch.cat([torch.rand(256, 2, generator=g) * 200 - 100, torch.rand(256, 1, generator=g) * 6.3], dim=1)

    def sim(a, b, maps_a, maps_b):
        return (pose_vectors(a, maps_a, params) * pose_vectors(b, maps_b, params)).sum(1)
    same = sim(pose, pose, ["A"] * 256, ["A"] * 256)
    assert torch.allclose(same, torch.ones(256), atol=1e-5)                  # unit rows, same place: 1
    other = sim(pose, pose, ["A"] * 256, [f"B{i}" for i in range(256)])       # same coordinates, other tracks:
    assert float(other.abs().max()) < 0.3 and abs(float(other.mean())) < 0.02    # ~0 (std 1 / sqrt(2 M))
    shifted = pose + torch.tensor([params["sigma_xy"], 0.0, 0.0])           # one sigma away: exp(-1/2)
    assert abs(float(sim(pose, shifted, ["A"] * 256, ["A"] * 256).mean()) - np.exp(-0.5)) < 0.05
    turned = pose + torch.tensor([0.0, 0.0, np.pi])            # facing the other way: ~0 (exp(-8) + RFF error)
    assert abs(float(sim(pose, turned, ["A"] * 256, ["A"] * 256).mean())) < 2 / np.sqrt(2 * params["features"])
    traj = dict(params, frames=3)                                           # a trajectory: per-frame mean
    seq = torch.stack([pose, pose + torch.tensor([1.0, 0.0, 0.0]), pose], dim=1)
    assert pose_vectors(seq, ["A"] * 256, traj).shape == (256, 2 * params["features"] * 3)
    # the map of a segment: "map" over "track_fingerprint" over none (one map for all)
    for i, info in enumerate(({"track_fingerprint": "f", "map": "m"}, {"track_fingerprint": "f"}, None)):
        d = tmp_path / str(i)
        (d / "meta").mkdir(parents=True)
        if info is not None:
            (d / "meta" / "track.json").write_text(json.dumps(info))
        assert segment_map(SimpleNamespace(directory=d)) == ("m", "f", "")[i]


def test_pose_index_finds_the_same_place_of_another_drive_on_the_same_track(setup):
    index = RetrievalIndex.open(setup["bank"], "pose")
    assert index.attrs["meta"]["pose"] == POSE_DEFAULTS and index.attrs["meta"]["maps"] == 2
    reader = TeacherRowReader(setup["bank"], ("actions", "bev_vec", "gru_out"))
    ds = camera_ds(setup["root"])
    r = Retriever(setup["bank"], "pose", k=1, min_similarity=0.9)
    assert r.kind == "pose" and r.at_load
    keys = [k for k in ds.keys if parse_key(k).segment == "segment_0001"]     # no rows of their own
    q = r.window_inputs(ds.tables, keys)
    assert q["pose"].shape == (len(keys), SEQ, 3) and set(q["map"]) == {"A"}
    nearest, sims = index.retrieve(r.query(q), 1, exclude=keys)
    # the same place of segment_0000 on track A, never valid/segment_0000 (same coordinates, track B)
    assert [str(n) for n in nearest[:, 0]] == [k.replace("segment_0001", "segment_0000") for k in keys]
    assert (sims[:, 0] > 0.99).all()
    mixed, used, best = r.targets(reader, q, keys)
    assert used.all()
    torch.testing.assert_close(mixed["actions"], reader.read(list(nearest[:, 0]))["actions"])
    # segment_0000's own windows (+-T excluded; valid/segment_0000 shares its name): the nearest left are
    # >= T + 1 frames = 8 m away on track A, below the gate
    own = [k for k in ds.keys if parse_key(k).segment == "segment_0000"]
    _, _, best_own = r.targets(reader, r.window_inputs(ds.tables, own), own)
    assert (best_own < 0.5).all()


def test_pose_cli_names_the_csv_without_pose_columns(setup, tmp_path, capsys):
    bare = write_tiny_dataset(tmp_path / "bare", splits={"train": 2, "valid": 1}, frames=10,
                              points_per_frame=(100, 200))
    assert retrieval_index.main(["build", "--store", setup["bank"], "--data_root", str(bare), "--query", "pose",
                                 "--name", "pose_bare"]) == 1
    err = capsys.readouterr().err
    assert "data.csv has no pose columns (x, y, yaw)" in err and str(bare) in err
    assert retrieval_index.main(["build", "--store", setup["bank"], "--query", "pose"]) == 2
    assert "--query pose needs --data_root" in capsys.readouterr().err


def test_student_index_is_the_stores_bev_vec_and_is_retrieved_in_the_train_step(setup, tmp_path):
    index = RetrievalIndex.open(setup["bank"], "student")
    key = sorted(setup["rows"])[0]
    row = torch.from_numpy(setup["rows"][key]["bev_vec"]).float().mean(0)
    got, sims = index.retrieve(row[None], len(index))
    assert sims[0, list(got[0]).index(key)] > 0.999                         # its own mean bev_vec
    r = Retriever(setup["bank"], "student")
    assert r.kind == "student" and not r.at_load
    n = len(camera_ds(setup["root"]))
    unpaired = sum(parse_key(k).segment == "segment_0001" for k in camera_ds(setup["root"]).keys)
    out = run_train_student(train_student.parse_config(
        _args(setup, tmp_path, "--kd_retrieval", "student", "--kd_retrieval_min_sim", "-1")))
    h = out["history"][0]
    assert h["retrieved_samples"] == unpaired and h["kd_samples"] == n and h["bc_only_samples"] == 0
    ev = evaluate_student(StudentEvalConfig(data_root=str(setup["root"]), split="train", seq_len=SEQ, stride=STRIDE,
                                            student_ckpt=str(tmp_path / "s.pt"), memorybank=setup["bank"],
                                            kd_retrieval="student", device="cpu", no_progress=True))
    r = ev["retrieval"]
    assert r["retrieved_n"] == unpaired and r["pairs_n"] == n - unpaired and r["pairs_used"] == n - unpaired
    assert np.isfinite(r["pairs_action_overall_mse"]) and -1.0 <= r["pairs_bev_vec_cosine"] <= 1.0
    assert ev["kd_gap"]["kd_n"] == n - unpaired
