"""The store's file-system helpers (`stores.fsio`)."""
from __future__ import annotations


def test_fsync_files_climbs_only_to_directories_whose_entry_is_not_yet_durable(tmp_path, monkeypatch):
    import os
    import shutil

    from stores import fsio

    synced: list[str] = []
    real = fsio.fsync_path
    monkeypatch.setattr(fsio, "fsync_path", lambda p: (synced.append(os.path.relpath(p, tmp_path)), real(p)))
    root = tmp_path / "mb.zarr"
    (root / "a" / "c" / "0").mkdir(parents=True)
    f1, f2 = root / "a" / "c" / "0" / "0", root / "a" / "c" / "0" / "1"
    f1.write_bytes(b"x")
    f2.write_bytes(b"y")
    durable: dict = {}
    fsio.fsync_files([f1], root, durable=durable)
    assert synced == ["mb.zarr/a/c/0/0", "mb.zarr/a/c/0", "mb.zarr/a/c", "mb.zarr/a", "mb.zarr"]
    synced.clear()
    fsio.fsync_files([f2], root, synced=[str(f2)], durable=durable)     # data synced by the caller
    assert synced == ["mb.zarr/a/c/0"]                                   # a/c/0's own entry is already durable
    synced.clear()
    shutil.rmtree(root / "a" / "c" / "0")                                # made again: a new entry in a/c
    (root / "a" / "c" / "0").mkdir()
    f1.write_bytes(b"z")
    fsio.fsync_files([f1], root, durable=durable)
    assert synced == ["mb.zarr/a/c/0/0", "mb.zarr/a/c/0", "mb.zarr/a/c", "mb.zarr/a"]    # a/c changed too
    synced.clear()
    fsio.fsync_files([f1], root)                                         # without a durable map: the whole climb
    assert synced[-1] == "mb.zarr" and len(synced) == 5
