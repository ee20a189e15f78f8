"""Copy a memorybank between back ends (Zarr <-> HDF5) and import the original's npz-per-key cache.

The original cache held one ``.npz`` per key with arrays ``actions`` (T, A), ``bev_vec`` (T, D),
``gru_out`` (T, H) and optionally ``bev_feat`` (T, C, H, W). File names are the key made filesystem safe by
``key_to_filename``: ``/`` -> ``__`` and ``:`` -> ``@`` (``train/segment_0001:12`` ->
``train__segment_0001@12.npz``). Decoding splits at the LAST ``@`` and the FIRST ``__``, so it is exact
unless the split name itself contains ``__``; a ``key`` array stored inside the npz always wins.
npz files are read with ``allow_pickle=False``.

Every conversion builds the new store under a temporary sibling name of ``dst`` and renames it into place
only when every row is copied (`stores.fsio.publish`: never over an existing path); on any failure the
temporary is removed, so a refused conversion (a damaged source, a full disk, a kill: the next conversion
removes a dead converter's temporary, and the creation's own temporary inside it, and says so) leaves nothing at
``dst``. Local paths only (an object store has no
rename): convert locally, then upload.
"""
from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from stores.abc import MemoryBank
from stores.errors import StoreError
from stores.keys import InvalidKeyError, parse_key, validate_key
from stores.factory import backend_for
from stores.fsio import fsync_path, publish, remove_path, remove_stale_temps, temp_sibling
from stores.paths import check_new_path
from stores.layout import check_shard_rows, ranges_of
from stores.remote.objstore import is_remote
from stores.schema import ALL_FIELDS, BEV_FEAT, Provenance, StoreSchema


def key_to_filename(key: str) -> str:
    """``train/seg:12`` -> ``train__seg@12.npz``."""
    validate_key(key)
    return key.replace("/", "__", 1).replace(":", "@") + ".npz"


def filename_to_key(name: str) -> str:
    """Inverse of `key_to_filename`; raises InvalidKeyError naming the file when it does not decode."""
    stem = name[:-4] if name.endswith(".npz") else name
    head, sep, start = stem.rpartition("@")
    split, sep2, segment = head.partition("__")
    if not sep or not sep2:
        raise InvalidKeyError(f"file name {name!r} is not '<split>__<segment>@<start>.npz'")
    key = f"{split}/{segment}:{start}"
    try:
        return validate_key(key)
    except InvalidKeyError as e:
        raise InvalidKeyError(f"file name {name!r}: {e}") from None


