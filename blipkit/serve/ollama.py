"""Ollama's API over the same model and engine, so Ollama clients work unchanged.

``/api/chat`` and ``/api/generate`` take images as base64 strings (``images`` of a message, or of the
request) and answer in NDJSON lines as tokens come (``"stream": false``: one JSON object), with Ollama's
fields: model, created_at, message / response, done, done_reason, total_duration, load_duration,
prompt_eval_count, prompt_eval_duration, eval_count, eval_duration (durations in nanoseconds). ``format``
("json" or a JSON schema) constrains the answer as OpenAI's ``response_format`` does. ``/api/tags``,
``/api/show``, ``/api/ps`` and ``/api/version`` describe the one model served. Errors are Ollama's
``{"error": "..."}`` bodies.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from blipkit.serve.errors import APIError
from blipkit.serve.generation import Generation, start_chat, start_text, text_prompt
from blipkit.serve.jobs import Result, TokenLogprob
from blipkit.serve.messages import ChatRequest, ImagePart, base64_uri, parse_turns
from blipkit.serve.options import Options, flag, ollama_options

if TYPE_CHECKING:
    from blipkit.serve.app import Server

OLLAMA_VERSION = "0.12.0"  # the Ollama API version whose endpoints and fields this follows
NDJSON = "application/x-ndjson"


def now() -> str:
    """Ollama's timestamps: RFC 3339 in UTC."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _logprobs(entries: list[TokenLogprob] | None) -> list[dict[str, Any]] | None:
    if entries is None:
        return None
    return [
        {
            "token": e.token,
            "logprob": e.logprob,
            "top_logprobs": [{"token": t, "logprob": lp} for t, lp in e.top],
        }
        for e in entries
    ]


class _Model:
    """What Ollama's listing calls say about the served model."""

    def __init__(self, srv: Server):
        model = srv.model
        params = list(model.model.parameters())
        self.count = sum(p.numel() for p in params)
        self.size = sum(p.numel() * p.element_size() for p in params)
        self.dtype = str(params[0].dtype).removeprefix("torch.").upper() if params else ""
        self.family = model.family
        self.digest = hashlib.sha256(json.dumps([srv.name, str(model.path)]).encode()).hexdigest()
        self.modified = datetime.fromtimestamp(srv.created, timezone.utc).isoformat().replace("+00:00", "Z")
        generates = srv.engine is not None
        self.capabilities = ["completion", "vision"] if generates else []
        self.context = model.text.llm_context if generates else 0

    def details(self) -> dict[str, Any]:
        size = self.count / 1e9
        label = f"{size:.1f}B" if size >= 1 else f"{self.count / 1e6:.1f}M"
        return {
            "parent_model": "",
            "format": "safetensors",
            "family": self.family,
            "families": [self.family],
            "parameter_size": label,
            "quantization_level": self.dtype,
        }

    def entry(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "model": name,
            "modified_at": self.modified,
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }


