"""VQA accuracy: the official answer normalisation and the ten-answer leave-one-out score, by hand."""

from __future__ import annotations

import argparse
import json

import pytest

from blipkit.eval import cli as eval_cli
from blipkit.eval.vqa import normalize_answer, score_answer, vqa_accuracy


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Yes", "yes"),
        ("Two", "2"),
        ("two dogs!", "2 dogs"),
        ("none", "0"),
        ("The cat.", "cat"),
        ("a red circle", "red circle"),
        ("an apple", "apple"),
        ("dont know", "don't know"),  # contractions get their apostrophe back
        ("isnt", "isn't"),
        ("couldnt've", "couldn't've"),
        ("well", "well"),  # ordinary words that look like contractions stay
        ("3.5", "3.5"),  # a decimal point stays
        ("end.", "end"),
        ("1,000", "1000"),  # digit,digit: punctuation removed, not spaced
        ("black-and-white", "black and white"),  # a mark inside a word becomes a space
        ("black - white", "black white"),  # a mark next to a space is removed
        ("left/right", "left right"),
        ("  many\tspaces \n ", "many spaces"),
        ("the the", ""),
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_ten_answers_leave_one_out():
    ten = ["2"] * 3 + ["3"] * 7
    # each subset leaving out a "2" has 2 matches (2/3), leaving out a "3" has 3 (1): (3*2/3 + 7*1) / 10
    assert score_answer("two", ten) == pytest.approx(0.9)
    assert score_answer("3", ten) == pytest.approx(1.0)
    assert score_answer("4", ten) == 0.0
    one_match = ["yes"] + ["no"] * 9  # 9 subsets with 1 match (1/3), one with 0
    assert score_answer("Yes!", one_match) == pytest.approx(9 / 3 / 10)
    two_matches = ["yes"] * 2 + ["no"] * 8  # 8 subsets with 2 (2/3), two with 1 (1/3)
    assert score_answer("yes", two_matches) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert score_answer("the dog", ["dog"] * 10) == 1.0


def test_one_answer_is_exact_match_after_normalisation():
    assert score_answer("A Circle.", ["circle"]) == 1.0
    assert score_answer("circles", ["circle"]) == 0.0
    with pytest.raises(ValueError):
        score_answer("x", [])


def test_vqa_accuracy_report():
    report = vqa_accuracy(
        {"1": "two", "2": "no", "9": "extra"},
        {"1": ["2"] * 10, "2": ["yes"], "3": ["red"]},
        {"1": "number", "2": "yes/no", "3": "other"},
    )
    assert report["accuracy"] == pytest.approx(1 / 3)
    assert report["per_question"] == {"1": 1.0, "2": 0.0, "3": 0.0}
    assert report["missing_predictions"] == ["3"] and report["unannotated_predictions"] == ["9"]
    assert report["by_answer_type"] == {"number": 1.0, "other": 0.0, "yes/no": 0.0}


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers(dest="command"), lambda p: None)
    args = parser.parse_args(argv)
    return args.func(args)


def test_eval_vqa_cli_writes_json_and_markdown(tmp_path, capsys):
    preds, anns = tmp_path / "p.jsonl", tmp_path / "a.jsonl"
    preds.write_text('{"question_id": 1, "answer": "Two"}\n{"question_id": 2, "answer": "blue"}\n')
    anns.write_text(
        json.dumps({"question_id": 1, "answers": [{"answer": "2"}] * 10, "answer_type": "number"})
        + "\n"
        + json.dumps(
            {"question_id": 2, "answers": ["red", "blue", "blue"] + ["red"] * 7, "answer_type": "other"}
        )
        + "\n"
    )
    out = tmp_path / "report.json"
    assert (
        run(["eval", "vqa", "--predictions", str(preds), "--annotations", str(anns), "--out", str(out)]) == 0
    )
    report = json.loads(out.read_text())
    # question 2: "blue" x2 -> eight subsets with 2 matches (2/3), two with 1 (1/3) = 0.6
    assert report["per_question"] == {"1": 1.0, "2": pytest.approx(0.6)}
    assert report["accuracy"] == pytest.approx(0.8)
    markdown = out.with_suffix(".md").read_text()
    assert "| overall | 2 | 0.8000 |" in markdown and "| number |" in markdown
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(0.8)
