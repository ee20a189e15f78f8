"""Creating a store on object storage when creators race (moto's S3 server on 127.0.0.1, the fixture of
`tests.test_store_remote`): every object is put only if absent (S3's ``If-None-Match: *``), so exactly one
creator makes the store; the other opens it, or gets StoreMismatchError naming both settings. The races are
made deterministic by running the whole other creator inside the first one's put of a chosen object."""
from __future__ import annotations

import fsspec
import pytest

from stores import StoreError, StoreMismatchError, create_memorybank, open_memorybank
from stores.remote import writes as remote_write
from stores.remote.objstore import ObjectFiles
from stores.remote.writes import empty_store_objects
from tests.store_fixtures import make_keys, rows_for, tiny_prov, tiny_schema


S = 16
OTHER = "cd" * 32                                 # another teacher's checkpoint hash


def _names(url: str) -> list[str]:
    root = url[len("s3://"):]
    return sorted(n[len(root) + 1:] for n in fsspec.filesystem("s3", skip_instance_cache=True).find(root))


def _race(monkeypatch, before: str, other) -> list[str]:
    """Run ``other()`` (a whole creation) just before this process's first put of the object ``before``."""
    real, fired = ObjectFiles.put_if_absent, []

    def racing(self: ObjectFiles, rel: str, data: bytes) -> bool:
        if rel == before and not fired:
            fired.append(rel)
            other()
        return real(self, rel, data)

    monkeypatch.setattr(ObjectFiles, "put_if_absent", racing)
    return fired


@pytest.mark.parametrize("where", ["s3", "memory", "file"])
def test_put_if_absent_writes_once_and_leaves_an_existing_object_unchanged(s3, tmp_path, where):  # noqa: F811
    url = {"s3": "s3://bkt/pia", "memory": "memory://e2r-pia", "file": f"file://{tmp_path}/pia"}[where]
    files = ObjectFiles(url)
    assert files.conditional
    assert files.put_if_absent("a/zarr.json", b"first")
    assert not files.put_if_absent("a/zarr.json", b"second")
    assert files.get("a/zarr.json") == b"first"
    files.put("a/zarr.json", b"third")                      # a plain put still replaces
    assert files.get("a/zarr.json") == b"third"
    assert list(files.listing()) == ["a/zarr.json"]         # no temporary left behind
    files.delete_tree()


def test_racing_creators_with_other_teachers_one_wins_the_other_gets_a_mismatch(s3, monkeypatch):  # noqa: F811
    url, schema = "s3://bkt/race_teacher.zarr", tiny_schema()
    made = []
    fired = _race(monkeypatch, "zarr.json", lambda: made.append(
        create_memorybank(url, schema, tiny_prov(OTHER), shard_rows=S)))
    with pytest.raises(StoreMismatchError) as err:
        create_memorybank(url, schema, tiny_prov(), shard_rows=S)
    assert fired == ["zarr.json"]
    msg = str(err.value)
    assert url in msg and OTHER in msg and tiny_prov().teacher_sha256 in msg and "another URL" in msg
    # the winner's store is intact and writable
    winner = made[0]
    keys = make_keys("train", S)
    winner.reserve_split("train", keys)
    winner.write_rows("train", 0, rows_for(schema, keys))
    winner.close()
    back = open_memorybank(url)
    assert back.provenance.teacher_sha256 == OTHER and back.complete_count() == S


def test_racing_creators_with_other_schemas_leave_only_the_winners_objects(s3, monkeypatch):  # noqa: F811
    url = "s3://bkt/race_schema.zarr"
    mine, theirs = tiny_schema(bev=True), tiny_schema(bev=False)
    # the other creator runs after this one put the bev_feat and complete/keys metadata, before light's
    _race(monkeypatch, "light/zarr.json",
          lambda: create_memorybank(url, theirs, tiny_prov(), shard_rows=S).close())
    with pytest.raises(StoreMismatchError, match="store_bev_feat"):
        create_memorybank(url, mine, tiny_prov(), shard_rows=S)
    assert _names(url) == sorted(empty_store_objects(theirs, tiny_prov(), S))   # bev_feat objects removed
    assert open_memorybank(url).schema == theirs


def test_a_creator_meeting_other_array_metadata_waits_for_the_root(s3, monkeypatch):  # noqa: F811
    url, mine, theirs = "s3://bkt/race_light.zarr", tiny_schema(), tiny_schema()
    theirs.seq_len = 5                                           # another light array shape
    other = empty_store_objects(theirs, tiny_prov(), S)
    files = ObjectFiles(url)
    files.put("light/zarr.json", other["light/zarr.json"])      # the other creator is half way
    monkeypatch.setattr(remote_write, "CREATE_WAIT_S", 0.3)
    with pytest.raises(StoreError, match="root zarr.json did not appear") as err:
        create_memorybank(url, mine, tiny_prov(), shard_rows=S)
    assert "remove_memorybank" in str(err.value)
    assert files.get("light/zarr.json") == other["light/zarr.json"]    # not overwritten
    for rel, data in other.items():                                     # the other creator finishes
        files.put_if_absent(rel, data)
    with pytest.raises(StoreMismatchError, match="seq_len"):
        create_memorybank(url, mine, tiny_prov(), shard_rows=S)
    assert files.get("light/zarr.json") == other["light/zarr.json"]


def test_same_settings_twice_open_the_one_store(s3, monkeypatch):  # noqa: F811
    url, schema = "s3://bkt/race_same.zarr", tiny_schema()
    first = create_memorybank(url, schema, tiny_prov(), shard_rows=S)
    root = ObjectFiles(url).get("zarr.json")
    second = create_memorybank(url, schema, tiny_prov(), shard_rows=S)             # exists: opened
    assert second.schema == schema and ObjectFiles(url).get("zarr.json") == root
    with pytest.raises(FileExistsError):
        create_memorybank(url, schema, tiny_prov(), shard_rows=S, exist_ok=False)
    first.close(), second.close()

    url = "s3://bkt/race_same2.zarr"
    made = []
    _race(monkeypatch, "zarr.json", lambda: made.append(create_memorybank(url, schema, tiny_prov(), shard_rows=S)))
    loser = create_memorybank(url, schema, tiny_prov(), shard_rows=S)              # lost the race: opened
    assert loser.schema == schema and loser.provenance.teacher_sha256 == tiny_prov().teacher_sha256
    assert _names(url) == sorted(empty_store_objects(schema, tiny_prov(), S))
    monkeypatch.undo()
    url = "s3://bkt/race_same3.zarr"
    _race(monkeypatch, "zarr.json", lambda: create_memorybank(url, schema, tiny_prov(), shard_rows=S).close())
    with pytest.raises(FileExistsError, match="just now"):
        create_memorybank(url, schema, tiny_prov(), shard_rows=S, exist_ok=False)


def test_a_crashed_creation_is_redone_by_creating_again(s3):  # noqa: F811
    url, schema = "s3://bkt/crashed.zarr", tiny_schema()
    files = ObjectFiles(url)
    for rel, data in empty_store_objects(schema, tiny_prov(), S).items():
        if rel != "zarr.json":                                  # the creator died before its root
            files.put(rel, data)
    bank = create_memorybank(url, schema, tiny_prov(), shard_rows=S)
    assert bank.schema == schema and len(bank) == 0
    assert _names(url) == sorted(empty_store_objects(schema, tiny_prov(), S))
