"""Answer a VQA dataset with a model (greedy, the model's VQA prompt) and score it.

Questions are grouped by image so each image goes through the vision encoder once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from blipkit.eval.vqa import vqa_accuracy
from blipkit.models.blip2 import Visual
from blipkit.processing import load_image

__all__ = ["answer_type", "answer_questions", "evaluate_vqa_model", "select"]

ImageChange = Callable[[Image.Image, str], Image.Image]  # (image, its path) -> the image the model sees


def answer_type(answer: str) -> str:
    """yes/no, number, shape, color or other (shape and color are easy-VQA's answer kinds)."""
    from blipkit.data import easy_vqa

    a = answer.strip().lower()
    if a in ("yes", "no"):
        return "yes/no"
    if a.isdigit():
        return "number"
    return "shape" if a in easy_vqa.SHAPES else "color" if a in easy_vqa.COLORS else "other"


def select(examples: list, limit: int = 0) -> list[int]:
    """Indices of the questions to ask: all, or a fixed random subset of ``limit`` (seed 0)."""
    if not limit or limit >= len(examples):
        return list(range(len(examples)))
    return sorted(np.random.default_rng(0).permutation(len(examples))[:limit].tolist())


@torch.inference_mode()
def answer_questions(
    model,
    examples: list,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    change: ImageChange | None = None,
    progress: bool = False,
) -> list[str]:
    """Greedy answers to ``examples`` (objects with ``image`` and ``question``), in their order.

    ``change`` alters each image before the model sees it (held-out variations of a dataset)."""
    from tqdm.auto import tqdm

    model.require_llm()
    text = model.text
    max_new = max_new_tokens or model.config.prompts.vqa_max_new_tokens
    order = sorted(range(len(examples)), key=lambda i: str(examples[i].image))
    answers: list[str] = [""] * len(examples)
    bar = tqdm(total=len(examples), unit="q", desc="vqa", disable=not progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        images = list(dict.fromkeys(str(examples[i].image) for i in chunk))
        inputs = [change(load_image(p), p) for p in images] if change else images
        if model.family == "caption":  # the caption-then-LLM bridge: each image's caption, then the LLM
            where = {p: n for n, p in enumerate(images)}
            shown = [inputs[where[str(examples[i].image)]] for i in chunk]
            questions = [examples[i].question for i in chunk]
            for i, a in zip(chunk, model.generate(shown, questions, max_new), strict=True):
                answers[i] = a
            bar.update(len(chunk))
            continue
        feats = model.image_features(inputs)  # (b_img, P, Dv)
        where = {p: n for n, p in enumerate(images)}
        embeds = feats[[where[str(examples[i].image)] for i in chunk]]  # (B, P, Dv)
        prompts = [text.prompt(text.question(examples[i].question), max_new) for i in chunk]
        tokens = model.complete(Visual(image_embeds=embeds), prompts, max_new)
        for i, t in zip(chunk, tokens, strict=True):
            answers[i] = text.decode(t)
        bar.update(len(chunk))
    bar.close()
    return answers


def evaluate_vqa_model(
    model, examples: list, limit: int = 0, batch_size: int = 32, progress: bool = False
) -> tuple[dict, list[dict]]:
    """(report, prediction rows) for VQA examples (``image``, ``question``, ``answer``); question ids are
    the examples' positions."""
    chosen = select(examples, limit)
    start = time.perf_counter()
    answers = answer_questions(model, [examples[i] for i in chosen], batch_size, progress=progress)
    seconds = time.perf_counter() - start
    qids = [str(i) for i in chosen]
    truth = {q: [examples[i].answer] for q, i in zip(qids, chosen, strict=True)}
    types = {q: answer_type(examples[i].answer) for q, i in zip(qids, chosen, strict=True)}
    predictions = dict(zip(qids, answers, strict=True))
    report = vqa_accuracy(predictions, truth, types)
    exact = [predictions[q].strip().lower() == truth[q][0].strip().lower() for q in qids]
    report["exact_match"] = sum(exact) / len(exact)
    report["answer_type_counts"] = dict(sorted(Counter(types.values()).items()))
    report["seconds"] = round(seconds, 1)
    rows = [
        {
            "question_id": q,
            "answer": predictions[q],
            "question": examples[i].question,
            "image": examples[i].image,
        }
        for q, i in zip(qids, chosen, strict=True)
    ]
    return report, rows
