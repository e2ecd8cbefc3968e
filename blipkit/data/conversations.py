"""Conversations about easy-VQA images, built from each image's attributes (shape, colour) for LLaVA training.

Every example is one image and a list of (user, assistant) turns; the loss is on the assistant turns only.

- ``vqa``: one easy-VQA question -> its one-word answer (as asked by ``Model.ask``);
- ``caption``: a short request ("Describe the image briefly.") -> the derived caption ("a red circle");
- ``describe``: "Describe the image." -> a full sentence ("The image shows a red circle.");
- ``chat``: two or three turns whose later questions refer back ("What shape is it?" -> "circle",
  "And its colour?" -> "red"), so ``Model.chat`` is trained on what it is asked to do.

Attributes come from ``blipkit.data.easy_vqa`` (``vqa_examples`` + ``derive_attributes``); choices of
wording are deterministic per (seed, image).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from blipkit.data import easy_vqa

DESCRIBE = "Describe the image."
CAPTION_REQUESTS = ("Describe the image briefly.", "Caption the image.", "What is in the image?")
SHAPE_QUESTIONS = ("What shape is it?", "What shape is in the image?", "Which shape do you see?")
COLOUR_QUESTIONS = ("What colour is it?", "What color is the shape?", "Which colour is the shape?")
# follow-ups that only make sense after the other attribute was asked about: "it" is the shape
COLOUR_FOLLOW_UPS = ("And its colour?", "And its color?", "What about its colour?", "And what colour is it?")
SHAPE_FOLLOW_UPS = ("And its shape?", "What about its shape?", "And what shape is it?")
YES_NO_FOLLOW_UPS = ("Is it {}?", "So is it {}?")


@dataclass(frozen=True)
class Conversation:
    image: str  # path of the image file
    turns: tuple[tuple[str, str], ...]  # (user, assistant), in order; every answer is scored
    kind: str  # "vqa", "caption", "describe" or "chat"


def sentence_for(attributes: dict[str, str]) -> str:
    """ "The image shows a red circle." from the image's attributes (``easy_vqa.caption_for``)."""
    return f"The image shows {easy_vqa.caption_for(attributes)}."


def image_attributes(split: str) -> dict[str, dict[str, str]]:
    """{image path: {"shape": ..., "color": ...}} as far as the split's answers tell."""
    rows = easy_vqa.vqa_examples(split)
    return easy_vqa.derive_attributes(
        [r.question for r in rows], [r.answer for r in rows], [r.image for r in rows]
    )


def chat_turns(attributes: dict[str, str], rng: random.Random) -> tuple[tuple[str, str], ...]:
    """Two or three turns about one image: one attribute, the other by reference, maybe a yes/no check."""
    shape, colour = attributes["shape"], attributes["color"]
    if rng.random() < 0.5:
        turns = [(rng.choice(SHAPE_QUESTIONS), shape), (rng.choice(COLOUR_FOLLOW_UPS), colour)]
    else:
        turns = [(rng.choice(COLOUR_QUESTIONS), colour), (rng.choice(SHAPE_FOLLOW_UPS), shape)]
    if rng.random() < 0.4:
        pick = rng.choice(["shape", "color"])
        choices = easy_vqa.SHAPES if pick == "shape" else easy_vqa.COLORS
        asked = attributes[pick] if rng.random() < 0.5 else rng.choice(choices)
        answer = "yes" if asked == attributes[pick] else "no"
        turns.append((rng.choice(YES_NO_FOLLOW_UPS).format(asked), answer))
    return tuple(turns)


def conversations(
    split: str = "train",
    kinds: Sequence[str] = ("vqa", "caption", "describe", "chat"),
    chats_per_image: int = 1,
    seed: int = 0,
) -> list[Conversation]:
    """The split's training conversations of ``kinds`` (caption / describe / chat only for images whose
    shape and colour are both known)."""
    unknown = sorted(set(kinds) - {"vqa", "caption", "describe", "chat"})
    if unknown:
        raise ValueError(f"unknown conversation kinds {unknown}")
    out: list[Conversation] = []
    if "vqa" in kinds:
        out += [Conversation(r.image, ((r.question, r.answer),), "vqa") for r in easy_vqa.vqa_examples(split)]
    for image, attrs in sorted(image_attributes(split).items()):
        if len(attrs) < 2:
            continue
        rng = random.Random(f"{seed}/{image}")
        if "caption" in kinds:
            request = rng.choice(CAPTION_REQUESTS)
            out.append(Conversation(image, ((request, easy_vqa.caption_for(attrs)),), "caption"))
        if "describe" in kinds:
            out.append(Conversation(image, ((DESCRIBE, sentence_for(attrs)),), "describe"))
        if "chat" in kinds:
            out += [Conversation(image, chat_turns(attrs, rng), "chat") for _ in range(chats_per_image)]
    return out
