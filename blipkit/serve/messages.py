"""Read an OpenAI chat request: the image, the (question, answer) history, the new message, the options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from blipkit.serve.errors import APIError

DEFAULT_MAX_TOKENS = 30


@dataclass
class ChatRequest:
    image_url: str
    image_param: str  # where the image sits in the request, for error messages
    message: str | None  # None: the last user turn is an image only -> caption it
    history: list[tuple[str, str]] = field(default_factory=list)
    model: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False


def _number(body: dict, name: str, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise APIError(
            f"'{name}' must be {what} in [{low}, {high}], got {value!r}", 400, "invalid_value", name
        )
    return value


def _parts(content: Any, where: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Texts and (url, param) images of one message's ``content``."""
    if content is None:
        return [], []
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise APIError("message content must be a string or a list of parts", 400, "invalid_content", where)
    texts, images = [], []
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise APIError("image_url part needs a 'url' string", 400, "invalid_image_url", here)
            images.append((url, f"{here}.image_url.url"))
        else:
            raise APIError(
                "content parts must be {'type': 'text', 'text': ...} or {'type': 'image_url', ...}",
                400,
                "invalid_content",
                here,
            )
    return texts, images


def parse_chat(body: Any) -> ChatRequest:
    """Validate a /v1/chat/completions body; raise APIError naming the problem."""
    if not isinstance(body, dict):
        raise APIError("request body must be a JSON object", 400, "invalid_body")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list", 400, "missing_messages", "messages")
    if body.get("n", 1) != 1:
        raise APIError("only n=1 is supported", 400, "invalid_value", "n")
    history: list[tuple[str, str]] = []
    pending: list[str] = []  # user texts waiting for an answer
    image: tuple[str, str] | None = None
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(
                "each message needs a role: system, user or assistant", 400, "invalid_role", f"messages[{i}]"
            )
        texts, images = _parts(msg.get("content"), f"messages[{i}].content")
        if role == "user":
            pending += [t.strip() for t in texts if t.strip()]
            image = images[-1] if images else image
        elif role == "assistant":
            answer = " ".join(t.strip() for t in texts)
            if pending:
                history.append((" ".join(pending), answer))
                pending = []
            elif history:
                history[-1] = (history[-1][0], f"{history[-1][1]} {answer}".strip())
    if messages[-1].get("role") != "user":
        raise APIError("the last message must come from the user", 400, "invalid_messages", "messages")
    if image is None:
        raise APIError(
            "no image in the conversation: add an image_url content part to a user message",
            400,
            "missing_image",
            "messages",
        )
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError("'model' must be a string", 400, "invalid_value", "model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError("'stream' must be true or false", 400, "invalid_value", "stream")
    max_tokens = _number(body, "max_tokens", 1, 4096, integer=True)
    max_tokens = max_tokens or _number(body, "max_completion_tokens", 1, 4096, integer=True)
    return ChatRequest(
        image_url=image[0],
        image_param=image[1],
        message=" ".join(pending) if pending else None,
        history=history,
        model=model,
        max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0),
        stream=stream,
    )
