"""A chat's LLM cache kept between turns (``blipkit.models.chat_cache``) on tiny random models: every turn
gives the tokens of a full recompute, later turns read their earlier positions from the cache, and the cases
where the cache cannot be exact (question-aware visual prompts, sampling) recompute."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_tiny_instructblip import make_instructblip
from hf_tiny_llava import CHAT_TEMPLATE, make_llava
from PIL import Image

import blipkit
from blipkit.models.chat_cache import common_prefix, position_keys
from blipkit.models.decoding import Decoder

MESSAGES = [
    "what is it ?",
    "and the color ?",
    "is the dog red ?",
    "what is on the table ?",
    "is there a cat ?",
    "describe the photo",
]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat-cache") / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module", params=["blip2-opt", "llava-llama", "llava-qwen2-tokenizer-template"])
def model(request, opt_dir, tmp_path_factory):
    """A model whose chats reuse the cache: BLIP-2 (visual prompt in front) and LLaVA (image spliced into the
    first turn), with a built-in template and a tokenizer chat template."""
    if request.param == "blip2-opt":
        return blipkit.load(opt_dir)
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "llava-llama":
        make_llava(path, llm="llama")
    else:
        make_llava(path, llm="qwen2", tower="siglip", select="full", chat_template=CHAT_TEMPLATE)
    return blipkit.load(path)


def prompt_positions(chat: blipkit.Chat, prompt) -> int:
    """LLM positions of a fitted prompt: the visual prompt and the text."""
    return chat.model.llm_inputs(chat.image, [prompt]).embeds.shape[1]


def converse(m: blipkit.Model, photo, messages, reuse_cache: bool, max_new_tokens: int = 6):
    """Answers, cached positions and prompt positions of each turn of one chat."""
    chat = m.chat(photo, max_new_tokens=max_new_tokens, reuse_cache=reuse_cache)
    answers, cached, positions = [], [], []
    for message in messages:
        prompt = chat.prompt(message)
        positions.append(prompt_positions(chat, prompt))
        answers.append(chat.send(message))
        cached.append(chat.cached_tokens)
    return answers, cached, positions


def test_cached_turns_equal_a_full_recompute(model, photo):
    answers, cached, positions = converse(model, photo, MESSAGES, reuse_cache=True)
    want, recomputed, _ = converse(model, photo, MESSAGES, reuse_cache=False)
    assert answers == want
    assert any(answers)  # the tiny model does say something
    assert recomputed == [0] * len(MESSAGES)
    assert cached[0] == 0
    for turn in range(1, len(MESSAGES)):
        # the whole previous prompt at least (its answer too, unless it reads back differently), never all
        assert positions[turn - 1] <= cached[turn] < positions[turn]
        assert cached[turn] > cached[turn - 1]


def test_position_keys_mark_the_image(model, photo):
    chat = model.chat(photo, max_new_tokens=4)
    prompt = chat.prompt("what is it ?")
    inputs = model.llm_inputs(chat.image, [prompt])
    keys = position_keys(prompt.llm_ids, inputs, model.text.settings.image_token_index)
    P = model.model.num_visual_tokens
    assert len(keys) == inputs.embeds.shape[1] == len(prompt.llm_ids) + P - (model.family == "llava")
    assert [k for k in keys if isinstance(k, tuple)] == [("image", i) for i in range(P)]
    text = [k for k in keys if not isinstance(k, tuple)]
    assert text == [t for t in prompt.llm_ids if t != model.text.settings.image_token_index]
    if model.family == "blip2":
        assert keys[:P] == [("image", i) for i in range(P)]
    assert common_prefix(keys, keys[:5] + [-1]) == 5


@pytest.mark.parametrize("name", ["blip2-opt", "llava-llama"])
def test_dropped_turns_stay_exact(name, opt_dir, photo, tmp_path):
    if name == "blip2-opt":
        m = blipkit.load(opt_dir)
        m.config.llm.max_context = 40  # 4 visual tokens + 6 new tokens leave 30 for the text
    else:
        make_llava(tmp_path, llm="llama")
        m = blipkit.load(tmp_path)
        m.config.llm.max_context = 120  # the llava_v1 system prompt takes most of it
    messages = MESSAGES + [f"is the dog red ? {i}" for i in range(4)]
    chat = m.chat(photo, max_new_tokens=6)
    dropped, cached, positions, answers = [], [], [], []
    for message in messages:
        prompt = chat.prompt(message)
        dropped.append(prompt.dropped_turns)
        positions.append(prompt_positions(chat, prompt))
        answers.append(chat.send(message))
        cached.append(chat.cached_tokens)
    want, _, _ = converse(m, photo, messages, reuse_cache=False)
    assert answers == want
    first = next(t for t, d in enumerate(dropped) if d > 0)  # the first turn that leaves the oldest out
    assert 0 < cached[first] < positions[first - 1]  # its start is shared, the rest moved: it reuses less
    assert max(dropped) > 1 and all(c > 0 for c in cached[1:])


def test_sampled_turn_drops_the_cache(model, photo):
    sampled = {"do_sample": True, "top_k": 5, "seed": 7}
    turns = [("what is it ?", {}), ("and the color ?", sampled), ("is the dog red ?", {})]
    turns.append(("is there a cat ?", {}))
    on = model.chat(photo, max_new_tokens=5)
    off = model.chat(photo, max_new_tokens=5, reuse_cache=False)
    cached = []
    for message, kwargs in turns:
        assert on.send(message, **kwargs) == off.send(message, **kwargs)
        cached.append(on.cached_tokens)
    assert cached[0] == cached[1] == cached[2] == 0 and cached[3] > 0  # recomputed after sampling


def test_reset_drops_the_cache(model, photo):
    chat = model.chat(photo, max_new_tokens=5)
    first = chat.send("what is it ?")
    chat.send("and the color ?")
    assert chat.cached_tokens > 0
    chat.reset()
    assert chat.send("what is it ?") == first and chat.cached_tokens == 0 and len(chat.history) == 1


@pytest.fixture(scope="module")
def aware(tmp_path_factory):
    """InstructBLIP with a tiny OPT: the Q-Former reads the chat text, so the visual prompt changes."""
    path = tmp_path_factory.mktemp("instructblip-opt")
    make_instructblip(path, llm="opt")
    return blipkit.load(path)


def test_question_aware_model_recomputes(aware, photo):
    assert aware.model.question_aware
    answers, cached, _ = converse(aware, photo, MESSAGES[:4], reuse_cache=True)
    want, _, _ = converse(aware, photo, MESSAGES[:4], reuse_cache=False)
    assert answers == want and cached == [0] * 4
    # why: the visual prompt of one turn is not the next turn's
    chat = aware.chat(photo, max_new_tokens=4)
    first = chat.prompt("what is it ?")
    chat.send("what is it ?")
    second = chat.prompt("and the color ?")
    a, b = (
        aware.llm_inputs(chat.image, [p]).embeds[:, : aware.model.num_visual_tokens] for p in (first, second)
    )
    assert not torch.allclose(a, b)


def test_answers_ended_by_eos_are_cached_whole(opt_dir, photo):
    m = blipkit.load(opt_dir)
    stop = m.tokenizer.convert_tokens_to_ids("green")  # a word the tiny OPT says at times: its end token
    m._decoder = Decoder(m.model, stop, m.text.llm_pad_id)
    answers, cached, positions = converse(m, photo, MESSAGES, reuse_cache=True, max_new_tokens=8)
    assert answers == converse(m, photo, MESSAGES, reuse_cache=False, max_new_tokens=8)[0]
    lengths = [len(m.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    assert any(n < 8 for n in lengths) and any(n == 8 for n in lengths)  # both ways a turn ends
    for turn in range(1, len(MESSAGES)):
        fed = lengths[turn - 1] if lengths[turn - 1] < 8 else 7  # the token that hit the limit is not fed
        assert cached[turn] == positions[turn - 1] + fed


def test_caption_bridge_chat_reuses_the_cache(opt_dir, photo):
    bridged = blipkit.via_caption(blipkit.load(opt_dir))
    chats = [bridged.chat(photo, max_new_tokens=4, reuse_cache=r) for r in (True, False)]
    cached = []
    for message in MESSAGES[:4]:
        assert chats[0].send(message) == chats[1].send(message)
        cached.append(chats[0].cached_tokens)
    assert cached[0] == 0 and all(b > a > 0 for a, b in zip(cached[1:-1], cached[2:], strict=True))
    assert chats[1].cached_tokens == 0
