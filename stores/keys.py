"""The sample key grammar: ``"<split>/<segment>:<start>"``, e.g. ``train/segment_0001:123``.

Every place that builds, parses or trusts a key goes through this module. A key names a window of
``seq_len`` frames of one segment starting at frame ``start``. LiDAR and camera samples of the same
moment share the key; that is how a student finds its teacher targets in the memorybank.

Parts (split, segment) are 1..128 characters of ``[A-Za-z0-9_.-]``, must not start with ``.`` or ``-``
and must not contain ``..``; ``start`` is a non-negative decimal integer without sign or leading zeros.
"""
from __future__ import annotations

import re
from typing import NamedTuple

from stores.errors import InvalidKeyError

__all__ = ["InvalidKeyError", "SampleKey", "make_key", "parse_key", "validate_key",
           "validate_part", "split_of"]

_PART_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
_START_RE = re.compile(r"0|[1-9][0-9]{0,17}")
MAX_KEY_LEN = 128 + 1 + 128 + 1 + 18


class SampleKey(NamedTuple):
    split: str
    segment: str
    start: int

    def __str__(self) -> str:  # noqa: D105
        return f"{self.split}/{self.segment}:{self.start}"


def validate_part(part: str, what: str = "part") -> str:
    """Return ``part`` if it is a valid split or segment name, else raise InvalidKeyError."""
    if not isinstance(part, str):
        raise InvalidKeyError(f"{what} must be a string, got {type(part).__name__}: {part!r}")
    if part == "":
        raise InvalidKeyError(f"{what} is empty")
    if ".." in part:
        raise InvalidKeyError(f"{what} {part!r} contains '..'")
    if "/" in part or "\\" in part or ":" in part:
        raise InvalidKeyError(f"{what} {part!r} contains a path separator or ':'")
    if not _PART_RE.fullmatch(part):
        raise InvalidKeyError(
            f"{what} {part!r} is not 1-128 characters of [A-Za-z0-9_.-] starting with a letter, digit or '_'")
    return part


def make_key(split: str, segment: str, start: int) -> str:
    """Build ``"<split>/<segment>:<start>"`` from validated parts."""
    validate_part(split, "split")
    validate_part(segment, "segment")
    if isinstance(start, bool) or not isinstance(start, int):
        try:
            import numpy as np
            if isinstance(start, np.integer):
                start = int(start)
            else:
                raise TypeError
        except TypeError:
            raise InvalidKeyError(f"start must be an integer, got {type(start).__name__}: {start!r}") from None
    if not 0 <= start < 10 ** 18:
        raise InvalidKeyError(f"start must be in 0..{10 ** 18 - 1} (at most 18 digits), got {start}")
    return f"{split}/{segment}:{start}"


def parse_key(key: str) -> SampleKey:
    """Parse and validate a key; raise InvalidKeyError naming the key and what is wrong."""
    if not isinstance(key, str):
        raise InvalidKeyError(f"key must be a string, got {type(key).__name__}: {key!r}")
    if len(key) > MAX_KEY_LEN:
        raise InvalidKeyError(f"key {key[:40]!r}... is longer than {MAX_KEY_LEN} characters")
    head, sep, start_s = key.rpartition(":")
    if not sep:
        raise InvalidKeyError(f"key {key!r} has no ':<start>' (expected '<split>/<segment>:<start>')")
    split, sep, segment = head.partition("/")
    if not sep:
        raise InvalidKeyError(f"key {key!r} has no '/' between split and segment")
    try:
        validate_part(split, "split")
        validate_part(segment, "segment")
    except InvalidKeyError as e:
        raise InvalidKeyError(f"key {key!r}: {e}") from None
    if not _START_RE.fullmatch(start_s):
        raise InvalidKeyError(f"key {key!r}: start {start_s!r} is not a non-negative integer")
    return SampleKey(split, segment, int(start_s))


def validate_key(key: str) -> str:
    """Return ``key`` unchanged if valid, else raise InvalidKeyError."""
    parse_key(key)
    return key


def split_of(key: str) -> str:
    """The split part of a valid key."""
    return parse_key(key).split