def _model_name(value: Any) -> str | None:
    """The requested model, with Ollama's default tag (":latest") read as the plain name."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise APIError("'model' must be a string", 400, "invalid_value", "model")
    return value.removesuffix(":latest")


def add_ollama_routes(app: FastAPI, srv: Server) -> None:
    info = _Model(srv)

    async def body_of(request: Request) -> dict[str, Any]:
        body = await srv.json_body(request)
        if not isinstance(body, dict):
            raise APIError("request body must be a JSON object", 400, "invalid_body")
        srv.check_model(_model_name(body.get("model", body.get("name"))))
        return body

    def options_of(body: dict[str, Any]) -> Options:
        srv.require_generation("chat")
        return ollama_options(body, fill_tokens=srv.model.text.llm_context // 2)

    @app.post("/api/chat")
    async def chat(request: Request) -> Any:
        body = await body_of(request)
        options = options_of(body)
        turns, _ = parse_turns(body, ollama=True)
        gen = await start_chat(srv, ChatRequest(turns, None, options))
        return await _respond(srv, gen, "message", options.stream)

    @app.post("/api/generate")
    async def generate(request: Request) -> Any:
        body = await body_of(request)
        for name in ("suffix", "template", "context"):
            if body.get(name):
                raise APIError(
                    f"'{name}' is not supported by this server", 400, "unsupported_parameter", name
                )
        prompt, images = body.get("prompt") or "", body.get("images") or []
        if not isinstance(prompt, str) or not isinstance(images, list):
            raise APIError("'prompt' must be a string and 'images' a list", 400, "invalid_value", "prompt")
        if not prompt and not images:  # Ollama's way to load a model: nothing to generate
            return {
                "model": srv.name,
                "created_at": now(),
                "response": "",
                "done": True,
                "done_reason": "load",
            }
        options = options_of(body)
        parts = [ImagePart(base64_uri(str(data)), f"images[{j}]") for j, data in enumerate(images)]
        req = ChatRequest(
            [("user", [*parts, *([prompt] if prompt else [])])], None, options, flag(body, "raw")
        )
        if parts:
            gen = await start_chat(srv, req)
        else:
            gen = await start_text(srv, await asyncio.to_thread(text_prompt, srv, req), options)
        return await _respond(srv, gen, "response", options.stream)

    @app.get("/api/tags")
    async def tags() -> dict[str, Any]:
        return {"models": [info.entry(srv.name)]}

    @app.get("/api/ps")
    async def ps() -> dict[str, Any]:
        on_gpu = srv.model.device.type == "cuda"
        entry = {
            **info.entry(srv.name),
            "expires_at": "9999-12-31T23:59:59Z",  # served until the server stops
            "size_vram": info.size if on_gpu else 0,
            "context_length": info.context,
        }
        return {"models": [entry]}

    @app.post("/api/show")
    async def show(request: Request) -> dict[str, Any]:
        await body_of(request)
        template = srv.model.text.template
        return {
            "license": "",
            "modelfile": f"# served by blipkit\nFROM {srv.model.path}\n",
            "parameters": "",
            "template": template.render([], "{{ .Prompt }}") if template is not None else "",
            "details": info.details(),
            "model_info": {
                "general.architecture": info.family,
                "general.parameter_count": info.count,
                f"{info.family}.context_length": info.context,
            },
            "capabilities": info.capabilities,
            "modified_at": info.modified,
        }

    @app.get("/api/version")
    async def version() -> dict[str, str]:
        return {"version": OLLAMA_VERSION}


async def _respond(srv: Server, gen: Generation, field: str, stream: bool) -> Any:
    """The answer as NDJSON lines (``stream``) or one object; ``field`` is "message" (chat) or "response"."""

    def piece(text: str, logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"model": srv.name, "created_at": now()}
        out[field] = {"role": "assistant", "content": text} if field == "message" else text
        if logprobs is not None:
            out["logprobs"] = _logprobs(logprobs)
        return {**out, "done": False}

    def final(result: Result, text: str, logprobs: list[TokenLogprob] | None) -> dict[str, Any]:
        first = max(result.first_token_ns - gen.started_ns, 0)
        return {
            **piece(text, logprobs),
            "done": True,
            "done_reason": result.finish_reason,
            "total_duration": gen.elapsed_ns(),
            "load_duration": 0,
            "prompt_eval_count": result.prompt_tokens,
            "prompt_eval_duration": first,
            "eval_count": result.completion_tokens,
            "eval_duration": max(result.done_ns - result.first_token_ns, 0),
        }

    if not stream:
        try:
            result = (await gen.results())[0]
        finally:
            gen.cancel()
        return final(result, result.text, result.logprobs)

    async def lines() -> AsyncIterator[str]:
        pending: list[TokenLogprob] = []
        try:
            async for _, kind, value in gen.events():
                if kind == "logprobs":
                    pending += value
                elif kind == "delta":
                    yield json.dumps(piece(value, pending or None)) + "\n"
                    pending = []
                elif kind == "done":
                    yield json.dumps(final(value, "", pending or None)) + "\n"
                else:
                    yield json.dumps({"error": f"generation failed: {value}"}) + "\n"
        finally:
            gen.cancel()

    return StreamingResponse(lines(), media_type=NDJSON)
