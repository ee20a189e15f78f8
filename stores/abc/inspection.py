"""`Inspection`: what `stores.verify` and the store CLI read below a bank's public API, handed out by the bank
itself (`MemoryBank.inspect()`): bound readers and values, so no code outside a bank touches its private
members."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stores.index import KeyIndex


@dataclass(frozen=True)
class Inspection:
    """A bank's raw readers (no completion check, no key lookup) and its key index.

    ``keys_of(rows)``: keys of store rows (unreadable ones skipped); ``read_keys(a, b)`` / ``read_flags(a,
    b)`` / ``read_complete(a, b)``: rows ``[a, b)`` of the keys / completion arrays; ``flags_extent()``: rows
    the completion array holds chunks for; ``read_rows(fields, rows)``: checked rows; ``index``: the key index
    (complete rows, duplicates, per-split indexes); ``lost_files``: the data-file part of ``bank.damage``.
    Zarr banks add ``chunk_rows(array)``, ``flat_reader(array)``, ``arrays_on_disk()``, ``row_reader(array)``
and, on object storage, ``listing`` (object name -> entry); a local Zarr bank ``files_of_rows(a, b)``: the
    paths, relative to the store, of every file holding rows ``[a, b)`` (keys, flags, data, identity tags). A store with identity tags adds
    ``expected_crcs(array, rows)`` -> ``(crc32c each row's chunk must have, rows without a tag)``
    (`stores.abc.guard.StoreGuard._expected_crcs`)."""

    keys_of: Callable[[Iterable[int]], list[str]]
    read_keys: Callable[[int, int], np.ndarray]
    read_flags: Callable[[int, int], np.ndarray]
    read_complete: Callable[[int, int], np.ndarray]
    flags_extent: Callable[[], int]
    read_rows: Callable[[Sequence[str], np.ndarray], dict[str, np.ndarray]]
    index: KeyIndex | None
    lost_files: tuple[str, ...]
    chunk_rows: Callable[[str], int] | None = None
    flat_reader: Callable[[str], Any] | None = None
    arrays_on_disk: Callable[[], list[str]] | None = None
    row_reader: Callable[[str], Any] | None = None
    listing: Mapping[str, Any] | None = None
    expected_crcs: Callable[[str, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None
    files_of_rows: Callable[[int, int], list[str]] | None = None
