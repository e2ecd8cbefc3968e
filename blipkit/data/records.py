"""The two kinds of training example: an image with a caption, and an image with a question and answer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionExample:
    image: str  # path of the image file
    caption: str


@dataclass(frozen=True)
class VqaExample:
    image: str
    question: str
    answer: str
    caption: str | None = None  # a caption of the image, when known (used by the bridge warm start)
