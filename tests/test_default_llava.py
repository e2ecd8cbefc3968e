"""The embedded LLaVA-style default (``blipkit.load("default-llava")``): what ships, how it loads, and that it
answers the example images' shape and colour, alone and in a chat that refers back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import blipkit
from blipkit.config import WEIGHTS_DIR, describe_models
from blipkit.convert import blipkit_llava

SHIPPED = WEIGHTS_DIR / "default-llava"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
IMAGES = {"red_circle.png": ("circle", "red"), "blue_triangle.png": ("triangle", "blue")}
IMAGES["green_rectangle.png"] = ("rectangle", "green")

# what the shipped weights (easy-VQA colour accuracy 0.78) still get wrong: strict, so a retrain that fixes
# them shows up; reports/default-llava.md has every answer
TEAL = pytest.mark.xfail(strict=True, reason="the shipped default-llava calls this green 'teal'")
YELLOW = pytest.mark.xfail(strict=True, reason="its caption of this image says 'yellow circle'")
ASK_CASES = [pytest.param("green_rectangle.png", marks=TEAL), pytest.param("red_circle.png", marks=YELLOW)]
ASK_CASES.append("blue_triangle.png")
CHAT_CASES = [pytest.param("green_rectangle.png", marks=TEAL), "red_circle.png", "blue_triangle.png"]

needs_weights = pytest.mark.skipif(
    not (SHIPPED / blipkit_llava.PROJECTOR_FILE).exists(), reason="default-llava weights not trained/shipped"
)


def _assets_available() -> bool:
    try:
        from blipkit import assets

        assets.resolve("asset:dinov2-s14")
        assets.resolve("asset:smollm2-135m-instruct")
    except Exception:  # the packages that carry the frozen weights are not installed
        return False
    return True


@needs_weights
def test_only_the_projector_ships_and_the_frozen_parts_are_referenced():
    assert sorted(p.name for p in SHIPPED.iterdir()) == ["config.json", blipkit_llava.PROJECTOR_FILE]
    raw = json.loads((SHIPPED / "config.json").read_text())
    assert (raw["format"], raw["family"]) == ("blipkit", "llava")
    assert raw["config"]["vision"]["pretrained"] == "asset:dinov2-s14"
    assert raw["config"]["llm"]["pretrained"] == "asset:smollm2-135m-instruct"
    assert (SHIPPED / blipkit_llava.PROJECTOR_FILE).stat().st_size < 5_000_000
    assert "default-llava" in blipkit.list_models()
    assert {"name": "default-llava", "family": "llava", "capabilities": ["caption", "ask", "chat"]} in (
        describe_models()
    )


@pytest.fixture(scope="module")
def model():
    if not (SHIPPED / blipkit_llava.PROJECTOR_FILE).exists():
        pytest.skip("default-llava weights not trained/shipped")
    if not _assets_available():
        pytest.skip("the default model's asset packages are not installed")
    return blipkit.load("default-llava")


def test_loads_by_name_as_a_llava(model):
    assert model.family == "llava"
    assert model.model.num_visual_tokens == (112 // 14 // model.model.config.pool) ** 2


@pytest.mark.parametrize("name", ASK_CASES)
def test_answers_shape_and_colour(model, name):
    shape, colour = IMAGES[name]
    image = EXAMPLES / name
    assert model.ask(image, "what shape is in the image?").strip().lower() == shape
    assert model.ask(image, "what color is the shape?").strip().lower() == colour
    assert shape in model.caption(image)[0].lower() and colour in model.caption(image)[0].lower()


@pytest.mark.parametrize("name", CHAT_CASES)
def test_chat_refers_back(model, name):
    shape, colour = IMAGES[name]
    chat = model.chat(EXAMPLES / name)
    assert chat.send("What shape is it?").strip().lower() == shape
    assert chat.send("And its colour?").strip().lower() == colour
