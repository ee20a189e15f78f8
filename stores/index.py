"""Key -> row index of a memorybank, built once from the ``keys`` and ``complete`` arrays (O(1) lookups)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from e2r.keys import InvalidKeyError, validate_key


class KeyIndex:
    """Maps each key of a *complete* row to its row number.

    ``keys`` (N,) str with "" for unreserved rows; ``complete`` (N,) bool. Rows that are reserved but not
    complete are not indexed, so readers never see them. Duplicate keys among complete rows are an error
    reported by ``duplicates`` (``verify`` flags them); lookups then return the first row.
    """

    def __init__(self, keys: np.ndarray, complete: np.ndarray) -> None:
        keys = np.asarray(keys)
        complete = np.asarray(complete, dtype=bool)
        if keys.shape != complete.shape:
            raise ValueError(f"keys {keys.shape} and complete mask {complete.shape} differ in length")
        self._row: dict[str, int] = {}
        self.duplicates: list[tuple[str, int, int]] = []
        for row in np.flatnonzero(complete & (keys != "")):
            k = str(keys[row])
            first = self._row.setdefault(k, int(row))
            if first != row:
                self.duplicates.append((k, first, int(row)))

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, key: object) -> bool:
        return key in self._row

    def row(self, key: str) -> int | None:
        """Row of a valid key, or None when absent. Raises InvalidKeyError for malformed keys."""
        validate_key(key)
        return self._row.get(key)

    def rows(self, keys: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Rows (int64, -1 where absent) for ``keys`` in request order, and the list of absent keys.

        A malformed key raises InvalidKeyError naming it. (Indexed keys were validated when reserved, so
        only keys not found are validated here: the hot path does one dict lookup per key.)
        """
        get = self._row.get
        out = np.fromiter((get(k, -1) if isinstance(k, str) else -1 for k in keys), dtype=np.int64,
                          count=len(keys))
        missing: list[str] = []
        for i in np.flatnonzero(out < 0).tolist():
            validate_key(keys[i])
            missing.append(keys[i])
        return out, missing

    def items(self) -> Iterable[tuple[str, int]]:
        return self._row.items()


def check_keys(keys: Sequence[str], where: str) -> list[str]:
    """Validate a list of keys for writing: grammar and uniqueness. ``where`` names the source in errors."""
    seen: dict[str, int] = {}
    out = []
    for i, k in enumerate(keys):
        try:
            validate_key(k)
        except InvalidKeyError as e:
            raise InvalidKeyError(f"{where}: key #{i}: {e}") from None
        if k in seen:
            raise InvalidKeyError(f"{where}: key {k!r} appears twice (positions {seen[k]} and {i})")
        seen[k] = i
        out.append(k)
    return out
