"""Learning rate (linear warm-up, then a cosine down to ``min_ratio`` of the peak) and the data order."""

from __future__ import annotations

import math

import numpy as np


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class DataOrder:
    """Which examples (and feature views) make up the global batch of each step.

    Every epoch is a fresh permutation seeded by (seed, epoch), consumed as one stream of global batches,
    so a step's batch depends only on (seed, step): resuming and changing the process count keep it.
    """

    def __init__(
        self, num_examples: int, batch_size: int, seed: int, views: int = 1, augment_prob: float = 0.0
    ):
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed
        self.views, self.augment_prob = views, augment_prob
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
            if epoch > 0:  # the previous epoch may still be needed by a batch that straddles both
                self._perms[epoch - 1] = np.random.default_rng([self.seed, epoch - 1]).permutation(self.n)
        return self._perms[epoch]

    def examples(self, step: int) -> np.ndarray:
        """(G,) example indices of the step's global batch."""
        positions = step * self.batch_size + np.arange(self.batch_size)
        epochs, offsets = positions // self.n, positions % self.n
        return np.array([self._perm(int(e))[o] for e, o in zip(epochs, offsets, strict=True)])

    def feature_views(self, step: int) -> np.ndarray:
        """(G,) which cached view of each image: 0 (plain) or an augmented one, with ``augment_prob``."""
        if self.views <= 1:
            return np.zeros(self.batch_size, dtype=np.int64)
        rng = np.random.default_rng([self.seed, 7919, step])
        augmented = rng.random(self.batch_size) < self.augment_prob
        return np.where(augmented, rng.integers(1, self.views, self.batch_size), 0)

    def epoch(self, step: int) -> float:
        return step * self.batch_size / self.n
