"""Conversation templates as data: how a history of turns and a new message become one prompt string.

A template renders ``[prefix][turn][sep][turn]...[sep][last]``:

- ``prefix``: the system part (``{system}`` is filled with ``system``), once at the start;
- ``turn``: a finished exchange, ``{user}`` and ``{assistant}`` filled;
- ``last``: the new message, ending where the assistant's reply begins;
- ``first``: how the first rendered user message is dressed (``{image}`` and, for ``llama_2``, the system
  block); the image placeholder goes there, so it stays when older turns are dropped to fit a window.

The names and texts follow the original LLaVA repo's ``conversation.py`` (``llava_v1``, ``vicuna_v1``,
``llama_2``, ``chatml``, ``plain``) and BLIP-2's "Question: {} Answer:" prompts (``blip2``). ``"tokenizer"``
names the tokenizer's own ``chat_template`` (rendered by transformers' ``apply_chat_template``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from blipkit.errors import ConfigError

_LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Template:
    """One conversation format (see the module docstring for the fields)."""

    name: str
    turn: str
    last: str
    prefix: str = ""
    sep: str = ""
    first: str = "{image}{user}"
    system: str = ""
    image: str = ""  # the image placeholder with its separator ("<image>\n"); "" for prefix layouts

    def with_image(self, placeholder: str) -> Template:
        """The template with ``placeholder`` (e.g. "<image>\\n") put before the first user message."""
        return replace(self, image=placeholder)

    def head(self) -> str:
        return self.prefix.format(system=self.system)

    def dress(self, user: str, first: bool) -> str:
        """A user message as rendered: the first one carries the image (and, for llama_2, the system)."""
        if not first:
            return user
        return self.first.format(image=self.image, user=user, system=self.system)

    def pieces(self, history: Sequence[tuple[str, str]], message: str, start: int = 0) -> list[str]:
        """The rendered turns ``history[start:]`` then the new message, each on its own."""
        kept = history[start:]
        out = [
            self.turn.format(user=self.dress(u.strip(), i == 0), assistant=a.strip())
            for i, (u, a) in enumerate(kept)
        ]
        out.append(self.last.format(user=self.dress(message.strip(), not kept)))
        return out

    def render(self, history: Sequence[tuple[str, str]], message: str, start: int = 0) -> str:
        """The prompt for ``message`` after the turns ``history[start:]``."""
        return self.head() + self.sep.join(self.pieces(history, message, start))


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            "blip2", turn="Question: {user} Answer: {assistant}", last="Question: {user} Answer:", sep=" "
        ),
        Template(
            "llava_v1",
            prefix="{system} ",
            turn="USER: {user} ASSISTANT: {assistant}</s>",
            last="USER: {user} ASSISTANT:",
            system=_LLAVA_SYSTEM,
        ),
        Template(
            "vicuna_v1",
            prefix="{system} ",
            turn="USER: {user} ASSISTANT: {assistant}</s>",
            last="USER: {user} ASSISTANT:",
            system=_VICUNA_SYSTEM,
        ),
        Template(
            "llama_2",
            turn="[INST] {user} [/INST] {assistant} </s>",
            last="[INST] {user} [/INST]",
            sep="<s>",
            first="<<SYS>>\n{system}\n<</SYS>>\n\n{image}{user}",
            system="You are a helpful language and vision assistant. You are able to understand the visual "
            "content that the user provides, and assist the user with a variety of tasks using natural "
            "language.",
        ),
        Template(
            "chatml",
            prefix="<|im_start|>system\n{system}<|im_end|>\n",
            turn="<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant}<|im_end|>\n",
            last="<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n",
            system="Answer the questions.",
        ),
        Template("plain", turn="{user}\n{assistant}\n", last="{user}\n"),
    )
}
TOKENIZER = "tokenizer"  # the tokenizer's own chat_template


def get_template(name: str, prompts_vqa: str | None = None, separator: str | None = None) -> Template:
    """A named template; ``blip2`` takes the model's VQA prompt ("Question: {} Answer:") and separator."""
    if name not in TEMPLATES:
        raise ConfigError(
            f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)} or {TOKENIZER!r}"
        )
    t = TEMPLATES[name]
    if name == "blip2" and prompts_vqa is not None:
        if "{}" not in prompts_vqa:
            raise ConfigError(f"prompts.vqa needs a '{{}}' placeholder, got {prompts_vqa!r}")
        last = prompts_vqa.replace("{}", "{user}")
        t = replace(t, last=last, turn=last + " {assistant}", sep=t.sep if separator is None else separator)
    return t


class TokenizerTemplate:
    """The tokenizer's ``chat_template``, rendered by transformers, used like a ``Template``.

    Multimodal chat templates (llava-hf's) take OpenAI-style content parts and write the image placeholder
    themselves; text-only ones take a string, and the placeholder is put before the first user message.
    """

    name = TOKENIZER
    _PROBE = "blipkit-probe"

    def __init__(self, tokenizer: Any, image: str = "", system: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("template 'tokenizer' needs a tokenizer with a chat_template")
        self.tokenizer = tokenizer
        self.image = image
        self.system = system
        self.parts = bool(image) and self._takes_parts()

    def _takes_parts(self) -> bool:
        """Whether the template renders content parts, image included."""
        probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self._PROBE}]}]
        try:
            text = self.tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        except Exception:  # a template that only reads strings
            return False
        return self._PROBE in text and self.image.strip() in text

    def with_image(self, placeholder: str) -> TokenizerTemplate:
        return TokenizerTemplate(self.tokenizer, placeholder, self.system)

    def _user(self, text: str, first: bool) -> Any:
        if self.parts:
            return [{"type": "image"}] * first + [{"type": "text", "text": text}]
        return (self.image if first else "") + text

    def _messages(self, history: Sequence[tuple[str, str]], message: str) -> list[dict[str, Any]]:
        msgs: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        for i, (u, a) in enumerate(history):
            msgs.append({"role": "user", "content": self._user(u.strip(), i == 0)})
            answer = [{"type": "text", "text": a.strip()}] if self.parts else a.strip()
            msgs.append({"role": "assistant", "content": answer})
        msgs.append({"role": "user", "content": self._user(message.strip(), not history)})
        return msgs

    def render(self, history: Sequence[tuple[str, str]], message: str, start: int = 0) -> str:
        return self.tokenizer.apply_chat_template(
            self._messages(history[start:], message), tokenize=False, add_generation_prompt=True
        )

    def pieces(self, history: Sequence[tuple[str, str]], message: str, start: int = 0) -> list[str]:
        """Each kept turn and the new message rendered on its own: an estimate of their sizes."""
        return [*(self.render([], u) + a for u, a in history[start:]), self.render([], message)]
