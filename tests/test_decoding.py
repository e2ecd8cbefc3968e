"""The one decoding module: which loop runs, and that sampling options reach the sampler."""

from __future__ import annotations

import pytest
import torch

import blipkit
from blipkit.models.blip2 import Visual
from blipkit.models.decoding import Decoder, Sampling


@pytest.fixture(scope="module")
def model(opt_dir) -> blipkit.Model:
    return blipkit.load(opt_dir)


@pytest.fixture(scope="module")
def inputs(model):
    torch.manual_seed(0)
    prefix = model.model.visual_prompt(Visual(torch.randn(3, 3, 28, 28)))
    ids, mask = model.text.llm_batch([model.text.llm_ids(t)[0] for t in ("a photo of", "what is", "")])
    return model.model.llm_inputs(prefix, ids, mask)


def sampled(decoder: Decoder, inputs, sampling: Sampling, seed: int) -> list[list[int]]:
    torch.manual_seed(seed)
    return decoder.generate(inputs, 8, sampling)


def transformers_sampled(model, inputs, seed: int, **options) -> list[list[int]]:
    torch.manual_seed(seed)
    eos = model.tokenizer.eos_token_id
    rows = model.model.hf_generate(inputs, max_new_tokens=8, eos_token_id=eos, pad_token_id=0, **options)
    return [r[: r.index(eos)] if eos in r else r for r in rows.tolist()]


def test_paths(model):
    decoder = model.decoder
    assert decoder.path(Sampling()) == "lean"
    assert decoder.path(Sampling(num_beams=3)) == "transformers"
    assert decoder.path(Sampling(do_sample=True, temperature=0.7)) == "transformers"
    assert decoder.path(Sampling.from_kwargs(min_new_tokens=2)) == "transformers"


@torch.inference_mode()
def test_sampling_equals_transformers_sampler_with_the_same_seed(model, inputs):
    options = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 0}
    sampling = Sampling(do_sample=True, temperature=0.7, top_p=0.8, top_k=0)
    for seed in range(3):
        assert sampled(model.decoder, inputs, sampling, seed) == transformers_sampled(
            model, inputs, seed, **options
        )


@torch.inference_mode()
def test_temperature_and_top_p_change_what_is_sampled(model, inputs):
    """Were the options ignored, every setting would give the same tokens for the same seeds."""
    settings = [
        Sampling(do_sample=True, temperature=1.0, top_p=1.0, top_k=0),
        Sampling(do_sample=True, temperature=0.3, top_p=1.0, top_k=0),
        Sampling(do_sample=True, temperature=1.0, top_p=0.3, top_k=0),
    ]
    runs = [[sampled(model.decoder, inputs, s, seed) for seed in range(4)] for s in settings]
    assert runs[0] != runs[1] and runs[0] != runs[2] and runs[1] != runs[2]
    greedy = model.decoder.generate(inputs, 8)
    cold = [
        sampled(model.decoder, inputs, Sampling(do_sample=True, temperature=1e-4, top_k=0), s)
        for s in range(3)
    ]
    assert all(c == greedy for c in cold)  # temperature towards 0 is greedy


@torch.inference_mode()
def test_streamed_tokens_and_per_row_stops(model, inputs):
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def on_token(row: int, token: int) -> bool:
        seen[row].append(token)
        return row == 1 and len(seen[1]) == 2  # row 1 stops after two tokens

    for sampling in (Sampling(), Sampling.from_kwargs(repetition_penalty=1.0)):  # lean, then transformers
        for row in seen.values():
            row.clear()
        out = model.decoder.generate(inputs, 6, sampling, on_token)
        eos = model.tokenizer.eos_token_id
        assert out[1] == seen[1] == out[1][:2] and len(out[1]) <= 2
        assert [t for t in seen[0] if t != eos] == out[0] and [t for t in seen[2] if t != eos] == out[2]
    with pytest.raises(ValueError, match="beam"):
        model.decoder.generate(inputs, 4, Sampling(num_beams=2), on_token)


@torch.inference_mode()
def test_bf16_weights_stay_close_to_fp32(opt_dir):
    fp32, bf16 = blipkit.load(opt_dir), blipkit.load(opt_dir, dtype="bf16")
    assert bf16.model.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert bf16.model.qformer.query_tokens.dtype == torch.float32  # the Q-Former stays fp32
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 28, 28)
    ids, mask = fp32.text.llm_batch([fp32.text.llm_ids("a photo of")[0]] * 2)
    full = fp32.model(pixels, ids, mask).logits
    half = bf16.model(pixels, ids, mask).logits
    assert half.dtype == torch.bfloat16 and not torch.equal(half.float(), full)  # it really ran in bf16
    error = (half.float() - full).abs()  # bf16 keeps 8 significant bits: ~1% per product, through 2 layers
    assert error.mean() < 0.05 * full.std() and error.max() < 0.1 * full.abs().max()
    agree = (half.float().argmax(-1) == full.argmax(-1)).float().mean()
    assert agree >= 0.75  # random weights perturbed by N(0, 0.5): many near-ties
