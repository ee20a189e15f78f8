"""Several window datasets read as one training set: a split and whole extra splits (e.g. recorded drives).

    train = WindowUnion([CameraSequenceDataset(root, "train", 5), CameraSequenceDataset(root, "round_01", 5)])

Index ``i`` runs over the first dataset's windows, then the second's, and so on; keys stay unique because a
key names its split. The action statistics (:meth:`frame_actions`) come from the parts whose actions are
expert labels (a recorded drive's commands are not; ``layout.RECORDED_RELPATH``), or from all parts when
none has labels.
"""
from __future__ import annotations

import bisect
from typing import Any, Sequence

import numpy as np

__all__ = ["WindowUnion"]


class WindowUnion:
    """The concatenation of window datasets (``CameraSequenceDataset`` / ``LidarSequenceDataset``) with the
    attributes the trainers read: ``len``, items, ``keys``, ``tables``, :meth:`frame_actions`."""

    def __init__(self, parts: Sequence[Any]) -> None:
        if not parts:
            raise ValueError("WindowUnion needs at least one dataset")
        self.parts = list(parts)
        self._ends = list(np.cumsum([len(p) for p in self.parts]))

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        k = bisect.bisect_right(self._ends, index)
        return self.parts[k][index - (self._ends[k - 1] if k else 0)]

    @property
    def keys(self) -> list[str]:
        return [key for p in self.parts for key in p.keys]

    @property
    def tables(self) -> dict[tuple[str, str], Any]:
        """``{(split, segment): SegmentTable}`` of every part (segment names may repeat across splits)."""
        return {(p.split, seg): table for p in self.parts for seg, table in p.tables.items()}

    @property
    def splits(self) -> list[str]:
        return [p.split for p in self.parts]

    def frame_actions(self) -> np.ndarray:
        """(F, 2) ``[wheel_angle, speed command]`` of the labelled parts' frames (all parts when none is)."""
        labelled = [p for p in self.parts if any(t.expert_labels for t in p.tables.values())]
        return np.concatenate([p.frame_actions() for p in (labelled or self.parts)])
