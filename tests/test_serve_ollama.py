"""Ollama's API through the real ``ollama`` package (``ollama.Client(host=...)``) against a live server on the
tiny random BLIP-2: chat with an image and generate, streamed (NDJSON) and whole, the listing endpoints,
options, JSON ``format`` and Ollama-shaped errors."""

from __future__ import annotations

import base64
import io
import json
from datetime import datetime

import httpx
import numpy as np
import pytest
from hf_tiny_bytes import llm_alone, make_byte_blip2
from live_server import live
from PIL import Image

ollama = pytest.importorskip("ollama")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import blipkit  # noqa: E402
from blipkit.serve import create_app  # noqa: E402


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model(opt_dir):
    return blipkit.load(opt_dir)


@pytest.fixture(scope="module")
def server(model):
    with live(create_app(model, model_name="tiny")) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server)


def greedy(model, data: bytes, question: str, tokens: int) -> str:
    return model.generate([data], [f"Question: {question} Answer:"], max_new_tokens=tokens)[0]


def check_final(part, tokens: int) -> None:
    """Ollama's closing fields of an answer."""
    assert part.done is True and part.done_reason in ("stop", "length") and part.model == "tiny"
    assert 0 < part.eval_count <= tokens and part.prompt_eval_count > 0
    assert part.total_duration >= part.eval_duration >= 0 and part.prompt_eval_duration >= 0
    datetime.fromisoformat(part.created_at.replace("Z", "+00:00"))


def test_chat_with_an_image_whole_and_streamed(client, server, model):
    data = png(1)
    messages = [{"role": "user", "content": "what is in the picture ?", "images": [data]}]
    r = client.chat(model="tiny", messages=messages, stream=False, options={"num_predict": 6})
    assert r.message.role == "assistant"
    assert r.message.content == greedy(model, data, "what is in the picture ?", 6)
    check_final(r, 6)
    parts = list(client.chat(model="tiny:latest", messages=messages, stream=True, options={"num_predict": 6}))
    assert all(p.done is False for p in parts[:-1]) and len(parts) >= 3
    assert "".join(p.message.content for p in parts) == r.message.content
    check_final(parts[-1], 6)
    body = {"model": "tiny", "messages": [{**messages[0], "images": [base64.b64encode(data).decode()]}]}
    lines = httpx.post(f"{server}/api/chat", json={**body, "options": {"num_predict": 6}}).text.splitlines()
    assert [json.loads(line)["message"]["content"] for line in lines] == [p.message.content for p in parts]
    follow_up = [
        *messages,
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": "what color ?"},
    ]
    r = client.chat(model="tiny", messages=follow_up, stream=False, options={"num_predict": 5})
    prompt = "Question: what is in the picture ? Answer: a cat Question: what color ? Answer:"
    assert r.message.content == model.generate([data], [prompt], max_new_tokens=5)[0]


def test_generate_with_an_image_whole_and_streamed(client, model):
    data = png(2)
    r = client.generate(model="tiny", prompt="what is it ?", images=[data], options={"num_predict": 7})
    assert r.response == greedy(model, data, "what is it ?", 7)
    check_final(r, 7)
    parts = list(
        client.generate(
            model="tiny", prompt="what is it ?", images=[data], stream=True, options={"num_predict": 7}
        )
    )
    assert "".join(p.response for p in parts) == r.response and parts[-1].done
    raw = client.generate(
        model="tiny", prompt="a photo of", images=[data], raw=True, options={"num_predict": 5}
    )
    assert raw.response == model.generate([data], ["a photo of"], max_new_tokens=5)[0]


def test_generate_text_alone_is_the_llm_alone(client, model):
    r = client.generate(model="tiny", prompt="what is it ?", options={"num_predict": 6})
    assert r.response == llm_alone(model, "Question: what is it ? Answer:", 6)  # in the model's template
    raw = client.generate(model="tiny", prompt="a photo of", raw=True, options={"num_predict": 6})
    assert raw.response == llm_alone(model, "a photo of", 6)
    text_chat = client.chat(
        model="tiny", messages=[{"role": "user", "content": "what is it ?"}], options={"num_predict": 6}
    )
    assert text_chat.message.content == r.response  # a chat without images: the same prompt
    loaded = client.generate(model="tiny")  # no prompt: Ollama's "load the model" call
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


def test_options_seed_stop_and_logprobs(client, model):
    data = png(3)
    messages = [{"role": "user", "content": "what is it ?", "images": [data]}]

    def sample(seed: int) -> str:
        options = {"num_predict": 10, "temperature": 1.0, "top_k": 50, "seed": seed}
        return client.chat(model="tiny", messages=messages, options=options).message.content

    assert sample(4) == sample(4) and len({sample(s) for s in range(5)}) > 1
    full = greedy(model, data, "what is it ?", 12)
    stop = f" {full.split()[2]}"
    r = client.chat(model="tiny", messages=messages, options={"num_predict": 12, "stop": [stop]})
    assert r.message.content == full[: full.index(stop)] and r.done_reason == "stop"
    r = client.chat(
        model="tiny", messages=messages, options={"num_predict": 4}, logprobs=True, top_logprobs=2
    )
    assert len(r.logprobs) == r.eval_count and all(len(lp.top_logprobs) == 2 for lp in r.logprobs)
    assert "".join(lp.token for lp in r.logprobs).strip() == r.message.content


def test_listing_endpoints(client, server, model):
    listed = client.list().models
    assert [m.model for m in listed] == ["tiny"]
    assert listed[0].details.family == "blip2" and listed[0].size > 0
    shown = client.show("tiny")
    assert "vision" in shown.capabilities and "completion" in shown.capabilities
    assert shown.modelinfo["general.parameter_count"] == sum(p.numel() for p in model.model.parameters())
    assert "{{ .Prompt }}" in shown.template
    assert [m.model for m in client.ps().models] == ["tiny"]
    assert httpx.get(f"{server}/api/version").json()["version"]


def test_errors_are_ollama_errors(client, server):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="gpt-9", messages=[{"role": "user", "content": "hi"}], stream=False)
    assert err.value.status_code == 404 and "gpt-9" in err.value.error
    two = [{"role": "user", "content": "compare them", "images": [png(4), png(5)]}]
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="tiny", messages=two, stream=False)
    assert err.value.status_code == 400 and "one image" in err.value.error
    r = httpx.post(f"{server}/api/chat", json={"model": "tiny", "messages": [], "stream": False})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)


def test_api_key_guards_the_ollama_routes(model):
    with live(create_app(model, model_name="tiny", api_key="s3cret")) as url:
        with pytest.raises(ollama.ResponseError) as err:
            ollama.Client(host=url).list()
        assert err.value.status_code == 401
        keyed = ollama.Client(host=url, headers={"Authorization": "Bearer s3cret"})
        assert [m.model for m in keyed.list().models] == ["tiny"]


def test_json_format_parses(tmp_path):
    make_byte_blip2(tmp_path)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "legs": {"type": "integer"}},
        "required": ["name", "legs"],
    }
    with live(create_app(blipkit.load(tmp_path), model_name="bytes")) as url:
        client = ollama.Client(host=url)
        for fmt in ("json", schema):
            for seed in range(2):
                options = {"num_predict": 40, "temperature": 1.0, "seed": seed}
                r = client.generate(
                    model="bytes", prompt="an animal", images=[png(seed)], format=fmt, options=options
                )
                answer = json.loads(r.response)
                assert isinstance(answer, dict) and (fmt == "json" or set(answer) >= {"name", "legs"})
