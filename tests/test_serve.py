"""The OpenAI-compatible server in-process (FastAPI TestClient) on tiny random checkpoints."""

from __future__ import annotations

import argparse
import base64
import http.server
import io
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hf_tiny import make_blip2
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

import blipkit  # noqa: E402
from blipkit.cli_options import add_model_args
from blipkit.serve import cli as serve_cli  # noqa: E402
from blipkit.serve import create_app  # noqa: E402
from blipkit.serve.engine import Engine  # noqa: E402


def png(seed: int, size: tuple[int, int] = (40, 50)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def ask(url: str, question: str = "what is it?") -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def sse_payloads(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


@pytest.fixture(scope="module")
def model(opt_dir):
    return blipkit.load(opt_dir)


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, model_name="tiny", max_image_bytes=100_000)) as c:
        yield c


def test_chat_answer_matches_the_model(client, model):
    img = png(1)
    r = client.post(
        "/v1/chat/completions", json={"model": "tiny", "messages": ask(data_uri(img)), "max_tokens": 6}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    expected = model.generate([img], ["Question: what is it? Answer:"], max_new_tokens=6)[0]
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_stream_chunks_add_up_to_the_answer(client):
    payload = {"messages": ask(data_uri(png(2)), "what color?"), "max_tokens": 7}
    plain = client.post("/v1/chat/completions", json=payload).json()["choices"][0]["message"]["content"]
    r = client.post("/v1/chat/completions", json={**payload, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_payloads(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain and len(chunks) >= 3


def test_sampling_options(client):
    payload = {"messages": ask(data_uri(png(2))), "max_tokens": 5, "temperature": 0.8, "top_p": 0.9}
    r = client.post("/v1/chat/completions", json=payload)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 5


def test_multi_turn_uses_history(client, model):
    img = png(3)
    messages = [
        {"role": "system", "content": "You are helpful."},
        *ask(data_uri(img), "what is it?"),
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": "what color is it?"},
    ]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5})
    prompt = "Question: what is it? Answer: a cat Question: what color is it? Answer:"
    assert (
        r.json()["choices"][0]["message"]["content"] == model.generate([img], [prompt], max_new_tokens=5)[0]
    )


def test_history_is_trimmed_to_the_context_window(model):
    engine = Engine(model)
    model.config.llm.max_context = 40  # 4 visual tokens + 6 new tokens leave 30 for the prompt
    try:
        history = [(f"is the dog red ? {i}", "green that cat") for i in range(8)]
        fitted = engine.prompt(history, "what color is the cat ?", max_tokens=6)
        assert len(fitted.llm_ids) <= 30 and "? 0" not in fitted.text and fitted.dropped_turns > 0
        assert fitted.text.endswith("Question: what color is the cat ? Answer:")
        long = engine.prompt([], "cat " * 100, max_tokens=6)
        assert len(long.llm_ids) <= 30 and long.truncated  # a message longer than the window keeps its end
        full = model.tokenizer(long.text)["input_ids"]
        assert long.llm_ids == full[:1] + full[-29:]  # BOS, then the end of the question
    finally:
        model.config.llm.max_context = None


def test_image_only_message_is_captioned(client, model):
    img = png(4)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(img)}}]}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4})
    assert r.json()["choices"][0]["message"]["content"] == model.caption(img, max_new_tokens=4)[0]


def test_cache_skips_the_vision_encoder(client, model):
    calls = []
    hook = model.model.vision.register_forward_hook(lambda *a: calls.append(1))
    try:
        url = data_uri(png(5))
        for q in ("what is it?", "what color?", "where is it?"):
            r = client.post("/v1/chat/completions", json={"messages": ask(url, q), "max_tokens": 3})
            assert r.status_code == 200
    finally:
        hook.remove()
    assert len(calls) == 1
    assert client.get("/health").json()["cache"]["hits"] >= 2


def test_concurrent_requests_are_batched_and_equal_one_by_one(model):
    engine = Engine(model, max_batch_size=8, batch_window_ms=300)
    images = [png(10 + i) for i in range(5)]
    questions = [f"what is {w}?" for w in ("it", "this", "the thing", "that", "there")]
    prompts = [engine.prompt([], q, 6) for q in questions]

    def one(i: int) -> str:
        key = f"img{i}"
        return engine.run(images[i], key, prompts[i], max_tokens=6).text

    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(one, range(5)))
    engine.stop()
    assert engine.largest_batch >= 2
    expected = [
        model.generate([im], [p.text], max_new_tokens=6)[0] for im, p in zip(images, prompts, strict=True)
    ]
    assert answers == expected


def test_a_lone_request_does_not_wait_the_batch_window(model):
    engine = Engine(model, batch_window_ms=3000)
    prompt = engine.prompt([], "what is it?", 4)
    engine.run(png(20), "warm", prompt, max_tokens=4)  # first-call costs
    start = time.monotonic()
    engine.run(png(21), "lone", prompt, max_tokens=4)
    assert time.monotonic() - start < 1.5  # not the 3 s window
    with engine.arriving():  # another request on its way: the first waits for it, both run as one batch
        done = []
        first = threading.Thread(target=lambda: done.append(engine.run(png(22), "a", prompt, max_tokens=4)))
        first.start()
        time.sleep(0.3)
        engine.run(png(23), "b", prompt, max_tokens=4)
        first.join()
    engine.stop()
    assert engine.largest_batch == 2 and len(done) == 1


