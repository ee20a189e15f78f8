"""Zarr v3 back end of the abstract `stores.abc.MemoryBank`: zarr-python creates and inspects and writes keys and
flags; `stores.zarr_v3.shard_codec.ShardCodec` writes data shards (in bulk, zarr-python's bytes); `RowChunkReader` reads rows.

Layout of ``<path>/`` (a Zarr v3 group; attributes = schema, provenance, splits, times, shard_rows,
``light_channels``), schema_version 3::

    keys        (N,)            string (vlen-utf8), chunks (max(S, 65536),)   "" for unreserved rows
    complete    (N,)            uint8, chunks (S,), fill 255: 0 reserved, 1 complete, 255 no chunk (lost / unused)
    light       (N, T, A+D+H)   float32|float16: actions | bev_vec | gru_out packed on the channel axis,
                                shards (S, T, A+D+H) of inner chunks (1, T, A+D+H), fill NaN
    bev_feat/bev_feat (N, T, C, H, W)  shards (B, T, C, H, W), inner chunk = one sample (only if stored)

Every chunk of every array ends with a crc32c checksum (codec ``crc32c`` last in the chain; the shard
indexes have one too). S = ``shard_rows`` (the writers' alignment unit); B divides S. Rows are read by
`stores.zarr_v3.row_reader.RowChunkReader` (mmap, checksum, one decode per row; no threads, so fork safe).
Opening validates the attributes against the arrays' metadata (`stores.validate`) and checks that every file
it will read is a regular file; a read-only handle also refuses a store whose keys / completion chunks or
data shards for complete rows are missing (`stores.abc.MemoryBank.refresh`).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.codecs as zc

from stores.abc import MemoryBank
from stores.abc.inspection import Inspection
from stores.errors import StoreCorruptError, UnsupportedLayout
from stores.fsio import read_json
from stores.index_file import index_dir, index_path
from stores.layout import COMPLETE_UNSET, keys_chunk_rows
from stores.zarr_v3.flat_chunks import FlatChunkReader
from stores.zarr_v3.row_reader import RowChunkReader
from stores.zarr_v3.shard_codec import ShardCodec, encode_threads, write_file
from stores.zarr_v3.checks import ARRAY_NAMES, ZarrIntegrity, field_path
from stores.schema import BEV_FEAT, DIM_NAMES, LIGHT_ARRAY, LIGHT_DIM_NAMES, LIGHT_FIELDS, StoreSchema
from stores.validate import ArrayInfo, check_store, zarr_array_info



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


class ZarrMemoryBank(ZarrIntegrity, MemoryBank):
    """`MemoryBank` over a Zarr v3 directory store."""

    backend = "zarr"
    index_files = True
    bulk_writes = True     # write_rows encodes whole shards itself (stores.zarr_v3.shard_codec); False: through zarr-python
    write_threads: int | None = None     # threads compressing a shard (None: the CPUs available, at most 8)

    def __init__(self, path: str, mode: str, fsync: bool = True) -> None:
        super().__init__(path, mode, fsync)
        self._group: zarr.Group | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._readers: dict[str, RowChunkReader | None] = {}
        self._codecs: dict[str, ShardCodec | None] = {}
        self._flat: dict[str, FlatChunkReader] = {}
        self._metas: dict[str, dict[str, Any]] = {}
        self._bad_chunks: set[tuple[str, int]] = set()     # (array, chunk) of keys/complete found damaged
        self._synced: set[str] = set()       # shard files write_atomic fsync-ed since the last _sync_rows
        self._durable: dict[str, tuple[int, int, int]] = {}     # directories whose entry is on disk (fsync_files)

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_group"], d["_arrays"], d["_readers"] = None, {}, {}
        return d

    @staticmethod
    def exists(path: str) -> bool:
        return os.path.lexists(Path(path) / "zarr.json")

    def _index_path(self, split: str) -> Path:
        return index_path(self.path, split)

    # ------------------------------------------------------------------ zarr-python side
    def _g(self) -> zarr.Group:
        if self._group is None:
            self._group = zarr.open_group(self.path, mode="r" if self.mode == "r" else "r+", zarr_format=3)
        return self._group

    def _arr(self, name: str) -> zarr.Array:
        """The zarr array holding ``name`` (a field, ``light``, ``keys`` or ``complete``)."""
        path = field_path(name)
        a = self._arrays.get(path)
        if a is None:
            if path not in self._metas and path in (field_path(n) for n in ARRAY_NAMES):
                self._meta(path)          # checks zarr.json is a regular file before zarr reads it
            a = self._g()[path]
            self._arrays[path] = a
        return a

    def _json(self, rel: str) -> dict[str, Any] | None:
        """The JSON object at ``rel`` inside the store (a zarr.json), None when absent; StoreCorruptError when
        it is not a regular file or not a JSON object (`stores.fsio.read_json`)."""
        return read_json(Path(self.path) / rel, self.path)

    def _meta(self, path: str) -> dict[str, Any] | None:
        m = self._json(f"{path}/zarr.json")
        if m is not None:
            self._metas[path] = m
        return m

    def _open_existing(self) -> dict[str, Any]:
        root = self._json("zarr.json")
        if root is None:
            raise FileNotFoundError(f"no Zarr memorybank at {self.path} (missing zarr.json)")
        if root.get("node_type") != "group":
            raise self._not_a_bank(f"{self.path} is a Zarr {root.get('node_type')!r}, not a group")
        attrs = dict(root.get("attributes") or {})
        self._check_version(attrs)
        infos: dict[str, ArrayInfo | None] = {}
        bad = []
        for name in ARRAY_NAMES:
            if name == BEV_FEAT and not attrs.get("store_bev_feat"):
                continue
            path = field_path(name)
            m = self._meta(path)
            try:
                infos[name] = zarr_array_info(m) if m is not None else None
            except ValueError as e:
                bad.append(f"array {name!r}: {e}")
        problems, _ = check_store(attrs, infos, "zarr", legacy=self._legacy)
        if bad or problems:
            raise StoreCorruptError(f"memorybank {self.path}: its attributes and arrays disagree: "
                                    + "; ".join(bad + problems) + f". Run `python -m stores verify {self.path}`; "
                                    "restore the store or re-export it", path=self.path)
        if attrs.get("store_bev_feat"):
            self._json(f"{BEV_FEAT}/zarr.json")
        return attrs

    def _create_new(self, schema: StoreSchema) -> None:
        S = int(self._attrs["shard_rows"])
        crc = zc.Crc32cCodec()
        self._attrs["light_channels"] = {f: list(v) for f, v in schema.light_channels().items()}
        g = zarr.open_group(self.path, mode="w-", zarr_format=3)
        self._group = g
        # keys are written only by reserve_split/remove_split (one process): big chunks, few files
        g.create_array("keys", shape=(0,), chunks=(keys_chunk_rows(S),), dtype=str, fill_value="",
                       compressors=[zc.ZstdCodec(level=3), crc], dimension_names=["row"])
        g.create_array("complete", shape=(0,), chunks=(S,), dtype="uint8", fill_value=COMPLETE_UNSET,
                       compressors=[zc.ZstdCodec(level=3), crc], dimension_names=["row"])
        shp = schema.row_shape(LIGHT_ARRAY)
        g.create_array(LIGHT_ARRAY, shape=(0, *shp), chunks=(1, *shp), shards=(S, *shp), dtype=schema.dtype,
                       fill_value=float("nan"), compressors=[light_compressor(schema.dtype), crc],
                       dimension_names=list(LIGHT_DIM_NAMES))
        if schema.store_bev_feat:
            B = int(self._attrs["bev_feat_shard_rows"])
            shp = schema.row_shape(BEV_FEAT)
            sub = g.create_group(BEV_FEAT, attributes={"pool": schema.bev_feat_pool, "shard_rows": B})
            kw = {"shards": (B, *shp)} if B > 1 else {}
            sub.create_array(BEV_FEAT, shape=(0, *shp), chunks=(1, *shp), dtype=schema.dtype,
                             fill_value=float("nan"), compressors=[bev_feat_compressor(schema.dtype), crc],
                             dimension_names=list(DIM_NAMES[BEV_FEAT]), **kw)

    def _arrays_on_disk(self) -> list[str]:
        return [LIGHT_ARRAY] + ([BEV_FEAT] if self.schema.store_bev_feat else [])

    def _channels(self) -> dict[str, tuple[int, int, int]]:
        cache = self.__dict__.get("_channel_cache")
        if cache is None or cache[0] is not self._attrs:
            cache = self._channel_cache = (self._attrs, self._fixed().light_channels())
        return cache[1]

    def _data_arrays(self) -> list[str]:
        return self._arrays_on_disk()

    def _write_attrs(self, attrs: dict[str, Any]) -> None:
        self._g().attrs.put(attrs)

    def _n_rows(self) -> int:
        return int(self._arr("keys").shape[0])

    def _resize(self, n: int) -> None:
        for name in [*self._arrays_on_disk(), "complete", "keys"]:      # keys last: never longer than the others
            a = self._arr(name)
            if a.shape[0] != n:
                a.resize((n, *a.shape[1:]))
        self._readers.clear()

    def _read_keys(self, a: int, b: int) -> np.ndarray:
        return self._zread("keys", a, b).astype(object) if b > a else np.zeros(0, object)

    def _write_keys(self, a: int, keys: np.ndarray) -> None:
        self._drop_bad_chunks("keys", a, a + len(keys))
        self._check_files(["keys"], a, a + len(keys))
        self._arr("keys")[a:a + len(keys)] = np.asarray(keys, dtype=str)

    def _read_flags(self, a: int, b: int) -> np.ndarray:
        return self._zread("complete", a, b).astype(np.uint8) if b > a else np.zeros(0, np.uint8)

    def _write_flags(self, a: int, b: int, value: int) -> None:
        if b > a:
            self._drop_bad_chunks("complete", a, b)
            self._check_files(["complete"], a, b)
            self._arr("complete")[a:b] = np.uint8(value)

    def _write_fields(self, a: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Pack the light fields into one block (n, T, A+D+H) and write it with one zarr write. The shard
        files it rewrites must be regular files (zarr would read a FIFO there forever)."""
        n = len(next(iter(arrays.values())))
        self._check_files(self._arrays_on_disk(), a, a + n)
        light = [arrays[f] for f in LIGHT_FIELDS if f in arrays]
        if light:
            if len(light) != len(LIGHT_FIELDS):
                raise ValueError(f"{self.path}: the packed light array needs all of {LIGHT_FIELDS} in one write")
            self._write_array(LIGHT_ARRAY, a, np.concatenate(light, axis=-1))
        if BEV_FEAT in arrays:
            self._write_array(BEV_FEAT, a, arrays[BEV_FEAT])
        self._readers.clear()

    def _codec(self, path: str) -> ShardCodec | None:
        """The bulk shard encoder of array ``path`` (None: a layout it does not handle)."""
        if path not in self._codecs:
            try:
                self._codecs[path] = ShardCodec(self._metas.get(path) or self._meta(path) or {})
            except UnsupportedLayout:
                self._codecs[path] = None
        return self._codecs[path]

    def _write_array(self, name: str, a: int, data: np.ndarray) -> None:
        """Rows ``[a, a + len(data))`` of array ``name``: each shard they touch encoded in bulk and put in
        place by one crash-safe file write (`stores.zarr_v3.shard_codec`); rows of a shard outside the block keep their
        stored chunks (the old shard's index is checked first). Through zarr-python when ``bulk_writes`` is
        off or the layout is not one the encoder handles (same bytes either way)."""
        path = field_path(name)
        codec = self._codec(path) if self.bulk_writes else None
        reader = self._reader(name) if codec is not None else None
        if codec is None or reader is None:
            self._arr(name)[a:a + len(data)] = data
            return
        S, end, b = codec.rows_per_shard, int(self._arr(name).shape[0]), a + len(data)
        for i in range(a // S, -(-b // S)):
            lo, hi = max(a, i * S), min(b, (i + 1) * S)
            whole = lo == i * S and hi >= min((i + 1) * S, end)
            old = None if whole else reader.read_shard(i)
            shard = codec.shard(data[lo - a:hi - a], lo - i * S, old, threads=self.write_threads or encode_threads())
            write_file(reader.file_str(i), shard, self.fsync)
            if self.fsync:
                self._synced.add(reader.file_str(i))

    def _write_field(self, name: str, a: int, data: np.ndarray) -> None:
        if name in LIGHT_FIELDS:
            c0, c1 = self.schema.light_channels()[name]
            self._arr(LIGHT_ARRAY)[a:a + len(data), :, c0:c1] = data
        else:
            self._arr(name)[a:a + len(data)] = data
        self._readers.clear()

    def _clear_rows(self, a: int, b: int) -> None:
        self._check_files(["keys", *self._arrays_on_disk()], a, b)
        self._write_flags(a, b, COMPLETE_UNSET)
        for name in self._arrays_on_disk():
            self._arr(name)[a:b] = np.nan   # all-fill inner chunks/shards are deleted (write_empty_chunks=False)
        self._drop_bad_chunks("keys", a, b)
        self._arr("keys")[a:b] = ""
        self._readers.clear()

    def refresh(self) -> None:
        """Reload the key index and drop mapped shard files (writers replace them by rename)."""
        self._readers = {}
        super().refresh()

    def dask_array(self, name: str) -> Any:
        """Dask array (N, T, ...) of field ``name`` (light fields: a channel slice of ``light``) or of an
        on-disk array name; one dask chunk per shard, nothing loaded. Reads go through zarr-python (which
        checks the chunks' checksums; rows never written read as NaN)."""
        import dask.array as da      # lazy: dask is only needed for this out-of-core view
        arr = self._arr(name)
        d = da.from_zarr(arr, chunks=(arr.shards or arr.chunks))
        if name in LIGHT_FIELDS:
            c0, c1 = self.schema.light_channels()[name]
            d = d[..., c0:c1]
        return d

    # ------------------------------------------------------------------ hot path
    def _reader(self, name: str) -> RowChunkReader | None:
        path = field_path(name)
        if path not in self._readers:
            meta = self._metas.get(path) or self._meta(path)
            try:
                self._readers[path] = self._row_reader(path, meta)
            except UnsupportedLayout:
                self._readers[path] = None
        return self._readers[path]

    def _row_reader(self, path: str, meta: dict[str, Any] | None) -> RowChunkReader:
        """The row reader of array ``path`` (UnsupportedLayout: read through zarr-python instead)."""
        return RowChunkReader(Path(self.path) / path, store=self.path, name=path, strict=not self._legacy,
                              keys_of=self._keys_of, meta=meta, fields=LIGHT_FIELDS if path == LIGHT_ARRAY else ())

    def _read_array_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        r = self._reader(name)
        if r is None:        # a layout RowChunkReader does not handle: zarr-python (correct, slower)
            uniq, inv = np.unique(rows, return_inverse=True)
            return np.asarray(self._arr(name).get_orthogonal_selection((uniq,)))[inv]
        return r.read(rows)

    def _read_rows(self, fields: Sequence[str], rows: np.ndarray, views: bool = False) -> dict[str, np.ndarray]:
        """``{field: (len(rows), T, ...)}`` in the order of ``rows``; the packed light row is read and
        checked ONCE for all light fields. They come back as channel views of the packed block when
        ``views`` or when all three are asked for (no copy), else as copies (a small field must not keep
        the whole packed block alive)."""
        out: dict[str, np.ndarray] = {}
        light = [f for f in fields if f in LIGHT_FIELDS]
        if light:
            packed = self._read_array_rows(LIGHT_ARRAY, rows)
            ch = self._channels()
            keep = views or len(set(light)) == len(LIGHT_FIELDS)
            for f in light:
                v = packed[..., ch[f][0]:ch[f][1]]
                out[f] = v if keep else np.ascontiguousarray(v)
        if BEV_FEAT in fields:
            out[BEV_FEAT] = self._read_array_rows(BEV_FEAT, rows)
        return {f: out[f] for f in fields}

    def inspect(self) -> Inspection:
        """`MemoryBank.inspect` plus the Zarr readers: chunk rows, flat chunks, arrays present, row readers."""
        return replace(super().inspect(), chunk_rows=self._chunk_rows, flat_reader=self._flat_reader,
                       arrays_on_disk=self._arrays_on_disk, row_reader=self._reader)

    def describe(self) -> list[dict[str, Any]]:
        """Per array: name, shape, dtype, chunks, shards, codecs, stored bytes (files on disk), raw bytes,
        and for ``light`` the channel slice of each field."""
        out = []
        idx_dir = index_dir(self.path)
        for name in ["keys", "complete", *self._arrays_on_disk()]:
            a = self._arr(name)
            root = Path(self.path) / field_path(name)
            stored = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != "zarr.json"
                         and idx_dir not in p.parents)
            raw = int(np.prod(a.shape)) * (a.dtype.itemsize if a.dtype.kind in "fiub" else 0)
            d = {"name": field_path(name), "shape": tuple(a.shape), "dtype": str(a.dtype),
                 "chunks": tuple(a.chunks), "shards": tuple(a.shards) if a.shards else None,
                 "codecs": [type(a.serializer).__name__] + [type(c).__name__ for c in a.compressors],
                 "stored_bytes": stored, "raw_bytes": raw}
            if name == LIGHT_ARRAY:
                d["fields"] = {f: tuple(v) for f, v in self.schema.light_channels().items()}
            out.append(d)
        if self.disk_index and self._index is not None:
            files = [p for p in idx_dir.iterdir() if p.is_file()] if idx_dir.is_dir() else []
            width = max((s.width for s in self._index.splits.values()), default=1)
            count = sum(s.count for s in self._index.splits.values())
            out.append({"name": "keys/index", "shape": (count,), "dtype": f"|S{width}", "chunks": None,
                        "shards": None, "codecs": ["sorted", "crc32c/block"],
                        "stored_bytes": sum(p.stat().st_size for p in files), "raw_bytes": count * (width + 4)})
        return out

    def close(self) -> None:
        self._readers.clear()
        self._arrays.clear()
        self._group = None
