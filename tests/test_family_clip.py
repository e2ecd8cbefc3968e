"""CLIP and SigLIP through the same API, CLI and server as BLIP-2: similarity matrices and zero-shot
probabilities equal transformers' own on the same images, index/search/cluster/plots run, generative calls
are a capability error."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from hf_tiny_clip import make_clip
from PIL import Image
from transformers import AutoProcessor, CLIPModel, SiglipModel

import blipkit
from blipkit.cli import main
from blipkit.errors import CapabilityError

TEXTS = ["a photo of a cat", "a photo of a dog", "a red car on the street"]
KINDS = ("clip", "siglip")


@pytest.fixture(scope="module", params=KINDS)
def dual(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_clip(path, kind=request.param)
    return request.param, path, blipkit.load(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three non-square images (the processors resize and crop them)."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(50, 40), (30, 64), (45, 45)]):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return folder, paths


def reference(kind, path, photos):
    """transformers' logits_per_image (N_img, N_txt) with its own processor and tokenizer."""
    cls = CLIPModel if kind == "clip" else SiglipModel
    hf = cls.from_pretrained(path).eval()
    proc = AutoProcessor.from_pretrained(path)
    images = [Image.open(p).convert("RGB") for p in photos]
    padding = "max_length" if kind == "siglip" else True
    inputs = proc(text=TEXTS, images=images, return_tensors="pt", padding=padding)
    if kind == "siglip":
        inputs.pop("attention_mask", None)
    with torch.no_grad():
        return hf(**inputs).logits_per_image


def test_similarity_and_classify_match_transformers(dual, photos):
    kind, path, m = dual
    _, files = photos
    want = reference(kind, path, files)
    sims = m.similarity(files, TEXTS)  # cosine
    logits = m.model.logits(sims)
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    probs = torch.tensor([list(row.values()) for row in m.classify(files, TEXTS, template="{}")])
    expected = want.softmax(dim=-1) if kind == "clip" else want.sigmoid()
    torch.testing.assert_close(probs, expected, atol=1e-4, rtol=1e-4)
    if kind == "clip":
        torch.testing.assert_close(probs.sum(dim=-1), torch.ones(3))
    # batched equals one by one
    one = torch.cat([m.similarity([f], TEXTS) for f in files])
    torch.testing.assert_close(one, sims, atol=1e-5, rtol=1e-5)
    assert m.embed_images(files).shape[0] == 3 and m.embed_texts(TEXTS).shape[0] == 3


def test_capabilities_and_errors(dual, photos):
    kind, _, m = dual
    _, files = photos
    assert m.family == "clip"
    assert m.capabilities == (("embed",) if kind == "clip" else ("embed", "match"))
    with pytest.raises(CapabilityError, match="cannot caption.*it can: embed"):
        m.caption(files[0])
    with pytest.raises(CapabilityError, match="cannot ask"):
        m.ask(files[0], "what is it?")
    with pytest.raises(CapabilityError, match="cannot chat"):
        m.chat(files[0])
    if kind == "clip":
        with pytest.raises(CapabilityError, match="cannot match"):
            m.match(files, TEXTS)
    else:
        want = reference(kind, dual[1], files).sigmoid()
        torch.testing.assert_close(m.match(files, TEXTS), want, atol=1e-4, rtol=1e-4)


def test_cli_commands(dual, photos, tmp_path, capsys):
    kind, path, _ = dual
    folder, files = photos
    model = ["--model", str(path)]
    assert main(["similarity", "--images", *map(str, files), "--texts", *TEXTS, *model]) == 0
    table = capsys.readouterr().out
    assert "a photo of a cat" in table and "img2.png" in table
    assert (
        main(
            [
                "similarity",
                "--images",
                *map(str, files),
                "--texts",
                *TEXTS,
                "--plot",
                str(tmp_path / "h.png"),
                *model,
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "h.png").size[0] > 100
    assert main(["classify", str(files[0]), "--labels", "cat,dog", *model]) == 0
    assert "cat" in capsys.readouterr().out
    assert main(["index", str(folder), "--out", str(tmp_path / "idx"), *model]) == 0
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), "a photo of a cat", "-k", "2", *model]) == 0
    hits = capsys.readouterr().out
    assert sum(name in hits for name in ("img0", "img1", "img2")) == 2
    assert main(["cluster", str(folder), "-k", "2", "--out", str(tmp_path / "clusters"), *model]) == 0
    assert (tmp_path / "clusters" / "assignments.csv").exists()
    assert main(["caption", str(files[0]), *model]) == 2
    assert "cannot caption" in capsys.readouterr().err


def data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_server_embeddings_texts_and_images(dual, photos):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from blipkit.serve import create_app

    _, _, m = dual
    _, files = photos
    with TestClient(create_app(m, model_name="tiny")) as c:
        body = {
            "model": "tiny",
            "input": [TEXTS[0], {"type": "image_url", "image_url": {"url": data_uri(files[1])}}, TEXTS[2]],
        }
        r = c.post("/v1/embeddings", json=body)
        assert r.status_code == 200, r.text
        got = torch.tensor([d["embedding"] for d in r.json()["data"]])
        texts = m.embed_texts([TEXTS[0], TEXTS[2]])
        image = m.embed_images(Image.open(io.BytesIO(files[1].read_bytes())))
        torch.testing.assert_close(got, torch.stack([texts[0], image[0], texts[1]]), atol=1e-5, rtol=1e-5)
        r = c.post(
            "/v1/embeddings", json={"input": [{"image": data_uri(files[0])}], "encoding_format": "base64"}
        )
        vector = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype=np.float32)
        np.testing.assert_allclose(vector, m.embed_images(files[0])[0].numpy(), atol=1e-5)
        bad = c.post("/v1/embeddings", json={"input": [{"video": "x"}]})
        assert bad.status_code == 400 and "input[0]" in json.dumps(bad.json())
        image = {"type": "image_url", "image_url": {"url": data_uri(files[0])}}
        chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]}
        r = c.post("/v1/chat/completions", json=chat)
        assert r.status_code == 400 and "cannot chat" in r.text


def test_models_lists_families_and_capabilities(capsys):
    assert set(blipkit.list_families()) == {"blip2", "llava", "caption", "clip"}
    assert {"default", "default-photo"} <= set(blipkit.list_models())
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "default" in out and "caption, ask, chat, embed, match" in out
    assert "LlavaForConditionalGeneration" in out and "SiglipModel" in out
    assert main(["models", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["models"][0] == {
        "name": "default",
        "family": "blip2",
        "capabilities": ["caption", "ask", "chat", "embed", "match"],
    }
