"""Shared helpers of the memorybank tests (synthetic data; no teacher needed): a tiny schema and provenance,
keys, deterministic rows, and stores on the local S3 server (`s3` fixture in conftest.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import numpy as np
import zarr
import zarr.codecs as zc

from stores import Provenance, StoreSchema, create_memorybank

TEACHER = "ab" * 32
S = 16                     # rows per shard of the object-storage test stores


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



def s3_fs() -> fsspec.AbstractFileSystem:
    """The local S3 server's file system (endpoint from the environment the `s3` fixture sets)."""
    return fsspec.filesystem("s3", skip_instance_cache=True)


def local_store(tmp_path, n: int = 40, bev: bool = False) -> tuple[str, list[str], dict[str, np.ndarray]]:
    """A local Zarr store of ``n`` complete train rows, shards of `S` rows: ``(path, keys, rows)``."""
    schema = tiny_schema(bev=bev)
    path = str(tmp_path / "local.zarr")
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=S)
    keys = make_keys("train", n)
    data = rows_for(schema, keys)
    bank.reserve_split("train", keys)
    bank.write_rows("train", 0, data)
    return path, keys, data


def upload_store(local: str, name: str) -> str:
    """Copy the local store ``local`` to ``s3://bkt/<name>``; its URL."""
    s3_fs().put(local, f"bkt/{name}", recursive=True)
    return f"s3://bkt/{name}"


def filled(path: str, bev: bool = False, n: int = 25, shard_rows: int = 8
           ) -> tuple[StoreSchema, list[str], dict[str, np.ndarray]]:
    """A store at ``path`` with ``n`` train rows written in two blocks (the first naming its keys); closed."""
    schema = tiny_schema(bev=bev)
    bank = create_memorybank(path, schema, tiny_prov(), shard_rows=shard_rows)
    keys = make_keys("train", n)
    bank.reserve_split("train", keys)
    data = rows_for(schema, keys)
    bank.write_rows("train", 0, {f: a[:10] for f, a in data.items()}, keys=keys[:10])
    bank.write_rows("train", 10, {f: a[10:] for f, a in data.items()})
    bank.close()
    return schema, keys, data


def as_vlen_keys(path: str, version: int = 4) -> list[str]:
    """Rewrite the keys of the fresh local Zarr store ``path`` as schema_version 3 and 4 stored them: zarr-python's
    variable-length ``string`` type (codecs vlen-utf8, zstd-3, crc32c), same chunks; ``version`` 4 keeps the key
    index files, 3 drops them. Returns the keys, row by row ("" where none)."""
    root = Path(path)
    g = zarr.open_group(path, mode="r")
    old = g["keys"]
    keys = [bytes(r).rstrip(b"\0").decode() for r in old[:]]
    chunks, n = old.chunks[0], old.shape[0]
    aside = root.parent / f"{root.name}.index-aside"
    if (root / "keys" / "index").exists():
        shutil.move(str(root / "keys" / "index"), aside)
    shutil.rmtree(root / "keys")
    arr = zarr.open_group(path, mode="r+").create_array(
        "keys", shape=(n,), chunks=(chunks,), dtype=str, fill_value="",
        compressors=[zc.ZstdCodec(level=3), zc.Crc32cCodec()], dimension_names=["row"])
    if n:
        arr[:] = np.asarray(keys, dtype=str)
    if aside.exists():
        if version >= 4:
            shutil.move(str(aside), root / "keys" / "index")
        else:
            shutil.rmtree(aside)
    meta = json.loads((root / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = version
    (root / "zarr.json").write_text(json.dumps(meta))
    return keys