def is_npz_dir(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and not (p / "zarr.json").exists() and any(p.glob("*.npz"))


def _load_npz(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as z:
        key = str(z["key"]) if "key" in z.files else filename_to_key(path.name)
        validate_key(key)
        return key, {f: np.asarray(z[f]) for f in ALL_FIELDS if f in z.files}


def convert_store(src: str, dst: str, dtype: str | None = None, shard_rows: int | None = None,
                  block_rows: int = 1024) -> dict[str, Any]:
    """Copy every complete row of store ``src`` into a new store ``dst`` (other back end or dtype). ``src``
    may be of an older schema_version (read in its own layout): ``dst`` is always written in the current
    one, so this is how a store written before chunk checksums is upgraded."""
    s = backend_for(src).open(src, mode="r", legacy=True)
    schema = s.schema
    if dtype:
        schema.dtype = dtype
    return built_aside(dst, lambda tmp: _copy_rows(s, src, _new_store(dst, tmp, schema, s.provenance,
                                                                       shard_rows or s.alignment), block_rows))


def check_convert_paths(src: str, dst: str, shard_rows: int | None) -> None:
    """Refuse, before anything is read or made: a ``dst`` where no store may be created (`check_new_path`: empty,
    under a file, on /proc), a ``dst`` inside ``src`` or ``src`` inside ``dst`` (a store written into the one it
    copies), a ``shard_rows`` that is no power of two in [1, 2^20]."""
    if not is_remote(dst):
        check_new_path(dst)
    if shard_rows is not None:
        check_shard_rows(shard_rows)
    if is_remote(src) or is_remote(dst):
        return
    a, b = os.path.realpath(src), os.path.realpath(dst)
    if b == a or b.startswith(a + os.sep) or a.startswith(b + os.sep):
        raise ValueError(f"convert: {dst} lies inside {src} (or the other way round); write the new store next to "
                         "it, not into it")


def _new_store(dst: str, tmp: str, schema: StoreSchema, provenance: Provenance, shard_rows: int | None) -> MemoryBank:
    """A new store of ``dst``'s back end at the temporary path ``tmp``, written by this process alone."""
    d = backend_for(dst).create(tmp, schema, provenance, shard_rows=shard_rows, exist_ok=False)
    d.sole_writer = True      # one process writes the new store: copying rows around gaps is allowed
    return d


def built_aside(dst: str, build: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """Run ``build(tmp)`` on a temporary sibling path of ``dst``, then rename the result to ``dst`` (never over
    an existing path); on any failure the temporary is removed and ``dst`` stays absent. Temporaries of ``dst``
    that a killed conversion or creation on this host left (nested ones included) are deleted first. Returns
    build's result plus ``cleaned``: the temporaries deleted."""
    if is_remote(dst):
        raise StoreError(f"convert writes local stores only, not {dst}: convert to a local path, then upload it")
    if os.path.lexists(dst):
        raise FileExistsError(f"{dst} already exists: convert writes a new store; choose another path or remove it")
    check_new_path(dst)
    cleaned = remove_stale_temps(dst)       # what a killed conversion (or creation) on this host left
    tmp = temp_sibling(dst)
    try:
        summary = build(tmp)
        if not publish(tmp, dst):
            raise FileExistsError(f"{dst} appeared while converting; the new store was not put there")
    except BaseException:
        remove_path(tmp, settle_s=0.5)      # zarr-python's writes of a failed step may still be landing
        raise
    fsync_path(os.path.dirname(os.path.abspath(dst)))
    return {**summary, "cleaned": cleaned}


def _copy_rows(s: MemoryBank, src: str, d: MemoryBank, block_rows: int) -> dict[str, Any]:
    """Every complete row of ``s`` into the new store ``d`` (same splits, same keys), then close ``d``."""
    copied = 0
    with d, tqdm(total=len(s), desc=f"convert {os.path.basename(src)}", unit="row") as bar:
        for split, (start, count) in sorted(s.splits.items(), key=lambda kv: kv[1][0]):
            keys = s.split_keys(split)
            d.reserve_split(split, keys)
            for a, b in ranges_of(s.inspect().read_complete(start, start + count)):
                for x in range(a, b, block_rows):
                    y = min(b, x + block_rows)
                    rows, missing = s.get_batch(keys[x:y])
                    if missing:
                        raise ValueError(f"{src}: keys {missing[:3]} complete but not indexed (duplicates?)")
                    d.write_rows(split, x, rows)
                    copied += y - x
                    bar.update(y - x)
    return {"rows": copied, "splits": sorted(s.splits)}


def convert_npz_dir(src: str, dst: str, teacher_sha256: str = "unknown", dtype: str = "float32",
                    shard_rows: int | None = None, block_rows: int = 256) -> dict[str, Any]:
    """Import a directory of one ``.npz`` per key into a new store; the schema comes from the first file."""
    files = sorted(Path(src).glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no .npz files in {src}")
    by_split: dict[str, list[tuple[tuple[str, int], str, Path]]] = defaultdict(list)
    for p in files:
        with np.load(p, allow_pickle=False) as z:
            key = str(z["key"]) if "key" in z.files else filename_to_key(p.name)
        k = parse_key(key)
        by_split[k.split].append(((k.segment, k.start), key, p))
    _, first = _load_npz(files[0])
    for f in ("actions", "bev_vec", "gru_out"):
        if f not in first:
            raise ValueError(f"{files[0]}: npz lacks {f!r} (has {sorted(first)})")
    T, A = first["actions"].shape
    bev = first.get(BEV_FEAT)
    schema = StoreSchema(seq_len=T, action_dim=A, bev_dim=first["bev_vec"].shape[1],
                         gru_hidden=first["gru_out"].shape[1], dtype=dtype,
                         bev_feat_shape=tuple(bev.shape[1:]) if bev is not None else None,
                         store_bev_feat=bev is not None)
    prov = Provenance(teacher_sha256=teacher_sha256, dataset_root="", model_config={"imported_from": str(src)})
    return built_aside(dst, lambda tmp: _import_npz(src, _new_store(dst, tmp, schema, prov, shard_rows), schema,
                                                    by_split, len(files), block_rows))


def _import_npz(src: str, bank: MemoryBank, schema: StoreSchema, by_split: dict[str, list[tuple[Any, str, Path]]],
                total: int, block_rows: int) -> dict[str, Any]:
    """The npz files of ``by_split`` (split -> [(sort key, key, file)]) into the new store ``bank``; closes it."""
    n = 0
    with bank, tqdm(total=total, desc="import npz", unit="key") as bar:
        for split, items in sorted(by_split.items()):
            items.sort()
            keys = [k for _, k, _ in items]
            bank.reserve_split(split, keys)
            for x in range(0, len(items), block_rows):
                chunk = items[x:x + block_rows]
                block: dict[str, list[np.ndarray]] = {f: [] for f in schema.fields}
                for _, key, p in chunk:
                    _, arrays = _load_npz(p)
                    for f in schema.fields:
                        if f not in arrays:
                            raise ValueError(f"{p}: npz for key {key!r} lacks field {f!r}")
                        block[f].append(arrays[f])
                try:
                    bank.write_rows(split, x, {f: np.stack(v) for f, v in block.items()})
                except ValueError as e:
                    raise ValueError(f"{src}: files {chunk[0][2].name}..{chunk[-1][2].name}: {e}") from None
                n += len(chunk)
                bar.update(len(chunk))
    return {"rows": n, "splits": sorted(by_split)}


def convert(src: str, dst: str, **kwargs: Any) -> dict[str, Any]:
    """Dispatch: npz directory -> store, or store -> store (Zarr <-> HDF5); the paths and ``shard_rows`` are
    checked first (`check_convert_paths`)."""
    check_convert_paths(src, dst, kwargs.get("shard_rows"))
    if is_npz_dir(src):
        return convert_npz_dir(src, dst, **kwargs)
    kwargs.pop("teacher_sha256", None)
    return convert_store(src, dst, **kwargs)
