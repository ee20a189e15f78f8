"""MemoryBankDataset + KeyBatchSampler through DataLoader workers, and DDP-style sharding across ranks."""
from __future__ import annotations

import numpy as np
import torch

from stores import create_memorybank
from stores.torch_data import KeyBatchSampler, MemoryBankDataset, make_loader
from tests.test_store_helpers import make_keys, rows_for, tiny_prov, tiny_schema


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
        s = KeyBatchSampler(50, batch_size=4, shuffle=True, seed=3, rank=rank, world_size=3)
        s.set_epoch(1)
        batches = list(s)
        assert len(batches) == len(s) == 5 and all(len(b) == 4 for b in batches)
        seen.append([i for b in batches for i in b])
    flat = sum(seen, [])
    assert sorted(set(flat)) == list(range(50))          # every index served, padding wraps around
    assert len(flat) == 60
    a = list(KeyBatchSampler(50, 4, seed=3, rank=0, world_size=3))
    b = KeyBatchSampler(50, 4, seed=3, rank=0, world_size=3)
    b.set_epoch(2)
    assert a != list(b)                                  # new shuffle each epoch
    assert len(KeyBatchSampler(50, 4, drop_last=True, rank=0, world_size=3)) == 4


def test_dataloader_two_workers_returns_right_rows(tmp_path):
    path, keys, data = _store(tmp_path)
    want_keys = keys + ["train/absent:1"]
    ds = MemoryBankDataset(path, keys=want_keys, fields=("actions", "gru_out"))
    loader = make_loader(ds, KeyBatchSampler(len(ds), batch_size=8, shuffle=True, seed=0), num_workers=2)
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
        loader = make_loader(ds, KeyBatchSampler(len(ds), 5, shuffle=False), num_workers=2, **kw)
        rows = torch.cat([b["actions"] for b in loader])
        np.testing.assert_array_equal(rows.numpy(), data["actions"])
