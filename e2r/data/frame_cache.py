"""Decoded camera frames kept in memory, so that an epoch decodes each frame once (a window of T frames at
stride 1 shares T - 1 frames with the next: without a cache every frame is decoded T times per epoch).

    cache = FrameCache(max_mb=512)
    images = cache.get(key)                   # (Ncam, 3, H, W) float32, or None
    cache.put(key, images)                    # kept while the budget allows; least recently used go first

Frames are stored as uint8 when that is exact (8-bit images: every value is k / 255, as the readers make
them), else as given (16-bit grayscale): a cached frame is bit-identical to a decoded one. One cache per
process: each DataLoader worker holds its own (the budget is per process).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Optional

import torch
from torch import Tensor

__all__ = ["FrameCache"]


class FrameCache:
    """An LRU of decoded frames within ``max_mb`` megabytes (0 = off)."""

    def __init__(self, max_mb: float = 512.0) -> None:
        if not max_mb >= 0:
            raise ValueError(f"frame cache size must be >= 0 MB, got {max_mb}")
        self.max_bytes = int(max_mb * 2 ** 20)
        self.nbytes, self.hits, self.misses = 0, 0, 0
        self._frames: OrderedDict[Hashable, Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._frames)

    def get(self, key: Hashable) -> Optional[Tensor]:
        """The frame stored under ``key`` as float32 (a fresh tensor), or None."""
        frame = self._frames.get(key)
        if frame is None:
            self.misses += 1
            return None
        self._frames.move_to_end(key)
        self.hits += 1
        return frame.float() / 255.0 if frame.dtype == torch.uint8 else frame.clone()

    def put(self, key: Hashable, frame: Tensor) -> None:
        """Keep ``frame`` (float in [0, 1]) under ``key``, evicting the least recently used to fit."""
        if self.max_bytes == 0:
            return
        q = torch.round(frame * 255.0)
        stored = q.to(torch.uint8) if torch.equal(q / 255.0, frame) else frame.clone()
        size = stored.numel() * stored.element_size()
        if size > self.max_bytes:
            return
        old = self._frames.pop(key, None)
        if old is not None:
            self.nbytes -= old.numel() * old.element_size()
        while self._frames and self.nbytes + size > self.max_bytes:
            _, dropped = self._frames.popitem(last=False)
            self.nbytes -= dropped.numel() * dropped.element_size()
        self._frames[key] = stored
        self.nbytes += size
