"""KD from retrieved teacher situations (e2r.workflow.retrieval_kd): the state index is built from the dataset
the store came from, unpaired windows get the softmax mix of their retrieved rows (never their own segment),
training counts paired / retrieved / BC-only windows, eval reports how close retrieval comes to true pairs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from e2r.keys import parse_key
from e2r.models.teacher import LiDARBEVTeacher
from e2r.workflow.configs import StudentEvalConfig
from e2r.workflow.evaluate import evaluate_student
from e2r.workflow.retrieval_kd import Retriever
from e2r.workflow.train import train_student as run_train_student
from pipelines import retrieval_index, train_student
from stores.retrieval import RetrievalIndex
from stores.torch_data import TeacherRowReader
from tests.fixtures import write_tiny_dataset
from tests.test_kd_data import SEQ, STRIDE, TEACHER, camera_ds, teacher_rows, write_bank


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Teacher rows for train segment_0000 (and valid) only: segment_0001's camera windows are unpaired."""
    tmp = tmp_path_factory.mktemp("rkd")
    root = write_tiny_dataset(tmp / "data", splits={"train": 2, "valid": 1}, frames=10, points_per_frame=(100, 200))
    torch.manual_seed(0)
    rows = teacher_rows(root, LiDARBEVTeacher(TEACHER).eval())
    rows = {k: v for k, v in rows.items() if parse_key(k).segment != "segment_0001" or k.startswith("valid/")}
    bank = write_bank(tmp / "mb.zarr", rows)
    assert retrieval_index.main(["--store", bank, "--data_root", str(root)]) == 0
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
    mixed, used, best = one.targets(reader, speed, steering, keys)
    nearest, sims = index.retrieve(one.query(speed, steering), 1, exclude=keys)
    assert used.all() and np.allclose(best.numpy(), sims[:, 0], atol=1e-6)
    for i, key in enumerate(nearest[:, 0]):
        assert parse_key(key).segment != parse_key(keys[i]).segment or \
            abs(parse_key(key).start - parse_key(keys[i]).start) > SEQ    # never its own window
        torch.testing.assert_close(mixed["actions"][i], reader.read([key])["actions"][0])
    three = Retriever(setup["bank"], "state", k=3, tau=1e3, min_similarity=-1.0)     # tau large: plain mean
    mixed3, _, _ = three.targets(reader, speed[:1], steering[:1], keys[:1])
    got, _ = index.retrieve(three.query(speed[:1], steering[:1]), 3, exclude=keys[:1])
    torch.testing.assert_close(mixed3["bev_vec"][0], reader.read(list(got[0]))["bev_vec"].mean(0), atol=1e-3,
                               rtol=1e-3)
    gated = Retriever(setup["bank"], "state", k=2, min_similarity=1.01).targets(reader, speed, steering, keys)
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
    assert train_student.main(_args(setup, tmp_path, "--kd_retrieval", "pose")) == 1
    assert "pose" in capsys.readouterr().err
    rc = train_student.main(["--data_root", str(setup["root"]), "--kd_retrieval", "state", "--device", "cpu"])
    assert rc == 1 and "--kd_retrieval needs --memorybank" in capsys.readouterr().err


def test_unpaired_training_never_uses_a_windows_own_segment(setup, tmp_path, monkeypatch):
    seen = []
    real = Retriever.targets

    def spy(self, reader, speed, steering, exclude):
        out = real(self, reader, speed, steering, exclude)
        keys, _ = self.index.retrieve(self.query(speed, steering), self.k, exclude=list(exclude),
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
    assert stores_main(["query", str(bank), key, "--name", "state", "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert f"query {key}: 3 neighbours" in out and key not in out.split("query")[0]
    assert stores_main(["index", "verify", str(bank)]) == 0 and stores_main(["verify", str(bank)]) == 0
    capsys.readouterr()
    chunk = next(p for p in sorted((Path(bank) / "retrieval" / "state").rglob("*")) if p.is_file()
                 and "vectors" in p.parts and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[0] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    assert stores_main(["verify", str(bank)]) == 1
    assert str(chunk) in capsys.readouterr().out
