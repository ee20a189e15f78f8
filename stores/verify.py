"""``python -m stores verify`` and ``stats``: read every chunk of every array and check it, without ever
hanging on a special file or allocating from an edited attribute.

`verify_path` reports, with the keys affected: special files (FIFOs, devices, symlinks to them, directories
where a chunk belongs: found by ``stat``, never opened), attributes that contradict the arrays, every chunk
whose crc32c checksum fails or that does not decode (keys, complete, light, bev_feat; shard indexes too),
rows marked complete whose shard or inner chunk is missing, split rows whose keys or completion chunks are
missing, non-finite values, invalid / misplaced / orphan / duplicate keys, and every split's on-disk key index
against the keys array (every block's checksum, the same keys at the same positions; index files of no split).
The checksum scan of the data arrays uses only each array's own ``zarr.json``, so it runs even when the
attributes are broken.
"""
from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import zarr
from tqdm import tqdm

from stores.keys import InvalidKeyError, parse_key
from stores.abc import MemoryBank
from stores.errors import StoreCorruptError, StoreError, UnsupportedLayout
from stores.factory import backend_for, open_memorybank
from stores.fsio import read_json, regular_size, special_files
from stores.index_file import compare_with_keys, index_files
from stores.remote.objstore import is_remote
from stores.remote.store import RemoteZarrMemoryBank
from stores.layout import invalid_rows, keys_crc32c, ranges_of
from stores.validate import orphan_mask
from stores.zarr_v3.row_reader import RowChunkReader
from stores.schema import BEV_FEAT, DEPTH, LIGHT_ARRAY, LIGHT_FIELDS
from stores.zarr_v3.store import ZarrMemoryBank, field_path

_MAX_CHUNK_ROWS = 2**22       # keys / complete chunks larger than this are not ours: not read


def open_lenient(path: str, **remote: Any) -> MemoryBank:
    """Open ``path`` read-only without refusing damaged rows (so they can be listed). ``remote``: the
    object-store arguments of `stores.open_memorybank` (storage_options, cache_dir, cache_bytes) for a URL."""
    return open_memorybank(path, "r", lenient=True, **(remote if is_remote(path) else {}))


def verify_path(path: str, block_rows: int = 1024, **remote: Any) -> tuple[list[str], MemoryBank | None]:
    """Every problem found in the store at ``path`` (empty = sound), and the opened bank (None when it
    could not be opened). A store on object storage (``remote``: `open_lenient`'s arguments) has every
    chunk of every shard object scanned, like a local one (no special files exist there)."""
    problems: list[str] = []
    zarr = backend_for(path) is ZarrMemoryBank
    if zarr and os.path.isdir(path):
        problems += [f"{p} is {kind}, not a regular file (never read)" for p, kind in special_files(path)]
    try:
        bank: MemoryBank | None = open_lenient(path, **remote)
    except (StoreError, OSError, ValueError) as e:
        problems.append(f"cannot open the store: {e}")
        bank = None
    if zarr and os.path.isdir(path):
        problems += [p for p in _scan_zarr_arrays(path, bank) if p not in problems]
    elif isinstance(bank, RemoteZarrMemoryBank):
        problems += [p for p in _scan_remote(bank) if p not in problems]
    if bank is not None:
        problems += verify_bank(bank, block_rows, scan_data=not (zarr or isinstance(bank, RemoteZarrMemoryBank)))
    return problems, bank


def _scan_zarr_arrays(path: str, bank: MemoryBank | None) -> list[str]:
    """Checksum of every chunk present of every array, from each array's own metadata."""
    out: list[str] = []
    keys_of = bank.inspect().keys_of if bank is not None else None
    for name in ("keys", "complete"):
        out += _scan_small(path, name, bank)
    for name in (LIGHT_ARRAY, BEV_FEAT, DEPTH):
        adir = Path(path) / field_path(name)
        if not (adir / "zarr.json").exists():
            continue
        try:
            r = RowChunkReader(adir, store=path, name=field_path(name), keys_of=keys_of,
                               fields=LIGHT_FIELDS if name == LIGHT_ARRAY else ())
        except (StoreCorruptError, UnsupportedLayout) as e:
            out.append(f"array {field_path(name)!r}: {e}")
            continue
        out += _scan_shards(r, name, bank)
    return out


