"""Decoding and resizing in DataLoader workers, fed lazily with batches of paths."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from blipkit.batch.files import load_listed
from blipkit.processing import ImageError, ImageProcessor

Item = tuple[str, str]  # (output key: resolved path, path to open)


def decode_one(processor: ImageProcessor, path: str) -> tuple[Tensor | None, str | None]:
    """(pixels (3, S, S), None) or (None, reason) for an image that cannot be read."""
    try:
        return processor.preprocess(load_listed(path)), None
    except ImageError as e:
        return None, e.reason
    except Exception as e:  # a decoder bug must cost one image, not the run
        return None, f"{type(e).__name__}: {e}"


class Decoder(Dataset):
    """Map-style dataset indexed by ``Item``: loads and preprocesses one image."""

    def __init__(self, processor: ImageProcessor):
        self.processor = processor

    def __getitem__(self, item: Item) -> tuple[str, Tensor | None, str | None]:
        key, path = item
        return (key, *decode_one(self.processor, path))


@dataclass
class Batch:
    keys: list[str]  # every item, in order
    pixels: Tensor | None  # (n_ok, 3, S, S) for the readable ones
    ok: list[str] = field(default_factory=list)  # keys of the rows of ``pixels``
    errors: dict[str, str] = field(default_factory=dict)  # key -> reason


def collate(items: list[tuple[str, Tensor | None, str | None]]) -> Batch:
    good = [(k, px) for k, px, _ in items if px is not None]
    return Batch(
        keys=[k for k, _, _ in items],
        pixels=torch.stack([px for _, px in good]) if good else None,
        ok=[k for k, _ in good],
        errors={k: err for k, px, err in items if px is None},
    )


def chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """Consecutive lists of ``size`` items, pulled lazily."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def batches(
    processor: ImageProcessor, items: Iterable[Item], batch_size: int, workers: int
) -> Iterable[Batch]:
    """Decoded batches in order; ``workers`` processes decode ahead while the model runs."""
    return DataLoader(
        Decoder(processor),
        batch_sampler=chunks(items, batch_size),  # iterated lazily in this process
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=2 if workers else None,
    )
