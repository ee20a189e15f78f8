"""Inspect and maintain memorybanks: ``python -m stores <command>`` (also installed as ``e2r-mb``).

Commands: info, ls, show, verify, stats, rm-split, reindex, convert (the retrieval index inside a store has its
own: ``python -m pipelines.retrieval_index build|query|verify``). Every command opens stores read-only except rm-split,
reindex and convert's destination. ``verify`` (which also checks the store's retrieval indexes) exits 1 when it
finds a problem.

A store on object storage is named by its URL (``s3://bucket/mb.zarr``, any fsspec protocol): endpoint and
credentials come from ``--storage_options JSON`` (fsspec's arguments, e.g. ``'{"endpoint_url":
"http://127.0.0.1:9000"}'``) or the usual environment variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``); ``--cache_dir`` keeps fetched chunks locally (``--cache_gb``).
``convert``, ``reindex`` and the retrieval index work on local stores.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence

import numpy as np

from stores.convert import convert
from stores.errors import StoreError
from stores.factory import open_memorybank
from stores.fsio import write_atomic
from stores.paths import check_new_path
from stores.remote.objstore import parse_storage_options
from stores.retrieval import list_indexes, verify_indexes
from stores.verify import field_stats, incomplete_count, verify_bank, verify_path  # noqa: F401 (verify_bank: API)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def open_kw(a: argparse.Namespace) -> dict:
    """`open_memorybank`'s object-store arguments from the command line (ignored for local paths)."""
    if a.cache_gb is not None and not (math.isfinite(a.cache_gb) and a.cache_gb > 0):
        raise ValueError(f"--cache_gb must be a positive number of GiB, got {a.cache_gb}")
    return {"storage_options": parse_storage_options(a.storage_options), "cache_dir": a.cache_dir,
            "cache_bytes": int(a.cache_gb * 2**30) if a.cache_gb else None}


def cmd_info(a: argparse.Namespace) -> int:
    bank = open_memorybank(a.path, mode="r", **open_kw(a))
    at = bank.attrs
    print(f"memorybank {a.path}  backend={bank.backend}  schema_version={at['schema_version']}  "
          f"rows={bank.n_rows}  complete={len(bank)}  shard_rows(alignment)={bank.alignment}")
    print(f"seq_len={at['seq_len']} action_dim={at['action_dim']} bev_dim={at['bev_dim']} "
          f"gru_hidden={at['gru_hidden']} dtype={at['dtype']} bev_feat={at['bev_feat_shape'] if at['store_bev_feat'] else 'not stored'}"
          + (f" pool={at['bev_feat_pool']}" if at.get("bev_feat_pool") else ""))
    if at.get("store_depth"):
        print(f"depth (T, Ncam, h, w)=({at['seq_len']}, {', '.join(map(str, at['depth_shape']))}) uint8 bins, "
              f"grid={at['depth_grid']} (255: no LiDAR point)")
    print(f"{'array':<20}{'shape':<24}{'dtype':<14}{'chunks':<22}{'shards':<22}{'codecs':<34}{'stored':>12}{'raw':>12}{'ratio':>7}")
    for d in bank.describe():
        ratio = f"{d['raw_bytes'] / d['stored_bytes']:.2f}" if d["stored_bytes"] and d["raw_bytes"] else "-"
        print(f"{d['name']:<20}{str(d['shape']):<24}{d['dtype']:<14}{str(d['chunks']):<22}{str(d['shards']):<22}"
              f"{','.join(d['codecs']):<34}{_mib(d['stored_bytes']):>12}{_mib(d['raw_bytes']):>12}{ratio:>7}")
        if d.get("fields"):
            print("    packed channels: " + ", ".join(f"{f} [{a}:{b}]" for f, (a, b) in d["fields"].items()))
    print("splits:")
    for name, (start, count) in sorted(bank.splits.items()):
        print(f"  {name:<12} rows [{start}, {start + count})  reserved={count}  complete={bank.complete_count(name)}")
    keys = next((d for d in bank.describe() if d["name"] == "keys"), None)
    if bank.backend == "zarr" and keys is not None and keys["dtype"] != "uint8":
        print(f"keys: zarr-python's variable-length strings (schema_version {at['schema_version']}), which other Zarr "
              f"implementations cannot open; `python -m stores convert {a.path} NEW` writes a copy whose keys are "
              "uint8 key bytes (schema_version 5)")
    if not bank.disk_index:
        print("key index: built in memory at every open" + (f" (schema_version {at['schema_version']}: "
              f"`python -m stores reindex {a.path}` writes it into the store)" if bank.index_files else ""))
    ident = at.get("identity")
    print(f"identity: store_uid={ident['store_uid']} teacher={ident['teacher']} (a tag per row and array: "
          "checked on every read)" if isinstance(ident, dict) else "identity: none (written before identity tags: "
          f"rows read with their checksums only; `python -m stores convert {a.path} NEW` adds them)")
    print(f"teacher_sha256={at['teacher_sha256']}  dataset_root={at['dataset_root']!r}  "
          f"code_version={at['code_version']}  created={at['created']}  updated={at['updated']}")
    print("model_config=" + json.dumps(at["model_config"], sort_keys=True))
    if at.get("lidar2ego"):
        print(f"lidar2ego (applied on read) of {len(at['lidar2ego'])} segment(s): "
              + json.dumps(at["lidar2ego"], sort_keys=True))
    return 0