def _scan_shards(r: RowChunkReader, name: str, bank: MemoryBank | None) -> list[str]:
    """Every chunk of every shard file (object) of array ``name`` present, checked and decoded; rows marked
    complete whose shard or chunk is missing."""
    out: list[str] = []
    complete = _complete_rows(bank)
    check = _finite_check(bank, name)
    expect_of = bank.inspect().expected_crcs if bank is not None else None
    files = set(r.files_present()) | {int(x) for x in np.unique(complete // r.rows_per_file)}
    for i in tqdm(sorted(files), desc=f"verify {name}", unit="shard", disable=len(files) < 64):
        S = r.rows_per_file
        held = complete[(complete >= i * S) & (complete < (i + 1) * S)]
        named = bank.inspect().keys_of(held[:8].tolist()) if bank is not None and len(held) else []
        expect = None
        if expect_of is not None and len(held):
            try:
                want, untagged = expect_of(field_path(name), held)
                expect = {int(x): (int(w), bool(u)) for x, w, u in zip(held.tolist(), want, untagged)}
            except StoreCorruptError as e:           # a damaged tag chunk: its rows cannot be proven
                out.append(str(e))
        present, probs = r.scan(i, check, expect)
        foreign = [(row, msg) for row, msg in probs if "failed its identity check" in msg]
        out += [msg + (f" ({len(held)} complete row(s) there, keys {named}{' ...' if len(held) > 8 else ''})"
                       if row < 0 and named and "key" not in msg else "")
                for row, msg in probs if "failed its identity check" not in msg]
        if foreign:                                  # one line per shard: a moved shard fails at every row
            keys = bank.inspect().keys_of([row for row, _ in foreign[:8]]) if bank is not None else []
            out.append(f"{foreign[0][1]}" + (f"; with {len(foreign) - 1} more row(s) of {r.chunk_name(i)} (rows "
                                             f"{[row for row, _ in foreign[:8]]}{' ...' if len(foreign) > 8 else ''}, "
                                             f"keys {keys}): restore the shard, or delete it and resume the export"
                                             if len(foreign) > 1 else ""))
        lost = held[~present[held - i * S]] if len(held) and not any(row < 0 for row, _ in probs) else []
        if len(lost):
            what = "shard file is missing" if not present.any() else "inner chunks are missing"
            keys = bank.inspect().keys_of(lost.tolist()) if bank is not None else []
            out.append(f"array {field_path(name)!r}, {r.chunk_name(i)}: {what} for {len(lost)} row(s) marked "
                       f"complete (rows {lost[:8].tolist()}{' ...' if len(lost) > 8 else ''}, keys "
                       f"{keys[:8]}{' ...' if len(keys) > 8 else ''}); resume the export to recompute them")
    return out


def _scan_remote(bank: RemoteZarrMemoryBank) -> list[str]:
    """`_scan_zarr_arrays` for a store on object storage: every ``keys`` / ``complete`` chunk object listed,
    then every shard object of the data arrays (one GET each)."""
    out: list[str] = []
    v = bank.inspect()
    assert v.chunk_rows and v.flat_reader and v.arrays_on_disk and v.row_reader and v.listing is not None
    for name in ("keys", "complete"):
        C, prefix = v.chunk_rows(name), f"{name}/c/"
        tail = "/0" if name == "keys" and v.flat_reader(name).row_shape else ""       # key bytes: keys/c/<c>/0
        for c in sorted(int(n[len(prefix):len(n) - len(tail)]) for n in v.listing if n.startswith(prefix)
                        and n.endswith(tail) and n[len(prefix):len(n) - len(tail)].isdigit()):
            try:
                v.flat_reader(name).chunk(c)
            except ValueError as e:
                keys = v.keys_of(range(c * C, (c + 1) * C)) if name != "keys" else []
                out.append(f"array {name!r}, chunk {name}/c/{c} (rows [{c * C}, {(c + 1) * C})) does not decode: {e}"
                           + (f" (keys {keys[:8]}{' ...' if len(keys) > 8 else ''})" if keys else ""))
    for name in v.arrays_on_disk():
        r = v.row_reader(name)
        out += _scan_shards(r, name, bank) if r is not None else []
    return out


def _complete_rows(bank: MemoryBank | None) -> np.ndarray:
    index = bank.inspect().index if bank is not None else None
    return np.zeros(0, np.int64) if index is None else index.complete_rows()


def _finite_check(bank: MemoryBank | None, name: str) -> Callable[[int, np.ndarray], str | None] | None:
    if bank is None:
        return None
    schema = bank.schema
    ch = schema.light_channels() if name == LIGHT_ARRAY else {name: (None, None)}
    keys_of = bank.inspect().keys_of

    def check(row: int, values: np.ndarray) -> str | None:
        if name != DEPTH and np.isfinite(values).all():
            return None
        bad = [f for f, (a, b) in ch.items() if invalid_rows(schema, f, (values[..., a:b] if a is not None
                                                                        else values)[None]).any()]
        key = (keys_of([row]) or [""])[0]
        return "; ".join(f"field {f!r} row {row} (key {key!r}): {_invalid(f)}" for f in bad) or None
    return check


def _invalid(field: str) -> str:
    """What `stores.layout.invalid_rows` found wrong in a row of ``field``, in words."""
    return "values that are no depth bin" if field == DEPTH else "non-finite values"


def _scan_small(path: str, name: str, bank: MemoryBank | None) -> list[str]:
    """keys / complete: every chunk file present read through zarr (its crc32c codec checks it)."""
    try:
        meta = read_json(Path(path) / name / "zarr.json", path)
    except StoreCorruptError as e:
        return [f"array {name!r}: {e}"]
    if meta is None:
        return []
    try:
        C = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        N = int(meta["shape"][0])
    except (KeyError, TypeError, ValueError, IndexError):
        return [f"array {name!r}: malformed zarr.json"]
    if not 0 < C <= _MAX_CHUNK_ROWS:
        return [f"array {name!r}: chunks of {C} rows (implausible; not read)"]
    try:
        arr = zarr.open_array(str(Path(path) / name), mode="r", zarr_format=3)
        chunks = sorted(int(e.name) for e in os.scandir(Path(path) / name / "c") if e.name.isdigit())
    except FileNotFoundError:
        return []
    except Exception as e:  # noqa: BLE001 - unreadable metadata is a finding
        return [f"array {name!r}: cannot open ({type(e).__name__}: {e})"]
    out = []
    tail = ["0"] * (len(meta["shape"]) - 1)          # key bytes (N, W): chunk files keys/c/<c>/0
    for c in chunks:
        lo, hi = c * C, min(N, (c + 1) * C)
        try:
            if regular_size(Path(path, name, "c", str(c), *tail), path, name) is None or lo >= hi:
                continue
            arr[lo:hi]
        except Exception as e:  # noqa: BLE001 - any decode/IO error is a finding
            reason = "crc32c checksum mismatch" if "checksum" in str(e).lower() else f"{type(e).__name__}: {e}"
            keys = bank.inspect().keys_of(range(lo, hi)) if bank is not None and name != "keys" else []
            out.append(f"array {name!r}, chunk {name}/c/{c} (rows [{lo}, {hi})) does not decode: {reason}"
                       + (f" (keys {keys[:8]}{' ...' if len(keys) > 8 else ''})" if keys else ""))
    return out


def verify_bank(bank: MemoryBank, block_rows: int = 1024, scan_data: bool = True) -> list[str]:
    """Problems of an opened bank: lost keys / flags / data (``bank.damage``), bad/orphan/duplicate keys,
    and (``scan_data``: back ends without a per-file scan) every complete row read and checked finite."""
    v = bank.inspect()
    problems = list(bank.damage) if scan_data else [d for d in bank.damage if d not in v.lost_files]
    n = bank.n_rows
    used = min(n, max((s + c for s, c in bank.splits.values()), default=0))
    keys = v.read_keys(0, used)
    flags = v.read_flags(0, max(used, min(n, v.flags_extent())))
    owner = np.full(len(flags), None, dtype=object)
    for split, (start, count) in bank.splits.items():
        owner[start:start + count] = split
    orphans = orphan_mask(flags, bank.splits)            # the rows `reindex` clears (MemoryBank.orphan_ranges)
    for r in np.flatnonzero(flags == 1):
        k = str(keys[r]) if r < len(keys) else ""
        if orphans[r]:
            problems.append(f"row {r}: complete but belongs to no split (orphan, key {k!r}; the leftover of an "
                            f"interrupted rm-split, harmless: `python -m stores reindex {bank.path}` clears it)")
            continue
        try:
            if parse_key(k).split != owner[r]:
                problems.append(f"row {r}: key {k!r} lies in split {owner[r]!r}")
        except InvalidKeyError as e:
            problems.append(f"row {r}: invalid key: {e}")
    for a, b, what in bank.leftover_ranges():           # unflagged: never served (`reindex` clears them)
        problems.append(f"rows [{a}, {b}) belong to no split but still hold {'; '.join(what)}: the leftover of an "
                        "interrupted rm-split or reserve_split, never served (no split's rows are affected); "
                        f"`python -m stores reindex {bank.path}` deletes it")
    for k, first, again in v.index.duplicates:  # type: ignore[union-attr]
        problems.append(f"key {k!r} is stored twice (rows {first} and {again})")
    problems += check_key_index(bank, keys)
    if scan_data:
        problems += _read_all(bank, block_rows, keys)
    return problems


def check_key_index(bank: MemoryBank, keys: np.ndarray) -> list[str]:
    """Each split's on-disk key index against the keys array (``keys``: rows ``[0, used)``): the checksum of
    every block, the same keys at the same positions, the split's ``keys_crc32c``; index files of no split.
    (An index that does not open is already in ``bank.damage``.)"""
    index = bank.inspect().index
    if not bank.disk_index or index is None:
        return []
    out = []
    for name, (s, c) in sorted(bank.splits.items()):
        idx = index.splits.get(name)
        split_keys = keys[s:s + c]
        if idx is None or not idx.on_disk or (split_keys == "").any():     # reported already
            continue
        want = bank.attrs["splits"][name].get("keys_crc32c")
        if want is not None and keys_crc32c(split_keys) != want:
            out.append(f"the keys of split {name!r} do not match their checksum (keys_crc32c)")
        try:
            idx.check_all()
        except StoreCorruptError as e:
            out.append(str(e))
            continue
        out += [f"key index of split {name!r} ({idx.where}) disagrees with the keys array: {p}; rebuild it: "
                f"`python -m stores reindex {bank.path}`" for p in compare_with_keys(idx.mapped(), split_keys)]
    for name, p in sorted(index_files(bank.path).items()):
        if name not in bank.splits:
            out.append(f"{p} is the key index of no split (left by an interrupted reserve_split or rm-split; "
                       f"harmless: `python -m stores reindex {bank.path}` removes it)")
    return out


def _read_all(bank: MemoryBank, block_rows: int, keys: np.ndarray) -> list[str]:
    problems = []
    rows_all = _complete_rows(bank)
    fields = list(bank.schema.fields)
    read_rows = bank.inspect().read_rows
    for x in tqdm(range(0, len(rows_all), block_rows), desc="verify", unit="block",
                  disable=len(rows_all) < 4 * block_rows):
        rows = rows_all[x:x + block_rows]
        try:
            data = read_rows(fields, rows)
        except StoreError:
            data = {}
            for r in rows.tolist():         # narrow down to each damaged row
                try:
                    read_rows(fields, np.array([r]))
                except StoreError as e:
                    problems.append(f"row {r} (key {keys[r]!r}) does not decode: {e}")
            continue
        for f, d in data.items():
            bad = invalid_rows(bank.schema, f, d)
            for r in rows[bad][:10]:
                problems.append(f"field {f!r} row {int(r)} (key {keys[r]!r}): {_invalid(f)}")
    return problems


def incomplete_count(bank: MemoryBank) -> int:
    read_complete = bank.inspect().read_complete
    return sum(b - x for s, c in bank.splits.values() for x, b in ranges_of(~read_complete(s, s + c)))


def field_stats(bank: MemoryBank, field: str, block_rows: int = 2048) -> dict[str, list[float]]:
    """Per-channel mean/std/min/max over complete rows, read block by block through the checked row reader
    (a damaged chunk raises StoreCorruptError). Channel = last axis for light fields, axis c for bev_feat, the
    camera for depth (its bins, DEPTH_NONE included)."""
    rows_all = _complete_rows(bank)
    read_rows = bank.inspect().read_rows
    n, mean, m2, lo, hi = 0, None, None, None, None
    for x in range(0, len(rows_all), block_rows):      # Chan et al.'s merge of per-block mean / M2
        d = read_rows([field], rows_all[x:x + block_rows])[field].astype(np.float64)
        d = np.moveaxis(d, 2, -1) if field in (BEV_FEAT, DEPTH) else d
        d = d.reshape(-1, d.shape[-1])
        nb, mb = d.shape[0], d.mean(0)
        m2b = ((d - mb) ** 2).sum(0)
        if mean is None:
            n, mean, m2, lo, hi = nb, mb, m2b, d.min(0), d.max(0)
            continue
        delta, tot = mb - mean, n + nb
        mean = mean + delta * nb / tot
        m2 = m2 + m2b + delta ** 2 * n * nb / tot
        n, lo, hi = tot, np.minimum(lo, d.min(0)), np.maximum(hi, d.max(0))
    assert mean is not None and m2 is not None and lo is not None and hi is not None
    return {"mean": mean.tolist(), "std": np.sqrt(m2 / n).tolist(), "min": lo.tolist(), "max": hi.tolist()}
