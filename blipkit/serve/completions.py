"""``/v1/completions``: OpenAI's legacy text completion API, for plain text prompts (no image).

The model's LLM continues the prompt as it is (no conversation template); ``prompt`` is a string or a list of
strings, each with its ``n`` choices (choice ``index`` = prompt * n + choice).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from blipkit.serve.chat import STREAM_HEADERS
from blipkit.serve.errors import APIError
from blipkit.serve.generation import Generation, raw_prompt, start_text
from blipkit.serve.jobs import Result, TokenLogprob
from blipkit.serve.openai_format import Chunk, completion_logprobs, sse, stream_events, usage
from blipkit.serve.options import openai_options

if TYPE_CHECKING:
    from blipkit.serve.app import Server

MAX_PROMPTS = 32


def _prompts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        if len(value) > MAX_PROMPTS:
            raise APIError(f"at most {MAX_PROMPTS} prompts per request", 400, "invalid_value", "prompt")
        return value
    if isinstance(value, list) and value and all(isinstance(p, (int, list)) for p in value):
        raise APIError(
            "'prompt' as token ids is not supported by this server: send text",
            400,
            "unsupported_parameter",
            "prompt",
        )
    raise APIError("'prompt' must be a string or a non-empty list of strings", 400, "invalid_value", "prompt")


def add_completion_route(app: FastAPI, srv: Server) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await srv.json_body(request)
        if not isinstance(body, dict):
            raise APIError("request body must be a JSON object", 400, "invalid_body")
        model = body.get("model")
        srv.check_model(model if isinstance(model, str) else None)
        prompts = _prompts(body.get("prompt"))
        options = openai_options(body, completion=True)
        srv.require_generation("generate text")
        fitted = [await asyncio.to_thread(raw_prompt, srv, p, options.max_tokens) for p in prompts]
        gens = [await start_text(srv, p, options) for p in fitted]
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": srv.name}
        echo = prompts if options.echo else [""] * len(prompts)
        if options.stream:
            events = _stream(gens, meta, echo, options.n, options.include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers=STREAM_HEADERS)
        try:
            results = [await gen.results() for gen in gens]
        finally:
            for gen in gens:
                gen.cancel()
        return _completion(meta, results, echo)


def _completion(meta: dict[str, Any], results: list[list[Result]], echo: list[str]) -> dict[str, Any]:
    choices = [
        {
            "text": echo[p] + r.text,
            "index": p * len(rs) + i,
            "logprobs": completion_logprobs(r.logprobs, len(echo[p])),
            "finish_reason": r.finish_reason,
        }
        for p, rs in enumerate(results)
        for i, r in enumerate(rs)
    ]
    return {**meta, "object": "text_completion", "choices": choices, "usage": _total(results)}


def _total(results: list[list[Result]]) -> dict[str, int]:
    """The usage of every prompt, added up."""
    counts = [usage(rs) for rs in results]
    return {k: sum(c[k] for c in counts) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


async def _stream(
    gens: list[Generation], meta: dict[str, Any], echo: list[str], n: int, include_usage: bool
) -> AsyncIterator[str]:
    """``text_completion`` chunks of every prompt's choices in turn, then the usage, then ``[DONE]``."""
    extra = {"usage": None} if include_usage else {}

    def chunker(p: int) -> Chunk:
        offsets = dict.fromkeys(range(n), len(echo[p]))

        def chunk(i: int, text: str | None, logprobs: list[TokenLogprob] | None, finish: str | None) -> dict:
            lp = completion_logprobs(logprobs, offsets[i]) if logprobs is not None else None
            offsets[i] += sum(len(e.token) for e in logprobs or [])
            choice = {"text": text or "", "index": p * n + i, "logprobs": lp, "finish_reason": finish}
            return {**meta, "object": "text_completion", "choices": [choice], **extra}

        return chunk

    results: list[list[Result]] = []
    try:
        for p, gen in enumerate(gens):
            chunk = chunker(p)
            if echo[p]:
                for i in range(n):
                    yield sse(chunk(i, echo[p], None, None))
            results.append([])
            async for event in stream_events(gen, chunk, results[-1]):
                yield event
            if len(results[-1]) < n:  # failed: the error event was the last
                break
        else:
            if include_usage:
                yield sse({**meta, "object": "text_completion", "choices": [], "usage": _total(results)})
        yield sse("[DONE]")
    finally:
        for gen in gens:
            gen.cancel()
