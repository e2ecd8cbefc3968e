"""JSON answers under a grammar: OpenAI's ``response_format`` and Ollama's ``format``.

The grammar engine is xgrammar (the one vLLM, SGLang and TensorRT-LLM use). Of the maintained libraries
checked with torch 2.13 (CPU) and transformers 5:

- xgrammar 0.2 installs as a wheel, compiles a JSON schema against any Hugging Face tokenizer into per-step
  token masks and applies them to CPU (or CUDA) logits; its ``GrammarMatcher`` runs inside a transformers
  ``LogitsProcessor``, which is what blipkit's decoder takes (``Sampling.processors``);
- lm-format-enforcer 0.11.3 does not import with transformers 5 (its transformers integration imports
  ``transformers.tokenization_utils``, which transformers 5 removed);
- outlines 1.3 drives generation through its own model wrappers (``outlines.from_transformers``) rather than
  as one processor inside another decoding loop, and would take over the batching engine's job.

A constrained answer must also end within its token budget: a random or rambling model would otherwise fill
``max_tokens`` with an endless string. While the budget allows, the model chooses freely among the tokens
the grammar allows. Each step, on a copy of the matcher, the processor counts the tokens that a closing
policy needs to finish the document (close the open string, then the open arrays and objects, the shortest
value where one is due, the text the grammar forces); once that count nearly fills what is left, it follows
the policy. So the answer is complete JSON whenever the schema's smallest document fits the budget.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import LogitsProcessor

from blipkit.serve.errors import APIError

CLOSING_LOOKAHEAD = 64  # tokens of closing policy simulated at most; beyond it, the budget is taken as short
CLOSING_MARGIN = 8  # tokens kept in hand: one free token can open a key, a string and an escape at once
# the closing policy's first choices, by where the text stands (else: the text the grammar forces, else the
# first token it allows): end a string; end a number, then its container; close a container, else start the
# shortest value
_IN_STRING = (b'"',)
_IN_NUMBER = (b"}", b"]", b",", b"0")
_OUTSIDE = (b"}", b"]", b"0", b'"')
_NUMBER = frozenset(b"0123456789+-.eE")


@dataclass
class _Lexer:
    """Whether the JSON text so far ends inside a string (just after a backslash there), or in a number (or
    a literal ending in "e": either way a value that may end now)."""

    in_string: bool = False
    escape: bool = False
    in_number: bool = False

    def feed(self, data: bytes) -> None:
        for byte in data:
            if self.escape:
                self.escape = False
            elif self.in_string and byte == 0x5C:  # backslash
                self.escape = True
            elif byte == 0x22:  # quote
                self.in_string = not self.in_string
            self.in_number = not self.in_string and byte in _NUMBER

    def copy(self) -> _Lexer:
        return _Lexer(self.in_string, self.escape, self.in_number)

    def choices(self, grammars: JsonGrammars) -> list[int]:
        if self.in_string:
            return grammars.in_string
        return grammars.in_number if self.in_number else grammars.outside


class _Row:
    """One sequence under the grammar: its matcher, where its text stands, and whether it is closing."""

    def __init__(self, matcher: Any, lexer: _Lexer | None = None):
        self.matcher = matcher
        self.lexer = lexer or _Lexer()
        self.closing = False
        self.live = True


def _allowed(mask: Tensor, token: int) -> bool:
    return bool((int(mask[token // 32]) >> (token % 32)) & 1)


def _first_allowed(mask: Tensor) -> int | None:
    words = (mask != 0).nonzero()
    if not len(words):
        return None
    w = int(words[0])
    word = int(mask[w]) & 0xFFFFFFFF
    return 32 * w + (word & -word).bit_length() - 1


class JsonConstraint:
    """A compiled JSON grammar for one request; ``processor(budget)`` makes a fresh processor per decoding."""

    def __init__(self, compiled: Any, grammars: JsonGrammars):
        self.compiled = compiled
        self.grammars = grammars

    def processor(self, budget: int) -> GrammarProcessor:
        return GrammarProcessor(self, budget)


class GrammarProcessor(LogitsProcessor):
    """Masks each row's scores to the tokens its grammar allows, and closes the document within ``budget``
    tokens (see the module docstring). Single use: one per ``generate`` call."""

    def __init__(self, constraint: JsonConstraint, budget: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.constraint = constraint
        self.grammars = constraint.grammars
        self.budget = budget
        self.steps = 0
        self.rows: list[_Row] = []
        self.mask: Tensor | None = None
        self.scratch = xgr.allocate_token_bitmask(1, self.grammars.vocab_size)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        xgr = self.xgr
        if self.mask is None:
            self.rows = [_Row(xgr.GrammarMatcher(self.constraint.compiled)) for _ in range(scores.shape[0])]
            self.mask = xgr.allocate_token_bitmask(len(self.rows), self.grammars.vocab_size)
        else:
            for row, token in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
                self._accept(row, token)
        left = self.budget - self.steps  # decoding steps left, this one included
        self.steps += 1
        forced: dict[int, int] = {}
        for i, row in enumerate(self.rows):
            if not row.live:  # finished: its scores no longer matter, but must stay a distribution
                self.mask[i] = -1
                continue
            row.matcher.fill_next_token_bitmask(self.mask, i)
            if _first_allowed(self.mask[i]) is None:  # the vocabulary cannot go on: end the row
                self.mask[i] = -1
                forced[i] = self.grammars.stop_ids[0]
                continue
            if not row.closing and left <= CLOSING_LOOKAHEAD + CLOSING_MARGIN:
                row.closing = self._closing_length(row) + CLOSING_MARGIN >= left
            if row.closing:
                forced[i] = self._closing_token(row, self.mask[i])
        device = scores.device
        work = scores if device.type in ("cpu", "cuda") else scores.cpu()
        xgr.apply_token_bitmask_inplace(work, self.mask.to(work.device), vocab_size=self.grammars.vocab_size)
        for i, token in forced.items():  # the one token left (its score is of no further use)
            work[i] = float("-inf")
            work[i, token] = 0.0
        return work.to(device)

    def _accept(self, row: _Row, token: int) -> None:
        if not row.live:
            return
        if row.matcher.is_terminated() or not row.matcher.accept_token(token):
            row.live = False  # ended (its stop token), or stopped by the caller and padded since
            return
        row.lexer.feed(self.grammars.token_bytes[token])

    def _closing_token(self, row: _Row, mask: Tensor) -> int:
        """The closing policy's next token for ``row`` (``mask``: the tokens its grammar allows now)."""
        grammars = self.grammars
        for token in grammars.stop_ids:
            if _allowed(mask, token):
                return token
        for token in row.lexer.choices(grammars):
            if _allowed(mask, token):
                return token
        forced = row.matcher.find_jump_forward_string()
        if forced:
            ids = grammars.tokenizer(forced, add_special_tokens=False)["input_ids"]
            if ids and _allowed(mask, ids[0]):
                return ids[0]
        first = _first_allowed(mask)
        return first if first is not None else grammars.stop_ids[0]

    def _closing_length(self, row: _Row) -> int:
        """Tokens (the stop token included) that the closing policy takes to finish ``row``'s document."""
        trial = _Row(row.matcher.fork(), row.lexer.copy())
        for n in range(1, CLOSING_LOOKAHEAD + 1):
            trial.matcher.fill_next_token_bitmask(self.scratch, 0)
            token = self._closing_token(trial, self.scratch[0])
            if token in self.grammars.stop_ids or not trial.matcher.accept_token(token):
                return n
            trial.lexer.feed(self.grammars.token_bytes[token])
        return CLOSING_LOOKAHEAD + 1


