"""The embedded default model, end to end, on drawn scenes it was not trained on (examples/)."""

from __future__ import annotations

from pathlib import Path

import pytest

import blipkit

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
