"""OpenAI's response shapes shared by ``/v1/chat/completions`` and ``/v1/completions``: usage,
log-probabilities, server-sent events, and the loop that turns a generation's events into chunks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from blipkit.serve.errors import error_body
from blipkit.serve.generation import Generation
from blipkit.serve.jobs import Result, TokenLogprob

Chunk = Callable[[int, str | None, list[TokenLogprob] | None, str | None], dict[str, Any]]


def sse(data: Any) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


def usage(results: list[Result]) -> dict[str, int]:
    """Token counts of a request: its prompt once, the tokens of every choice."""
    prompt = results[0].prompt_tokens if results else 0
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """A chat choice's ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}], "refusal"}``."""
    if entries is None:
        return None

    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    content = [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
    """``choices[i].logprobs`` of a text completion: parallel lists, ``text_offset`` from ``offset``."""
    if entries is None:
        return None
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [dict(e.top) for e in entries],
        "text_offset": offsets,
    }


async def stream_events(gen: Generation, chunk: Chunk, results: list[Result]) -> AsyncIterator[str]:
    """Server-sent events of ``gen``: ``chunk(choice, text, logprobs, finish_reason)`` for each piece, ending
    at an error event if a job fails; the finished choices' results are added to ``results``."""
    pending: dict[int, list[TokenLogprob]] = {}
    try:
        async for index, kind, value in gen.events():
            if kind == "logprobs":
                pending.setdefault(index, []).extend(value)
            elif kind == "delta":
                yield sse(chunk(index, value, pending.pop(index, None), None))
            elif kind == "done":
                yield sse(chunk(index, None, pending.pop(index, None), value.finish_reason))
                results.append(value)
            else:
                yield sse(error_body(f"generation failed: {value}", "server_error", code="generation_failed"))
                return
    finally:
        gen.cancel()
