"""Every error the core library raises, under one base class a caller can catch: :class:`E2RError`.

Each is also a ``ValueError`` (bad input), so code that catches ``ValueError`` keeps working. Messages name
the file, row, key or flag at fault and, where there is one, what to do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from stores.errors import InvalidKeyError   # the key grammar's error lives with the grammar (stores.keys)

__all__ = ["E2RError", "Problem", "DataError", "LayoutUndecidable", "CheckpointError", "InvalidKeyError", "check_positive", "check_probability",
           "check_weights", "ConfigError"]


class E2RError(Exception):
    """Base of the e2r core's errors."""


@dataclass(frozen=True)
class Problem:
    """One bad input: the file, the data.csv row (or None) and the reason."""

    file: str
    row: Optional[int]
    reason: str

    def __str__(self) -> str:
        return f"{self.file}" + (f": row {self.row}" if self.row is not None else "") + f": {self.reason}"


class DataError(E2RError, ValueError):
    """Bad input data. ``.problem`` holds the file, the data.csv row (or None) and the reason."""

    def __init__(self, file: Union[str, Path], reason: str, row: Optional[int] = None):
        self.problem = Problem(str(file), row, reason)
        super().__init__(str(self.problem))

    @property
    def file(self) -> str:
        return self.problem.file

    @property
    def row(self) -> Optional[int]:
        return self.problem.row


class LayoutUndecidable(E2RError, ValueError):
    """Auto-detection could not decide the number of features per point; the message says why."""


class CheckpointError(E2RError, ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


class ConfigError(E2RError, ValueError):
    """A run configuration (flag values) that cannot work; the message names the flag."""


def check_positive(cfg: object, names: Sequence[str]) -> None:
    """ConfigError naming the flag ``--<name>`` for each of ``names`` whose value on ``cfg`` is set (not None)
    and < 1: the one check every run config uses for its counts."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}")


def check_probability(cfg: object, names: Sequence[str]) -> None:
    """ConfigError naming the flag ``--<name>`` for each of ``names`` whose value on ``cfg`` is not in
    [0, 1] (NaN included): the one check of every probability flag."""
    for name in names:
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"--{name} must be in [0, 1], got {value}")


def check_weights(cfg: object, names: Sequence[str]) -> None:
    """ConfigError naming the flag ``--<name>`` for each of ``names`` whose value on ``cfg`` is not a finite
    number >= 0: the one check of every loss weight and weight-like factor (a NaN weight would otherwise turn
    its term off silently, since ``nan > 0`` is false, and an infinite one makes every loss infinite)."""
    for name in names:
        value = getattr(cfg, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ConfigError(f"--{name} must be a finite number >= 0, got {value}")
