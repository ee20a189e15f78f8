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
