"""A bounded, thread-safe LRU of per-image entries (visual features, LLM keys/values), keyed by image hash."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass(frozen=True, eq=False)
class ImageEntry:
    """What the LLM side needs of one image; tensors owned by the entry, never written to after creation."""

    features: Tensor  # (1, Q, Dl) visual prompt, or (1, P, Dv) ViT features for question-aware models
    kv: tuple[tuple[Tensor, Tensor], ...] | None = None  # per LLM layer (keys, values) over the prompt

    @property
    def nbytes(self) -> int:
        tensors = [self.features, *(t for layer in self.kv or () for t in layer)]
        return sum(t.nbytes for t in tensors)


def _nbytes(value: Any) -> int:
    return int(getattr(value, "nbytes", 0))


class FeatureCache:
    """Maps an image hash to its entry; least recently used entries go first.

    Bounded by ``capacity`` entries and, when given, ``max_bytes`` of tensor data (an entry larger than
    ``max_bytes`` is not kept). Values report their size with ``nbytes`` (tensors and ``ImageEntry`` do).
    """

    def __init__(self, capacity: int = 64, max_bytes: int | None = None):
        self.capacity = max(0, capacity)
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str, count: bool = True) -> Any | None:
        """The entry for ``key`` (now the most recent) or None; ``count`` adds to the hit/miss stats."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            if count:
                self.hits += value is not None
                self.misses += value is None
            return value

    def put(self, key: str, value: Any) -> None:
        size = _nbytes(value)
        if self.capacity == 0 or (self.max_bytes is not None and size > self.max_bytes):
            return
        with self._lock:
            old = self._items.pop(key, None)
            self._bytes += size - _nbytes(old)
            self._items[key] = value
            while len(self._items) > self.capacity or (
                self.max_bytes is not None and self._bytes > self.max_bytes
            ):
                _, dropped = self._items.popitem(last=False)
                self._bytes -= _nbytes(dropped)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def stats(self) -> dict[str, int | None]:
        with self._lock:
            return {
                "size": len(self._items),
                "capacity": self.capacity,
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
            }
