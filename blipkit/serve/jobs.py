"""One generation's job as the engine runs it: inputs, decoding options, progress, and its result."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor

from blipkit.models.decoding import LogitBias, LogprobRecorder, Sampling
from blipkit.serve.cache import ImageEntry
from blipkit.text import Prompt


@dataclass
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives at its step."""

    token: str  # its text (what it adds to the answer)
    logprob: float
    top: list[tuple[str, float]]  # (text, logprob), most likely first
    end: int = 0  # length of the answer text once this token is in


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop sequence) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int
    cached_image: bool
    logprobs: list[TokenLogprob] | None = None  # when asked for: one per token of ``text``
    first_token_ns: int = 0  # time.perf_counter_ns() when the first token (or the end) came
    done_ns: int = 0  # and when the job finished


ImageRef = tuple[str, ImageEntry | None, Tensor | None]  # (image hash, cached entry, (1, 3, S, S) pixels)


@dataclass
class Job:
    """One chat completion: its inputs, decoding options, and where its events go.

    ``emit`` receives ``("delta", str)`` while streaming (with logprobs, ``("logprobs", [TokenLogprob])``
    for the tokens of the delta that follows), then ``("done", Result)`` or ``("error", Exception)``.
    """

    key: str  # image hash
    prompt: Prompt  # the fitted prompt: LLM token ids and the Q-Former's text
    emit: Callable[[tuple[str, Any]], None]
    features: ImageEntry | None = None  # the image's cache entry, when it was cached
    pixels: Tensor | None = None  # (1, 3, S, S) when the image was not cached
    max_tokens: int = 30
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    finished: bool = False
    top_k: int | None = None
    stop: Sequence[str] = ()  # stop sequences: the text ends before the first one found
    seed: int | None = None  # sampling only
    logprobs: int | None = None  # alternatives listed per token; None: no log-probabilities
    constraint: Any = None  # a grammar (``blipkit.serve.constrained.JsonConstraint``)
    logit_bias: dict[int, float] | None = None
    images: list[ImageRef] | None = None  # several images, one per image token of the prompt (LLaVA)
    visual_tokens: int | None = None  # LLM positions the images take (default: one image's)
    recorder: LogprobRecorder | None = None
    logged: list[TokenLogprob] = field(default_factory=list)  # per token, when logprobs are asked for
    released: int = 0  # logged entries already streamed
    first_token_ns: int = 0

    @property
    def solo(self) -> bool:
        """Decodes in a batch of its own: per-call state (seed, processors) or an image layout of its own."""
        seeded = self.seed is not None and bool(self.temperature)
        processed = self.logprobs is not None or self.constraint is not None or bool(self.logit_bias)
        return bool(self.images) or seeded or processed

    @property
    def group(self) -> tuple:
        """Jobs with equal groups decode alike and can share one batch."""
        if self.solo:
            return (2, id(self))
        if not self.temperature:  # omitted or 0: greedy
            return (0,)
        top_p = float(self.top_p if self.top_p is not None else 1.0)
        return (1, float(self.temperature), top_p, int(self.top_k or 0))

    @property
    def sampling(self) -> Sampling:
        """How tokens are chosen (greedy, or sampling with the job's temperature, top-p, top-k)."""
        if not self.temperature:
            return Sampling()
        top_p = float(self.top_p if self.top_p is not None else 1.0)
        return Sampling(
            do_sample=True, temperature=float(self.temperature), top_p=top_p, top_k=self.top_k or 0
        )

    def decoding(self) -> Sampling:
        """``sampling`` with the job's seed and fresh logits processors, for one decoding call."""
        processors: list[Any] = [LogitBias(self.logit_bias)] if self.logit_bias else []
        self.recorder = LogprobRecorder() if self.logprobs is not None else None
        if self.recorder is not None:
            processors.append(self.recorder)
        if self.constraint is not None:
            processors.append(self.constraint.processor(self.max_tokens))
        sampling = self.sampling
        return replace(sampling, seed=self.seed if sampling.do_sample else None, processors=tuple(processors))


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop sequence found in ``text`` starts (None: none is in it)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop sequence."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
