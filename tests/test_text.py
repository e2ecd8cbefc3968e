"""The text processor: templates, windows, chat fitting, and inputs far longer than any window."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw
from tiny_assets import tiny_assets

import blipkit
from blipkit.errors import UsageError
from blipkit.loading import build_llm, build_vision, save_checkpoint
from blipkit.models.blip2 import Blip2
from blipkit.text import TextProcessor, fill


@pytest.fixture(scope="module")
def aware(tmp_path_factory) -> blipkit.Model:
    """A tiny question-aware model: Q-Former text window 32 positions, LLM context 64."""
    root = tiny_assets(tmp_path_factory.mktemp("tiny-aware"))
    cfg = blipkit.Blip2Config.from_json(root / "model.json")
    torch.manual_seed(0)
    model = Blip2(cfg, build_vision(cfg.vision, None, None), build_llm(cfg.llm, None, None, torch.float32))
    save_checkpoint(model, root / "ckpt")
    return blipkit.load(root / "ckpt")


@pytest.fixture(scope="module")
def image() -> Image.Image:
    img = Image.new("RGB", (40, 40), "white")
    ImageDraw.Draw(img).ellipse((5, 5, 30, 30), fill="red")
    return img


def test_fill_and_chat_layout(model):
    assert fill("Question: {} Answer:", "  what is it?\n") == "Question: what is it? Answer:"
    with pytest.raises(UsageError, match="placeholder"):
        fill("Question:", "x")
    prompt = model.text.chat([("what is it?", "a cat")], "what color?", 5)
    assert prompt.text == "Question: what is it? Answer: a cat Question: what color? Answer:"
    assert prompt.llm_ids == model.tokenizer(prompt.text)["input_ids"] and prompt.dropped_turns == 0
    with pytest.raises(UsageError, match="empty"):
        model.text.question("  ")


def test_pad_tokens_are_settled_at_load_and_left_alone(model):
    tok = model.tokenizer
    before = (tok.pad_token, tok.padding_side)
    model.text.llm_batch([[1, 2, 3], [4]], side="left")
    model.caption(torch.zeros(2, 3, 28, 28), max_new_tokens=2)
    assert (tok.pad_token, tok.padding_side) == before and tok.pad_token is not None


def test_a_tokenizer_without_pad_gets_its_eos(model):
    tok = model.tokenizer.__class__.from_pretrained(model.path)
    tok.pad_token = None
    text = TextProcessor(model.config, tok, None, 64)
    assert tok.pad_token == tok.eos_token and text.llm_pad_id == tok.eos_token_id


def test_the_qformer_reads_at_most_its_window(aware):
    text = aware.text
    assert text.qformer_max_tokens == 32
    ids, mask = text.qformer_batch(["is it red " * 500 + "?", "what is it ?"])
    assert ids.shape[1] == 32 and mask[1].sum() < 32
    assert text.qformer_rows(["x " * 500])[0] == text.qformer_tokenizer("x " * 500)["input_ids"][:31] + [
        text.qformer_tokenizer.sep_token_id
    ]  # cut as in training: the start kept, [SEP] last


@pytest.mark.parametrize("which", ["aware", "model"])
def test_inputs_far_longer_than_any_window(which, request, image):
    m = request.getfixturevalue(which)  # question-aware tiny model, and a tiny transformers BLIP-2 (OPT)
    words = "is it red " * 1667 + "?"  # 5,000 words
    assert isinstance(m.ask(image, words, max_new_tokens=3), str)
    chat = m.chat(image, max_new_tokens=3)
    for i in range(200):
        chat.history.append((f"is the shape number {i} red ?", "yes it is"))
    fitted = chat.prompt("and its colour ?")
    assert fitted.dropped_turns > 150 and fitted.text.endswith(m.text.question("and its colour ?"))
    assert len(fitted.llm_ids) <= m.text.llm_budget(3)
    assert isinstance(chat.send("and its colour ?"), str)
    caption = "a red circle " * 1000  # a 3,000-word query
    if m.text.qformer_tokenizer is not None:
        assert m.similarity([image], [caption]).shape == (1, 1)
        assert m.match([image], [caption]).shape == (1, 1)
    assert isinstance(m.caption(image, prompt=caption, max_new_tokens=3)[0], str)


def test_question_aware_chat_fits_both_windows(aware):
    text = aware.text
    history = [(f"is the shape number {i} red ?", "yes") for i in range(30)]
    fitted = text.chat(history, "and its colour ?", 3)
    q_len = len(text.qformer_tokenizer(fitted.qformer_text)["input_ids"])
    assert q_len <= 32 and fitted.qformer_text.endswith("and its colour ? answer :")
    assert len(text.qformer_tokenizer(fitted.text)["input_ids"]) > 32  # the LLM keeps more of the history
    assert fitted.text.endswith(fitted.qformer_text)  # both windows keep the newest turns


class CountingTokenizer:
    """Delegates to a tokenizer and counts the characters it is asked to tokenise."""

    def __init__(self, tok):
        self.tok, self.chars = tok, 0

    def __call__(self, texts, **kwargs):
        self.chars += sum(map(len, [texts] if isinstance(texts, str) else texts))
        return self.tok(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_chat_fitting_is_linear_in_the_history(model):
    counting = CountingTokenizer(model.tokenizer)
    text = TextProcessor(model.config, counting, None, 512)
    work = []
    for turns in (500, 4000):
        history = [(f"what is thing {i} ?", "a cat") for i in range(turns)]
        counting.chars = 0
        fitted = text.chat(history, "what color ?", 5)
        work.append(counting.chars / sum(len(q) + len(a) for q, a in history))
        assert fitted.text.endswith("Question: what color ? Answer:") and fitted.dropped_turns > turns - 60
    assert work[1] < 2.5  # characters tokenised per character of history: a constant, not the turn count
    assert fitted.llm_ids == text.chat(history[-100:], "what color ?", 5).llm_ids


def test_max_new_tokens_larger_than_the_window_is_a_usage_error(model):
    with pytest.raises(UsageError, match="no room"):
        model.text.chat([], "what ?", model.text.llm_context)


@pytest.fixture(scope="module")
def model(opt_dir) -> blipkit.Model:
    return blipkit.load(opt_dir)
