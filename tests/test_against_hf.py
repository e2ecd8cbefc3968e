"""Parity with transformers' BLIP-2 on tiny random models (every parameter perturbed away from its init)."""

from __future__ import annotations

import pytest
import torch
from hf_tiny import make_blip2
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

import blipkit

TEXTS = ["a photo of a cat", "question : what color is the dog ? answer :"]
IMAGE_SIZE = 28


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


def _hf_text(hf, ids: torch.Tensor, mask: torch.Tensor, Q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix the Q image placeholder tokens transformers' generation model scatters the queries into."""
    image_ids = torch.full((ids.shape[0], Q), hf.config.image_token_id, dtype=ids.dtype)
    return torch.cat([image_ids, ids], 1), torch.cat([torch.ones_like(image_ids), mask], 1)


def _tokenize(model: blipkit.Model, texts: list[str], side: str = "right"):
    tok = model.tokenizer
    tok.padding_side = side
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


GEN_CASES = [
    ("opt", 4, 2),
    ("opt", 8, 1),
    ("llama", 4, 2),
    ("llama", 6, 3),
    ("t5", 4, 2),
    ("t5", 8, 1),
]


@pytest.fixture(scope="module", params=GEN_CASES, ids=lambda c: f"{c[0]}-q{c[1]}-x{c[2]}")
def generation_pair(request, tmp_path_factory):
    llm, Q, freq = request.param
    path = tmp_path_factory.mktemp(f"hf-{llm}-{Q}-{freq}")
    make_blip2(path, llm=llm, num_query_tokens=Q, cross_attention_frequency=freq, qformer_layers=3)
    # both sides on SDPA: eager vs SDPA differs by ~1e-3 on T5 with perturbed weights, ours vs theirs by 0
    hf = Blip2ForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").eval()
    return hf, blipkit.load(path), Q


@torch.inference_mode()
def test_against_hf_logits(generation_pair):
    hf, ours, Q = generation_pair
    pixels = _pixels(2)
    ids, mask = _tokenize(ours, TEXTS)
    if ours.model.is_encoder_decoder:
        dec = torch.tensor([[0, 5, 7, 9], [0, 11, 3, 4]])
        theirs = hf(
            pixel_values=pixels,
            input_ids=_hf_text(hf, ids, mask, Q)[0],
            attention_mask=_hf_text(hf, ids, mask, Q)[1],
            decoder_input_ids=dec,
        ).logits
        mine = ours.model(pixels, ids, mask, decoder_input_ids=dec).logits
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
        return
    hf_ids, hf_mask = _hf_text(hf, ids, mask, Q)
    theirs = hf(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask).logits[:, Q:]  # (B, T, V)
    mine = ours.model(pixels, ids, mask).logits
    assert mine.shape == theirs.shape
    keep = mask.bool()
    torch.testing.assert_close(mine[keep], theirs[keep], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_against_hf_greedy_tokens(generation_pair):
    hf, ours, Q = generation_pair
    for i, text in enumerate(TEXTS):
        pixels = _pixels(1, seed=i)
        ids, mask = _tokenize(ours, [text])
        hf_ids, hf_mask = _hf_text(hf, ids, mask, Q)
        kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "num_beams": 1}
        theirs = hf.generate(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask, **kwargs)
        if ours.model.is_encoder_decoder:
            theirs = theirs[:, 1:]  # decoder start token
        elif theirs.shape[1] > 6:
            theirs = theirs[:, hf_ids.shape[1] :]  # transformers returns the prompt too
        mine = ours.model.generate(pixels, ids, mask, **kwargs)
        assert mine.tolist() == theirs.tolist()


@torch.inference_mode()
def test_batched_generation_equals_one_by_one(generation_pair):
    _, ours, _ = generation_pair
    images = [_pixels(1, seed=s)[0] for s in range(3)]
    prompts = ["a photo of", "question : what is it ? answer :", ""]
    batch = torch.stack(images)
    batched = ours.generate(batch, prompts, max_new_tokens=5)
    single = [
        ours.generate(img[None], [p], max_new_tokens=5)[0] for img, p in zip(images, prompts, strict=True)
    ]
    assert batched == single
    beams = ours.generate(batch, prompts, max_new_tokens=5, num_beams=3)
    assert beams == [
        ours.generate(img[None], [p], max_new_tokens=5, num_beams=3)[0]
        for img, p in zip(images, prompts, strict=True)
    ]


@pytest.fixture(scope="module", params=[(4, 2), (6, 1)], ids=lambda c: f"q{c[0]}-x{c[1]}")
def retrieval_pair(request, tmp_path_factory):
    Q, freq = request.param
    path = tmp_path_factory.mktemp(f"hf-retrieval-{Q}-{freq}")
    make_blip2(path, retrieval=True, num_query_tokens=Q, cross_attention_frequency=freq, qformer_layers=3)
    hf = Blip2ForImageTextRetrieval.from_pretrained(path, attn_implementation="sdpa").eval()
    return hf, blipkit.load(path)


@torch.inference_mode()
def test_against_hf_itc_similarity(retrieval_pair):
    hf, ours = retrieval_pair
    pixels = _pixels(3)
    tok = ours.qformer_tokenizer
    tok.padding_side = "right"
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    theirs = hf(
        pixel_values=pixels,
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        use_image_text_matching_head=False,
    ).logits_per_image  # (N_img, N_txt)
    torch.testing.assert_close(ours.similarity(pixels, TEXTS), theirs, atol=1e-5, rtol=1e-4)


@torch.inference_mode()
def test_against_hf_itm_probabilities(retrieval_pair):
    hf, ours = retrieval_pair
    pixels = _pixels(2)
    tok = ours.qformer_tokenizer
    tok.padding_side = "right"
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    theirs = hf(
        pixel_values=pixels,
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        use_image_text_matching_head=True,
    ).logits_per_image.softmax(-1)[:, 1]  # pairs (i, i)
    mine = ours.match(pixels, TEXTS)  # (N_img, N_txt)
    torch.testing.assert_close(mine.diagonal(), theirs, atol=1e-5, rtol=1e-4)


def test_retrieval_model_cannot_caption(retrieval_pair):
    _, ours = retrieval_pair
    with pytest.raises(blipkit.errors.CapabilityError, match="no language model"):
        ours.caption(_pixels(1))


def test_generation_model_cannot_embed_text(generation_pair):
    _, ours, _ = generation_pair
    with pytest.raises(blipkit.errors.CapabilityError, match="text path"):
        ours.similarity(_pixels(1), ["a cat"])
