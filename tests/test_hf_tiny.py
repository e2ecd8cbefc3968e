"""The tiny transformers BLIP-2 reference models of hf_tiny: they build, save, reload and run."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_tiny import IMAGE_TOKEN, WORDS, hf_inputs, make_blip2, make_tokenizer
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
)

TEXTS = ["a photo of a cat", "question : what color is the dog ? answer :"]
Q = 4


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def _saved_keys(path: Path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.fixture(scope="module", params=["opt", "llama", "t5"])
def gen(request, tmp_path_factory):
    llm = request.param
    path = tmp_path_factory.mktemp(f"tiny-{llm}")
    return llm, path, make_blip2(path, llm=llm, num_query_tokens=Q), make_tokenizer(llm, image_token=True)


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-retrieval")
    return path, make_blip2(path, retrieval=True, num_query_tokens=Q), make_tokenizer("bert")


# --- tokenizers ---------------------------------------------------------------------------------------------
SPECIAL_IDS = {  # kind -> (ids of "a red cat", pad id)
    "opt": (lambda a, r, c: [2, a, r, c], 1),
    "llama": (lambda a, r, c: [1, a, r, c], 2),
    "t5": (lambda a, r, c: [a, r, c, 1], 0),
    "bert": (lambda a, r, c: [2, a, r, c, 3], 0),
}


@pytest.mark.parametrize("kind", sorted(SPECIAL_IDS))
def test_tokenizer_round_trip_and_specials(kind, tmp_path):
    tok = make_tokenizer(kind)
    text = "a red cat"
    ids = tok(text).input_ids
    words = [tok.convert_tokens_to_ids(w) for w in text.split()]
    expected, pad = SPECIAL_IDS[kind]
    assert ids == expected(*words)
    assert tok.pad_token_id == pad and tok.padding_side == "right"
    assert tok.decode(ids, skip_special_tokens=True) == text
    sentence = " ".join(WORDS)
    assert tok.unk_token_id not in tok(sentence).input_ids
    assert tok.decode(tok(sentence).input_ids, skip_special_tokens=True) == sentence
    assert tok.decode(tok("a zebra").input_ids, skip_special_tokens=True) == "a"  # unknown -> unk (special)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(TEXTS).input_ids == tok(TEXTS).input_ids
    assert again.decode(again(sentence).input_ids, skip_special_tokens=True) == sentence


def test_image_token_is_last_special_id():
    base, tok = make_tokenizer("opt"), make_tokenizer("opt", image_token=True)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == len(base) == len(tok) - 1
    assert tok(IMAGE_TOKEN * 2 + "a cat", add_special_tokens=False).input_ids[:2] == [image_id] * 2
    assert tok.decode([image_id, *tok("a cat").input_ids], skip_special_tokens=True) == "a cat"


def test_hf_inputs_layout():
    tok = make_tokenizer("opt", image_token=True)
    image_id = len(tok) - 1
    left = hf_inputs(tok, ["a cat", "a red cat"], Q, image_id)
    assert left["input_ids"].tolist() == [
        [image_id] * Q + [1, 2, 4, tok.convert_tokens_to_ids("cat")],
        [image_id] * Q + tok("a red cat").input_ids,
    ]
    assert left["attention_mask"].tolist() == [[1] * Q + [0, 1, 1, 1], [1] * (Q + 4)]
    right = hf_inputs(tok, ["a cat", "a red cat"], Q, image_id, padding_side="right")
    assert right["attention_mask"][0].tolist() == [1] * Q + [1, 1, 1, 0]
    assert tok.padding_side == "right"
    plain = hf_inputs(make_tokenizer("bert"), ["a cat", "a red cat"], Q, None)
    assert plain["input_ids"][:, 0].tolist() == [2, 2]  # right padding by default: [CLS] first
    t5 = hf_inputs(make_tokenizer("t5", image_token=True), ["a cat", "a red cat"], Q, 67)
    assert t5["attention_mask"][0].tolist() == [1] * Q + [1, 1, 1, 0]  # T5: right padding by default


# --- generation models --------------------------------------------------------------------------------------
def _forward_kwargs(llm: str, tok, model) -> dict:
    kwargs = hf_inputs(tok, TEXTS, Q, model.config.image_token_id)
    if llm == "t5":
        kwargs["decoder_input_ids"] = torch.tensor([[0, 5, 7, 9], [0, 11, 3, 4]])
    return kwargs


def test_config_and_perturbation(gen):
    llm, _, model, tok = gen
    cfg = model.config
    assert not model.training
    assert cfg.image_token_id == cfg.image_token_index == len(tok) - 1
    assert cfg.text_config.vocab_size == len(tok) and cfg.num_query_tokens == Q
    assert cfg.qformer_config.use_qformer_text_input is False
    assert cfg.vision_config.image_size == 28 and cfg.vision_config.patch_size == 14
    assert cfg._attn_implementation == "eager"
    for name, p in model.named_parameters():
        assert not torch.all(p == p.flatten()[0]), f"{name} still constant (unperturbed)"
    assert model.query_tokens.abs().min() > 0
    lm = model.language_model
    assert (lm.get_output_embeddings().weight is lm.get_input_embeddings().weight) == (llm == "opt")


@torch.inference_mode()
def test_reload_gives_identical_logits(gen):
    llm, path, model, tok = gen
    kwargs = _forward_kwargs(llm, tok, model)
    pixels = _pixels(2)
    mine = model(pixel_values=pixels, **kwargs).logits
    T = kwargs["decoder_input_ids" if llm == "t5" else "input_ids"].shape[1]
    assert mine.shape == (2, T, len(tok)) and torch.isfinite(mine).all()
    eager = Blip2ForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    assert not eager.training
    assert torch.equal(eager(pixel_values=pixels, **kwargs).logits, mine)
    sdpa = Blip2ForConditionalGeneration.from_pretrained(path)  # default attention: sdpa
    torch.testing.assert_close(sdpa(pixel_values=pixels, **kwargs).logits, mine, atol=1e-3, rtol=1e-4)
    # the image matters and the placeholders are where the queries go
    other = model(pixel_values=_pixels(2, seed=1), **kwargs).logits
    assert (other - mine).abs().max() > 1e-2


@torch.inference_mode()
def test_generate_runs(gen):
    llm, _, model, tok = gen
    image_id = model.config.image_token_id
    inputs = hf_inputs(tok, TEXTS, Q, image_id)
    kwargs = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
    pixels = _pixels(2)
    out = model.generate(pixel_values=pixels, **inputs, **kwargs)
    if llm == "t5":
        assert out.shape == (2, 1 + 5) and out[:, 0].tolist() == [0, 0]  # decoder start token first
    else:  # decoder-only: transformers returns the prompt (placeholders included) followed by the new tokens
        assert out.shape == (2, inputs["input_ids"].shape[1] + 5)
        assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert out.max() < len(tok)
    # hf_inputs' default padding side keeps batched generation equal to one-by-one generation
    for i, text in enumerate(TEXTS):
        one = model.generate(pixel_values=pixels[i : i + 1], **hf_inputs(tok, [text], Q, image_id), **kwargs)
        new = out[i, -5:] if llm == "t5" else out[i, inputs["input_ids"].shape[1] :]
        assert one[0, -5:].tolist() == new.tolist()


def test_processor_matches_hf_inputs(gen):
    _, path, model, tok = gen
    processor = AutoProcessor.from_pretrained(path)
    image = Image.fromarray(np.full((40, 30, 3), 127, dtype=np.uint8))
    enc = processor(images=[image, image], text=TEXTS, padding=True, return_tensors="pt")
    mine = hf_inputs(tok, TEXTS, Q, model.config.image_token_id, padding_side="right")
    assert enc["input_ids"].tolist() == mine["input_ids"].tolist()
    assert enc["attention_mask"].tolist() == mine["attention_mask"].tolist()
    assert enc["pixel_values"].shape == (2, 3, 28, 28)
    ip = AutoImageProcessor.from_pretrained(path)
    assert dict(ip.size) == {"height": 28, "width": 28} and int(ip.resample) == 3
    assert list(ip.image_mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])


# --- retrieval model ----------------------------------------------------------------------------------------
@torch.inference_mode()
def test_retrieval_forward_and_reload(retrieval):
    path, model, tok = retrieval
    assert model.config.image_token_index is None and model.config.qformer_config.use_qformer_text_input
    assert model.config.qformer_config.vocab_size == len(tok)
    for name, p in model.named_parameters():
        assert not torch.all(p == p.flatten()[0]), f"{name} still constant (unperturbed)"
    inputs = hf_inputs(tok, TEXTS, Q, None, padding_side="right")
    itm = model(pixel_values=_pixels(2), **inputs, use_image_text_matching_head=True).logits_per_image
    assert itm.shape == (2, 2)  # one (image i, text i) pair per row, 2 classes (no match, match)
    itc = model(pixel_values=_pixels(3), **inputs, use_image_text_matching_head=False).logits_per_image
    assert itc.shape == (3, 2) and itc.abs().max() <= 1 + 1e-5  # max over queries of cosine similarities
    again = Blip2ForImageTextRetrieval.from_pretrained(path, attn_implementation="eager")
    assert torch.equal(again(pixel_values=_pixels(3), **inputs).logits_per_image, itc)
    assert AutoTokenizer.from_pretrained(path)(TEXTS).input_ids == tok(TEXTS).input_ids


# --- saved keys ---------------------------------------------------------------------------------------------
def test_cross_attention_frequency_changes_saved_keys(tmp_path):
    counts = {}
    for freq in (1, 2):
        make_blip2(tmp_path / str(freq), cross_attention_frequency=freq, qformer_layers=3)
        layers = {
            int(m.group(1))
            for k in _saved_keys(tmp_path / str(freq))
            if (m := re.match(r"qformer\.encoder\.layer\.(\d+)\.crossattention\.", k))
        }
        counts[freq] = sum(".crossattention." in k for k in _saved_keys(tmp_path / str(freq)))
        assert layers == {i for i in range(3) if i % freq == 0}
    assert counts == {1: 3 * 10, 2: 2 * 10}


def _expand(pattern: str) -> list[str]:
    parts = re.split(r"\{([^}]*)\}", pattern)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def _documented_keys() -> dict[str, set[str]]:
    """The key lists in the comment at the top of hf_tiny.py, by section ([opt], [retrieval], ...)."""
    sections: dict[str, set[str]] = {}
    current = None
    for line in (Path(__file__).parent / "hf_tiny.py").read_text().splitlines():
        if not line.startswith("#"):
            break
        if m := re.match(r"# \[(\w+)\]", line):
            current = sections.setdefault(m.group(1), set())
            continue
        if current is None or not line.startswith("#   "):
            continue
        for token in line[1:].split():
            if token.startswith("(") or not ("." in token or token == "query_tokens"):
                break
            current.update(_expand(token))
    return sections


def test_documented_keys(gen, retrieval):
    """The key names documented for the key converter at the top of hf_tiny.py are the ones saved."""
    docs = _documented_keys()
    llm, path, _, _ = gen
    keys = _saved_keys(path)
    if llm == "opt":
        assert keys == docs["opt"] and len(keys) == 113
    else:
        assert {k for k in keys if k.startswith("language_model.")} == docs[llm]
        shared = {k for k in docs["opt"] if not k.startswith("language_model.")}
        assert {k for k in keys if not k.startswith("language_model.")} == shared
        assert len(keys) == {"llama": 98, "t5": 129}[llm]
    ret = _saved_keys(retrieval[0])
    assert ret == docs["retrieval"] | {k for k in docs["opt"] if not k.startswith("language_")}
    assert len(ret) == 95


def test_deterministic_and_rng_untouched(tmp_path):
    state = torch.get_rng_state()
    a = make_blip2(tmp_path / "a", llm="llama", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = make_blip2(tmp_path / "b", llm="llama", seed=3)
    c = make_blip2(tmp_path / "c", llm="llama", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["query_tokens"], sc["query_tokens"])
