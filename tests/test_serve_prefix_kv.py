"""The serving engine's cache of the LLM keys/values over the visual prompt, on tiny random checkpoints."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hf_tiny import make_blip2
from PIL import Image

import blipkit
from blipkit.models.blip2 import Visual
from blipkit.models.decoding import Sampling
from blipkit.models.llm_io import cache_keyword
from blipkit.models.prefix_cache import compute_prefix_kv, row_kv, stack_kv, supports_prefix_kv
from blipkit.serve.cache import FeatureCache, ImageEntry
from blipkit.serve.engine import Engine, Job

QUESTIONS = [  # different prompt lengths
    "what ?",
    "what color is the small cat on the blanket near the tree ?",
    "where is it ?",
    "how many dogs are there ?",
]


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def opt(opt_dir):
    return blipkit.load(opt_dir)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-llama")
    make_blip2(path, llm="llama", num_query_tokens=4)
    return blipkit.load(path)


@pytest.fixture(params=["opt", "llama"])
def model(request):
    return request.getfixturevalue(request.param)


def entry_tensors(entry: ImageEntry) -> list[torch.Tensor]:
    return [entry.features, *(t for layer in entry.kv for t in layer)]


Ran = list[tuple[Job, list]]  # each job with the events it emitted


def run_batch(engine: Engine, items: list[tuple[int, str, int]], **options) -> Ran:
    """Runs (image seed, question, max_tokens) jobs as one batch on this thread."""
    ran: Ran = []
    for seed, question, max_tokens in items:
        prompt = engine.prompt([], question, max_tokens)
        key = f"img{seed}"
        entry = engine.cached(key)
        pixels = None if entry is not None else engine.pixels(png(seed))
        events: list = []
        job = Job(key, prompt, events.append, entry, pixels, max_tokens=max_tokens, **options)
        ran.append((job, events))
    engine.run_batch([job for job, _ in ran])
    return ran


def outcome(ran: Ran) -> list[tuple]:
    """(tokens, finish reason, text, cached image) per job; every job must have finished cleanly."""
    results = []
    for job, events in ran:
        kind, result = events[-1]
        assert kind == "done", result
        results.append((job.tokens, result.finish_reason, result.text, result.cached_image))
    return results


def test_logits_and_tokens_equal_the_uncached_layout(model):
    blip, tok = model.model, model.tokenizer
    torch.manual_seed(0)
    prefix = blip.visual_prompt(Visual(torch.randn(3, 3, 28, 28)))  # (3, Q, D): three images
    kv = compute_prefix_kv(blip.llm, prefix)
    assert kv is not None and kv[0][0].shape[-2] == prefix.shape[1]
    rows = [model.text.llm_ids(t)[0] for t in QUESTIONS[:3]]
    options = {
        "max_new_tokens": 8,
        "do_sample": False,
        "eos_token_id": None,  # every row runs all steps: every step's logits are compared
        "pad_token_id": tok.pad_token_id,
        "output_logits": True,
        "return_dict_in_generate": True,
    }
    ids, mask = model.text.llm_batch(rows)  # right-padded: the uncached path left-packs [pad][prefix][text]
    plain = blip.hf_generate(blip.llm_inputs(prefix, ids, mask), **options)
    ids, mask = model.text.llm_batch(rows, side="left")  # [prefix from the cache][pad][text]
    inputs = blip.llm_inputs(prefix, ids, mask)
    cache = {cache_keyword(blip.llm): stack_kv(blip.llm, [row_kv(kv, i) for i in range(3)])}
    cached = blip.llm.generate(inputs_embeds=inputs.embeds, attention_mask=inputs.mask, **cache, **options)
    assert mask.sum(1).unique().numel() == 3  # three prompt lengths in one batch
    for step_cached, step_plain in zip(cached.logits, plain.logits, strict=True):
        torch.testing.assert_close(step_cached, step_plain, atol=1e-4, rtol=1e-4)
    assert torch.equal(cached.sequences, plain.sequences)
    # the decoder's two loops after the cached prefix give transformers' uncached tokens
    eos = tok.eos_token_id
    expected = [row[: row.index(eos)] if eos in row else row for row in plain.sequences.tolist()]
    decoder = model.decoder
    lean = decoder.generate(inputs, 8, prefix_kv=[row_kv(kv, i) for i in range(3)])
    assert decoder.path(Sampling()) == "lean"
    forced = Sampling(options={"repetition_penalty": 1.0})  # any option: transformers' loop
    assert decoder.path(forced) == "transformers"
    through_hf = decoder.generate(inputs, 8, forced, prefix_kv=[row_kv(kv, i) for i in range(3)])
    assert lean == through_hf == [r[:8] for r in expected]


def test_engine_answers_equal_without_kv_cache(model):
    with_kv, without = Engine(model), Engine(model, prefix_kv=False)
    assert with_kv.prefix_kv and not without.prefix_kv
    warm = [(0, QUESTIONS[0], 4), (1, QUESTIONS[1], 4)]
    # hits (images 0 and 1, image 0 twice) and misses (2, 3) in one batch, four prompt lengths
    mixed = [(0, QUESTIONS[1], 3), (2, QUESTIONS[2], 6), (1, QUESTIONS[0], 5), (3, QUESTIONS[3], 6)]
    mixed.append((0, QUESTIONS[3], 6))
    for batch in (warm, mixed):
        assert outcome(run_batch(with_kv, batch)) == outcome(run_batch(without, batch))
    cached = [r[3] for r in outcome(run_batch(with_kv, mixed))]
    assert cached == [True] * len(mixed)
    assert all(with_kv.cached(f"img{i}").kv is not None for i in range(4))
    assert all(without.cached(f"img{i}").kv is None for i in range(4))


def test_sampling_equal_without_kv_cache(model):
    with_kv, without = Engine(model), Engine(model, prefix_kv=False)
    batch = [(0, QUESTIONS[0], 6), (1, QUESTIONS[1], 6), (0, QUESTIONS[2], 6)]
    results = []
    for engine in (with_kv, without):
        run_batch(engine, batch)  # cache the images
        torch.manual_seed(1)
        results.append(outcome(run_batch(engine, batch, temperature=0.9, top_p=0.8)))
    assert results[0] == results[1]


def test_cache_hit_skips_vision_and_llm_prefix(opt):
    engine = Engine(opt)
    Q = opt.config.qformer.num_query_tokens
    vision_calls, llm_lengths = [], []

    def record(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        llm_lengths.append((x if x is not None else kwargs["input_ids"]).shape[1])

    hooks = [
        opt.model.vision.register_forward_hook(lambda *a: vision_calls.append(1)),
        opt.model.llm.get_decoder().register_forward_pre_hook(record, with_kwargs=True),  # every LLM pass
    ]
    try:
        batch = [(5, QUESTIONS[0], 4), (6, QUESTIONS[1], 4)]
        width = max(len(engine.prompt([], q, 4).llm_ids) for _, q, _ in batch)
        run_batch(engine, batch)  # misses: one vision pass, one LLM pass over the prefixes, then the text
        assert len(vision_calls) == 1 and llm_lengths[:2] == [Q, width]
        vision_calls.clear()
        llm_lengths.clear()
        run_batch(engine, [(6, QUESTIONS[2], 4), (5, QUESTIONS[1], 4)])  # hits
        assert vision_calls == []
        assert llm_lengths[0] == width and set(llm_lengths[1:]) <= {1}  # text only, then one token a step
    finally:
        for hook in hooks:
            hook.remove()
    assert engine.stats()["cache"]["prefix_kv"] is True


def test_cached_entry_is_unchanged_by_generation(opt):
    engine = Engine(opt)
    run_batch(engine, [(7, QUESTIONS[0], 2)])
    entry = engine.cached("img7")
    before = [t.clone() for t in entry_tensors(entry)]
    run_batch(engine, [(7, QUESTIONS[1], 8), (8, QUESTIONS[2], 8), (7, QUESTIONS[3], 8)])
    assert engine.cached("img7") is entry
    after = entry_tensors(entry)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert all(t.shape[0] == 1 for t in after)


def test_lru_eviction_by_count_and_bytes():
    cache = FeatureCache(capacity=2)
    for key in "ab":
        cache.put(key, torch.zeros(4))
    assert cache.get("a") is not None  # "b" is now the least recent
    cache.put("c", torch.zeros(4))
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.stats()["bytes"] == 2 * 16

    by_bytes = FeatureCache(capacity=10, max_bytes=40)
    for key in "abc":
        by_bytes.put(key, ImageEntry(torch.zeros(1, 4), ((torch.zeros(1), torch.zeros(1)),)))  # 24 bytes each
    assert len(by_bytes) == 1 and "c" in by_bytes and by_bytes.stats()["bytes"] == 24
    by_bytes.put("big", torch.zeros(20))  # larger than the whole budget: not kept
    assert "big" not in by_bytes and "c" in by_bytes


def test_engine_evicts_least_recent_image(opt):
    engine = Engine(opt, cache_size=2)
    for seed in (10, 11, 12):
        run_batch(engine, [(seed, QUESTIONS[0], 2)])
    stats = engine.stats()["cache"]
    assert engine.cached("img10") is None and stats["size"] == 2 and stats["bytes"] > 0
    assert outcome(run_batch(engine, [(10, QUESTIONS[0], 2)]))[0][3] is False  # encoded again


def test_models_without_reusable_prefix_keep_todays_path(tmp_path, opt):
    make_blip2(tmp_path, llm="t5", num_query_tokens=4)
    t5 = blipkit.load(tmp_path)
    engine = Engine(t5)
    assert not supports_prefix_kv(t5.model) and engine.stats()["cache"]["prefix_kv"] is False
    ran = run_batch(engine, [(0, QUESTIONS[0], 4), (1, QUESTIONS[1], 4)])
    assert engine.cached("img0").kv is None
    expected = t5.generate([png(0), png(1)], [job.prompt.text for job, _ in ran], max_new_tokens=4)
    assert [r[2] for r in outcome(ran)] == expected

    opt.config.bridge.text_input = True  # question-aware: the visual prompt depends on the text
    try:
        assert not supports_prefix_kv(opt.model) and not Engine(opt).prefix_kv
    finally:
        opt.config.bridge.text_input = False
    assert not Engine(opt, cache_size=0).prefix_kv  # nothing kept: nothing to reuse
