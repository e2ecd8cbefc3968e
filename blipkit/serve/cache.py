"""A bounded, thread-safe LRU of per-image visual features, keyed by image hash."""

from __future__ import annotations

import threading
from collections import OrderedDict

from torch import Tensor


class FeatureCache:
    """Maps an image hash to the tensor the LLM side needs (the visual prompt, or the ViT features)."""

    def __init__(self, capacity: int = 64):
        self.capacity = max(0, capacity)
        self._items: OrderedDict[str, Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str, count: bool = True) -> Tensor | None:
        """The entry for ``key`` (now the most recent) or None; ``count`` adds to the hit/miss stats."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            if count:
                self.hits += value is not None
                self.misses += value is None
            return value

    def put(self, key: str, value: Tensor) -> None:
        if self.capacity == 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict[str, int]:
        return {"size": len(self._items), "capacity": self.capacity, "hits": self.hits, "misses": self.misses}
