"""Continuous batching: rows that join a running batch (and leave it) decode the tokens static batches give,
with fewer LLM passes when output lengths are mixed."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import make_blip2

import blipkit
from blipkit.models.blip2 import Visual
from blipkit.models.continuous import ContinuousBatch, Row, split_rows
from blipkit.models.decoding import Sampling

TEXTS = ["a photo of", "what is in the picture? answer in a few words", "", "describe it", "why"]


@pytest.fixture(scope="module", params=["opt", "llama"])
def model(request, tmp_path_factory) -> blipkit.Model:
    path = tmp_path_factory.mktemp(f"continuous-{request.param}")
    make_blip2(path, llm=request.param, num_query_tokens=4)
    return blipkit.load(path, batch_size=3)


def _pairs(model, n: int, seed: int = 0):
    torch.manual_seed(seed)
    images = torch.randn(n, 3, 28, 28)
    prompts = [model.text.prompt(TEXTS[i % len(TEXTS)], 16) for i in range(n)]
    return images, prompts


def _limited(limits: list[int]):
    """An ``on_token`` that stops row i after ``limits[i]`` tokens, and the tokens it saw."""
    seen: list[list[int]] = [[] for _ in limits]

    def on_token(row: int, token: int) -> bool:
        seen[row].append(token)
        return len(seen[row]) >= limits[row]

    return on_token, seen


@pytest.mark.parametrize("limits", [[16] * 10, [1, 16, 2, 16, 16, 1, 3, 16, 1, 9]])
def test_continuous_equals_static_batches(model, limits):
    images, prompts = _pairs(model, len(limits))
    on_token, seen = _limited(limits)
    static = model.complete(images, prompts, 16, on_token=on_token, continuous=False)
    static_seen = [list(s) for s in seen]
    on_token, seen = _limited(limits)
    joined = model.complete(images, prompts, 16, on_token=on_token)
    assert joined == static
    assert seen == static_seen


def test_rows_join_shorter_and_longer_caches_and_leave(model):
    """admit_at=1: a newcomer joins at every free slot, so caches of every relative length are merged and the
    leading padding is cut as rows leave; every row still decodes its own tokens."""
    images, prompts = _pairs(model, 7, seed=1)
    limits = [2, 12, 1, 5, 12, 3, 8]
    reference = [
        model.complete(images[i : i + 1], prompts[i : i + 1], n, continuous=False)[0]
        for i, n in enumerate(limits)
    ]
    inputs = model.llm_inputs(Visual(images), prompts)
    out: list[list[int]] = [[] for _ in range(7)]
    sink = model.decoder.collector(out)
    rows = split_rows(inputs, 12, [lambda t, i=i: sink(i, t) or len(out[i]) >= limits[i] for i in range(7)])
    rows = [Row(r.embeds, limits[i], r.on_token) for i, r in enumerate(rows)]
    widths = []
    for batch in model.decoder.continuous(rows, slots=3, admit_at=1):
        assert batch.running <= 3
        widths.append(batch.mask.shape[1] if batch.running else 0)
    assert out == reference
    assert min(w for w in widths if w) < max(widths)  # the cache shrank again after long rows left


def test_mixed_lengths_take_fewer_passes(model):
    images, prompts = _pairs(model, 12, seed=2)
    limits = [1, 1, 14, 1] * 3
    inputs = model.llm_inputs(Visual(images), prompts)

    def passes(slots: int, static: bool) -> int:
        seen: list[list[int]] = [[] for _ in limits]
        sinks = [lambda t, i=i: seen[i].append(t) or len(seen[i]) >= limits[i] for i in range(12)]
        rows = split_rows(inputs, 14, sinks)
        if static:  # batches of `slots` run to their longest row: one prefill plus a step per further token
            return sum(1 + max(limits[i : i + slots]) - 1 for i in range(0, 12, slots))
        batches = list(model.decoder.continuous(rows, slots, admit_at=1))
        assert [len(s) for s in seen] == limits
        return batches[-1].forwards

    assert passes(4, static=False) < passes(4, static=True)


def test_batches_that_cannot_join_stay_static(model):
    assert model.decoder.joins(Sampling())
    assert not model.decoder.joins(Sampling(num_beams=2))
    assert not model.decoder.joins(Sampling(do_sample=True))
    with pytest.raises(ValueError, match="slots"):
        ContinuousBatch(model.decoder.lean, slots=0)
