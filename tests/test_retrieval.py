"""Index, search (exact and FAISS), ITM re-ranking, zero-shot classify, similarity plots and clusters on a
tiny random retrieval model."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Blip2ForImageTextRetrieval

import blipkit
from blipkit import errors
from blipkit.cli_options import add_model_args
from blipkit.retrieval import ImageIndex, Searcher, build_index, rerank
from blipkit.retrieval import cli as retrieval_cli


@pytest.fixture(scope="module")
def model(retrieval_dir):
    return blipkit.load(retrieval_dir)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (24 + 4 * i, 32, 3), dtype=np.uint8)).save(
            folder / f"img{i}.png"
        )
    return folder


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    retrieval_cli.register(parser.add_subparsers(dest="command"), add_model_args)
    args = parser.parse_args(argv)
    return args.func(args)


def images_of(folder):
    return sorted(str(p.resolve()) for p in folder.glob("*.png"))


def test_index_holds_per_query_embeddings_and_resumes(model, retrieval_dir, folder, tmp_path):
    paths = images_of(folder)
    out = tmp_path / "index"
    first = build_index(model, paths[:4], out, str(retrieval_dir), batch_size=3)
    assert (first.added, first.skipped, first.failed) == (4, 0, [])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    second = build_index(model, [*paths, tmp_path / "broken.png"], out, str(retrieval_dir), batch_size=3)
    assert (second.added, second.skipped) == (2, 4)
    assert [p for p, _ in second.failed] == [str((tmp_path / "broken.png").resolve())]
    index = ImageIndex.load(out)
    assert index.paths == paths and not (out / "parts").exists()
    torch.testing.assert_close(index.embeddings, model.image_query_embeddings(paths))
    assert index.meta["model"] == str(retrieval_dir) and index.meta["num_query_tokens"] == 4
    with pytest.raises(ValueError, match="built with model"):
        build_index(model, paths, out, "another-model")


def test_interrupted_build_keeps_finished_batches(model, folder, tmp_path):
    paths = images_of(folder)
    out = tmp_path / "index"

    def stop_after_first_batch(done, total):
        if done < total:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(model, paths, out, batch_size=2, on_batch=stop_after_first_batch)
    assert len(ImageIndex.load(out)) == 2  # the finished batch is on disk
    result = build_index(model, paths, out, batch_size=2)
    assert (result.added, result.skipped, len(result.index)) == (4, 2, 6)


@pytest.fixture(scope="module")
def index(model, retrieval_dir, folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("index")
    return build_index(model, images_of(folder), out, str(retrieval_dir), batch_size=4).index, out


def test_text_search_ranks_by_max_over_queries(model, index):
    index, _ = index
    texts = ["a red circle", "blue"]
    hits = Searcher(index, "exact").search_texts(model.embed_texts(texts), k=4)
    sims = model.similarity(index.paths, texts)  # (N, 2)
    for j, row in enumerate(hits):
        assert [h.index for h in row] == sims[:, j].topk(4).indices.tolist()
        torch.testing.assert_close(torch.tensor([h.score for h in row]), sims[:, j].topk(4).values)


def test_faiss_and_exact_search_agree(model, index):
    pytest.importorskip("faiss")
    index, _ = index
    texts = model.embed_texts(["a red circle", "blue", "two green squares"])
    for k in (1, 3, 6, 10):
        exact = Searcher(index, "exact").search_texts(texts, k)
        fast = Searcher(index, "faiss").search_texts(texts, k)
        assert [[h.path for h in row] for row in exact] == [[h.path for h in row] for row in fast]
        for a, b in zip(exact, fast, strict=True):
            assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)
    queries = model.embed_images(index.paths[:2])
    exact = Searcher(index, "exact").search_images(queries, 3)
    fast = Searcher(index, "faiss").search_images(queries, 3)
    assert [[h.path for h in row] for row in exact] == [[h.path for h in row] for row in fast]
    assert [row[0].path for row in exact] == index.paths[:2]  # an image is its own nearest neighbour


@torch.inference_mode()
def test_rerank_orders_by_itm_logit_plus_itc(model, index, retrieval_dir):
    index, _ = index
    hits = Searcher(index).search_texts(model.embed_texts(["a red circle"]), k=6)[0]
    itc = {h.path: h.itc for h in hits}
    reranked = rerank(model, hits, "a red circle", top=4)
    head = hits[:4]  # the ITC top 4, scored independently by transformers' own retrieval model
    hf = Blip2ForImageTextRetrieval.from_pretrained(retrieval_dir, attn_implementation="sdpa").eval()
    enc = model.qformer_tokenizer(["a red circle"] * 4, return_tensors="pt")
    pixels = model.pixel_values([h.path for h in head])
    itm = hf(pixel_values=pixels, **enc, use_image_text_matching_head=True).logits_per_image[:, 1]
    expected = sorted(((float(itm[i]) + itc[h.path], h.path) for i, h in enumerate(head)), reverse=True)
    assert [h.path for h in reranked[:4]] == [path for _, path in expected]
    assert [h.score for h in reranked[:4]] == pytest.approx([score for score, _ in expected], abs=1e-4)
    assert [h.path for h in reranked[4:]] == [h.path for h in hits[4:]]  # the rest keep ITC order
    assert len({h.path for h in reranked}) == len(hits)


def test_search_cli_text_image_and_rerank(index, capsys):
    _, out = index
    assert run(["search", str(out), "a red circle", "-k", "3", "--rerank", "5"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["rank"] for r in rows] == [1, 2, 3] and all("itm_prob" in r for r in rows)
    some_image = ImageIndex.load(out).paths[2]
    assert run(["search", str(out), "--image", some_image, "-k", "2", "--backend", "exact"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["path"] == some_image and len(rows) == 2
    with pytest.raises(errors.UsageError):
        run(["search", str(out)])


def test_index_cli_reports_failures(retrieval_dir, folder, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    for p in list(folder.glob("*.png"))[:2]:
        (tmp_path / "in" / p.name).write_bytes(p.read_bytes())
    (tmp_path / "in" / "bad.jpg").write_bytes(b"nope")
    argv = ["index", str(tmp_path / "in"), "--out", str(tmp_path / "idx"), "--model", str(retrieval_dir)]
    assert run(argv) == errors.EXIT_SOME_FAILED
    assert "bad.jpg" in capsys.readouterr().err
    (tmp_path / "in" / "bad.jpg").unlink()
    assert run(argv) == 0
    assert "added 0, already there 2" in capsys.readouterr().err


def test_classify_cli(retrieval_dir, model, folder, capsys):
    paths = images_of(folder)[:2]
    assert run(["classify", *paths, "--labels", "a cat, a dog,a cat", "--template", "a photo of {}",
                "--model", str(retrieval_dir)]) == 0  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = model.classify(paths, ["a cat", "a dog"], template="a photo of {}")
    for row, probs in zip(rows, expected, strict=True):
        assert set(row["probs"]) == {"a cat", "a dog"} and row["label"] == max(probs, key=probs.get)
        assert sum(row["probs"].values()) == pytest.approx(1, abs=1e-3)


def test_similarity_cli_prints_and_plots(retrieval_dir, folder, tmp_path, capsys):
    plot = tmp_path / "heat.png"
    paths = images_of(folder)[:3]
    argv = ["similarity", "--images", *paths, "--texts", "a cat", "a dog", "--model", str(retrieval_dir)]
    assert run([*argv, "--plot", str(plot)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 4 and "a cat" in table[0]
    assert Image.open(plot).size[0] > 200
    assert run([*argv, "--json", "--itm"]) == 0
    scores = json.loads(capsys.readouterr().out)["scores"]
    assert np.array(scores).shape == (3, 2) and all(0 <= v <= 1 for row in scores for v in row)


def test_cluster_cli_from_folder_and_index(retrieval_dir, folder, index, tmp_path, capsys):
    out = tmp_path / "clusters"
    assert run(["cluster", str(folder), "-k", "2", "--out", str(out), "--model", str(retrieval_dir)]) == 0
    rows = list(csv.DictReader((out / "assignments.csv").open()))
    assert len(rows) == 6 and {r["cluster"] for r in rows} == {"0", "1"}
    assert sorted(p.name for p in out.glob("*.png")) == ["cluster_00.png", "cluster_01.png"]
    _, index_dir = index
    assert run(["cluster", "--index", str(index_dir), "-k", "3", "--out", str(tmp_path / "c3")]) == 0
    assert len(list((tmp_path / "c3").glob("cluster_*.png"))) == 3
    with pytest.raises(ValueError, match="k must be"):
        run(["cluster", "--index", str(index_dir), "-k", "7", "--out", str(tmp_path / "c7")])
