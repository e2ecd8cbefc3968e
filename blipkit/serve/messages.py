"""Read a chat request (OpenAI's messages, or Ollama's): its turns, with their texts and images, and options.

A conversation is kept as its user / assistant turns, each a list of parts: texts, and images given as an
image URL (a data URI, or a remote URL where the server allows them). ``conversation()`` turns it into the
(question, answer) history and the new message that the model's template renders; with a placeholder, each
image becomes that placeholder where it stood (LLaVA reads several images, each at its own placeholder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from blipkit.serve.errors import APIError
from blipkit.serve.options import DEFAULT_MAX_TOKENS, Options, openai_options


@dataclass(frozen=True)
class ImagePart:
    url: str  # a data URI, or an http(s) URL
    param: str  # where it sits in the request, for error messages


Part = str | ImagePart


@dataclass
class ChatRequest:
    turns: list[tuple[str, list[Part]]]  # ("user" | "assistant", parts), system messages left out
    model: str | None = None
    options: Options = field(default_factory=Options)
    raw: bool = False  # the message is the whole prompt, no template (Ollama's generate with raw)

    @property
    def images(self) -> list[ImagePart]:
        """Every image of the user turns, in order (an image given twice is listed twice)."""
        return [p for role, parts in self.turns if role == "user" for p in parts if isinstance(p, ImagePart)]

    def distinct_images(self) -> list[ImagePart]:
        """The images by URL, each once, in order of first appearance."""
        seen: dict[str, ImagePart] = {}
        for image in self.images:
            seen.setdefault(image.url, image)
        return list(seen.values())

    @property
    def max_tokens(self) -> int:
        return self.options.max_tokens

    def conversation(self, placeholder: str | None = None) -> tuple[list[tuple[str, str]], str | None]:
        """The (question, answer) turns and the new message (None: the last turn has no text).

        Consecutive user turns join into one question; an assistant turn without a question before it joins
        the previous answer. With ``placeholder`` every image is written as ``placeholder + "\\n"`` where it
        stood, and the new message is never None while it holds an image.
        """
        history: list[tuple[str, str]] = []
        pending: list[str] = []  # user texts waiting for an answer
        for role, parts in self.turns:
            if role == "user":
                pending += _user_pieces(parts, placeholder)
            else:
                answer = " ".join(p.strip() for p in parts if isinstance(p, str))
                if pending:
                    history.append((_join(pending), answer))
                    pending = []
                elif history:
                    history[-1] = (history[-1][0], f"{history[-1][1]} {answer}".strip())
        return history, (_join(pending) if pending else None)

    @property
    def history(self) -> list[tuple[str, str]]:
        return self.conversation()[0]

    @property
    def message(self) -> str | None:
        return self.conversation()[1]


def _user_pieces(parts: list[Part], placeholder: str | None) -> list[str]:
    pieces = []
    for part in parts:
        if isinstance(part, ImagePart):
            if placeholder is not None:
                pieces.append(placeholder + "\n")
        elif part.strip():
            pieces.append(part.strip())
    return pieces


def _join(pieces: list[str]) -> str:
    """Texts joined by spaces, image placeholders (ending in a newline) joined to what follows."""
    return "".join(p if p.endswith("\n") else p + " " for p in pieces).strip()


def _parts(content: Any, where: str) -> list[Part]:
    """Texts and images of one OpenAI message's ``content``."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise APIError("message content must be a string or a list of parts", 400, "invalid_content", where)
    parts: list[Part] = []
    for j, part in enumerate(content):
        here = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise APIError("image_url part needs a 'url' string", 400, "invalid_image_url", here)
            parts.append(ImagePart(url, f"{here}.image_url.url"))
        else:
            raise APIError(
                "content parts must be {'type': 'text', 'text': ...} or {'type': 'image_url', ...}",
                400,
                "invalid_content",
                here,
            )
    return parts


def _ollama_parts(msg: dict, where: str) -> list[Part]:
    """Texts and images of one Ollama message: ``images`` (base64 strings) first, then ``content``."""
    images = msg.get("images") or []
    if not isinstance(images, list):
        raise APIError("'images' must be a list of base64 strings", 400, "invalid_image", f"{where}.images")
    parts: list[Part] = []
    for j, data in enumerate(images):
        if not isinstance(data, str) or not data:
            raise APIError("each image must be a base64 string", 400, "invalid_image", f"{where}.images[{j}]")
        parts.append(ImagePart(base64_uri(data), f"{where}.images[{j}]"))
    content = msg.get("content")
    if content is not None and not isinstance(content, str):
        raise APIError("message content must be a string", 400, "invalid_content", f"{where}.content")
    return [*parts, *([content] if content else [])]


def base64_uri(data: str) -> str:
    """A data URI for a bare base64 image (Ollama's form), so it is decoded like any other."""
    return data if data.startswith("data:") else f"data:;base64,{data}"


def parse_turns(body: Any, ollama: bool = False) -> tuple[list[tuple[str, list[Part]]], str | None]:
    """The user / assistant turns of a chat body and its ``model``; the last message must be the user's."""
    if not isinstance(body, dict):
        raise APIError("request body must be a JSON object", 400, "invalid_body")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list", 400, "missing_messages", "messages")
    turns: list[tuple[str, list[Part]]] = []
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(
                "each message needs a role: system, user or assistant", 400, "invalid_role", f"messages[{i}]"
            )
        where = f"messages[{i}]"
        parts = _ollama_parts(msg, where) if ollama else _parts(msg.get("content"), f"{where}.content")
        if role in ("user", "assistant"):
            turns.append((role, parts))
    if messages[-1].get("role") != "user":
        raise APIError("the last message must come from the user", 400, "invalid_messages", "messages")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError("'model' must be a string", 400, "invalid_value", "model")
    return turns, model


def parse_chat(body: Any, require_image: bool = True) -> ChatRequest:
    """Validate a /v1/chat/completions body; raise APIError naming the problem."""
    turns, model = parse_turns(body)
    req = ChatRequest(turns, model, openai_options(body))
    if require_image and not req.images:
        raise APIError(
            "no image in the conversation: add an image_url content part to a user message",
            400,
            "missing_image",
            "messages",
        )
    return req


__all__ = ["DEFAULT_MAX_TOKENS", "ChatRequest", "ImagePart", "parse_chat", "parse_turns"]
