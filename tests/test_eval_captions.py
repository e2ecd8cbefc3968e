"""Caption metrics through pycocoevalcap's scorers, with and without Java."""

from __future__ import annotations

import argparse
import json

import pytest

from blipkit.eval import cli as eval_cli
from blipkit.eval.captions import caption_metrics, java_available, tokenize

pytest.importorskip("pycocoevalcap")
needs_java = pytest.mark.skipif(not java_available(), reason="java is not installed")

REFS = {
    "1": ["A cat is sitting on a mat.", "a cat on a mat"],
    "2": ["A dog runs in the park.", "a dog running"],
    "3": ["Two birds (small) fly over the sea.", "birds flying"],
}
PREDS = {"1": "A cat sits on a mat.", "2": "a dog is running", "3": "a plane"}


def test_simple_tokenizer_without_java():
    assert tokenize({"a": ["A Cat, on the MAT!"]}, use_java=False) == {"a": ["a cat on the mat"]}


def test_metrics_without_java(capsys):
    report = caption_metrics(PREDS, REFS, use_java=False)
    assert list(report["metrics"]) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]
    assert report["skipped"] == ["METEOR"] and report["tokenizer"] == "simple"
    assert capsys.readouterr().out == ""  # Bleu's statistics are not printed
    # BLEU-1 by hand: 5 + 3 + 0 of 6 + 4 + 2 candidate words match (clipped); references are shorter: BP 1
    assert report["metrics"]["BLEU-1"] == pytest.approx(8 / 12, abs=1e-6)
    assert report["per_image"]["3"]["CIDEr"] == 0.0
    perfect = caption_metrics({k: v[0] for k, v in REFS.items()}, REFS, use_java=False)["metrics"]
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and perfect["ROUGE-L"] == pytest.approx(1.0)


def test_mismatched_ids_are_an_error():
    with pytest.raises(ValueError, match="same images"):
        caption_metrics({"1": "a cat"}, REFS, use_java=False)


@needs_java
def test_ptb_tokenizer_matches_pycocoevalcap():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    theirs = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    assert tokenize(REFS, use_java=True) == theirs


@pytest.mark.slow
@needs_java
def test_meteor_with_java():
    report = caption_metrics(PREDS, REFS)
    assert report["tokenizer"] == "ptb" and 0 < report["metrics"]["METEOR"] < 1


def test_eval_caption_cli(tmp_path, capsys):
    preds, refs = tmp_path / "p.jsonl", tmp_path / "r.jsonl"
    preds.write_text("".join(json.dumps({"path": k, "caption": v}) + "\n" for k, v in PREDS.items()))
    refs.write_text("".join(json.dumps({"path": k, "caption": c}) + "\n" for k, v in REFS.items() for c in v))
    out = tmp_path / "captions.json"
    argv = [
        "eval",
        "caption",
        "--predictions",
        str(preds),
        "--references",
        str(refs),
        "--out",
        str(out),
        "--no-java",
    ]
    assert eval_cli_run(argv) == 0
    report = json.loads(out.read_text())
    assert report["images"] == 3 and "CIDEr" in report["metrics"]
    assert "| BLEU-1 |" in out.with_suffix(".md").read_text()
    assert "per_image" not in json.loads(capsys.readouterr().out)


def eval_cli_run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers(dest="command"), lambda p: None)
    args = parser.parse_args(argv)
    return args.func(args)
