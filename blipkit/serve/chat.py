"""``/v1/chat/completions``: OpenAI's chat API over images and text, streamed or whole."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from blipkit.serve.generation import Generation, start_chat
from blipkit.serve.jobs import Result, TokenLogprob
from blipkit.serve.messages import parse_chat
from blipkit.serve.openai_format import chat_logprobs, sse, stream_events, usage

if TYPE_CHECKING:
    from blipkit.serve.app import Server

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def add_chat_route(app: FastAPI, srv: Server) -> None:
    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        req = parse_chat(await srv.json_body(request))
        srv.check_model(req.model)
        srv.require_generation("chat")
        gen = await start_chat(srv, req)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": srv.name}
        if req.options.stream:
            events = _stream(gen, meta, req.options.n, req.options.include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers=STREAM_HEADERS)
        try:
            results = await gen.results()
        finally:
            gen.cancel()
        return completion(meta, results)


def completion(meta: dict[str, Any], results: list[Result]) -> dict[str, Any]:
    """A ``chat.completion`` object: one choice per result."""
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": r.text},
            "logprobs": chat_logprobs(r.logprobs),
            "finish_reason": r.finish_reason,
        }
        for i, r in enumerate(results)
    ]
    return {**meta, "object": "chat.completion", "choices": choices, "usage": usage(results)}


async def _stream(gen: Generation, meta: dict[str, Any], n: int, include_usage: bool) -> AsyncIterator[str]:
    """``chat.completion.chunk`` events: each choice's role first, then its text as it comes."""
    extra = {"usage": None} if include_usage else {}

    def chunk(
        index: int,
        text: str | None,
        logprobs: list[TokenLogprob] | None = None,
        finish: str | None = None,
        delta: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        delta = delta if delta is not None else ({"content": text} if text is not None else {})
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": chat_logprobs(logprobs),
            "finish_reason": finish,
        }
        return {**meta, "object": "chat.completion.chunk", "choices": [choice], **extra}

    results: list[Result] = []
    try:
        for i in range(n):
            yield sse(chunk(i, None, delta={"role": "assistant", "content": ""}))
        async for event in stream_events(gen, chunk, results):
            yield event
        if include_usage and len(results) == n:
            yield sse({**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage(results)})
        yield sse("[DONE]")
    finally:
        gen.cancel()
