"""On-disk format of a retrieval index, inside a memorybank: ``<store>/retrieval/<name>/`` (`stores.retrieval`).

Every node is a Zarr v3 group or array, so zarr-python, xarray and ``python -m stores verify`` see a valid
hierarchy (zarr-python reads every array here too and checks its checksums)::

    retrieval/                     group
    retrieval/<name>/              group; its attributes are the manifest (below), sealed by their own crc32c
        part_00000/                group: one build or append
            vectors   (n, D) float16   unit-normalised rows, chunks (C, D)
            segment   (n,)   int32     index into `segments`: the key's "<split>/<segment>"
            start     (n,)   int64     the key's start frame           (key = f"{segments[segment]}:{start}")
            segments  (m, W) uint8     the part's "<split>/<segment>" strings, ASCII, NUL padded
        faiss_00000/  (bytes,) uint8   the faiss index (faiss.serialize_index), one chunk; approximate kinds only

Arrays are uncompressed, codecs ``bytes`` (little-endian) + ``crc32c``: a chunk file is the raw rows followed
by the crc32c of them, so a reader memory-maps it (`MappedArray`: pages shared by every process through the
page cache) and checks each chunk's crc32c the first time this process touches it. The manifest records
the crc32c of every array's and part's ``zarr.json``, and a crc32c of itself: every byte under
``<name>/`` is checked before it is used; a damaged byte raises `StoreCorruptError` naming the file.

Writes are crash safe: a build is written under a temporary sibling name, fsync-ed and renamed into place;
an append writes its part (and a new faiss node) the same way, then replaces the manifest atomically
(temporary file, fsync, rename), then deletes the old faiss node. A crash leaves the old index whole;
unreferenced nodes of a crashed append are deleted by the next append. One writer at a time.
"""
from __future__ import annotations

import json
import mmap
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import torch

from stores.keys import parse_key
from stores.errors import StoreCorruptError, StoreError
from stores.factory import open_memorybank
from stores.fsio import fsync_path, fsync_tree, open_regular, read_json, read_regular, remove_path, remove_stale_temps, temp_sibling, write_atomic
from stores.index import check_keys
from stores.retrieval.faiss_index import corrupt, faiss_blob, faiss_module, faiss_params, load_faiss  # noqa: F401 (re-exported)

FORMAT, VERSION = "e2r-retrieval", 1
ROOT = "retrieval"
CHUNK_BYTES = 16 * 2**20          # target bytes of a `vectors` chunk
BLOCK = 65536                     # rows normalised at a time (build)
_CODECS = {1: [{"name": "bytes"}, {"name": "crc32c"}],
           0: [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]}


def index_dir(store: str | os.PathLike, name: str) -> Path:
    return Path(store) / ROOT / name


def list_indexes(store: str | os.PathLike) -> list[str]:
    """Names of the retrieval indexes of a store (directories under ``retrieval/`` with a manifest)."""
    try:
        return sorted(e.name for e in os.scandir(Path(store) / ROOT)
                      if e.is_dir() and not e.name.startswith(".") and (Path(e.path) / "zarr.json").is_file())
    except FileNotFoundError:
        return []