class JsonGrammars:
    """Compiles JSON constraints for one tokenizer (built on first use; thread-safe)."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._lock = threading.Lock()
        self._compiler: Any = None

    def _ready(self) -> Any:
        with self._lock:
            if self._compiler is None:
                try:
                    import xgrammar as xgr
                except ImportError as e:
                    raise APIError(
                        "JSON output needs xgrammar: pip install 'blipkit[json]'",
                        400,
                        "unsupported_response_format",
                        "response_format",
                    ) from e
                stop = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else None
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=stop
                )
                vocab = info.decoded_vocab
                self.token_bytes = [bytes(v) for v in vocab]
                self.stop_ids = list(info.stop_token_ids)
                first = {}
                for i, data in enumerate(self.token_bytes):
                    first.setdefault(data, i)
                self.in_string = [first[c] for c in _IN_STRING if c in first]
                self.in_number = [first[c] for c in _IN_NUMBER if c in first]
                self.outside = [first[c] for c in _OUTSIDE if c in first]
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def constraint(self, schema: dict[str, Any] | None, param: str) -> JsonConstraint:
        """The constraint for ``schema`` (None: any JSON object); a schema xgrammar refuses is a 400."""
        compiler = self._ready()
        text = json.dumps(schema if schema is not None else {"type": "object"})
        try:
            with self._lock:
                compiled = compiler.compile_json_schema(text, any_whitespace=False, strict_mode=False)
        except Exception as e:  # xgrammar reports schema problems as RuntimeError / ValueError subclasses
            raise APIError(f"cannot use this JSON schema: {e}", 400, "invalid_json_schema", param) from e
        if not self._can_start(compiled):
            raise APIError(
                "this model's tokenizer has no token that can start the JSON answer",
                400,
                "unsupported_response_format",
                param,
            )
        return JsonConstraint(compiled, self)

    def _can_start(self, compiled: Any) -> bool:
        import xgrammar as xgr

        mask = xgr.allocate_token_bitmask(1, self.vocab_size)
        xgr.GrammarMatcher(compiled).fill_next_token_bitmask(mask, 0)
        first = _first_allowed(mask[0])
        return first is not None and first not in self.stop_ids


def vocab_size(llm: torch.nn.Module) -> int:
    """Rows of the LLM's output projection: the width of the scores a processor sees."""
    return int(llm.get_output_embeddings().weight.shape[0])
