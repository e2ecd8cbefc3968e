"""Recall@K in both directions, ITC alone and with ITM re-ranking."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

import blipkit
from blipkit import cli
from blipkit.cli_options import add_model_args
from blipkit.eval import cli as eval_cli
from blipkit.eval.recall import group_pairs, recall_at_k, rerank_scores, retrieval_eval


def test_recall_at_k_by_hand():
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.3, 0.8], [0.7, 0.6, 0.5]])
    relevant = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.bool)
    # first relevant ranks: row 0 -> 0, row 1 -> 2, row 2 -> 2
    assert recall_at_k(scores, relevant, ks=(1, 2, 3)) == pytest.approx(
        {"R@1": 1 / 3, "R@2": 1 / 3, "R@3": 1.0}
    )
    none = torch.zeros(1, 3, dtype=torch.bool)
    assert recall_at_k(scores[:1], none, ks=(1, 10)) == {"R@1": 0.0, "R@10": 0.0}


def test_group_pairs_merges_duplicate_texts():
    images, texts, relevant = group_pairs(
        ["a.png", "b.png", "c.png", "a.png"], ["red", "red", "blue", "round"]
    )
    assert images == ["a.png", "b.png", "c.png"] and texts == ["red", "blue", "round"]
    assert relevant.int().tolist() == [[1, 0, 1], [1, 0, 0], [0, 1, 0]]


def test_rerank_scores_reorders_only_the_top():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1]])
    out = rerank_scores(scores, 2, lambda rows, cols: torch.tensor([0.0 if c == 0 else 5.0 for c in cols]))
    assert out[0].argsort(descending=True).tolist() == [1, 0, 2, 3]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(
            {"image": f"{i}.png", "caption": ["a red circle", "a blue square", "a green triangle"][i % 3]}
        )
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "pairs.jsonl"


def test_retrieval_eval_matches_model_similarity(retrieval_dir, pairs):
    model = blipkit.load(retrieval_dir)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    images, texts, relevant = group_pairs(
        [str(pairs.parent / r["image"]) for r in rows], [r["caption"] for r in rows]
    )
    report = retrieval_eval(model, images, texts, relevant, ks=(1, 2), rerank=2)
    sims = model.similarity(images, texts)
    assert report["itc"]["text_to_image"] == recall_at_k(sims.T, relevant.T, (1, 2))
    assert report["itc"]["image_to_text"] == recall_at_k(sims, relevant, (1, 2))
    # re-ranking the top 2 never changes R@2
    assert report["itc+itm"]["text_to_image"]["R@2"] == report["itc"]["text_to_image"]["R@2"]
    assert report["itc+itm"]["image_to_text"]["R@2"] == report["itc"]["image_to_text"]["R@2"]


def test_eval_retrieval_cli(retrieval_dir, pairs, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers(dest="command"), add_model_args)
    out = tmp_path / "r.json"
    args = parser.parse_args(
        [
            "eval",
            "retrieval",
            "--pairs",
            str(pairs),
            "--model",
            str(retrieval_dir),
            "--rerank",
            "3",
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert (report["images"], report["texts"]) == (5, 3)
    assert set(report["itc+itm"]["image_to_text"]) == {"R@1", "R@5", "R@10"}
    assert "| itc+itm | text to image |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("relevance", ["attribute", "caption"])
def test_eval_retrieval_on_easy_vqa_names_its_relevance(retrieval_dir, tmp_path, relevance):
    """The command and ``bench/retrieval_goals.py`` judge easy-VQA the same way by default (by attribute)."""
    from blipkit.data import easy_vqa

    out = tmp_path / "r.json"
    argv = ["eval", "retrieval", "--model", str(retrieval_dir), "--limit", "6", "--rerank", "3"]
    assert cli.main([*argv, "--relevance", relevance, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["relevance"] == relevance
    if relevance == "attribute":
        images, texts, relevant, _ = easy_vqa.retrieval_set("test", 6)
        expected = retrieval_eval(
            blipkit.load(retrieval_dir), images, texts, torch.tensor(relevant), rerank=3
        )
        assert (report["images"], report["texts"]) == (6, 35)
        assert report["itc"] == expected["itc"] and report["itc+itm"] == expected["itc+itm"]
    else:
        captions = {e.caption for e in easy_vqa.caption_examples("test")[:6]}
        assert report["texts"] == len(captions)
