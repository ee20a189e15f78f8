"""Row identity: a row a store serves is proven to be the row written for the key asked for, in the current
reservation of its split, at its place, in this store, for the teacher the store records - not only intact.

A crc32c proves a chunk's bytes, not where they belong: a shard file swapped with its neighbour, a shard of
``valid`` copied over one of ``train``, or the ``light/`` directory of another teacher's store all pass it. A
store with identity (root attribute ``identity``, written at creation: a random ``store_uid``, the
``teacher`` fingerprint and the data ``arrays``) keeps one 64-bit tag per row and data array, (N, F) uint64
(Zarr: one file per ``shard_rows`` rows, ``complete/tags/<c>``, little-endian + crc32c; HDF5: the dataset
``identity`` with fletcher32), written after the row's data and before its completion flag::

    salt(row, key, a) = (kd(key) + row * R + su(split of row) + base + A(a)) * M      (mod 2^64)
    tag[row, a]       = crc(row's chunk of array a) ^ salt(row, key, a)

``kd`` is a digest of the key's ASCII bytes (`key_digests`: the key strings, never the keys array's
encoding), ``su`` a digest of the split entry's random ``uid`` (a new one at every ``reserve_split``: the
split's generation), ``base`` a digest of the store uid and the teacher fingerprint (blake2b of
``teacher_sha256`` and ``model_config``), ``A(a)`` one of the array's path, ``R`` and ``M`` fixed odd
constants. ``crc`` is the crc32c the chunk already carries (Zarr: of its compressed bytes, the value of the
``crc32c`` codec; HDF5: of the decoded row). A reader recomputes the salt from the key it was asked for and
the row the index gave and accepts a chunk only when ``tag ^ salt`` equals the chunk's crc32c: the upper
32 bits must vanish and the lower ones match, so a chunk at another row, of another key, split reservation,
array, store or teacher, or a lost tag (0), is refused except with probability ~2^-64. The cost is one
``struct.unpack`` and an XOR per row plus ~10 vectorised operations per batch (docs/STORE.md).
"""
from __future__ import annotations

import hashlib
import json
import secrets
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import google_crc32c
import numpy as np

from stores.errors import StoreCorruptError
from stores.keys import MAX_KEY_LEN

IDENTITY = "identity"            # the root attribute; the HDF5 tag dataset (N, F) uint64 (Zarr: complete/tags/<c>)
IDENTITY_VERSION = 1
U64 = struct.Struct("<Q")        # one stored tag, little-endian
_MASK = 2**64 - 1


def _odd_constants(seed: int, n: int) -> np.ndarray:
    """``n`` odd 64-bit constants from splitmix64 of ``seed`` (fixed forever: tags on disk depend on them;
    a longer list starts with the shorter one)."""
    out, x = [], seed
    for _ in range(n):
        x = (x + 0x9E3779B97F4A7C15) & _MASK
        z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        out.append((z ^ (z >> 31)) | 1)
    return np.array(out, np.uint64)


