"""Batches sliced for one process of a data-parallel run (tokenising is ``blipkit.text.TextProcessor``'s)."""

from __future__ import annotations

from torch import Tensor


def trim(mask: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Drop the columns no row uses (after slicing a process's rows out of a global batch)."""
    width = int(mask.sum(dim=1).max()) if mask.numel() else 0
    return tuple(t[:, :width] for t in (mask, *tensors))
