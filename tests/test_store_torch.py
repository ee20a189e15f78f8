"""MemoryBankDataset / TeacherRowReader + EpochBatchSampler through DataLoader workers, and DDP-style sharding
across ranks."""
from __future__ import annotations

import pickle

import numpy as np
import torch
from torch.utils.data import Dataset

from e2r.data.sampler import EpochBatchSampler
from stores import create_memorybank
from stores.torch_data import MemoryBankDataset, TeacherRowReader, make_loader
from tests.store_fixtures import make_keys, rows_for, tiny_prov, tiny_schema


def _store(tmp_path, n=40):
    path = str(tmp_path / "mb.zarr")
    schema = tiny_schema()
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=16)
    keys = make_keys("train", n)
    bank.reserve_split("train", keys)
    bank.write_rows("train", 0, rows_for(schema, keys))
    return path, keys, rows_for(schema, keys)


def test_sampler_shards_ranks_disjoint_and_covering():
    seen = []
    for rank in range(3):
        s = EpochBatchSampler(50, batch_size=4, shuffle=True, seed=3, rank=rank, world_size=3)
        s.set_epoch(1)
        batches = list(s)
        assert len(batches) == len(s) == 5 and [len(b) for b in batches] == [4, 4, 4, 4, 1]   # 17 per rank
        seen.append([i for b in batches for i in b])
    flat = sum(seen, [])
    assert sorted(set(flat)) == list(range(50))          # every index served, padding wraps around
    assert len(flat) == 51                               # padded to a multiple of world_size
    a = list(EpochBatchSampler(50, 4, seed=3, rank=0, world_size=3))
    b = EpochBatchSampler(50, 4, seed=3, rank=0, world_size=3)
    b.set_epoch(2)
    assert a != list(b)                                  # new shuffle each epoch
    assert len(EpochBatchSampler(50, 4, drop_last=True, rank=0, world_size=3)) == 4


def test_dataloader_two_workers_returns_right_rows(tmp_path):
    path, keys, data = _store(tmp_path)
    want_keys = keys + ["train/absent:1"]
    ds = MemoryBankDataset(path, keys=want_keys, fields=("actions", "gru_out"))
    loader = make_loader(ds, EpochBatchSampler(len(ds), batch_size=8, shuffle=True, seed=0), num_workers=2)
    got = 0
    for batch in loader:
        assert batch["actions"].dtype == torch.float32 and batch["gru_out"].shape[1:] == (3, 12)
        for i, k in enumerate(batch["keys"]):
            if k == "train/absent:1":
                assert not batch["found"][i] and not batch["actions"][i].any()
                continue
            assert batch["found"][i]
            j = keys.index(k)
            np.testing.assert_array_equal(batch["gru_out"][i].numpy(), data["gru_out"][j])
            got += 1
    assert got >= len(keys)


def test_parent_reads_then_forked_and_spawned_workers_read(tmp_path):
    path, keys, data = _store(tmp_path, n=20)
    ds = MemoryBankDataset(path, split="train")
    first = ds[[0, 1]]                                   # the parent maps shard files before workers start
    np.testing.assert_array_equal(first["bev_vec"].numpy(), data["bev_vec"][:2])
    for ctx in (None, "spawn"):                          # fork (Linux default) inherits the maps; spawn reopens
        kw = {"multiprocessing_context": ctx} if ctx else {}
        loader = make_loader(ds, EpochBatchSampler(len(ds), 5, shuffle=False), num_workers=2, **kw)
        rows = torch.cat([b["actions"] for b in loader])
        np.testing.assert_array_equal(rows.numpy(), data["actions"])


class _KeyBatches(Dataset):
    """Item = one batch of keys read through a `TeacherRowReader` (what a trainer's batch dataset does)."""

    def __init__(self, reader: TeacherRowReader, keys: list[str]) -> None:
        self.reader, self.keys = reader, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, idx):
        return self.reader.read([self.keys[i] for i in idx])


def test_teacher_row_reader_found_mask_zeros_and_pickled_into_workers(tmp_path):
    path, keys, data = _store(tmp_path, n=20)
    reader = TeacherRowReader(path, fields=("actions", "bev_vec"))
    assert reader.fields == ("actions", "bev_vec") and reader.schema.seq_len == 3
    assert TeacherRowReader(path).fields == ("actions", "bev_vec", "gru_out")
    req = [keys[5], "train/absent:1", keys[0], keys[5]]
    batch = reader.read(req)
    assert batch["keys"] == req and list(batch) == ["keys", "actions", "bev_vec", "found"]
    assert batch["found"].dtype == torch.bool and batch["found"].tolist() == [True, False, True, True]
    assert batch["actions"].dtype == torch.float32 and batch["bev_vec"].shape == (4, 3, 8)
    assert not batch["actions"][1].any() and not batch["bev_vec"][1].any()       # absent key: zeros
    np.testing.assert_array_equal(batch["bev_vec"].numpy()[[0, 2, 3]], data["bev_vec"][[5, 0, 5]])
    np.testing.assert_array_equal(batch["actions"].numpy()[[0, 2, 3]], data["actions"][[5, 0, 5]])
    clone = pickle.loads(pickle.dumps(reader))           # the open handle is dropped, reopened on use
    assert clone.__dict__["_bank"] is None and reader.__dict__["_bank"] is not None
    np.testing.assert_array_equal(clone.read(keys[:3])["actions"].numpy(), data["actions"][:3])
    want = keys + ["train/absent:2"]
    loader = make_loader(_KeyBatches(reader, want), EpochBatchSampler(len(want), 6, shuffle=True, seed=1),
                         num_workers=2, multiprocessing_context="spawn")     # spawn: the reader is pickled
    seen = set()
    for b in loader:
        assert b["bev_vec"].shape[1:] == (3, 8) and len(b["keys"]) == len(b["found"])
        for i, k in enumerate(b["keys"]):
            seen.add(k)
            if k == "train/absent:2":
                assert not b["found"][i] and not b["bev_vec"][i].any()
                continue
            assert b["found"][i]
            np.testing.assert_array_equal(b["bev_vec"][i].numpy(), data["bev_vec"][keys.index(k)])
    assert seen == set(want)