_KEY_SEED = 0xE2D17E57
_KEY_MUL = _odd_constants(_KEY_SEED, -(-MAX_KEY_LEN // 8) + 1)
_WORDS = {w: (np.dtype(f"S{8 * w}"), np.ascontiguousarray(_KEY_MUL[:w])) for w in range(1, len(_KEY_MUL) + 1)}
_LE64 = np.dtype("<u8")
_ROW_MUL, _MIX = (np.uint64(c) for c in _odd_constants(0x0DDB10C5, 2))


def digest64(*parts: str) -> int:
    """A 64-bit digest (blake2b) of the strings ``parts``."""
    return int.from_bytes(hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest(), "little")


def key_bytes(keys: Sequence[str] | np.ndarray) -> np.ndarray:
    """Keys as a bytes array ``S<w>`` (ASCII; a key outside the grammar, e.g. a damaged one read by ``verify``,
    as its UTF-8 bytes: it then matches no tag)."""
    if isinstance(keys, np.ndarray) and keys.dtype.kind == "S":
        return keys
    keys = [str(k) for k in keys]
    try:
        return np.array(keys, dtype="S") if keys else np.zeros(0, "S1")
    except UnicodeEncodeError:
        return np.array([k.encode("utf-8", "surrogatepass") for k in keys], dtype="S")


def key_digests(keys: Sequence[str] | np.ndarray) -> np.ndarray:
    """(n,) uint64: each key's digest, the sum over its 8-byte little-endian words (NUL padded) of word_i * K_i
    (mod 2^64). Keys hold no NUL, so a key has the same digest whatever the width of the array it comes in.
    ``keys``: strings, or a bytes array ``S<w>`` (what the key index searched with: no conversion)."""
    q = key_bytes(keys)
    n = len(q)
    if not n:
        return np.zeros(0, np.uint64)
    w = -(-q.dtype.itemsize // 8)
    padded, mul = _WORDS[w] if w in _WORDS else (np.dtype(f"S{8 * w}"), _odd_constants(_KEY_SEED, w))
    return q.astype(padded).view(_LE64).reshape(n, w) @ mul      # integer matmul: wraps mod 2^64


def teacher_fingerprint(attrs: Mapping[str, Any]) -> str:
    """The teacher a store records (``teacher_sha256`` and ``model_config`` of its attributes), as 16 hex digits."""
    text = json.dumps({"teacher_sha256": attrs.get("teacher_sha256"), "model_config": attrs.get("model_config")},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def new_identity(attrs: Mapping[str, Any], arrays: Sequence[str]) -> dict[str, Any]:
    """The ``identity`` attribute of a new store with root attributes ``attrs`` and data ``arrays`` (the tag
    array's columns, in order)."""
    return {"version": IDENTITY_VERSION, "store_uid": secrets.token_hex(8), "teacher": teacher_fingerprint(attrs),
            "arrays": list(arrays)}


def new_split_uid() -> str:
    """A split reservation's random ``uid`` (its generation, recorded in its split entry)."""
    return secrets.token_hex(8)


def identity_problems(attrs: Mapping[str, Any], arrays: Sequence[str]) -> list[str]:
    """What is wrong with the ``identity`` attribute of ``attrs`` for a store of data ``arrays`` ([] when it
    has none: an older store, read with identity unchecked)."""
    ident = attrs.get("identity")
    if ident is None:
        return []
    if not isinstance(ident, dict) or not isinstance(ident.get("store_uid"), str) or \
            not isinstance(ident.get("arrays"), list):
        return [f"attribute identity={ident!r} is not {{version, store_uid, teacher, arrays}}"]
    if ident.get("version") != IDENTITY_VERSION:
        return [f"attribute identity has version {ident.get('version')!r}; this code reads {IDENTITY_VERSION} "
                "(a newer e2r-kd wrote it? upgrade)"]
    if list(ident["arrays"]) != list(arrays):
        return [f"attribute identity names the arrays {ident['arrays']}, the store holds {list(arrays)}"]
    if ident.get("teacher") != teacher_fingerprint(attrs):
        return ["the teacher recorded in the attributes (teacher_sha256, model_config) is not the one the rows were "
                f"written for (identity fingerprint {ident.get('teacher')!r}, attributes give "
                f"{teacher_fingerprint(attrs)!r}): the attributes were edited or belong to another store"]
    return []


class RowIdentity:
    """The salts of one store's rows, from its root attributes (module docstring). ``arrays``: the tag
    columns; `salts` per batch, `array_salts` / `tags` per array."""

    def __init__(self, attrs: Mapping[str, Any]) -> None:
        ident = attrs["identity"]
        self.arrays = [str(a) for a in ident["arrays"]]
        self.columns = {a: i for i, a in enumerate(self.arrays)}
        base = digest64("store", str(ident["store_uid"]), teacher_fingerprint(attrs))
        entries = sorted((int(v["start"]), name, str(v.get("uid", ""))) for name, v in attrs["splits"].items())
        self._starts = np.array([e[0] for e in entries], np.int64)
        self._split = np.array([digest64("split", name, uid) for _, name, uid in entries], np.uint64)
        if len(entries) == 1:             # one split: its su is a constant, added with the array's (one op less)
            base += int(self._split[0])
            self._split = np.zeros(0, np.uint64)
        self._array = {a: np.uint64((base + digest64("array", a)) % 2**64) for a in self.arrays}

    def salts(self, rows: np.ndarray, keys: Sequence[str] | np.ndarray) -> np.ndarray:
        """(n,) uint64: ``kd(key) + row * R + su(split)`` of each store row (int64 (n,)) read as the key at the
        same position of ``keys`` (strings, or the bytes array the index searched with): the part of the salt
        shared by the arrays (`array_salts`)."""
        rows = np.asarray(rows, np.int64)
        x = key_digests(keys)
        x += rows.view(np.uint64) * _ROW_MUL
        if len(self._split):
            x += self._split[np.maximum(np.searchsorted(self._starts, rows, "right") - 1, 0)]
        return x

    def _salt(self, salts: np.ndarray, array: str) -> np.ndarray:
        x = salts + self._array[array]
        x *= _MIX
        return x

    def array_salts(self, salts: np.ndarray, array: str) -> np.ndarray:
        """(n,) uint64: per row, what ``tag ^ crc`` must equal for array ``array``."""
        return self._salt(salts, array)

    def expected(self, salts: np.ndarray, array: str, tags: np.ndarray) -> np.ndarray:
        """(n,) uint64: the crc32c rows with stored ``tags`` must have in ``array`` (>= 2^32: none can)."""
        return np.asarray(tags, np.uint64) ^ self._salt(salts, array)

    def tags(self, salts: np.ndarray, array: str, crcs: np.ndarray) -> np.ndarray:
        """(n,) uint64 tags of rows whose chunks of ``array`` have the crc32c ``crcs`` ((n,) ints)."""
        return np.asarray(crcs).astype(np.uint64) ^ self._salt(salts, array)


# ---------------------------------------------------------------------------------------------- tag chunks
def encode_tags(values: np.ndarray) -> bytes | None:
    """The stored bytes of one whole tag chunk ``values`` (S, F) uint64: little-endian values + their crc32c
    (zarr v3 codecs ``bytes`` + ``crc32c``, zarr-python's bytes); None when all are 0 (the fill value: no
    chunk, as zarr-python writes it)."""
    if not np.asarray(values).any():
        return None
    raw = np.ascontiguousarray(values, dtype="<u8").tobytes()
    return raw + google_crc32c.value(raw).to_bytes(4, "little")


def tag_chunk_bytes(S: int, F: int) -> int:
    """The size of every stored tag chunk: (S, F) uint64 + its crc32c."""
    return 8 * S * F + 4


def check_tag_size(size: int, S: int, F: int) -> None:
    """ValueError when a tag chunk file of ``size`` bytes cannot be one (checked before it is read or mapped:
    a sparse 8 GiB file is refused by its size, never allocated)."""
    if size != tag_chunk_bytes(S, F):
        raise ValueError(f"{size} bytes, expected {tag_chunk_bytes(S, F)}")


def decode_tags(raw: Any, S: int, F: int) -> np.ndarray:
    """(S, F) uint64 of a stored tag chunk (bytes or a map); ValueError when its size or crc32c is wrong."""
    u8 = np.frombuffer(raw, np.uint8)
    check_tag_size(len(u8), S, F)
    if google_crc32c.value(u8[:-4]) != int.from_bytes(u8[-4:].tobytes(), "little"):
        raise ValueError("crc32c checksum mismatch (chunk corrupted)")
    return u8[:-4].view("<u8").reshape(S, F)


def merge_tags(old: Any | None, S: int, F: int, lo: int, values: np.ndarray) -> bytes | None:
    """The tag chunk ``old`` (stored bytes, None when absent) with rows ``[lo, lo + len(values))`` set to
    ``values`` (n, F). A damaged ``old`` counts as empty: its other rows lose their tags, so they read as
    unproven and a resumed export redoes them (`incomplete_ranges`)."""
    try:
        tags = np.zeros((S, F), np.uint64) if old is None else decode_tags(old, S, F).copy()
    except ValueError:
        tags = np.zeros((S, F), np.uint64)
    tags[lo:lo + len(values)] = values
    return encode_tags(tags)


class TagChunks:
    """The tag chunks as a reader sees them: chunk ``c`` (rows ``[c * S, (c + 1) * S)``) loaded by
    ``load(c)`` (its stored bytes or a read-only map, None when absent), its crc32c checked once, then kept
    (a map shares the page cache). An absent chunk reads as zeros: its rows have no tag and are refused.
    ``where(c)`` names it in errors. Pickling drops what was loaded (maps do not travel)."""

    def __init__(self, load: Callable[[int], Any | None], S: int, F: int, store: str,
                 where: Callable[[int], str]) -> None:
        self._load, self.S, self.F, self.store, self.where = load, int(S), int(F), store, where
        self._raw: dict[int, Any] = {}
        self._u64: dict[int, np.ndarray] = {}
        self._zeros = bytes(8 * self.S * self.F + 4)

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_raw"], d["_u64"] = {}, {}
        return d

    def clear(self) -> None:
        self._raw.clear()
        self._u64.clear()

    def raw(self, c: int) -> Any:
        """Chunk ``c``'s bytes (checked; zeros when absent): tag of row ``c * S + k`` in column ``col`` at byte
        ``8 * (k * F + col)``."""
        got = self._raw.get(c)
        if got is None:
            try:
                got = self._load(c)                 # ValueError: a file of the wrong size, refused unread
                if got is not None:
                    decode_tags(got, self.S, self.F)
            except ValueError as e:
                raise StoreCorruptError(f"memorybank {self.store}: identity chunk {self.where(c)} (rows "
                                        f"[{c * self.S}, {(c + 1) * self.S})): {e}. Run `python -m stores verify "
                                        f"{self.store}`; resume the export (it redoes rows without a valid tag)",
                                        path=self.store, array=IDENTITY, chunk=self.where(c)) from None
            got = self._raw[c] = self._zeros if got is None else got
        return got

    def u64(self, c: int) -> np.ndarray:
        """Chunk ``c``'s tags as a flat (S * F,) uint64 view (row ``k``, column ``col`` at ``k * F + col``)."""
        got = self._u64.get(c)
        if got is None:
            got = self._u64[c] = np.frombuffer(self.raw(c), "<u8", count=self.S * self.F)
        return got

    def expected(self, c: int, rows: np.ndarray, salts: np.ndarray, col: int) -> list[int]:
        """``tag ^ salt`` of each of ``rows`` (int64, all in chunk ``c``; column ``col``; ``salts`` aligned)."""
        k = rows & (self.S - 1)
        return (self.u64(c)[k if self.F == 1 else k * self.F + col] ^ salts).tolist()

    def tag(self, row: int, col: int) -> int:
        """The stored tag of ``row`` in column ``col`` (0: none)."""
        return U64.unpack_from(self.raw(row // self.S), 8 * ((row % self.S) * self.F + col))[0]

    def offsets(self, rows: np.ndarray, col: int) -> list[int]:
        """Byte offsets of the tags of ``rows`` (int64; column ``col``) in their chunks (the hot loop's operands;
        S is a power of two)."""
        k = rows & (self.S - 1)
        return ((k << 3) if self.F == 1 else ((k * self.F + col) << 3)).tolist()


def mismatch_reason(tag: int) -> str:
    """Why a chunk failed its identity check (its stored ``tag``)."""
    if tag == 0:
        return ("it has no identity tag (its identity chunk is missing or was never written: written by an e2r-kd "
                "without identity, or lost)")
    return ("its identity tag does not match: the chunk is not the one written for this key at this row of this "
            "split reservation in this store (moved here from another row, split or store, another teacher's, or "
            "rewritten since the reader opened the store)")


def row_crc32c(block: np.ndarray) -> np.ndarray:
    """(n,) int64: crc32c of each row's bytes of ``block`` (n, ...) as stored (C order, little-endian): the
    HDF5 back end's row checksum (a decoded row's bytes)."""
    a = np.ascontiguousarray(block)
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    rows = a.reshape(len(a), -1).view(np.uint8) if len(a) else np.zeros((0, 0), np.uint8)
    value = google_crc32c.value
    return np.fromiter((value(r) for r in rows), np.int64, count=len(rows))
