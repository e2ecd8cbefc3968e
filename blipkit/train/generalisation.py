"""Held-out variations of easy-VQA for checking generalisation: other image sizes and positions, and
question wordings never seen in training. Used by ``python -m blipkit.train.vqa_eval --variant ...``."""

from __future__ import annotations

import random
import re

from PIL import Image

from blipkit.train.features import augmented_view

# (pattern, rewrite): each keeps the question's meaning (and so its answer); none occurs in easy-VQA
PARAPHRASES = [
    (r"^what shape is (in the image|present|this)\?$", "which shape can you see in this picture?"),
    (r"^what shape does the image contain\?$", "which shape is shown?"),
    (r"^what color is the shape\?$", "which colour does the shape have?"),
    (r"^what is the color of the shape\?$", "what colour is the object?"),
    (r"^what is the (\w+) shape\?$", r"which shape is drawn in \1?"),
    (r"^what color is the (circle|rectangle|triangle)\?$", r"which colour is the \1?"),
    (r"^what is the color of the (circle|rectangle|triangle)\?$", r"tell me the colour of the \1."),
    (r"^is an? (\w+)( shape)? present\?$", r"do you see a \1\2 here?"),
    (r"^is no (\w+)( shape)? present\?$", r"is it true that there is no \1\2 here?"),
    (r"^is there an? (\w+)( shape)?( in the image)?\?$", r"can you see a \1\2?"),
    (r"^does the image contain an? (\w+)( shape)?\?$", r"is a \1\2 shown in the picture?"),
    (r"^is there not an? (\w+)( shape)?( in the image)?\?$", r"is it true that there is no \1\2?"),
    (r"^does the image not contain an? (\w+)( shape)?\?$", r"is it true that the picture has no \1\2?"),
]


def paraphrase(question: str) -> str | None:
    """A new wording of an easy-VQA question with the same answer, or None when no rule applies."""
    for pattern, rewrite in PARAPHRASES:
        if re.match(pattern, question):
            return re.sub(pattern, rewrite, question)
    return None


def bigger(image: Image.Image, size: int = 200) -> Image.Image:
    """The same scene at another resolution."""
    return image.resize((size, size), Image.Resampling.BICUBIC)


def moved(image: Image.Image, key: str) -> Image.Image:
    """The shape at another size and position on a larger canvas (a seed stream unused in training)."""
    return augmented_view(image, random.Random(f"held-out/{key}"))
