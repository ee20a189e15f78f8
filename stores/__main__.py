"""Inspect and maintain memorybanks: ``python -m stores <command>`` (also installed as ``e2r-mb``).

Commands: info, ls, show, verify, stats, rm-split, convert. Every command opens stores read-only except
rm-split and convert's destination. ``verify`` exits 1 when it finds a problem.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from e2r.keys import InvalidKeyError, parse_key
from stores.abc import MemoryBank
from stores.convert import convert
from stores.errors import StoreError
from stores.factory import open_memorybank
from stores.layout import ranges_of


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def cmd_info(a: argparse.Namespace) -> int:
    bank = open_memorybank(a.path, mode="r")
    at = bank.attrs
    print(f"memorybank {a.path}  backend={bank.backend}  schema_version={at['schema_version']}  "
          f"rows={bank.n_rows}  complete={len(bank)}  shard_rows(alignment)={bank.alignment}")
    print(f"seq_len={at['seq_len']} action_dim={at['action_dim']} bev_dim={at['bev_dim']} "
          f"gru_hidden={at['gru_hidden']} dtype={at['dtype']} bev_feat={at['bev_feat_shape'] if at['store_bev_feat'] else 'not stored'}"
          + (f" pool={at['bev_feat_pool']}" if at.get("bev_feat_pool") else ""))
    print(f"{'array':<20}{'shape':<24}{'dtype':<14}{'chunks':<22}{'shards':<22}{'codecs':<34}{'stored':>12}{'raw':>12}{'ratio':>7}")
    for d in bank.describe():
        ratio = f"{d['raw_bytes'] / d['stored_bytes']:.2f}" if d["stored_bytes"] and d["raw_bytes"] else "-"
        print(f"{d['name']:<20}{str(d['shape']):<24}{d['dtype']:<14}{str(d['chunks']):<22}{str(d['shards']):<22}"
              f"{','.join(d['codecs']):<34}{_mib(d['stored_bytes']):>12}{_mib(d['raw_bytes']):>12}{ratio:>7}")
        if d.get("fields"):
            print("    packed channels: " + ", ".join(f"{f} [{a}:{b}]" for f, (a, b) in d["fields"].items()))
    print("splits:")
    for name, (start, count) in sorted(bank.splits.items()):
        print(f"  {name:<12} rows [{start}, {start + count})  reserved={count}  complete={len(bank.keys(name))}")
    print(f"teacher_sha256={at['teacher_sha256']}  dataset_root={at['dataset_root']!r}  "
          f"code_version={at['code_version']}  created={at['created']}  updated={at['updated']}")
    print("model_config=" + json.dumps(at["model_config"], sort_keys=True))
    return 0


def cmd_ls(a: argparse.Namespace) -> int:
    bank = open_memorybank(a.path, mode="r")
    keys = bank.keys(a.split)
    for k in keys[: a.limit] if a.limit else keys:
        print(k)
    return 0


def cmd_show(a: argparse.Namespace) -> int:
    bank = open_memorybank(a.path, mode="r")
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


def verify_bank(bank: MemoryBank, block_rows: int = 1024) -> list[str]:
    """Every problem found: unreadable/corrupt chunks, non-finite values, bad/orphan/duplicate keys."""
    problems: list[str] = []
    n = bank.n_rows
    keys = bank._read_keys(0, n)
    complete = bank._read_complete(0, n)
    owner = np.full(n, None, dtype=object)
    for split, (start, count) in bank.splits.items():
        if start + count > n:
            problems.append(f"split {split!r} rows [{start}, {start + count}) beyond the {n} rows of the store")
        owner[start:start + count] = split
    for r in np.flatnonzero(complete):
        k = str(keys[r])
        if owner[r] is None:
            problems.append(f"row {r}: complete but belongs to no split (orphan, key {k!r})")
        try:
            if parse_key(k).split != owner[r] and owner[r] is not None:
                problems.append(f"row {r}: key {k!r} lies in split {owner[r]!r}")
        except InvalidKeyError as e:
            problems.append(f"row {r}: invalid key: {e}")
    for k, first, again in bank._index.duplicates:  # type: ignore[union-attr]
        problems.append(f"key {k!r} is stored twice (rows {first} and {again})")
    rows_all = np.flatnonzero(complete)
    fields = list(bank.schema.fields)
    for x in tqdm(range(0, len(rows_all), block_rows), desc="verify", unit="block", disable=len(rows_all) < 4 * block_rows):
        rows = rows_all[x:x + block_rows]
        try:
            data = bank._read_rows(fields, rows)        # the packed light row is read once for its fields
        except Exception:  # noqa: BLE001 - narrow it down field by field below
            data = {}
            for f in fields:
                try:
                    data[f] = bank._read_rows([f], rows)[f]
                except Exception as e:  # noqa: BLE001 - any decode/IO error is a finding
                    problems.append(f"field {f!r} rows {int(rows[0])}..{int(rows[-1])}: unreadable "
                                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        for f, d in data.items():
            bad = ~np.isfinite(d.reshape(len(rows), -1)).all(1)
            for r in rows[bad][:10]:
                problems.append(f"field {f!r} row {int(r)} (key {keys[r]!r}): non-finite values")
    return problems


def cmd_verify(a: argparse.Namespace) -> int:
    bank = open_memorybank(a.path, mode="r")
    problems = verify_bank(bank)
    for p in problems:
        print("PROBLEM:", p)
    incomplete = sum(b - x for s, c in bank.splits.values() for x, b in ranges_of(~bank._read_complete(s, s + c)))
    print(f"verify {a.path}: {len(bank)} complete rows, {incomplete} reserved rows not yet written, "
          f"{len(problems)} problem(s)")
    return 1 if problems else 0


def field_stats(bank: MemoryBank, field: str) -> dict[str, list[float]]:
    """Per-channel mean/std/min/max over complete rows, computed with dask chunk by chunk.
    Channel = last axis for light fields, axis c (2) for bev_feat."""
    import dask.array as da      # lazy: dask is only needed by `stats`
    arr = bank.dask_array(field)
    mask = bank._read_complete(0, arr.shape[0])
    arr = arr[mask].astype("float64")
    axis = 2 if field == "bev_feat" else arr.ndim - 1
    red = tuple(i for i in range(arr.ndim) if i != axis)
    mean, std, lo, hi = da.compute(arr.mean(red), arr.std(red), arr.min(red), arr.max(red))
    return {"mean": mean.tolist(), "std": std.tolist(), "min": lo.tolist(), "max": hi.tolist()}


def cmd_stats(a: argparse.Namespace) -> int:
    bank = open_memorybank(a.path, mode="r")
    fields = [a.field] if a.field else list(bank.schema.fields)
    result = {}
    for f in fields:
        if f not in bank.schema.fields:
            print(f"field {f!r} is not stored in {a.path} (fields: {bank.schema.fields})", file=sys.stderr)
            return 1
        if len(bank) == 0:
            print(f"{f}: no complete rows")
            continue
        s = field_stats(bank, f)
        result[f] = s
        print(f"{f}: {len(s['mean'])} channels over {len(bank)} complete rows")
        for c in range(min(len(s["mean"]), a.max_channels)):
            print(f"  ch {c:>4}: mean={s['mean'][c]:.5g} std={s['std'][c]:.5g} min={s['min'][c]:.5g} max={s['max'][c]:.5g}")
        if len(s["mean"]) > a.max_channels:
            print(f"  ... ({len(s['mean']) - a.max_channels} more; --json to save all)")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh)
    return 0


def cmd_rm_split(a: argparse.Namespace) -> int:
    bank = open_memorybank(a.path, mode="r+")
    start, count = bank.splits.get(a.split, (None, None)) if a.split in bank.splits else (None, None)
    if start is None:
        print(f"split {a.split!r} is not in {a.path} (splits: {sorted(bank.splits)})", file=sys.stderr)
        return 1
    bank.remove_split(a.split)
    print(f"removed split {a.split!r} ({count} rows) from {a.path}")
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    kw = {"shard_rows": a.shard_rows}
    if a.dtype:
        kw["dtype"] = a.dtype
    if a.teacher_sha256:
        kw["teacher_sha256"] = a.teacher_sha256
    summary = convert(a.src, a.dst, **kw)
    print(f"converted {a.src} -> {a.dst}: {summary['rows']} rows, splits {summary['splits']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stores", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("info", help="fields, shapes, dtypes, chunks, codecs, bytes, splits, provenance")
    s.add_argument("path")
    s = sub.add_parser("ls", help="list keys of complete rows")
    s.add_argument("path")
    s.add_argument("--split", default=None, help="only this split")
    s.add_argument("--limit", type=int, default=0, help="print at most N keys (0 = all)")
    s = sub.add_parser("show", help="per-field shape and summary statistics of one key")
    s.add_argument("path")
    s.add_argument("key", help="e.g. train/segment_0001:123")
    s.add_argument("--values", action="store_true", help="also print the arrays")
    s = sub.add_parser("verify", help="check every complete row is readable, finite and indexed (exit 1 on a problem)")
    s.add_argument("path")
    s = sub.add_parser("stats", help="per-channel mean/std/min/max with dask over chunks")
    s.add_argument("path")
    s.add_argument("--field", default=None, help="actions | bev_vec | gru_out | bev_feat (default: all stored)")
    s.add_argument("--max-channels", type=int, default=8, help="channels to print per field")
    s.add_argument("--json", default=None, help="write all channels' stats to this JSON file")
    s = sub.add_parser("rm-split", help="delete a split's rows and entry")
    s.add_argument("path")
    s.add_argument("split")
    s = sub.add_parser("convert", help="zarr <-> hdf5 (by suffix .h5/.hdf5), or a directory of <key>.npz -> store")
    s.add_argument("src")
    s.add_argument("dst", help="new store: *.zarr directory or *.h5 file")
    s.add_argument("--dtype", choices=["float32", "float16"], default=None, help="stored dtype of dst")
    s.add_argument("--shard-rows", type=int, default=None, help="rows per shard of dst (power of two)")
    s.add_argument("--teacher-sha256", default=None, help="teacher checkpoint hash to record (npz import)")
    return p


COMMANDS = {"info": cmd_info, "ls": cmd_ls, "show": cmd_show, "verify": cmd_verify, "stats": cmd_stats,
            "rm-split": cmd_rm_split, "convert": cmd_convert}


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return COMMANDS[a.cmd](a)
    except (StoreError, FileNotFoundError, FileExistsError, ValueError, KeyError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
