"""The embedded default model, end to end, on drawn scenes it was not trained on (examples/)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import blipkit
from blipkit.models.decoding import Sampling
from blipkit.serve.engine import Engine

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def default():
    return blipkit.load("default")


def test_default_answers_shape_and_colour(default):
    assert default.ask(EXAMPLES / "red_circle.png", "what shape is in the image?") == "circle"
    assert default.ask(EXAMPLES / "red_circle.png", "what color is the shape?") == "red"
    assert default.ask(EXAMPLES / "blue_triangle.png", "what shape is in the image?") == "triangle"
    assert default.ask(EXAMPLES / "green_rectangle.png", "what color is the shape?") == "green"


def test_default_captions_a_scene(default):
    assert default.caption(EXAMPLES / "red_circle.png") == ["a red circle"]


def test_default_zero_shot_shapes(default):
    labels = ["a circle", "a rectangle", "a triangle"]
    probs = default.classify([EXAMPLES / "red_circle.png", EXAMPLES / "green_rectangle.png"], labels)
    assert [max(p, key=p.get) for p in probs] == ["a circle", "a rectangle"]


def test_default_chat_remembers(default):
    chat = default.chat(EXAMPLES / "blue_triangle.png")
    chat.send("what shape is in the image?")
    chat.send("what color is the shape?")
    assert [a for _, a in chat.history] == ["triangle", "blue"]


def test_default_served_batch_equals_one_by_one(default):
    """Question-aware queries through the server's lean greedy loop: a batch of mixed prompt lengths (one
    image cached before) answers as ``ask`` does one question at a time through transformers' ``generate``."""
    engine = Engine(default, batch_window_ms=500)  # long enough for the four threads to share one batch
    assert engine.decoder.path(Sampling()) == "lean" and not engine.prefix_kv  # the prompt reads the question
    asks = [
        ("red_circle.png", "what shape is in the image?"),
        ("blue_triangle.png", "what color is the shape?"),
        ("red_circle.png", "is there a blue shape in the image?"),
        ("green_rectangle.png", "does the image contain a rectangle?"),
    ]
    data = {name: (EXAMPLES / name).read_bytes() for name, _ in asks}

    def ask(name: str, question: str) -> str:
        return engine.run(data[name], name, engine.prompt([], question, 10), max_tokens=10).text

    ask("red_circle.png", "what is this?")  # cached from here on
    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda a: ask(*a), asks))
    engine.stop()
    assert engine.largest_batch > 1
    assert answers == [transformers_answer(default, EXAMPLES / name, question) for name, question in asks]


def transformers_answer(model, image, question: str, n: int = 10) -> str:
    """The answer of transformers' own ``generate`` (the reference path), one question at a time."""
    prompt = model.text.prompt(model.text.question(question), n)
    visual = model.visual([image], [prompt.qformer_text])
    tokens = model.model.generate(
        visual.pixel_values,
        torch.tensor([prompt.llm_ids]),
        qformer_input_ids=visual.qformer_input_ids,
        qformer_attention_mask=visual.qformer_attention_mask,
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=model.text.llm_pad_id,
    )
    return model.text.decode(tokens[0])


def test_default_matches_captions_against_hard_negatives(default):
    """ITM on easy-VQA test images: the true caption beats the same shape in another colour and the same
    colour on another shape (what re-ranking the ITC top K has to decide)."""
    from blipkit.data import easy_vqa

    test = easy_vqa.retrieval_set("test", limit=24)
    pairs = []
    for image, attributes in zip(test.images, test.attributes, strict=True):
        color, shape = attributes["color"], attributes["shape"]
        caption = f"a {color} {shape}"
        other_color = next(c for c in easy_vqa.COLORS if c != color)
        other_shape = next(s for s in easy_vqa.SHAPES if s != shape)
        pairs.append((image, [caption, f"a {other_color} {shape}", f"a {color} {other_shape}"]))
    wins = [bool(default.match([image], captions)[0].argmax() == 0) for image, captions in pairs]
    assert sum(wins) >= 0.9 * len(wins), wins
