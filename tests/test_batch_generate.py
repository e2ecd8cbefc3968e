"""The lean greedy loop gives transformers' greedy tokens, also when some rows stop early."""

from __future__ import annotations

import numpy as np
import pytest
from hf_tiny import make_blip2

import blipkit
from blipkit.batch.generate import Captioner
from blipkit.models.decoding import Decoder


@pytest.fixture(scope="module", params=["opt", "llama"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"hf-{request.param}-gen")
    make_blip2(path, llm=request.param, num_query_tokens=4)
    return blipkit.load(path)


@pytest.fixture(scope="module")
def pixels(model):
    rng = np.random.default_rng(0)
    return model.pixel_values([rng.integers(0, 255, (30, 40, 3), dtype=np.uint8) for _ in range(6)])


def transformers_tokens(model, pixels, prompt: str, eos: int) -> list[list[int]]:
    """transformers' greedy ``generate`` (the reference path), cut at ``eos``."""
    ids, mask = model.text.llm_batch([model.text.llm_ids(prompt)[0]] * len(pixels))
    kwargs = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": eos, "pad_token_id": 0}
    ref = model.model.generate(pixels, ids, mask, **kwargs).tolist()
    return [row[: row.index(eos)] if eos in row else row for row in ref]


@pytest.mark.parametrize("prompt", [None, "a photo of"])
def test_same_captions_as_transformers(model, pixels, prompt):
    captioner = Captioner(model, prompt, max_new_tokens=6)
    assert captioner.decoder.path(captioner.sampling) == "lean"
    expected = transformers_tokens(model, pixels, prompt or "", model.tokenizer.eos_token_id)
    assert captioner.tokens(pixels) == expected
    assert captioner(pixels) == [model.text.decode(t) for t in expected]
    assert captioner(pixels) == model.caption(pixels, prompt=prompt, max_new_tokens=6)


def test_rows_that_finish_early_are_dropped_without_changing_the_others(model, pixels):
    captioner = Captioner(model, "a photo of", max_new_tokens=6)
    full = captioner.tokens(pixels)
    # a token that some rows produce and others do not: make it the end-of-sequence token
    counts = {t: sum(t in row for row in full) for row in full for t in row}
    stop = next(t for t, n in counts.items() if 0 < n < len(full))
    captioner.decoder = Decoder(model.model, stop, model.text.llm_pad_id)
    got = captioner.tokens(pixels)
    assert got == transformers_tokens(model, pixels, "a photo of", stop)
    assert any(len(g) < 6 for g in got) and any(len(g) == 6 for g in got)