def cmd_ls(a: argparse.Namespace) -> int:
    if a.limit < 0:
        raise ValueError(f"--limit must be 0 (all keys) or a positive number of keys, got {a.limit}")
    bank = open_memorybank(a.path, mode="r", **open_kw(a))
    keys = bank.keys(a.split)
    for k in keys[: a.limit] if a.limit else keys:
        print(k)
    return 0


def cmd_show(a: argparse.Namespace) -> int:
    bank = open_memorybank(a.path, mode="r", **open_kw(a))
    if not bank.has(a.key):
        print(f"key {a.key!r} is not in {a.path}", file=sys.stderr)
        return 1
    np.set_printoptions(precision=4, suppress=True, linewidth=120, threshold=10**6 if a.values else 1000)
    for f, v in bank.get(a.key).items():
        v32 = v.astype(np.float64)
        print(f"{f:<10} shape={v.shape} dtype={v.dtype} mean={v32.mean():.5g} std={v32.std():.5g} "
              f"min={v32.min():.5g} max={v32.max():.5g}")
        if a.values:
            print(v)
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    problems, bank = verify_path(a.path, **open_kw(a))
    if bank is not None and os.path.isdir(a.path) and list_indexes(a.path):     # Zarr stores only
        problems += verify_indexes(a.path, bank.keys())     # also indexed keys whose rows were removed
    for p in problems:
        print("PROBLEM:", p)
    if bank is not None and not bank.has_identity:
        print(f"NOTICE: {a.path} was written before rows carried identity tags: checksums prove each chunk's bytes, "
              "but not that it is the chunk of its key, split and store (a moved or foreign shard is not detected). "
              f"`python -m stores convert {a.path} NEW` writes a copy with identity tags")
    if bank is None:
        print(f"verify {a.path}: the store could not be opened, {len(problems)} problem(s)")
        return 1
    print(f"verify {a.path}: {len(bank)} complete rows, {incomplete_count(bank)} reserved rows not yet written, "
          f"{len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_stats(a: argparse.Namespace) -> int:
    if a.json:                                          # before the work: under a regular file, on /proc, a folder
        check_new_path(a.json, "--json file")
        if os.path.isdir(a.json):
            raise ValueError(f"--json {a.json} is a directory; name a file to write")
    bank = open_memorybank(a.path, mode="r", **open_kw(a))
    fields = [a.field] if a.field else list(bank.schema.fields)
    result = {}
    for f in fields:
        if f not in bank.schema.fields:
            print(f"field {f!r} is not stored in {a.path} (fields: {bank.schema.fields})", file=sys.stderr)
            return 1
        if len(bank) == 0:
            print(f"{f}: no complete rows")
            continue
        try:
            s = field_stats(bank, f)
        except StoreError as e:
            print(f"error: cannot compute stats of {f!r}: {e}", file=sys.stderr)
            return 1
        result[f] = s
        print(f"{f}: {len(s['mean'])} channels over {len(bank)} complete rows")
        for c in range(min(len(s["mean"]), a.max_channels)):
            print(f"  ch {c:>4}: mean={s['mean'][c]:.5g} std={s['std'][c]:.5g} min={s['min'][c]:.5g} max={s['max'][c]:.5g}")
        if len(s["mean"]) > a.max_channels:
            print(f"  ... ({len(s['mean']) - a.max_channels} more; --json to save all)")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        write_atomic(a.json, [json.dumps(result).encode()], fsync=True)      # whole or not at all
    return 0


def cmd_rm_split(a: argparse.Namespace) -> int:
    bank = open_memorybank(a.path, mode="r+", **open_kw(a))
    start, count = bank.splits.get(a.split, (None, None)) if a.split in bank.splits else (None, None)
    if start is None:
        print(f"split {a.split!r} is not in {a.path} (splits: {sorted(bank.splits)})", file=sys.stderr)
        return 1
    bank.remove_split(a.split)          # a read-only store: StoreReadOnlyError, nothing changed
    print(f"removed split {a.split!r} ({count} rows) from {a.path}")
    return 0


def cmd_reindex(a: argparse.Namespace) -> int:
    bank = open_memorybank(a.path, mode="r+", **open_kw(a))
    orphans = sum(y - x for x, y in bank.orphan_ranges())
    leftovers = bank.leftover_ranges()
    done = bank.reindex()
    if orphans:
        print(f"cleared {orphans} orphan row(s) (complete rows of no split, left by an interrupted rm-split)")
    for x, y, what in leftovers:
        print(f"deleted the leftovers of rows [{x}, {y}) of no split ({'; '.join(what)}; left by an interrupted "
              "rm-split or reserve_split)")
    if not bank.index_files:
        print(f"{a.path}: a {bank.backend} store builds its key index in memory at open; no index to write")
        return 0
    print(f"wrote the key index of {len(done)} split(s) ({', '.join(done) or 'none'}) into {a.path}; schema_version "
          f"{bank.attrs['schema_version']}")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    kw = {"shard_rows": a.shard_rows}
    if a.dtype:
        kw["dtype"] = a.dtype
    if a.teacher_sha256:
        kw["teacher_sha256"] = a.teacher_sha256
    summary = convert(a.src, a.dst, **kw)
    for t in summary.get("cleaned", []):
        print(f"removed {t}: the temporary store of a conversion or creation of {a.dst} that was killed")
    print(f"converted {a.src} -> {a.dst}: {summary['rows']} rows, splits {summary['splits']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stores", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--storage_options", default=None, help="store URLs: fsspec options as a JSON object, e.g. "
                        "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}' (default: AWS_* environment variables)")
    remote.add_argument("--cache_dir", default=None, help="store URLs: local cache of fetched chunks (LRU)")
    remote.add_argument("--cache_gb", type=float, default=None, help="size cap of --cache_dir in GiB (default 20)")
    s = sub.add_parser("info", parents=[remote], help="fields, shapes, dtypes, chunks, codecs, bytes, splits, provenance")
    s.add_argument("path")
    s = sub.add_parser("ls", parents=[remote], help="list keys of complete rows")
    s.add_argument("path")
    s.add_argument("--split", default=None, help="only this split")
    s.add_argument("--limit", type=int, default=0, help="print at most N keys (0 = all)")
    s = sub.add_parser("show", parents=[remote], help="per-field shape and summary statistics of one key")
    s.add_argument("path")
    s.add_argument("key", help="e.g. train/segment_0001:123")
    s.add_argument("--values", action="store_true", help="also print the arrays")
    s = sub.add_parser("verify", parents=[remote], help="read every chunk of every array: checksums, missing shards/chunks, attributes "
                       "vs arrays, finite values, keys (exit 1 listing every problem)")
    s.add_argument("path")
    s = sub.add_parser("stats", parents=[remote], help="per-channel mean/std/min/max over complete rows (checked reads, block by block)")
    s.add_argument("path")
    s.add_argument("--field", default=None, help="actions | bev_vec | gru_out | bev_feat | depth (default: all stored)")
    s.add_argument("--max-channels", type=int, default=8, help="channels to print per field")
    s.add_argument("--json", default=None, help="write all channels' stats to this JSON file")
    s = sub.add_parser("rm-split", parents=[remote], help="delete a split's rows and entry")
    s.add_argument("path")
    s.add_argument("split")
    s = sub.add_parser("reindex", parents=[remote],
                       help="clear orphan rows (left by an interrupted rm-split), write every split's key index from "
                            "its checked keys (upgrades a schema_version 3 store in place; repairs a lost or damaged "
                            "index); no writer may run")
    s.add_argument("path")
    s = sub.add_parser("convert", help="zarr <-> hdf5 (by suffix .h5/.hdf5), or a directory of <key>.npz -> store")
    s.add_argument("src")
    s.add_argument("dst", help="new store: *.zarr directory or *.h5 file")
    s.add_argument("--dtype", choices=["float32", "float16"], default=None, help="stored dtype of dst")
    s.add_argument("--shard-rows", type=int, default=None, help="rows per shard of dst (power of two)")
    s.add_argument("--teacher-sha256", default=None, help="teacher checkpoint hash to record (npz import)")
    return p


COMMANDS = {"info": cmd_info, "ls": cmd_ls, "show": cmd_show, "verify": cmd_verify, "stats": cmd_stats,
            "rm-split": cmd_rm_split, "reindex": cmd_reindex, "convert": cmd_convert}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    try:
        return COMMANDS[a.cmd](a)
    except (StoreError, FileNotFoundError, FileExistsError, ValueError, KeyError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
