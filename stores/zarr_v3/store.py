"""Zarr v3 back end of the abstract `stores.abc.MemoryBank` (`ZarrMemoryBank`): zarr-python creates and inspects
and writes keys and flags; `stores.zarr_v3.shard_codec.ShardCodec` writes data shards (in bulk, zarr-python's
bytes); `RowChunkReader` reads rows.

Layout of ``<path>/`` (a Zarr v3 group: ``keys``, ``complete``, the packed ``light`` array, ``bev_feat/bev_feat``
when stored; created by `stores.zarr_v3.arrays`): docs/STORE.md.

Every chunk of every array ends with a crc32c checksum (codec ``crc32c`` last in the chain; the shard
indexes have one too). S = ``shard_rows`` is the writers' alignment unit. Rows are read by
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

from stores.abc import MemoryBank
from stores.abc.inspection import Inspection
from stores.errors import StoreCorruptError, UnsupportedLayout
from stores.fsio import fsync_files, read_json, regular_size, remove_path
from stores.index_file import index_path
from stores.layout import COMPLETE_UNSET
from stores.schema import GROUP_FIELDS, LIGHT_ARRAY, LIGHT_FIELDS, StoreSchema
from stores.zarr_v3.arrays import array_problems, create_arrays, dask_view, describe_arrays
from stores.zarr_v3.checks import (ARRAY_NAMES, abandoned_dir, chunk_failure, discard_dir, field_path, missing_data,
                                   small_chunk_error)
from stores.zarr_v3.flat_chunks import FlatChunkReader
from stores.zarr_v3.identity import ZarrIdentity
from stores.zarr_v3.key_array import BYTES, decode_keys, keys_encoding, write_key_rows
from stores.zarr_v3.leftover_files import ZarrLeftovers
from stores.zarr_v3.row_reader import RowChunkReader
from stores.zarr_v3.shard_codec import ShardCodec, encode_threads, write_file
from stores.zarr_v3.upkeep import drop_files, intact_rows, zarr_errors

class ZarrMemoryBank(ZarrLeftovers, ZarrIdentity, MemoryBank):
    """`MemoryBank` over a Zarr v3 directory store (identity, generation, lock: `ZarrIdentity`)."""

    backend = "zarr"
    index_files = True
    bulk_writes = True     # write_rows encodes whole shards itself (stores.zarr_v3.shard_codec); False: through zarr-python
    recheck_chunks = True  # incomplete_ranges checks the crc32c of complete rows' chunks (stores.zarr_v3.upkeep)
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
        d["_group"], d["_arrays"], d["_readers"], d["_tagc"], d["_keys_cache"] = None, {}, {}, None, None
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
        problems = array_problems(attrs, self._meta, self._legacy)
        if problems:
            raise StoreCorruptError(f"memorybank {self.path}: its attributes and arrays disagree: "
                                    + "; ".join(problems) + f". Run `python -m stores verify {self.path}`; "
                                    "restore the store or re-export it", path=self.path)
        for name in (n for n in GROUP_FIELDS if attrs.get(f"store_{n}")):
            self._json(f"{name}/zarr.json")
        return attrs

    def _create_new(self, schema: StoreSchema) -> None:
        self._attrs["light_channels"] = {f: list(v) for f, v in schema.light_channels().items()}
        self._group = create_arrays(self.path, schema, self._attrs)

    def _arrays_on_disk(self) -> list[str]:
        return [LIGHT_ARRAY] + [f for f in self.schema.fields if f in GROUP_FIELDS]

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

    def _key_width(self) -> int:
        """Bytes per key row (schema_version 5: key bytes uint8 (N, W)); 0 for vlen string keys (3, 4)."""
        m = self._metas.get("keys") or self._meta("keys")
        return int(m["shape"][1]) if keys_encoding(m) == BYTES else 0     # type: ignore[index]

    def _read_keys(self, a: int, b: int) -> np.ndarray:
        return self._zread("keys", a, b).astype(object) if b > a else np.zeros(0, object)

    def _write_keys(self, a: int, keys: np.ndarray) -> None:
        self._drop_bad_chunks("keys", a, a + len(keys))
        self._check_files(["keys"], a, a + len(keys))
        if self._key_width():       # key bytes: chunks encoded here, zarr-python's bytes (stores.zarr_v3.key_array)
            write_key_rows(Path(self.path, "keys"), self._metas["keys"], a, keys, self.fsync,
                           self._flat_reader("keys").chunk)
        else:
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
        for name in (n for n in GROUP_FIELDS if n in arrays):
            self._write_array(name, a, arrays[name])
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
            with self._zarr_rows(name, a, a + len(data)):
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

    def _zarr_rows(self, name: str, a: int, b: int) -> Any:
        """Context of a zarr-python read/write of rows ``[a, b)`` of ``name``: its errors name files and keys."""
        return zarr_errors(self.path, field_path(name), self._files_of(name, a, b),
                           lambda: self._keys_of(range(a, min(b, a + 8))))

    def _clear_rows(self, a: int, b: int) -> None:
        self._check_files(["keys", *self._arrays_on_disk()], a, b)
        self._write_flags(a, b, COMPLETE_UNSET)
        for name in self._arrays_on_disk():       # files of rows no split uses: deleted, never read
            for lo, hi in drop_files(self._reader(name), a, b, self.splits.values()):
                with self._zarr_rows(name, lo, hi):
                    self._arr(name)[lo:hi] = self._arr(name).fill_value   # all-fill chunks/shards are deleted
        self._drop_bad_chunks("keys", a, b)
        self._arr("keys")[a:b] = 0 if self._key_width() else ""
        self._readers.clear()

    def refresh(self) -> None:
        """Reload the key index and drop mapped shard files (writers replace them by rename)."""
        self._readers = {}
        super().refresh()

    def dask_array(self, name: str) -> Any:
        """Dask array (N, T, ...) of field ``name`` (light fields: a channel slice of ``light``) or of an
        on-disk array name; one dask chunk per shard, nothing loaded. Reads go through zarr-python (which
        checks the chunks' checksums; rows never written read as NaN)."""
        return dask_view(self._arr(name), self.schema.light_channels().get(name))

    # ------------------------------------------------------------------ checked reads, durability, integrity
    @classmethod
    def abandoned(cls, path: str) -> bool:
        """True when the directory ``path`` holds only the start of a creation killed in place (no data)."""
        return abandoned_dir(path)
    @staticmethod
    def _discard(path: str) -> None:
        discard_dir(path)
    def _zread(self, name: str, a: int, b: int) -> np.ndarray:
        """``name[a:b]`` after checking its chunk files are regular (``complete``: read directly, chunk by
        chunk; ``keys``: through zarr-python). A chunk that fails its checksum or decode raises
        StoreCorruptError naming it (read-only handle), or is read as its fill value and recorded in
        ``_read_damage`` / ``_bad_chunks`` (writable handle, verify)."""
        C = self._chunk_rows(name)
        flat = self._flat_reader(name)
        if flat is None:
            arr = self._arr(name)
            for c in range(a // C, -(-b // C)):
                regular_size(self._chunk_path(name, c), self.path, name)
            try:
                return np.asarray(arr[a:b])
            except Exception:  # noqa: BLE001 - narrowed down to each chunk below
                pass
        out = np.full(b - a, COMPLETE_UNSET, np.uint8) if name == "complete" else np.full(b - a, "", object)
        for c in range(a // C, -(-b // C)):
            lo, hi = max(a, c * C), min(b, (c + 1) * C)
            try:
                if flat is None:
                    out[lo - a:hi - a] = np.asarray(self._arr(name)[lo:hi])
                elif (got := flat.chunk(c)) is not None:      # key bytes decoded chunk by chunk (bounded memory)
                    got = got[lo - c * C:hi - c * C]
                    out[lo - a:hi - a] = decode_keys(got) if got.ndim == 2 else got
            except StoreCorruptError:
                raise                          # not a regular file: never tolerated
            except Exception as e:  # noqa: BLE001 - any decode/IO error of a chunk is corruption
                msg = f"array {name!r}, chunk {name}/c/{c} (rows [{c * C}, {(c + 1) * C})) does not decode: " \
                      f"{chunk_failure(e)}"
                if self.mode == "r+" or self._lenient:
                    self._bad_chunks.add((name, c))
                    self._read_damage += [] if msg in self._read_damage else [msg]
                    continue
                keys = self._keys_of(range(lo, hi)) if name != "keys" else []
                raise small_chunk_error(self.path, name, c, msg, keys) from None
        return out

    def _flat_reader(self, name: str) -> FlatChunkReader | None:
        """The direct chunk reader of ``complete`` and of key bytes (None for vlen ``keys``: zarr-python reads them)."""
        if name != "complete" and (name != "keys" or not self._key_width()):
            return None
        if name not in self._flat:
            self._flat[name] = FlatChunkReader(Path(self.path) / name, self._metas.get(name) or self._meta(name),
                                               store=self.path, name=name)
        return self._flat[name]

    def _keys_present(self, a: int, b: int) -> np.ndarray:
        """(b - a,) bool: rows whose ``keys`` chunk file exists (stat only; a special file raises)."""
        C = self._chunk_rows("keys")
        out = np.zeros(max(0, b - a), bool)
        for c in range(a // C, -(-b // C)):
            if self._file_size(self._chunk_path("keys", c), "keys") is not None:
                out[max(a, c * C) - a:min(b, (c + 1) * C) - a] = True
        return out

    def _chunk_rows(self, name: str) -> int:
        """Rows per chunk of the unsharded array ``name`` (keys, complete)."""
        return int(self._arr(name).chunks[0])

    def _file_size(self, path: str | os.PathLike, name: str) -> int | None:
        """Size of the store file ``path`` of array ``name``, None when absent; StoreCorruptError when it is
        not a regular file (`stores.fsio.regular_size`)."""
        return regular_size(path, self.path, name)

    def _chunk_path(self, name: str, c: int) -> Path:
        """The file of chunk ``c`` of the unsharded array ``name`` (``c/<c>``; key bytes (N, W): ``c/<c>/0``)."""
        return Path(self.path, field_path(name), "c", str(c), *(["0"] if name == "keys" and self._key_width() else []))

    def _drop_bad_chunks(self, name: str, a: int, b: int) -> None:
        """Delete the damaged chunks of ``name`` that a write of rows ``[a, b)`` touches (already lost)."""
        if not self._bad_chunks:
            return
        C = int(self._arr(name).chunks[0])
        for c in range(a // C, -(-b // C)):
            if (name, c) in self._bad_chunks:
                remove_path(self._chunk_path(name, c))
                self._bad_chunks.discard((name, c))

    def _files_of(self, name: str, a: int, b: int) -> list[Path]:
        arr = self._arr(name)
        rows = int((arr.shards or arr.chunks)[0])
        tail = ["0"] * (len(arr.shape) - 1)
        root = Path(self.path) / field_path(name) / "c"
        return [root.joinpath(str(i), *tail) for i in range(a // rows, -(-b // rows))] if b > a else []

    def _check_files(self, names: Sequence[str], a: int, b: int) -> None:
        """StoreCorruptError when a file holding rows ``[a, b)`` of ``names`` is not a regular file."""
        for name in names:
            for p in self._files_of(name, a, b):
                regular_size(p, self.path, name)

    def _sync_rows(self, names: Sequence[str], a: int, b: int) -> None:
        files = [p for n in names for p in self._files_of(n, a, b)]
        fsync_files(files, self.path, synced=self._synced, durable=self._durable)
        self._synced.clear()

    def _sync_meta(self) -> None:
        root = Path(self.path)
        metas = [root / "zarr.json"] + [root / field_path(n) / "zarr.json" for n in
                                        ["keys", "complete", *self._arrays_on_disk()]]
        fsync_files(metas, self.path)

    def _rows_with_data(self, a: int, b: int) -> np.ndarray:
        ok = self._tags_present(a, b)            # a row without its identity tag is redone too
        for name in self._arrays_on_disk():
            r = self._reader(name)
            if r is not None:
                ok &= intact_rows(r, a, b, self._keys_of) if self.recheck_chunks else r.present(a, b)
        return ok

    def _missing_data(self, complete: np.ndarray) -> list[str]:
        """Data files (shards) that the rows flagged in ``complete`` need and that are absent (non-regular
        files raise): one stat per shard holding a complete row."""
        if self._legacy or not len(complete):     # older versions dropped all-zero chunks: absence is not loss
            return []
        readers = [(n, r) for n in self._arrays_on_disk() if (r := self._reader(n)) is not None]
        return missing_data(readers, complete, self._file_size, self._keys_of) + self._missing_tags(complete)
    def _flags_extent(self) -> int:
        """Rows covered by the ``complete`` chunk files present (a bound for scans of an edited shape)."""
        try:
            ids = [int(e.name) for e in os.scandir(Path(self.path) / "complete" / "c") if e.name.isdigit()]
        except FileNotFoundError:
            return 0
        return (max(ids) + 1) * int(self._arr("complete").chunks[0]) if ids else 0

    # ------------------------------------------------------------------ hot path
    def _reader(self, name: str) -> RowChunkReader | None:
        path = field_path(name)
        if path not in self._readers:
            meta = self._metas.get(path) or self._meta(path)
            try:
                self._readers[path] = self._bind_tags(self._row_reader(path, meta), path)
            except UnsupportedLayout:
                self._readers[path] = None
        return self._readers[path]

    def _row_reader(self, path: str, meta: dict[str, Any] | None) -> RowChunkReader:
        """The row reader of array ``path`` (UnsupportedLayout: read through zarr-python instead)."""
        return RowChunkReader(Path(self.path) / path, store=self.path, name=path, strict=not self._legacy,
                              keys_of=self._keys_of, meta=meta, fields=LIGHT_FIELDS if path == LIGHT_ARRAY else ())

    def _read_array_rows(self, name: str, rows: np.ndarray, salts: np.ndarray | None = None) -> np.ndarray:
        r = self._reader(name)
        if r is None:        # a layout RowChunkReader does not handle (older stores): zarr-python (correct, slower)
            uniq, inv = np.unique(rows, return_inverse=True)
            with self._zarr_rows(name, int(uniq[0]), int(uniq[-1]) + 1):
                return np.asarray(self._arr(name).get_orthogonal_selection((uniq,)))[inv]
        return r.read(rows, self._array_salts(salts, field_path(name)))

    def _read_rows(self, fields: Sequence[str], rows: np.ndarray, views: bool = False,
                   salts: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``{field: (len(rows), T, ...)}`` in the order of ``rows``; the packed light row is read and
        checked ONCE for all light fields. They come back as channel views of the packed block when
        ``views`` or when all three are asked for (no copy), else as copies (a small field must not keep
        the whole packed block alive)."""
        out: dict[str, np.ndarray] = {}
        light = [f for f in fields if f in LIGHT_FIELDS]
        if light:
            packed = self._read_array_rows(LIGHT_ARRAY, rows, salts)
            ch = self._channels()
            keep = views or len(set(light)) == len(LIGHT_FIELDS)
            for f in light:
                v = packed[..., ch[f][0]:ch[f][1]]
                out[f] = v if keep else np.ascontiguousarray(v)
        out.update({n: self._read_array_rows(n, rows, salts) for n in GROUP_FIELDS if n in fields})
        return {f: out[f] for f in fields}

    def inspect(self) -> Inspection:
        """`MemoryBank.inspect` plus the Zarr readers: chunk rows, flat chunks, arrays present, row readers."""
        return replace(super().inspect(), chunk_rows=self._chunk_rows, flat_reader=self._flat_reader,
                       arrays_on_disk=self._arrays_on_disk, row_reader=self._reader, files_of_rows=self._files_of_rows)

    def describe(self) -> list[dict[str, Any]]:
        """Per array: name, shape, dtype, chunks, shards, codecs, stored bytes (files on disk), raw bytes,
        and for ``light`` the channel slice of each field."""
        arrays = [(name, self._arr(name)) for name in ["keys", "complete", *self._arrays_on_disk()]]
        return describe_arrays(self.path, arrays, self.schema.light_channels(),
                               self._index if self.disk_index else None)

    def close(self) -> None:
        self._readers.clear()
        self._arrays.clear()
        self._group = None
