"""easy-VQA (the ``easy_vqa`` package): 64x64 images of one coloured shape, questions with one-word answers.

Captions ("a red circle") are derived per image from the answers to its questions, so the same images serve
stage 1 (image-text pairs), captioning and VQA.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import NamedTuple

from blipkit.data.records import CaptionExample, VqaExample
from blipkit.errors import UsageError

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "yellow", "teal", "brown", "gray", "black")
SPLITS = ("train", "test")
_WORD = re.compile(r"[a-z]+")


def _load(split: str) -> tuple[list[str], list[str], list[int], dict[int, str]]:
    import easy_vqa

    if split not in SPLITS:
        raise UsageError(f"unknown easy-VQA split {split!r}; expected one of {SPLITS}")
    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    return list(questions), list(answers), [int(i) for i in image_ids], {int(k): v for k, v in paths.items()}


def _is_negated(question: str) -> bool:
    words = _WORD.findall(question)
    return "not" in words or words[:2] == ["is", "no"]


def derive_attributes(
    questions: list[str], answers: list[str], image_ids: list[int]
) -> dict[int, dict[str, str]]:
    """{image id: {"shape": ..., "color": ...}} read off the answers (direct answers, then yes/no logic)."""
    known: dict[int, dict[str, str]] = defaultdict(dict)
    excluded: dict[int, dict[str, set[str]]] = defaultdict(lambda: {"shape": set(), "color": set()})
    for question, answer, image in zip(questions, answers, image_ids, strict=True):
        words = set(_WORD.findall(question))
        shape = next((w for w in SHAPES if w in words), None)
        color = next((w for w in COLORS if w in words), None)
        if answer in SHAPES:
            known[image]["shape"] = answer
            if color:
                known[image]["color"] = color
        elif answer in COLORS:
            known[image]["color"] = answer
            if shape:
                known[image]["shape"] = shape
        elif answer in ("yes", "no"):
            present = (answer == "yes") != _is_negated(question)
            for kind, word in (("shape", shape), ("color", color)):
                if word and present:
                    known[image][kind] = word
                elif word:
                    excluded[image][kind].add(word)
    for image, out in excluded.items():  # one value left after ruling the others out
        for kind, choices in (("shape", SHAPES), ("color", COLORS)):
            left = [c for c in choices if c not in out[kind]]
            if kind not in known[image] and len(left) == 1:
                known[image][kind] = left[0]
    return dict(known)


def caption_for(attributes: dict[str, str]) -> str:
    """ "a red circle", "a red shape" or "a circle" from whatever is known about the image."""
    color, shape = attributes.get("color"), attributes.get("shape", "shape")
    return f"a {color} {shape}" if color else f"a {shape}"


# prompts users type before a caption; stage 2 (``caption_prompts``) teaches them to continue with the caption
USER_CAPTION_PROMPTS = (
    "a photo of",
    "a picture of",
    "an image of",
    "a photo of a",
    "a picture of a",
    "an image of a",
    "this is",
    "this is a",
    "a drawing of",
    "the image shows",
)


def continue_caption(prompt: str, caption: str) -> str:
    """The words that continue ``prompt`` into ``caption``: "a photo of" + "a red circle", "a photo of a" +
    "red circle" (a prompt that ends in the caption's article takes the rest)."""
    article, _, rest = caption.partition(" ")
    if rest and prompt.split()[-1:] == [article]:
        return rest
    return caption


def image_paths(split: str) -> dict[int, str]:
    """{image id: png path} of a split."""
    return _load(split)[3]


def vqa_examples(split: str) -> list[VqaExample]:
    """Every question of the split, with its image's derived caption."""
    questions, answers, image_ids, paths = _load(split)
    attributes = derive_attributes(questions, answers, image_ids)
    return [
        VqaExample(paths[i], q, a, caption_for(attributes.get(i, {})))
        for q, a, i in zip(questions, answers, image_ids, strict=True)
    ]


def caption_examples(split: str) -> list[CaptionExample]:
    """One derived caption per image (images whose shape and colour are both unknown are left out)."""
    questions, answers, image_ids, paths = _load(split)
    attributes = derive_attributes(questions, answers, image_ids)
    return [CaptionExample(paths[i], caption_for(a)) for i, a in sorted(attributes.items()) if a]


class RetrievalSet(NamedTuple):
    images: list[str]  # paths of the images whose colour and shape are both known
    texts: list[str]  # every caption the grammar makes
    relevant: list[list[bool]]  # (N_img, N_txt): the caption names only the image's attributes
    attributes: list[dict[str, str]]  # {"color": ..., "shape": ...} per image


def retrieval_set(split: str, limit: int | None = None) -> RetrievalSet:
    """Images whose colour and shape are both known, every caption the grammar makes ("a red circle",
    "a red shape", "a circle") and their relevance: a caption fits an image when each attribute it names
    is the image's. ``limit``: the first N such images.

    Relevance by attribute, not by caption string: "a red shape" describes every red image, and an image
    whose shape no question reveals could not be judged against "a red circle", so it is left out."""
    questions, answers, image_ids, paths = _load(split)
    attributes = derive_attributes(questions, answers, image_ids)
    known = [(paths[i], a) for i, a in sorted(attributes.items()) if len(a) == 2][:limit]
    texts = [f"a {c} {s}" for c in COLORS for s in SHAPES] + [f"a {c} shape" for c in COLORS]
    texts += [f"a {s}" for s in SHAPES]

    def fits(text: str, a: dict[str, str]) -> bool:
        words = text.split()[1:]
        color = words[0] if words[0] in COLORS else None
        return color in (None, a["color"]) and words[-1] in ("shape", a["shape"])

    relevant = [[fits(t, a) for t in texts] for _, a in known]
    return RetrievalSet([p for p, _ in known], texts, relevant, [a for _, a in known])
