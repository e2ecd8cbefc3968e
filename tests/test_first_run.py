"""What a first run meets: the OpenAI SDK's embeddings call, progress bars, score names, clear usage errors,
readable plots and a ``--help`` line for every option."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from live_server import live
from PIL import Image, ImageDraw

import blipkit
from blipkit.cli import build_parser, main

IMAGES = 3


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("first-run")
    rng = np.random.default_rng(5)
    for i in range(IMAGES):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def retrieval_model(retrieval_dir):
    return blipkit.load(retrieval_dir)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- /v1/embeddings with the official SDK ---------------------------------------------------------------


def test_openai_sdk_embeddings_with_default_arguments(retrieval_model):
    openai = pytest.importorskip("openai")
    from blipkit.serve import create_app

    texts = ["a red circle", "a blue square on grass"]
    expected = retrieval_model.embed_texts(texts).float()
    with live(create_app(retrieval_model, model_name="tiny")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        got = client.embeddings.create(model="tiny", input=texts)  # the SDK asks for base64
        short = client.embeddings.create(model="tiny", input=texts, dimensions=8)
        floats = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    assert [d.index for d in got.data] == [0, 1]
    vectors = torch.tensor([d.embedding for d in got.data])
    assert torch.allclose(vectors, expected, atol=1e-6)
    assert torch.allclose(torch.tensor([d.embedding for d in floats.data]), expected, atol=1e-6)
    truncated = torch.tensor([d.embedding for d in short.data])
    assert truncated.shape == (2, 8)
    assert torch.allclose(truncated, torch.nn.functional.normalize(expected[:, :8], dim=-1), atol=1e-6)


@pytest.mark.parametrize("dims", [0, -3, 10**6, "8", 2.5, True])
def test_embeddings_dimensions_out_of_range_is_a_400_naming_the_field(retrieval_model, dims):
    from fastapi.testclient import TestClient

    from blipkit.serve import create_app

    client = TestClient(create_app(retrieval_model))
    r = client.post("/v1/embeddings", json={"input": ["a cat"], "dimensions": dims})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions", r.text
    r = client.post("/v1/embeddings", json={"input": ["a cat"], "encoding_format": "int8"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "encoding_format"


# --- progress --------------------------------------------------------------------------------------------


def test_index_is_quiet_when_piped_and_shows_a_bar_with_progress(retrieval_dir, images, tmp_path, capsys):
    code, _, err = run(["index", images, "--out", tmp_path / "a", "--model", retrieval_dir], capsys)
    assert code == 0 and "embedded" not in err and "img/s" not in err
    assert err.strip().splitlines() == [
        f"index {tmp_path / 'a'}: 3 images (added 3, already there 0, failed 0)"
    ]
    argv = ["index", images, "--out", tmp_path / "b", "--model", retrieval_dir, "--progress"]
    code, _, err = run(argv, capsys)
    assert code == 0 and "index: 100%" in err and "3/3" in err


@pytest.fixture(scope="module")
def pairs(images):
    rows = [{"image": f"{i}.png", "caption": ["a red circle", "a blue square"][i % 2]} for i in range(IMAGES)]
    path = images / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_retrieval_progress(retrieval_dir, pairs, capsys):
    argv = ["eval", "retrieval", "--pairs", pairs, "--model", retrieval_dir, "--rerank", "2"]
    code, out, err = run(argv, capsys)
    assert code == 0 and json.loads(out)["images"] == IMAGES and "retrieval:" not in err
    code, out, err = run([*argv, "--progress"], capsys)
    assert code == 0 and json.loads(out)["images"] == IMAGES and "retrieval: 100%" in err


def test_eval_vqa_model_progress(opt_dir, images, capsys):
    rows = [{"image": f"{i}.png", "question": "is it red?", "answer": "yes"} for i in range(IMAGES)]
    path = images / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["eval", "vqa-model", "--dataset", path, "--image-root", images, "--model", opt_dir]
    code, out, err = run(argv, capsys)
    assert code == 0 and json.loads(out)["questions"] == IMAGES and "vqa:" not in err
    code, out, err = run([*argv, "--progress"], capsys)
    assert code == 0 and json.loads(out)["questions"] == IMAGES and "vqa: 100%" in err


# --- one ITM scale -----------------------------------------------------------------------------------------


def test_search_prints_itm_match_probabilities_like_similarity(retrieval_dir, images, tmp_path, capsys):
    index = tmp_path / "index"
    assert run(["index", images, "--out", index, "--model", retrieval_dir], capsys)[0] == 0
    code, out, _ = run(["search", index, "a red circle", "-k", "3", "--rerank", "3"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 3 and all("itm" not in r for r in rows)
    paths = [r["path"] for r in rows]
    code, out, _ = run(
        [
            "similarity",
            "--images",
            *paths,
            "--texts",
            "a red circle",
            "--itm",
            "--json",
            "--model",
            retrieval_dir,
        ],
        capsys,
    )
    probs = [row[0] for row in json.loads(out)["scores"]]
    assert code == 0 and [r["itm_prob"] for r in rows] == pytest.approx(probs, abs=1e-4)
    assert all(0.0 <= p <= 1.0 for p in probs)
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)  # still ranked by ITM logit + ITC


# --- usage errors ----------------------------------------------------------------------------------------


def test_caption_unknown_out_suffix_is_a_usage_error(opt_dir, images, tmp_path, capsys):
    out = tmp_path / "captions.xml"
    code, _, err = run(["caption", images, "--out", out, "--model", opt_dir], capsys)
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and ".jsonl, .csv, .parquet" in err and "--format" in err
    code, _, _ = run(
        ["caption", images / "0.png", "--out", out, "--format", "jsonl", "--model", opt_dir], capsys
    )
    assert code == 0 and json.loads(out.read_text())["path"].endswith("0.png")


def test_caption_of_no_images_is_a_usage_error_but_a_finished_resume_is_not(
    opt_dir, images, tmp_path, capsys
):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("no pictures here")
    code, _, err = run(["caption", empty, "--model", opt_dir], capsys)
    assert code == 2 and err == f"blipkit: error: no images found in {empty}\n"
    code, _, err = run(["index", empty, "--out", tmp_path / "i", "--model", opt_dir], capsys)
    assert code == 2 and "no images found" in err
    out = tmp_path / "caps.jsonl"
    assert run(["caption", images / "1.png", "--out", out, "--model", opt_dir], capsys)[0] == 0
    code, _, err = run(["caption", images / "1.png", "--out", out, "--model", opt_dir], capsys)
    assert code == 0 and err.strip() == "captioned 0, skipped 1, failed 0"


def test_classify_with_a_single_label_says_two_are_needed(retrieval_dir, images, capsys):
    code, out, err = run(["classify", images, "--labels", "one", "--model", retrieval_dir], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "at least two" in err


# --- pictures --------------------------------------------------------------------------------------------


def test_similarity_heatmap_has_images_on_rows_and_no_empty_canvas(images, tmp_path):
    pytest.importorskip("matplotlib")
    from blipkit.retrieval.plots import similarity_heatmap

    files = [str(images / f"{i}.png") for i in range(2)]
    texts = ["a red circle", "a blue square", "x" * 60]
    out = tmp_path / "heat.png"
    ax = similarity_heatmap(files, texts, torch.rand(2, 3), out)
    assert ax.images[0].get_array().shape == (2, 3)  # images x texts, as the printed table
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[:2] == texts[:2] and labels[2].endswith("\u2026") and len(labels[2]) <= 40
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0.png", "1.png"]
    ink = np.asarray(Image.open(out).convert("L")) < 250
    ys, xs = np.nonzero(ink)
    assert (xs.max() - xs.min() + 1) / ink.shape[1] > 0.85 and (ys.max() - ys.min() + 1) / ink.shape[0] > 0.85


def test_contact_sheet_marks_cut_labels_with_an_ellipsis(images, tmp_path, monkeypatch):
    from blipkit.retrieval.plots import contact_sheet

    drawn = []
    original = ImageDraw.ImageDraw.text
    monkeypatch.setattr(
        ImageDraw.ImageDraw,
        "text",
        lambda self, xy, text, *a, **k: drawn.append(text) or original(self, xy, text, *a, **k),
    )
    long = "a_very_long_image_name_that_does_not_fit_under_its_thumbnail.png"
    contact_sheet(
        [images / "0.png", images / "1.png"], tmp_path / "sheet.png", thumb=64, labels=["0.png", long]
    )
    assert drawn[0] == "0.png"
    assert drawn[1].endswith(("\u2026", "...")) and long.startswith(drawn[1].rstrip(".\u2026"))


# --- --help ----------------------------------------------------------------------------------------------


# help strings that live outside the commands checked here (the main parser's ask/chat, train, serve)
def _actions(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, str, object]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, (*path, name))
        elif not isinstance(action, argparse._HelpAction):
            yield " ".join(path), (action.option_strings or [action.dest])[-1], action


def test_every_option_and_argument_has_help():
    missing = [
        f"{command} {name}"
        for command, name, action in _actions(build_parser())
        if not (action.help and action.help.strip())
    ]
    assert missing == []
