"""Held-out variations of easy-VQA for checking generalisation: other image sizes and positions, and question
wordings never seen in training, scored by blipkit's one VQA evaluator (``blipkit.eval.vqa_model``).

    python bench/heldout.py [--model default] [--limit 300] [--variant none|bigger|moved|paraphrased]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import defaultdict
from dataclasses import replace

from PIL import Image

import blipkit
from blipkit.data import easy_vqa
from blipkit.eval.vqa_model import answer_questions, answer_type, select
from blipkit.train.features import augmented_geometry

VARIANTS = ("none", "bigger", "moved", "paraphrased")

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


def bigger(image: Image.Image, path: str, size: int = 200) -> Image.Image:
    """The same scene at another resolution."""
    return image.resize((size, size), Image.Resampling.BICUBIC)


def moved(image: Image.Image, path: str) -> Image.Image:
    """The shape at another size and position on a larger canvas (a seed stream unused in training)."""
    return augmented_geometry(image, random.Random(f"held-out/{path}"))


def evaluate(model: blipkit.Model, limit: int = 0, variant: str = "none", split: str = "test") -> dict:
    """Exact-match accuracy (overall, yes/no, shape, color) on ``split`` under ``variant``."""
    examples = easy_vqa.vqa_examples(split)
    if variant == "paraphrased":
        examples = [replace(e, question=paraphrase(e.question)) for e in examples if paraphrase(e.question)]
    examples = [examples[i] for i in select(examples, limit)]
    change = {"bigger": bigger, "moved": moved}.get(variant)
    start = time.perf_counter()
    answers = answer_questions(model, examples, change=change)
    hits, named, totals = defaultdict(int), defaultdict(int), defaultdict(int)
    for e, a in zip(examples, answers, strict=True):
        for key in ("overall", answer_type(e.answer)):
            hits[key] += a.strip().lower() == e.answer.strip().lower()
            named[key] += names_only(a, e.answer)
            totals[key] += 1
    result = {k: hits[k] / totals[k] for k in totals} | {"questions": totals["overall"]}
    result["names_the_answer"] = {k: named[k] / totals[k] for k in totals}
    return result | {"seconds": round(time.perf_counter() - start, 1)}


ANSWER_WORDS = {
    "yes/no": {"yes", "no"},
    "shape": {"circle", "rectangle", "triangle"},
    "color": {"red", "green", "blue", "yellow", "teal", "brown", "gray", "black"},
}


def names_only(answer: str, truth: str) -> bool:
    """An answer that names the right answer word and no other of its kind ("The shape is a circle.")."""
    words = set(re.findall(r"[a-z]+", answer.lower().replace("grey", "gray")))
    rivals = ANSWER_WORDS[answer_type(truth)] - {truth}
    return truth in words and not words & rivals


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="default")
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--variant", default="none", choices=VARIANTS)
    p.add_argument("--split", default="test", choices=easy_vqa.SPLITS)
    args = p.parse_args()
    print(
        json.dumps(
            {"variant": args.variant}
            | evaluate(blipkit.load(args.model), args.limit, args.variant, args.split)
        )
    )


if __name__ == "__main__":
    main()
