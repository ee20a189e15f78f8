"""Property of the store CLIs (``python -m stores``, ``python -m pipelines.retrieval_index query``) against hostile input: any command on any path - a good
store with any one file damaged (bytes flipped, truncated, replaced by garbage, deleted), a garbage file, a
missing path - and any key text either works (exit 0) or exits 1/2 with a message: never a traceback, never
a hang. A store whose data bytes were changed is never verified clean. Examples come from a fixed seed."""
from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stores import create_memorybank
from stores.__main__ import main as stores_main
from pipelines.retrieval_index import main as retrieval_main
from tests.fixtures import Hang
from tests.store_fixtures import make_keys, rows_for, tiny_prov, tiny_schema

CLI = settings(max_examples=40, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
COMMANDS = ("info", "ls", "show", "verify", "stats", "query")


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "mb.zarr"
    schema = tiny_schema(bev=True)
    bank = create_memorybank(str(path), schema, tiny_prov(), shard_rows=8)
    keys = make_keys("train", 12)
    bank.reserve_split("train", keys)
    bank.write_rows("train", 0, rows_for(schema, keys))
    return path


def run_cli(argv: list[str]) -> int:
    """``main(argv)`` under a 20 s alarm (``query``: the retrieval CLI's); argparse's SystemExit is its exit code."""
    def alarm(signum, frame):
        raise Hang(f"python -m stores {' '.join(argv)} still running after 20 s")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 20.0)
    try:
        return (retrieval_main if argv[:1] == ["query"] else stores_main)(argv)
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@CLI
@given(data=st.data(), command=st.sampled_from(COMMANDS),
       damage=st.sampled_from(("flip", "truncate", "garbage", "delete", "none")),
       key=st.one_of(st.just("train/segment_0000:0"), st.text(max_size=30)))
def test_any_command_on_a_damaged_store_gives_an_answer_or_a_message(good, tmp_path_factory, data, command, damage,
                                                                       key, capsys):
    path = tmp_path_factory.mktemp("d") / "mb.zarr"
    shutil.copytree(good, path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    target = data.draw(st.sampled_from(files), label="file")
    raw = target.read_bytes()
    if damage == "flip" and raw:
        pos = data.draw(st.integers(0, len(raw) - 1), label="byte")
        target.write_bytes(raw[:pos] + bytes([raw[pos] ^ 0xA5]) + raw[pos + 1:])
    elif damage == "truncate":
        target.write_bytes(raw[:data.draw(st.integers(0, max(len(raw) - 1, 0)), label="length")])
    elif damage == "garbage":
        target.write_bytes(data.draw(st.binary(max_size=64), label="garbage"))
    elif damage == "delete":
        target.unlink()
    args = {"show": [str(path), key], "query": ["--store", str(path), "--key", key]}.get(command, [str(path)])
    rc = run_cli([command, *args])
    err = capsys.readouterr().err
    assert rc in (0, 1, 2) and "Traceback" not in err, (command, damage, target, err)
    changed = not target.exists() or target.read_bytes() != raw
    if command == "verify" and changed and target.name != "zarr.json" and "c" in target.relative_to(path).parts:
        assert rc == 1, f"verify passed a store whose chunk {target} was damaged ({damage})"


@CLI
@given(command=st.sampled_from(COMMANDS), content=st.one_of(st.none(), st.binary(max_size=200)),
       key=st.text(max_size=20))
def test_any_command_on_a_non_store_path_exits_with_a_message(tmp_path_factory, command, content, key, capsys):
    path = tmp_path_factory.mktemp("n") / "thing.zarr"
    if content is not None:
        path.write_bytes(content)
    args = {"show": [str(path), key], "query": ["--store", str(path), "--key", key]}.get(command, [str(path)])
    rc = run_cli([command, *args])
    out, err = capsys.readouterr()
    assert rc in (1, 2) and "Traceback" not in err and (out + err).strip(), (command, err)   # verify: PROBLEM lines
