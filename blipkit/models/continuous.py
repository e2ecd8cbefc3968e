"""Continuous batching for the lean greedy loop: a finished row leaves, a waiting row takes its slot.

Static batches decode until their longest row is done, so a batch of one-word answers and one long
description runs the long one alone for most of its steps. Here the running rows share one key/value cache,
left-padded to a common length::

    row a: [pad pad][prompt a ..........][new tokens a]
    row b: [prompt b ...................][new tokens b]
    row c: [pad pad pad pad][prompt c ...][new]          <- joined after a row left

Newcomers are prefilled together (one forward over their prompts alone: the running rows do not recompute
anything), then their cache joins the running one, padded on the left to the same length. A finished row
leaves the cache at once, and columns that became padding in every row are cut. Every row keeps its own
positions and padding is masked, so a row decodes the tokens it decodes in any other batch.

Newcomers join when at least ``admit_at`` slots are free (or nothing is running): each join is one more
forward pass, which on a CPU costs about as much as a decode step, so joining one row per step would eat what
the freed slots save.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from blipkit.models.greedy import GreedyDecoder
from blipkit.models.llm_io import LLMInputs, new_cache


@dataclass
class Row:
    """One sequence to decode: its prompt embeddings (n, D) with no padding, a token budget, and where its
    tokens go: ``on_token(token)`` returns True when the row is done (it also stops after its budget);
    ``on_done()`` is called once when it leaves."""

    embeds: Tensor  # (n, D)
    max_new_tokens: int
    on_token: Callable[[int], bool]
    on_done: Callable[[], None] | None = None


def split_rows(
    inputs: LLMInputs,
    max_new_tokens: int,
    sinks: list[Callable[[int], bool]],
    on_done: Callable[[], None] | None = None,
) -> list[Row]:
    """The rows of a batch of LLM inputs, their padding dropped (positions follow from the real tokens)."""
    return [
        Row(inputs.embeds[i][inputs.mask[i].bool()], max_new_tokens, sink, on_done)
        for i, sink in enumerate(sinks)
    ]


def joinable(llm: nn.Module) -> bool:
    """Whether ``llm`` keeps a plain per-layer key/value cache that rows can join and leave."""
    cache = new_cache(llm)
    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


def _pad_left(t: Tensor, n: int) -> Tensor:
    """``t`` with ``n`` zero columns before its sequence axis (-2 for keys/values, -1 for masks)."""
    if n == 0:
        return t
    dim = -2 if t.dim() == 4 else -1
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class ContinuousBatch:
    """The running rows of one continuous decode: ``add`` joins newcomers, ``step`` decodes one token each."""

    def __init__(self, lean: GreedyDecoder, slots: int, admit_at: int | None = None):
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.lean = lean
        self.slots = slots
        self.admit_at = admit_at if admit_at is not None else max(1, slots // 4)
        self.cache: DynamicCache | None = None
        self.rows: list[Row] = []
        self.counts: list[int] = []  # tokens handed to each row so far
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # (b, C + 1): cache columns, then the next token
        self.last = torch.zeros(0, dtype=torch.long)  # (b,) position of each row's pending token
        self.next_ids = torch.zeros(0, dtype=torch.long)  # (b,) token each row feeds next
        self.forwards = 0  # LLM passes run (prefills and steps), for benchmarks

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def free(self) -> int:
        return self.slots - len(self.rows)

    def wants_rows(self) -> bool:
        """Whether newcomers should join now."""
        return self.free > 0 and (self.free >= self.admit_at or not self.rows)

    @torch.inference_mode()
    def add(self, rows: list[Row]) -> None:
        """Prefill ``rows`` together, hand each its first token, and join those not done to the batch."""
        if not rows:
            return
        if len(rows) > self.free:
            raise ValueError(f"{len(rows)} rows for {self.free} free slots")
        first = rows[0].embeds
        lengths = [r.embeds.shape[0] for r in rows]
        L = max(lengths)
        embeds = first.new_zeros(len(rows), L, first.shape[-1])  # (k, L, D) left-padded
        mask = torch.zeros(len(rows), L, dtype=torch.long, device=first.device)
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            embeds[i, L - n :] = row.embeds
            mask[i, L - n :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        step = {"inputs_embeds": embeds, "attention_mask": mask}
        if self.lean.positions:
            step["position_ids"] = positions
        cache = new_cache(self.lean.llm)
        next_ids = self.lean.next_tokens(step, cache)  # (k,)
        self.forwards += 1
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        self._join(cache, rows, mask, positions[:, -1] + 1, next_ids)

    def _join(
        self, cache: DynamicCache, rows: list[Row], mask: Tensor, last: Tensor, next_ids: Tensor
    ) -> None:
        """Hand the newcomers their first token, then merge those still going into the running batch."""
        counts = [0] * len(rows)
        keep = self._hand(rows, counts, next_ids)
        if not keep:
            return
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=next_ids.device)
            cache.batch_select_indices(index)
            rows, counts = [rows[i] for i in keep], [counts[i] for i in keep]
            mask, last, next_ids = mask[index], last[index], next_ids[index]
        if self.cache is None or not self.rows:
            self.cache = cache
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            a, b = width - self.mask.shape[1], width - mask.shape[1]
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([_pad_left(mine.keys, a), _pad_left(theirs.keys, b)])
                mine.values = torch.cat([_pad_left(mine.values, a), _pad_left(theirs.values, b)])
            mask = torch.cat([_pad_left(self.mask, a), _pad_left(mask, b)])
            last, next_ids = torch.cat([self.last, last]), torch.cat([self.next_ids, next_ids])
            rows, counts = self.rows + rows, self.counts + counts
        self.rows, self.counts, self.mask, self.last, self.next_ids = rows, counts, mask, last, next_ids

    def _hand(self, rows: list[Row], counts: list[int], tokens: Tensor) -> list[int]:
        """Give each row its token; the indices of the rows still going."""
        keep = []
        for i, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            counts[i] += 1
            if not row.on_token(token) and counts[i] < row.max_new_tokens:
                keep.append(i)
            elif row.on_done is not None:
                row.on_done()
        return keep

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step of every running row; finished rows leave."""
        if not self.rows:
            return
        step = {"input_ids": self.next_ids[:, None], "attention_mask": self.mask}
        if self.lean.positions:
            step["position_ids"] = self.last[:, None]
        next_ids = self.lean.next_tokens(step, self.cache)  # (b,)
        self.forwards += 1
        keep = self._hand(self.rows, self.counts, next_ids)
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        last = self.last + 1
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, dtype=torch.long, device=next_ids.device)
            self.rows = [self.rows[i] for i in keep]
            self.counts = [self.counts[i] for i in keep]
            if not keep:
                self.cache, self.mask = None, mask[:0, :0]
                self.last, self.next_ids = last[:0], next_ids[:0]
                return
            self.cache.batch_select_indices(index)
            mask, last, next_ids = mask[index], last[index], next_ids[index]
            mask = self._trim(mask)
        self.mask, self.last, self.next_ids = mask, last, next_ids

    def _trim(self, mask: Tensor) -> Tensor:
        """Cut the leading columns that are padding in every row (from the mask and the cache)."""
        used = mask.any(0).nonzero()
        cut = int(used[0]) if used.numel() else 0
        if cut == 0:
            return mask
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]
        return mask[:, cut:]


def decode_continuously(
    lean: GreedyDecoder, rows: Iterable[Row], slots: int, admit_at: int | None = None
) -> Iterator[ContinuousBatch]:
    """Decode every row of ``rows`` (pulled lazily, so it may encode images as it goes) with at most ``slots``
    running at once; yields the batch after every pass, so a caller can hand on what finished."""
    source = iter(rows)
    batch = ContinuousBatch(lean, slots, admit_at)
    waiting: deque[Row] = deque()
    exhausted = False
    while True:
        if batch.wants_rows():
            while len(waiting) < batch.free and not exhausted:
                row = next(source, None)
                if row is None:
                    exhausted = True
                elif row.max_new_tokens < 1:
                    if row.on_done is not None:
                        row.on_done()
                else:
                    waiting.append(row)
            if waiting:
                batch.add([waiting.popleft() for _ in range(min(batch.free, len(waiting)))])
                yield batch
        if batch.running:
            batch.step()
            yield batch
        elif exhausted and not waiting:
            return
