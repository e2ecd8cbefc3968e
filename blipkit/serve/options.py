"""Generation options of a request, read from OpenAI's and Ollama's field names into one ``Options``.

OpenAI bodies: unknown fields are ignored, as OpenAI's API does; fields OpenAI knows but this server cannot
honour (tools, audio, penalties, ...) are a 400 naming them, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from blipkit.serve.errors import APIError

DEFAULT_MAX_TOKENS = 30  # chat answers when the request names no limit
DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions, as OpenAI's
MAX_TOKENS = 4096
MAX_CHOICES = 16
MAX_STOP = 4  # OpenAI's limit
MAX_OLLAMA_STOP = 16  # Modelfiles often list several stop strings
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes


@dataclass
class Options:
    """How to generate, whichever API asked."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float | None = None  # None or 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None  # choice i samples with seed + i
    n: int = 1
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # alternatives listed per token; None: no log-probabilities
    stream: bool = False
    include_usage: bool = False
    json: bool = False  # the answer is JSON: an object, or valid under ``json_schema``
    json_schema: dict[str, Any] | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    echo: bool = False  # completions: the prompt in front of the text


def invalid(name: str, what: str, value: Any) -> APIError:
    return APIError(f"'{name}' must be {what}, got {value!r}", 400, "invalid_value", name)


def unsupported(name: str, why: str = "") -> APIError:
    reason = f": {why}" if why else ""
    return APIError(f"'{name}' is not supported by this server{reason}", 400, "unsupported_parameter", name)


def number(body: dict, name: str, low: float, high: float, integer: bool = False) -> Any:
    """``body[name]`` checked to lie in [low, high] (None when absent)."""
    value = body.get(name)
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        raise invalid(name, f"{'an integer' if integer else 'a number'} in [{low}, {high}]", value)
    return value


def flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, "true or false", value)
    return value


def stops(value: Any, name: str = "stop", limit: int = MAX_STOP) -> tuple[str, ...]:
    """A stop string or list of at most ``limit`` of them; empty strings are dropped."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items) or len(items) > limit:
        raise invalid(name, f"a string or a list of at most {limit} strings", value)
    return tuple(s for s in items if s)


def _logit_bias(value: Any) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid("logit_bias", "an object of token id -> bias", value)
    out = {}
    for key, bias in value.items():
        if not str(key).isdigit() or isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise invalid("logit_bias", "an object of token id -> bias", value)
        if not -100 <= bias <= 100:
            raise invalid("logit_bias", "biases in [-100, 100]", bias)
        out[int(key)] = float(bias)
    return out


def _response_format(value: Any) -> tuple[bool, dict[str, Any] | None]:
    """(json, schema) of OpenAI's ``response_format``."""
    if value is None:
        return False, None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, None
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(
                "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                400,
                "invalid_value",
                "response_format",
            )
        return True, schema
    raise invalid("response_format", "{'type': 'text' | 'json_object' | 'json_schema', ...}", value)


def _refuse_unsupported(body: dict) -> None:
    """400 for the OpenAI fields that are set to something this server cannot do."""
    for name in ("tools", "functions"):
        if body.get(name):
            raise unsupported(name, "the models served here do not call tools")
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none", "auto"):
            raise unsupported(name, "the models served here do not call tools")
    if body.get("audio") is not None:
        raise unsupported("audio", "answers are text only")
    if body.get("modalities") not in (None, ["text"]):
        raise unsupported("modalities", "answers are text only")
    for name in ("prediction", "web_search_options", "reasoning_effort"):
        if body.get(name) is not None:
            raise unsupported(name)
    for name in ("frequency_penalty", "presence_penalty"):
        if number(body, name, -2.0, 2.0):
            raise unsupported(name, "only 0 is supported")


