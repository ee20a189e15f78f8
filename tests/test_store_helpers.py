"""Shared tiny fixtures for the memorybank tests (synthetic data; no teacher needed)."""
from __future__ import annotations

import numpy as np

from stores import Provenance, StoreSchema

TEACHER = "ab" * 32


def tiny_schema(bev: bool = False, dtype: str = "float32") -> StoreSchema:
    return StoreSchema(seq_len=3, action_dim=2, bev_dim=8, gru_hidden=12,
                       bev_feat_shape=(4, 6, 5) if bev else None, store_bev_feat=bev, dtype=dtype)


def tiny_prov(sha: str = TEACHER) -> Provenance:
    return Provenance(teacher_sha256=sha, model_config={"preset": "tiny", "bev_dim": 8}, dataset_root="/data")


def make_keys(split: str, n: int) -> list[str]:
    return [f"{split}/seg_{i // 10:03d}:{i % 10}" for i in range(n)]


def rows_for(schema: StoreSchema, keys: list[str], seed_base: int = 0) -> dict[str, np.ndarray]:
    """Deterministic per-key rows: the same key always gets the same values (resume checks rely on it)."""
    out: dict[str, list[np.ndarray]] = {f: [] for f in schema.fields}
    for k in keys:
        rng = np.random.default_rng(abs(hash_key(k)) + seed_base)
        for f in schema.fields:
            out[f].append(rng.standard_normal(schema.row_shape(f)).astype(schema.dtype))
    return {f: np.stack(v) for f, v in out.items()}


def hash_key(k: str) -> int:
    import hashlib
    return int.from_bytes(hashlib.sha256(k.encode()).digest()[:6], "little")


def test_fsync_files_climbs_only_to_directories_whose_entry_is_not_yet_durable(tmp_path, monkeypatch):
    import os
    import shutil

    from stores import fsio

    synced: list[str] = []
    real = fsio.fsync_path
    monkeypatch.setattr(fsio, "fsync_path", lambda p: (synced.append(os.path.relpath(p, tmp_path)), real(p)))
    root = tmp_path / "mb.zarr"
    (root / "a" / "c" / "0").mkdir(parents=True)
    f1, f2 = root / "a" / "c" / "0" / "0", root / "a" / "c" / "0" / "1"
    f1.write_bytes(b"x")
    f2.write_bytes(b"y")
    durable: dict = {}
    fsio.fsync_files([f1], root, durable=durable)
    assert synced == ["mb.zarr/a/c/0/0", "mb.zarr/a/c/0", "mb.zarr/a/c", "mb.zarr/a", "mb.zarr"]
    synced.clear()
    fsio.fsync_files([f2], root, synced=[str(f2)], durable=durable)     # data synced by the caller
    assert synced == ["mb.zarr/a/c/0"]                                   # a/c/0's own entry is already durable
    synced.clear()
    shutil.rmtree(root / "a" / "c" / "0")                                # made again: a new entry in a/c
    (root / "a" / "c" / "0").mkdir()
    f1.write_bytes(b"z")
    fsio.fsync_files([f1], root, durable=durable)
    assert synced == ["mb.zarr/a/c/0/0", "mb.zarr/a/c/0", "mb.zarr/a/c", "mb.zarr/a"]    # a/c changed too
    synced.clear()
    fsio.fsync_files([f1], root)                                         # without a durable map: the whole climb
    assert synced[-1] == "mb.zarr" and len(synced) == 5
