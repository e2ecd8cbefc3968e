"""Conversation templates: the strings the original LLaVA repo's ``conversation.py`` builds, BLIP-2's prompts,
the tokenizer's own chat_template, and chat fitting that keeps the image placeholder."""

from __future__ import annotations

import pytest
from hf_tiny import make_tokenizer

from blipkit.config import Blip2Config, LLMConfig, PromptConfig
from blipkit.errors import ConfigError
from blipkit.templates import TEMPLATES, TokenizerTemplate, get_template
from blipkit.text import TextProcessor

LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def test_llava_v1_matches_the_original_repo():
    t = get_template("llava_v1").with_image("<image>\n")
    assert t.render([], "What is shown?") == f"{LLAVA_SYSTEM} USER: <image>\nWhat is shown? ASSISTANT:"
    assert (
        t.render([("Q1", "A1")], "Q2")
        == f"{LLAVA_SYSTEM} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    )
    # dropping the oldest turn moves the image to the first turn that is kept
    assert t.render([("Q1", "A1"), ("Q2", "A2")], "Q3", start=1) == (
        f"{LLAVA_SYSTEM} USER: <image>\nQ2 ASSISTANT: A2</s>USER: Q3 ASSISTANT:"
    )


def test_llama_2_matches_the_original_repo():
    t = get_template("llama_2").with_image("<image>\n")
    system = t.system
    assert t.render([("Q1", "A1")], "Q2") == (
        f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n<image>\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST]"
    )


def test_chatml_plain_vicuna():
    chatml = get_template("chatml").with_image("<image>\n")
    assert chatml.render([], "Q") == (
        "<|im_start|>system\nAnswer the questions.<|im_end|>\n<|im_start|>user\n<image>\nQ<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert get_template("plain").with_image("<image>\n").render([], "Q") == "<image>\nQ\n"
    assert get_template("vicuna_v1").render([], "Q").endswith("user's questions. USER: Q ASSISTANT:")


def test_blip2_template_follows_the_model_prompts():
    t = get_template("blip2", "Question: {} Short answer:", " ")
    assert t.render([("what is it?", "a cat")], "and its colour?") == (
        "Question: what is it? Short answer: a cat Question: and its colour? Short answer:"
    )
    with pytest.raises(ConfigError, match="placeholder"):
        get_template("blip2", "no placeholder")
    with pytest.raises(ConfigError, match="unknown conversation template 'llava_v9'"):
        get_template("llava_v9")
    assert set(TEMPLATES) == {"blip2", "llava_v1", "vicuna_v1", "llama_2", "chatml", "plain"}


def chat_tokenizer():
    tok = make_tokenizer("llama")
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tok


def test_tokenizer_template_renders_through_transformers():
    t = TokenizerTemplate(chat_tokenizer()).with_image("<image>\n")
    assert t.render([("what is it ?", "a cat")], "and the dog ?") == (
        "<user> <image>\nwhat is it ? <assistant> a cat <user> and the dog ? <assistant>"
    )
    with pytest.raises(ConfigError, match="chat_template"):
        TokenizerTemplate(make_tokenizer("llama"))


class _LlavaLike:
    """The fields ``TextSettings`` reads of a LLaVA config."""

    family = "llava"
    template = "llava_v1"
    image_token = "<image>"
    image_token_index = -200
    prompts = PromptConfig()
    llm = LLMConfig(max_context=96)


def test_chat_fitting_keeps_the_image_and_drops_old_turns():
    tok = make_tokenizer("llama")  # no <image> token: the original LLaVA way, -200 between the pieces
    text = TextProcessor(_LlavaLike(), tok, None, visual_tokens=4)
    history = [(f"is the dog red ? {i}", "no") for i in range(20)]
    prompt = text.chat(history, "what color is the cat ?", max_new_tokens=4)
    assert prompt.dropped_turns > 0
    assert prompt.text.count("<image>") == 1 and prompt.llm_ids.count(-200) == 1
    assert len(prompt.llm_ids) <= 96 - 4 - 4
    assert 0 < prompt.dropped_turns < 20  # some turns kept, the image in the first of them
    assert f"USER: <image>\n{history[prompt.dropped_turns][0]} ASSISTANT: no</s>" in prompt.text
    assert prompt.text.endswith("USER: what color is the cat ? ASSISTANT:")
    # the pieces around the image are tokenised on their own, BOS only at the start
    first = tok(prompt.text.split("<image>")[0])["input_ids"]
    assert prompt.llm_ids[: len(first)] == first and prompt.llm_ids[len(first)] == -200


def test_llava_prompt_gets_an_image_placeholder():
    text = TextProcessor(_LlavaLike(), make_tokenizer("llama"), None, visual_tokens=4)
    assert text.prompt("describe", 4).text == "<image>\ndescribe"
    assert text.caption_prompt("describe the image").endswith("USER: <image>\ndescribe the image ASSISTANT:")
    assert text.question("what is it ?").startswith(LLAVA_SYSTEM)


def test_blip2_chat_is_unchanged():
    cfg = Blip2Config()
    text = TextProcessor(cfg, make_tokenizer("opt"), None, 512)
    prompt = text.chat([("what is it ?", "a cat")], "what color ?", 10)
    assert prompt.text == "Question: what is it ? Answer: a cat Question: what color ? Answer:"
