"""VQA accuracy as the official VQAv2 evaluation defines it.

An answer is normalised (punctuation, number words -> digits, articles dropped, contractions restored), then
scored against the human answers: with ten answers, each of the ten leave-one-out subsets of nine gives
``min(#matching / 3, 1)`` and the score is their mean; with one answer it is an exact match. Unlike the
official script, human answers are normalised the same way as the prediction even when they all agree, so
"two" matches "2" in every case.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from blipkit.errors import DataError

__all__ = ["normalize_answer", "score_answer", "vqa_accuracy"]

_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its point)

# contractions in their written form; every spelling with some apostrophes left out maps back to it
_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd
he'd've he'll he's how'd how'll how's i'd i'd've i'll i'm i've isn't it'd it'd've it'll let's ma'am mightn't
mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd she'd've she'll she's
should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've
someone'll someone's something'd something'd've something'll that's there'd there'd've there're there's
they'd they'd've they'll they're they've 'twas wasn't we'd we'd've we'll we're we've weren't what'll what're
what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't
would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()
# spellings that are ordinary words and must stay as they are
_REAL_WORDS = {"hell", "ill", "its", "id", "lets", "shed", "shell", "wed", "well", "were"}


def _apostrophe_variants(word: str) -> Iterable[str]:
    """``word`` with every non-empty subset of its apostrophes removed."""
    spots = [i for i, c in enumerate(word) if c == "'"]
    for n in range(1, len(spots) + 1):
        for drop in itertools.combinations(spots, n):
            yield "".join(c for i, c in enumerate(word) if i not in drop)


_RESTORE = {v: w for w in _CONTRACTIONS for v in _apostrophe_variants(w) if v not in _REAL_WORDS}


def _strip_punctuation(text: str) -> str:
    # a mark next to a space (or any mark in a "1,000"-style text) is removed, otherwise it becomes a space
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        removed = glued or f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if removed else " ")
    return _PERIOD.sub("", out)


def normalize_answer(answer: str) -> str:
    """The official VQA answer normalisation: "Two dogs!" -> "2 dogs", "the cat." -> "cat"."""
    text = _strip_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_RESTORE.get(w, w) for w in words if w not in _ARTICLES)


def score_answer(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (ten, or just one)."""
    if not answers:
        raise DataError("a question needs at least one human answer")
    pred = normalize_answer(prediction)
    humans = [normalize_answer(a) for a in answers]
    if len(humans) == 1:
        return float(pred == humans[0])
    matches = sum(h == pred for h in humans)
    # leaving out answer i removes one match exactly when answer i matched
    scores = [min((matches - (h == pred)) / 3, 1.0) for h in humans]
    return sum(scores) / len(scores)


def vqa_accuracy(
    predictions: Mapping[str, str],
    annotations: Mapping[str, Sequence[str]],
    answer_types: Mapping[str, str] | None = None,
) -> dict:
    """Score every annotated question; a question without a prediction scores 0 and is listed.

    Returns ``{"accuracy", "questions", "per_question", "missing_predictions", "unannotated_predictions"}``
    plus ``"by_answer_type"`` when ``answer_types`` is given.
    """
    if not annotations:
        raise DataError("no annotated questions")
    per_question = {
        qid: score_answer(predictions[qid], answers) if qid in predictions else 0.0
        for qid, answers in annotations.items()
    }
    report = {
        "accuracy": sum(per_question.values()) / len(per_question),
        "questions": len(per_question),
        "missing_predictions": sorted(q for q in annotations if q not in predictions),
        "unannotated_predictions": sorted(q for q in predictions if q not in annotations),
    }
    if answer_types:
        totals: dict[str, list[float]] = defaultdict(list)
        for qid, score in per_question.items():
            totals[answer_types.get(qid, "other")].append(score)
        report["by_answer_type"] = {k: sum(v) / len(v) for k, v in sorted(totals.items())}
    return report | {"per_question": per_question}