def test_models_health_and_index(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["cache"]["capacity"] == 64
    page = client.get("/")
    assert page.status_code == 200 and "blipkit chat" in page.text and 'type="file"' in page.text
    assert "getReader" in client.get("/static/app.js").text  # reads the answer as a stream


def test_embeddings(tmp_path, model):
    make_blip2(tmp_path, retrieval=True, num_query_tokens=4)
    retrieval = blipkit.load(tmp_path)
    c = TestClient(create_app(retrieval))
    r = c.post("/v1/embeddings", json={"input": ["a cat", "a dog"]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    expected = retrieval.embed_texts(["a cat", "a dog"])
    np.testing.assert_allclose(np.array([d["embedding"] for d in data]), expected.numpy(), atol=1e-5)
    assert c.post("/v1/chat/completions", json={"messages": ask(data_uri(png(1)))}).status_code == 400
    no_text_path = TestClient(create_app(model)).post("/v1/embeddings", json={"input": "a cat"})
    assert no_text_path.status_code == 400 and no_text_path.json()["error"]["code"] == "unsupported_by_model"


BAD = [
    ("malformed json", b'{"messages": [', 400, "invalid_json"),
    ("not an object", [1, 2], 400, "invalid_body"),
    ("no messages", {"model": "tiny"}, 400, "missing_messages"),
    ("empty messages", {"messages": []}, 400, "missing_messages"),
    ("no image", {"messages": [{"role": "user", "content": "hi"}]}, 400, "missing_image"),
    ("undecodable image", {"messages": ask(data_uri(b"not an image at all"))}, 400, "invalid_image"),
    ("bad base64", {"messages": ask("data:image/png;base64,@@@@")}, 400, "invalid_base64"),
    ("too large", {"messages": ask(data_uri(b"x" * 200_000))}, 413, "image_too_large"),
    ("unknown model", {"model": "gpt-9", "messages": ask(data_uri(png(1)))}, 404, "model_not_found"),
    ("file url", {"messages": ask("file:///etc/passwd")}, 400, "local_image_refused"),
    ("local path", {"messages": ask("/etc/passwd")}, 400, "local_image_refused"),
    ("remote url", {"messages": ask("http://127.0.0.1:9/x.png")}, 400, "remote_images_disabled"),
    ("bad temperature", {"messages": ask(data_uri(png(1))), "temperature": 9}, 400, "invalid_value"),
    ("bad max_tokens", {"messages": ask(data_uri(png(1))), "max_tokens": 0}, 400, "invalid_value"),
    (
        "assistant last",
        {"messages": [*ask(data_uri(png(1))), {"role": "assistant", "content": "x"}]},
        400,
        "invalid_messages",
    ),
]


@pytest.mark.parametrize("name,body,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(client, name, body, status, code):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = client.post("/v1/chat/completions", **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    ok = client.post("/v1/chat/completions", json={"messages": ask(data_uri(png(1))), "max_tokens": 2})
    assert ok.status_code == 200  # still serving


def test_unknown_route_is_an_openai_error(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_api_key(model):
    c = TestClient(create_app(model, api_key="s3cret"))
    payload = {"messages": ask(data_uri(png(1))), "max_tokens": 2}
    assert c.post("/v1/chat/completions", json=payload).status_code == 401
    wrong = c.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    good = {"Authorization": "Bearer s3cret"}
    assert c.post("/v1/chat/completions", json=payload, headers=good).status_code == 200
    assert c.get("/").status_code == 200 and c.get("/health").status_code == 200


def test_remote_images_only_when_allowed(model):
    img = png(6)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(img)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/cat.png"
    try:
        c = TestClient(create_app(model, allow_remote_images=True, allow_private_networks=True))
        r = c.post("/v1/chat/completions", json={"messages": ask(url), "max_tokens": 4})
        assert r.status_code == 200, r.text
        expected = model.generate([img], ["Question: what is it? Answer:"], max_new_tokens=4)[0]
        assert r.json()["choices"][0]["message"]["content"] == expected
        assert c.post("/v1/chat/completions", json={"messages": ask("file:///etc/hosts")}).status_code == 400
    finally:
        httpd.shutdown()


def test_cli_serve_arguments_and_missing_extra(monkeypatch, capsys):
    parser = argparse.ArgumentParser(prog="blipkit")
    serve_cli.register(parser.add_subparsers(), add_model_args)
    args = parser.parse_args(["serve"])
    assert (args.host, args.port, args.api_key, args.allow_remote_images) == ("127.0.0.1", 8000, None, False)
    assert args.func is serve_cli.cmd_serve
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert args.func(parser.parse_args(["serve", "--model", "nowhere"])) == 2
    assert "pip install 'blipkit[serve]'" in capsys.readouterr().err
