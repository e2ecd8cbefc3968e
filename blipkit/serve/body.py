"""Read a request's JSON body within a size limit, with errors that name the problem."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from blipkit.serve.errors import APIError


async def json_body(request: Request, limit: int) -> Any:
    """The parsed JSON body; over ``limit`` bytes is a 413, malformed JSON a 400."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(
            f"request body is {length} bytes, over the limit of {limit} bytes", 413, "body_too_large"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(f"request body is over the limit of {limit} bytes", 413, "body_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    del chunks
    try:
        return json.loads(raw)
    except RecursionError:
        raise APIError("request body is not valid JSON: nested too deeply", 400, "invalid_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"request body is not valid JSON: {e}", 400, "invalid_json") from e