def openai_options(body: dict, completion: bool = False) -> Options:
    """The options of a ``/v1/chat/completions`` (or, with ``completion``, ``/v1/completions``) body."""
    _refuse_unsupported(body)
    stream = flag(body, "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not (stream and isinstance(stream_options, dict)):
        raise invalid("stream_options", "an object, and only with stream: true", stream_options)
    include_usage = flag(stream_options or {}, "include_usage")
    n = number(body, "n", 1, MAX_CHOICES, integer=True) or 1
    max_tokens = number(body, "max_tokens", 1, MAX_TOKENS, integer=True)
    if not completion:
        max_tokens = max_tokens or number(body, "max_completion_tokens", 1, MAX_TOKENS, integer=True)
    default = DEFAULT_COMPLETION_TOKENS if completion else DEFAULT_MAX_TOKENS
    if completion:
        logprobs = number(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS, integer=True)
        if body.get("suffix"):
            raise unsupported("suffix", "text is only ever appended")
        best_of = number(body, "best_of", 1, MAX_CHOICES, integer=True)
        if best_of not in (None, 1, n):
            raise unsupported("best_of", "only best_of equal to n")
        echo = flag(body, "echo")
        if echo and logprobs is not None:
            raise unsupported("echo", "not together with logprobs (the prompt's log-probabilities)")
    else:
        top = number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
        if top is not None and not flag(body, "logprobs"):
            raise invalid("top_logprobs", "given only with logprobs: true", top)
        logprobs = (top or 0) if flag(body, "logprobs") else None
        echo = False
    json_mode, schema = _response_format(None if completion else body.get("response_format"))
    return Options(
        max_tokens=max_tokens or default,
        temperature=number(body, "temperature", 0.0, 2.0),
        top_p=number(body, "top_p", 0.0, 1.0),
        seed=number(body, "seed", *SEED_RANGE, integer=True),
        n=n,
        stop=stops(body.get("stop")),
        logprobs=logprobs,
        stream=stream,
        include_usage=include_usage,
        json=json_mode,
        json_schema=schema,
        logit_bias=_logit_bias(body.get("logit_bias")),
        echo=echo,
    )


def ollama_format(value: Any) -> tuple[bool, dict[str, Any] | None]:
    """(json, schema) of Ollama's ``format``: "json", a JSON schema object, or nothing."""
    if value in (None, ""):
        return False, None
    if value == "json":
        return True, None
    if isinstance(value, dict):
        return True, value
    raise invalid("format", "'json' or a JSON schema object", value)


def ollama_options(body: dict, fill_tokens: int) -> Options:
    """The options of an Ollama ``/api/chat`` or ``/api/generate`` body.

    ``options`` maps: temperature, top_p, top_k, seed, stop, num_predict (unset or negative: up to
    ``fill_tokens``). Runtime and other sampler options (num_ctx, num_gpu, mirostat, ...) are ignored, as
    Ollama ignores the options a model does not use; the default is greedy decoding (no temperature).
    """
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise invalid("options", "an object", opts)
    if body.get("tools"):
        raise unsupported("tools", "the models served here do not call tools")
    if body.get("think"):
        raise unsupported("think", "the models served here do not think aloud")
    predict = number(opts, "num_predict", -2, MAX_TOKENS, integer=True)
    if predict == 0:
        raise invalid("num_predict", "a positive number of tokens, or -1", predict)
    json_mode, schema = ollama_format(body.get("format"))
    top = number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
    return Options(
        max_tokens=predict if predict is not None and predict > 0 else min(fill_tokens, MAX_TOKENS),
        temperature=number(opts, "temperature", 0.0, 2.0),
        top_p=number(opts, "top_p", 0.0, 1.0),
        top_k=number(opts, "top_k", 0, 1_000_000, integer=True),
        seed=number(opts, "seed", *SEED_RANGE, integer=True),
        stop=stops(opts.get("stop"), "options.stop", MAX_OLLAMA_STOP),
        logprobs=(top or 0) if flag(body, "logprobs") else None,
        stream=flag(body, "stream", default=True),
        json=json_mode,
        json_schema=schema,
    )