def default_chunk_rows(dim: int) -> int:
    """Rows per chunk: a power of two, about `CHUNK_BYTES` of float16 vectors, at least 1024."""
    return max(1024, 1 << int(np.log2(max(1, CHUNK_BYTES // (2 * dim)))))


def write_bytes_atomic(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write ``path`` crash-safely (`stores.fsio.write_atomic`), then fsync its directory."""
    write_atomic(path, [data], fsync)
    if fsync:
        fsync_path(path.parent)


def group_json(attrs: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs or {}}, indent=1).encode()


def ensure_root(store: str | os.PathLike, fsync: bool = True) -> Path:
    """``<store>/retrieval/`` as a Zarr group (created when absent)."""
    root = Path(store) / ROOT
    root.mkdir(exist_ok=True)
    if not (root / "zarr.json").exists():
        write_bytes_atomic(root / "zarr.json", group_json({"format": FORMAT + "-root"}), fsync)
    return root


def write_array(adir: Path, data: np.ndarray, chunk_rows: int, dims: Sequence[str]) -> int:
    """Write ``data`` (n, ...), n > 0, as a Zarr v3 array in directory ``adir``: chunks of ``chunk_rows`` rows (the
    last one zero padded, as Zarr stores edge chunks), codecs bytes + crc32c. Returns the crc32c of its zarr.json."""
    data = np.ascontiguousarray(data, data.dtype.newbyteorder("<"))
    meta = {"zarr_format": 3, "node_type": "array", "shape": list(data.shape), "data_type": data.dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk_rows, *data.shape[1:]]}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": 0, "codecs": _CODECS[int(data.dtype.itemsize == 1)], "attributes": {},
            "dimension_names": list(dims), "storage_transformers": []}
    adir.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(meta, indent=1).encode()
    (adir / "zarr.json").write_bytes(raw)
    flat = data.reshape(len(data), -1).view(np.uint8)
    for c in range(-(-len(data) // chunk_rows)):
        body = flat[c * chunk_rows:(c + 1) * chunk_rows].tobytes()
        body += b"\0" * (chunk_rows * flat.shape[1] - len(body))
        path = adir.joinpath("c", str(c), *(["0"] * (data.ndim - 1)))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body + google_crc32c.value(body).to_bytes(4, "little"))
    return google_crc32c.value(raw)


def write_node(idir: Path, node: str, arrays: Sequence[tuple[str, np.ndarray, int, tuple[str, ...]]],
               fsync: bool = True) -> dict[str, int]:
    """Write node ``idir/node``: a group of ``arrays`` ``(name, data, chunk rows, dimension names)``, or one array
    when its name is "", under a temporary name; fsync it, rename it into place (an unreferenced leftover of a
    crashed append there is deleted first). Returns ``{zarr.json path relative to idir: crc32c}``."""
    final = idir / node
    remove_stale_temps(final)
    remove_path(final)
    tmp, crcs = Path(temp_sibling(final)), {}
    try:
        tmp.mkdir()
        if arrays[0][0]:
            (tmp / "zarr.json").write_bytes(group_json())
            crcs[f"{node}/zarr.json"] = google_crc32c.value(group_json())
        for name, data, rows, dims in arrays:
            crcs["/".join(filter(None, (node, name, "zarr.json")))] = write_array(tmp / name, data, rows, dims)
        if fsync:
            fsync_tree(tmp)
        os.rename(tmp, final)
    finally:
        remove_path(tmp)
    if fsync:
        fsync_path(idir)
    return crcs


def seal(attrs: dict[str, Any]) -> dict[str, Any]:
    """``attrs`` plus ``crc32c``: the crc32c of their canonical JSON."""
    body = {k: v for k, v in attrs.items() if k != "crc32c"}
    return {**body, "crc32c": google_crc32c.value(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())}


def write_manifest(idir: Path, attrs: dict[str, Any], fsync: bool = True) -> None:
    write_bytes_atomic(idir / "zarr.json", group_json(seal(attrs)), fsync)


def read_manifest(store: str, name: str) -> dict[str, Any]:
    """The checked manifest of index ``name``: FileNotFoundError when there is none, StoreCorruptError when it
    or a zarr.json it lists is damaged."""
    idir = index_dir(store, name)
    path = idir / "zarr.json"
    try:
        meta = read_json(path, store)
    except StoreCorruptError as e:
        raise corrupt(store, path, str(e)) from None
    if meta is None:
        have = list_indexes(store)
        raise FileNotFoundError(f"memorybank {store} has no retrieval index {name!r} ({path} is missing; indexes: "
                                f"{have or 'none'}); build one: python -m pipelines.retrieval_index build --store {store} --name "
                                f"{name} --vectors FILE.npy")
    attrs = meta.get("attributes")
    if meta.get("node_type") != "group" or not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
        raise corrupt(store, path, "not a retrieval index manifest")
    if seal(attrs)["crc32c"] != attrs.get("crc32c"):
        raise corrupt(store, path, "manifest crc32c checksum mismatch - file corrupted")
    if attrs.get("version") != VERSION:
        raise corrupt(store, path, f"format version {attrs.get('version')!r}, this code reads {VERSION}")
    if not isinstance(attrs.get("meta_crc32c"), dict) or not isinstance(attrs.get("parts"), list):
        raise corrupt(store, path, "manifest without its parts or zarr.json checksums")
    f = attrs.get("faiss")
    nodes = [p.get("name") for p in attrs["parts"] if isinstance(p, dict)] + ([f.get("node")] if f else [])
    if (len(nodes) != len(attrs["parts"]) + bool(f) or not all(re.fullmatch(r"(part|faiss)_\d{5}", str(n)) for n in nodes)
            or any(rel.split("/")[0] not in nodes or ".." in rel for rel in attrs["meta_crc32c"])):
        raise corrupt(store, path, f"the manifest names nodes that are not parts of an index: {nodes}")
    for rel, crc in attrs["meta_crc32c"].items():
        raw = read_regular(idir / rel, store, max_bytes=2**20)
        if raw is None:
            raise corrupt(store, idir / rel, "missing")
        if google_crc32c.value(raw) != crc:
            raise corrupt(store, idir / rel, "crc32c checksum mismatch (recorded in the manifest) - file corrupted")
    return attrs


class MappedArray:
    """A checked array of an index, read through memory maps. ``shape`` / ``dtype`` / ``chunk_rows`` come from
    the manifest (its zarr.json, crc-checked by `read_manifest`, is the one written with them).
    ``chunk(c)`` -> (chunk_rows, ...) view of chunk ``c`` (the last one zero padded), its crc32c checked the
    first time in this process. Pickles without its maps (a DataLoader worker maps the files itself)."""

    def __init__(self, adir: Path, store: str, shape: Sequence[int], dtype: str, chunk_rows: int) -> None:
        self.dir, self.store = adir, store
        self.shape, self.dtype, self.chunk_rows = tuple(int(s) for s in shape), np.dtype(dtype), int(chunk_rows)
        self.n_chunks = -(-self.shape[0] // self.chunk_rows)
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}

    def file(self, c: int) -> Path:
        return self.dir.joinpath("c", str(c), *(["0"] * (len(self.shape) - 1)))

    def chunk(self, c: int) -> np.ndarray:
        got = self._maps.get(c)
        if got is not None:
            return got
        path = self.file(c)
        nbytes = self.chunk_rows * int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        opened = open_regular(path, self.store)
        if opened is None:
            raise corrupt(self.store, path, "chunk file missing")
        fd, size = opened
        try:
            if size != nbytes + 4:
                raise corrupt(self.store, path, f"{size} bytes, expected {nbytes + 4} (truncated or damaged)")
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        if google_crc32c.value(np.frombuffer(mm, np.uint8, nbytes)) != int.from_bytes(mm[nbytes:], "little"):
            raise corrupt(self.store, path, "crc32c checksum mismatch - file corrupted")
        arr = np.frombuffer(mm, self.dtype.newbyteorder("<"), count=nbytes // self.dtype.itemsize)
        self._maps[c] = arr = arr.reshape(self.chunk_rows, *self.shape[1:])
        return arr

    def take(self, rows: np.ndarray, out: np.ndarray | None = None, scratch: np.ndarray | None = None) -> np.ndarray:
        """Rows ``rows`` (int64, any order) into ``out`` (allocated when None): read in ascending order, chunk by
        chunk, into ``scratch`` (like ``out``), then put in the asked order (two ``np.take``: about half the
        time of a fancy-indexed scatter for random rows)."""
        shape = (len(rows), *self.shape[1:])
        out = np.empty(shape, self.dtype) if out is None else out
        if not len(rows):
            return out
        c0 = int(rows[0]) // self.chunk_rows
        if (rows // self.chunk_rows == c0).all():           # one chunk: no sort
            np.take(self.chunk(c0), rows - c0 * self.chunk_rows, axis=0, out=out)
            return out
        order = np.argsort(rows)
        srt, tmp = rows[order], np.empty(shape, self.dtype) if scratch is None else scratch
        bounds = np.searchsorted(srt, np.arange(self.n_chunks + 1) * self.chunk_rows)
        for c in np.flatnonzero(np.diff(bounds)).tolist():
            a, b = bounds[c], bounds[c + 1]
            np.take(self.chunk(c), srt[a:b] - c * self.chunk_rows, axis=0, out=tmp[a:b])
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return np.take(tmp, inverse, axis=0, out=out)

    def read(self) -> np.ndarray:
        """All rows (a copy)."""
        return self.take(np.arange(self.shape[0]))

    def check_all(self) -> None:
        for c in range(self.n_chunks):
            self.chunk(c)

    def blob_path(self) -> Path:
        """The one chunk file of a byte array, its crc32c checked (reads the whole file once; not kept mapped)."""
        self.chunk(0)
        self._maps.pop(0)
        return self.file(0)


def add_part(idir: Path, attrs: dict[str, Any], rows: tuple[np.ndarray, np.ndarray, np.ndarray, list[str]],
             fsync: bool) -> None:
    """Write ``rows`` (`prepare_rows`) as the next part of the index in ``idir`` and list it in ``attrs``."""
    vec, seg, start, heads = rows
    name, C, width = f"part_{len(attrs['parts']):05d}", attrs["chunk_rows"], max(map(len, heads))
    table = np.array(heads, f"S{width}").view(np.uint8).reshape(len(heads), width)
    attrs["meta_crc32c"].update(write_node(idir, name, [("vectors", vec, C, ("row", "d")), ("segment", seg, C, ("row",)),
                                                        ("start", start, C, ("row",)),
                                                        ("segments", table, len(heads), ("segment", "char"))], fsync))
    attrs["parts"].append({"name": name, "rows": len(vec), "segments": len(heads), "width": width})


def add_faiss(idir: Path, attrs: dict[str, Any], blob: np.ndarray, params: dict[str, Any], fsync: bool) -> None:
    """Write the serialized faiss index ``blob`` (uint8) as node ``faiss_<last part>`` and record it in ``attrs``."""
    node = f"faiss_{len(attrs['parts']) - 1:05d}"
    attrs["meta_crc32c"].update(write_node(idir, node, [("", blob, len(blob), ("byte",))], fsync))
    attrs["faiss"] = {"node": node, "bytes": len(blob), **params, "faiss_version": faiss_module().__version__}


def part_arrays(idir: Path, store: str, part: dict[str, Any], dim: int, C: int) -> dict[str, MappedArray]:
    """The arrays of a part listed in the manifest (see the module docstring), not read yet."""
    d, n = idir / part["name"], int(part["rows"])
    return {"vectors": MappedArray(d / "vectors", store, (n, dim), "float16", C),
            "segment": MappedArray(d / "segment", store, (n,), "int32", C),
            "start": MappedArray(d / "start", store, (n,), "int64", C),
            "segments": MappedArray(d / "segments", store, (part["segments"], part["width"]), "uint8", part["segments"])}


def blob_array(idir: Path, store: str, node: str, nbytes: int) -> MappedArray:
    return MappedArray(idir / node, store, (nbytes,), "uint8", nbytes)


# ---------------------------------------------------------------------------------------------- rows in
def load_inputs(vectors: str, keys: str | None) -> tuple[np.ndarray, list[str] | None]:
    """(vectors (N, D) memory-mapped from the .npy file ``vectors``, keys from the text file ``keys`` (one per
    line) or None); ValueError / FileNotFoundError naming the file that cannot be read so."""
    try:
        v = np.load(vectors, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        kind = FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError
        raise kind(f"vectors file {vectors}: cannot read it as a .npy array ({e})") from None
    if not isinstance(v, np.ndarray):
        raise ValueError(f"vectors file {vectors}: a .npz archive; save the (N, D) matrix with numpy.save (.npy)")
    if keys is None:
        return v, None
    try:
        lines = Path(keys).read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"keys file {keys}: cannot read it as ASCII text, one key per line ({e})") from None
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise ValueError(f"keys file {keys}: line {blank[0]} is empty (one key per line, {len(blank)} empty lines)")
    return v, [line.strip() for line in lines]


def open_bank_keys(store: str) -> tuple[np.ndarray, Any]:
    """(complete keys in row order as bytes, schema) of the Zarr memorybank directory ``store``."""
    if not os.path.isdir(store):
        raise FileNotFoundError(f"{store} is not a directory: a retrieval index lives inside a Zarr memorybank "
                                "directory (an HDF5 store cannot hold one: convert it with python -m stores convert)")
    bank = open_memorybank(store, mode="r")
    return np.array(bank.keys(), "S"), bank.schema


def check_in_store(keys: Sequence[str], store_keys: np.ndarray, where: str, store: str) -> None:
    missing = np.flatnonzero(~np.isin(np.array(list(keys), "S"), store_keys))
    if len(missing):
        raise ValueError(f"{where}: {len(missing)} keys have no complete row in memorybank {store} (first: "
                         f"{[keys[i] for i in missing[:5]]}); index only keys the student can read teacher rows of")


def splits_per_segment(heads: Sequence[str]) -> int:
    """The most splits one segment name occurs in (over the distinct "<split>/<segment>" strings)."""
    names = [parse_key(f"{h}:0").segment for h in set(heads)]
    return max(np.unique(names, return_counts=True)[1].tolist() or [1])


def prepare_rows(vectors: torch.Tensor | np.ndarray, keys: Sequence[str], where: str
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Check and factor rows for a part: ``vectors`` (N, D) float (any float dtype, a memmap too) and their N
    unique valid ``keys``. Returns (vectors (N, D) float16 unit-normalised, segment (N,) int32, start (N,) int64,
    heads): key i = f"{heads[segment[i]]}:{start[i]}". ValueError / InvalidKeyError naming ``where`` and the row."""
    keys = check_keys(list(keys), where)
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().cpu().numpy()
    if getattr(vectors, "ndim", 0) != 2 or len(vectors) != len(keys) or not len(keys):
        raise ValueError(f"{where}: vectors of shape {getattr(vectors, 'shape', '?')} for {len(keys)} keys; expected "
                         "(N, D) with one row per key, N > 0")
    if np.dtype(vectors.dtype).kind not in "fiu":
        raise ValueError(f"{where}: vectors must be numbers, got dtype {vectors.dtype}")
    out = np.empty(vectors.shape, np.float16)
    for a in range(0, len(keys), BLOCK):
        x = np.asarray(vectors[a:a + BLOCK], np.float32)
        n = np.linalg.norm(x, axis=1)
        bad = np.flatnonzero(~np.isfinite(n) | (n == 0))
        if len(bad):
            raise ValueError(f"{where}: row {a + bad[0]} (key {keys[a + bad[0]]!r}) is zero or not finite: it has no "
                             f"direction ({len(bad)} such rows in rows [{a}, {a + len(x)}))")
        out[a:a + len(x)] = x / n[:, None]
    parsed = [parse_key(k) for k in keys]
    heads, inverse = np.unique(np.array([f"{p.split}/{p.segment}" for p in parsed]), return_inverse=True)
    start = np.fromiter((p.start for p in parsed), np.int64, len(parsed))
    return out, inverse.astype(np.int32), start, heads.tolist()
