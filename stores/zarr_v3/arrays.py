"""The arrays of a Zarr memorybank (`stores.zarr_v3.store.ZarrMemoryBank`): their codecs (chosen by
measurement, docs/STORE.md), creating them empty, checking their metadata against the root attributes, and
describing them (``python -m stores info``)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs as zc

from stores.index import KeyIndex
from stores.index_file import index_dir
from stores.layout import COMPLETE_UNSET, keys_chunk_rows
from stores.schema import BEV_FEAT, DEPTH, DEPTH_FILL, DEPTH_DTYPE, DIM_NAMES, LIGHT_ARRAY, LIGHT_DIM_NAMES, StoreSchema
from stores.validate import ArrayInfo, check_store, zarr_array_info
from stores.zarr_v3.checks import ARRAY_NAMES, field_path
from stores.zarr_v3.key_array import create_keys_array
from stores.zarr_v3.identity import TAGS_DIR


def light_compressor(dtype: str) -> zc.BloscCodec | zc.ZstdCodec:
    """Codec of the packed light array, chosen by measurement (docs/STORE.md): float32 -> blosc lz4-9 + byte
    shuffle (1.07x, ~7x faster to decode than zstd, ~12x faster to encode than lz4hc-5, which compresses 3 %
    more: stores written before keep lz4hc, readers take either); float16 -> zstd-3 (lz4 gains nothing on
    float16, and the float16 bytes goal needs the entropy coder)."""
    if np.dtype(dtype).itemsize >= 4:
        return zc.BloscCodec(cname="lz4", clevel=9, shuffle="shuffle", typesize=np.dtype(dtype).itemsize)
    return zc.ZstdCodec(level=3)


def bev_feat_compressor(dtype: str) -> zc.BloscCodec:
    """bev_feat: blosc lz4 + byte shuffle, cheap to decode for the read-heavy dense KD term."""
    return zc.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=np.dtype(dtype).itemsize)


def create_arrays(path: str, schema: StoreSchema, attrs: dict[str, Any]) -> zarr.Group:
    """The empty arrays of a new store at ``path`` (which must not exist) for ``schema``; ``attrs``: its root
    attributes (``shard_rows``, ``bev_feat_shard_rows``). Returns the group (its attributes not yet written)."""
    S = int(attrs["shard_rows"])
    crc = zc.Crc32cCodec()
    g = zarr.open_group(path, mode="w-", zarr_format=3)
    # keys are written only by reserve_split/remove_split (one process): big chunks, few files; key bytes in a
    # core data type (stores.zarr_v3.key_array), so every Zarr v3 implementation opens every array
    create_keys_array(g, keys_chunk_rows(S))
    g.create_array("complete", shape=(0,), chunks=(S,), dtype="uint8", fill_value=COMPLETE_UNSET,
                   compressors=[zc.ZstdCodec(level=3), crc], dimension_names=["row"])
    shp = schema.row_shape(LIGHT_ARRAY)
    g.create_array(LIGHT_ARRAY, shape=(0, *shp), chunks=(1, *shp), shards=(S, *shp), dtype=schema.dtype,
                   fill_value=float("nan"), compressors=[light_compressor(schema.dtype), crc],
                   dimension_names=list(LIGHT_DIM_NAMES))
    if schema.store_bev_feat:
        B = int(attrs["bev_feat_shard_rows"])
        shp = schema.row_shape(BEV_FEAT)
        sub = g.create_group(BEV_FEAT, attributes={"pool": schema.bev_feat_pool, "shard_rows": B})
        kw = {"shards": (B, *shp)} if B > 1 else {}
        sub.create_array(BEV_FEAT, shape=(0, *shp), chunks=(1, *shp), dtype=schema.dtype,
                         fill_value=float("nan"), compressors=[bev_feat_compressor(schema.dtype), crc],
                         dimension_names=list(DIM_NAMES[BEV_FEAT]), **kw)
    if schema.store_depth:         # uint8 bins, shards of S rows like light; fill DEPTH_FILL is never a stored byte
        shp = schema.row_shape(DEPTH)
        sub = g.create_group(DEPTH, attributes={"grid": schema.depth_grid, "shape": list(schema.depth_shape or ())})
        sub.create_array(DEPTH, shape=(0, *shp), chunks=(1, *shp), shards=(S, *shp), dtype=DEPTH_DTYPE,
                         fill_value=DEPTH_FILL, compressors=[zc.ZstdCodec(level=3), crc],
                         dimension_names=list(DIM_NAMES[DEPTH]))
    return g


def array_problems(attrs: dict[str, Any], meta_of: Callable[[str], dict[str, Any] | None], legacy: bool) -> list[str]:
    """What contradicts the root attributes ``attrs`` in the arrays' metadata (``meta_of(array path)``, None when
    absent; `stores.validate.check_store`)."""
    infos: dict[str, ArrayInfo | None] = {}
    bad = []
    for name in ARRAY_NAMES:
        if (name == BEV_FEAT and not attrs.get("store_bev_feat")) or (name == DEPTH and not attrs.get("store_depth")):
            continue
        m = meta_of(field_path(name))
        try:
            infos[name] = zarr_array_info(m) if m is not None else None
        except ValueError as e:
            bad.append(f"array {name!r}: {e}")
    problems, _ = check_store(attrs, infos, "zarr", legacy=legacy)
    return bad + problems


def dask_view(arr: zarr.Array, channels: tuple[int, int] | None = None) -> Any:
    """A dask array over ``arr``, one dask chunk per shard (or chunk), nothing loaded; ``channels`` = ``(first,
    end)``: that slice of the last axis (a light field of the packed ``light`` array)."""
    import dask.array as da      # lazy: dask is only needed for this out-of-core view
    d = da.from_zarr(arr, chunks=(arr.shards or arr.chunks))
    return d if channels is None else d[..., channels[0]:channels[1]]


def describe_arrays(path: str, arrays: Sequence[tuple[str, zarr.Array]], light_channels: dict[str, tuple[int, int]],
                    index: KeyIndex | None) -> list[dict[str, Any]]:
    """`ZarrMemoryBank.describe` of the store at ``path``: its ``(name, array)`` pairs, the light channel map,
    and its on-disk key index (None: kept in memory)."""
    out = []
    idx_dir, tag_dir = index_dir(path), Path(path).joinpath(*TAGS_DIR)
    for name, a in arrays:
        root = Path(path) / field_path(name)
        stored = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != "zarr.json"
                     and idx_dir not in p.parents and tag_dir not in p.parents)
        raw = int(np.prod(a.shape)) * (a.dtype.itemsize if a.dtype.kind in "fiub" else 0)
        d = {"name": field_path(name), "shape": tuple(a.shape), "dtype": str(a.dtype),
             "chunks": tuple(a.chunks), "shards": tuple(a.shards) if a.shards else None,
             "codecs": [type(a.serializer).__name__] + [type(c).__name__ for c in a.compressors],
             "stored_bytes": stored, "raw_bytes": raw}
        if name == LIGHT_ARRAY:
            d["fields"] = {f: tuple(v) for f, v in light_channels.items()}
        out.append(d)
    tags = [p for p in tag_dir.iterdir() if p.is_file() and p.name.isdigit()] if tag_dir.is_dir() else []
    if tags:                      # the rows' identity tags (stores.zarr_v3.identity)
        nb = tags[0].stat().st_size - 4
        out.append({"name": "/".join(TAGS_DIR), "shape": (len(tags) * nb // 8,), "dtype": "uint64", "chunks": None,
                    "shards": None, "codecs": ["identity tags", "crc32c"], "raw_bytes": len(tags) * nb,
                    "stored_bytes": sum(p.stat().st_size for p in tags)})
    if index is not None:
        files = [p for p in idx_dir.iterdir() if p.is_file()] if idx_dir.is_dir() else []
        width = max((s.width for s in index.splits.values()), default=1)
        count = sum(s.count for s in index.splits.values())
        out.append({"name": "keys/index", "shape": (count,), "dtype": f"|S{width}", "chunks": None,
                    "shards": None, "codecs": ["sorted", "crc32c/block"],
                    "stored_bytes": sum(p.stat().st_size for p in files), "raw_bytes": count * (width + 4)})
    return out
