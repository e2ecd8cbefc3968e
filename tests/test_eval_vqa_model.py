"""Answering a VQA set with a model: the same answers as ``Model.ask``, scored and written out."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import blipkit
from blipkit.data.records import VqaExample
from blipkit.eval.vqa_model import answer_type, evaluate_vqa_model, select


@pytest.fixture(scope="module")
def model(opt_dir):
    return blipkit.load(opt_dir)


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vqa-images")
    rng = np.random.default_rng(2)
    paths = []
    for i in range(2):
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(paths[-1])
    questions = ["what shape is it?", "is it red?", "what color?", "how many?"]
    return [VqaExample(paths[i % 2], q, "yes") for i, q in enumerate(questions)]


def test_answers_match_model_ask_and_are_scored(model, examples):
    report, rows = evaluate_vqa_model(model, examples, batch_size=3)
    expected = [model.ask(e.image, e.question) for e in examples]
    assert [r["answer"] for r in rows] == expected
    assert [r["question_id"] for r in rows] == ["0", "1", "2", "3"]
    hits = [float(a.strip().lower() == "yes") for a in expected]
    assert report["accuracy"] == pytest.approx(sum(hits) / 4)
    assert report["questions"] == 4 and report["answer_type_counts"] == {"yes/no": 4}


def test_limit_picks_a_fixed_subset():
    assert select(list(range(10)), 4) == select(list(range(10)), 4)
    assert len(select(list(range(10)), 4)) == 4 and select(list(range(3)), 0) == [0, 1, 2]


def test_answer_types():
    assert [answer_type(a) for a in ("Yes", "circle", "teal", "3", "kite")] == [
        "yes/no", "shape", "color", "number", "other"
    ]  # fmt: skip
