"""The caption-then-LLM bridge: the model captions, then its LLM answers from the caption alone (the tokens
are the LLM's own greedy tokens for that text prompt, no image tokens); through the API, CLI and server."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import blipkit
from blipkit.caption_bridge import CaptionThenLLM
from blipkit.cli import main


@pytest.fixture(scope="module")
def bridged(opt_dir):
    m = blipkit.load(opt_dir)
    return m, blipkit.via_caption(m)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("bridge") / "img.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


def llm_greedy(model, text: str, n: int) -> list[int]:
    """The bare LLM's greedy tokens after ``text`` (no image at all)."""
    tok = model.tokenizer
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        out = model.model.llm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    return [t for t in out[0, ids.shape[1] :].tolist() if t != tok.eos_token_id]


def test_answer_is_the_llm_reading_the_caption(bridged, photo):
    m, v = bridged
    assert isinstance(v, CaptionThenLLM) and v.family == "caption"
    caption = m.caption(photo, max_new_tokens=8)[0]
    assert v.caption(photo, max_new_tokens=8) == [caption]
    chat = v.chat(photo, max_new_tokens=6)
    prompt = chat.prompt("what is it ?")
    assert prompt.text == f"Image: {v.describe([photo])[0]}\nQuestion: what is it ? Answer:"
    assert prompt.llm_ids == m.tokenizer(prompt.text)["input_ids"]  # text tokens only
    want = v.text.decode(llm_greedy(v, prompt.text, 6))
    assert chat.send("what is it ?") == want
    second = chat.prompt("and the color ?").text
    assert second.startswith("Image: ") and second.count("Image: ") == 1
    assert second.endswith(f"Answer: {want} Question: and the color ? Answer:".replace("  ", " "))
    asked = v.ask(photo, "what is it ?", max_new_tokens=6)
    assert asked == v.text.decode(llm_greedy(v, prompt.text, 6))


def test_batched_questions_and_capabilities(bridged, tmp_path):
    _, v = bridged
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((30, 30, 3), 60 * i, dtype=np.uint8)).save(files[-1])
    questions = ["what is it ?", "is there a dog on the grass ?", "what color ?"]
    batched = v.generate(files, questions, max_new_tokens=5)
    assert batched == [v.ask(f, q, max_new_tokens=5) for f, q in zip(files, questions, strict=True)]
    assert v.capabilities == ("caption", "ask", "chat")


def test_cli_via_caption(bridged, opt_dir, photo, capsys, monkeypatch):
    _, v = bridged
    assert main(["ask", str(photo), "what is it ?", "--model", str(opt_dir), "--via-caption"]) == 0
    assert capsys.readouterr().out.strip() == v.ask(photo, "what is it ?")
    monkeypatch.setattr("sys.stdin", io.StringIO("what is it ?\nand the color ?\n"))
    assert main(["chat", str(photo), "--model", str(opt_dir), "--via-caption", "--max-new-tokens", "5"]) == 0
    chat = v.chat(photo, max_new_tokens=5)
    assert capsys.readouterr().out.split("\n")[:2] == [
        chat.send("what is it ?"),
        chat.send("and the color ?"),
    ]


def test_server_via_caption(bridged, photo):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from blipkit.serve import create_app

    _, v = bridged
    url = "data:image/png;base64," + base64.b64encode(photo.read_bytes()).decode()
    image = {"type": "image_url", "image_url": {"url": url}}
    with TestClient(create_app(v, model_name="bridge")) as c:
        for stream in (False, True):
            body = {
                "max_tokens": 5,
                "stream": stream,
                "messages": [{"role": "user", "content": [image, {"type": "text", "text": "what is it ?"}]}],
            }
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            want = v.chat(photo, max_new_tokens=5).send("what is it ?")
            if stream:
                chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
                text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
                assert text.strip() == want
            else:
                assert r.json()["choices"][0]["message"]["content"] == want


def test_default_model_via_caption_uses_the_chat_template():
    m = blipkit.via_caption(blipkit.load("default"))
    chat = m.chat("examples/red_circle.png", max_new_tokens=4)
    text = chat.prompt("what shape is it?").text
    caption = m.describe(["examples/red_circle.png"])[0]
    assert f"<|im_start|>user\nImage: {caption}\nwhat shape is it?<|im_end|>" in text


def test_bridge_from_a_config(bridged, opt_dir, photo, tmp_path):
    """``{"family": "caption", "config": {"captioner": ...}}``: the same bridge as ``via_caption()``."""
    _, v = bridged
    (tmp_path / "config.json").write_text(
        json.dumps({"format": "blipkit", "family": "caption", "config": {"captioner": str(opt_dir)}})
    )
    loaded = blipkit.load(tmp_path)
    assert isinstance(loaded, CaptionThenLLM)
    assert loaded.ask(photo, "what is it ?") == v.ask(photo, "what is it ?")
    (tmp_path / "config.json").write_text(
        json.dumps({"format": "blipkit", "family": "caption", "config": {"captioner": str(opt_dir), "lm": 1}})
    )
    with pytest.raises(blipkit.errors.ConfigError, match="unknown key"):
        blipkit.load(tmp_path)
