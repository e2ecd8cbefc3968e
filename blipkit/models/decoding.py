"""Every decoding need of a model in one place: ``Decoder.generate`` picks the path, callers never do.

- greedy, decoder-only LLM with no logit processing in its generation config: blipkit's lean loop
  (``GreedyDecoder``: finished rows leave the batch, an exact bf16 greedy head where it pays);
- beam search, sampling, encoder-decoder LLMs, extra ``generate`` options: transformers' ``generate``;
- either of them after a cached visual prompt (``prefix_kv``: the LLM's keys/values over it, one entry per
  row, see ``blipkit.models.prefix_cache``): the LLM then runs over the text only.

New tokens can be handed to ``on_token(row, token)`` as they come (streaming, per-row limits, cancelling):
it returns True when that row should stop. A row also stops at an end-of-sequence token, which is passed to
``on_token`` but not returned.

``Sampling.seed`` makes sampling reproducible (the same seed and inputs give the same tokens; the global
random state is left as it was); ``Sampling.processors`` are transformers logits processors run at every step
(``LogitBias``, ``LogprobRecorder``, grammar constraints), after the generation config's own and before the
sampling warpers (temperature, top-k, top-p).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from blipkit.models.blip2 import Blip2
from blipkit.models.continuous import ContinuousBatch, Row, decode_continuously, joinable
from blipkit.models.greedy import GreedyDecoder, plain_greedy
from blipkit.models.llm_io import LLMInputs, cache_keyword
from blipkit.models.prefix_cache import KV, stack_kv

OnToken = Callable[[int, int], bool]  # (row, token) -> True when the row is done


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (the default), beam search, or sampling.

    ``options`` are further transformers ``generate`` options (``min_new_tokens``, ``repetition_penalty``,
    ...); any of them, or any of ``processors``, sends decoding through transformers. ``seed`` seeds the
    sampler for one ``generate`` call.
    """

    num_beams: int = 1
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    processors: tuple[LogitsProcessor, ...] = ()

    @classmethod
    def from_kwargs(cls, num_beams: int = 1, **kwargs: Any) -> Sampling:
        """From ``generate``-style keywords (and ``seed``)."""
        names = ("do_sample", "temperature", "top_p", "top_k", "seed")
        known = {k: kwargs.pop(k) for k in names if k in kwargs}
        return cls(num_beams=num_beams, **known, options=kwargs)

    @property
    def greedy(self) -> bool:
        return self.num_beams == 1 and not self.do_sample and not self.options and not self.processors

    def generate_kwargs(self) -> dict[str, Any]:
        """The keywords for transformers' ``generate``."""
        kwargs: dict[str, Any] = {"num_beams": self.num_beams, "do_sample": bool(self.do_sample)}
        if self.do_sample:
            for name in ("temperature", "top_p", "top_k"):
                if getattr(self, name) is not None:
                    kwargs[name] = getattr(self, name)
        kwargs |= self.options
        if self.processors:
            kwargs["logits_processor"] = LogitsProcessorList(self.processors)
        return kwargs


GREEDY = Sampling()


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run the block with the random state seeded by ``seed`` (on the CPU and ``device``), then restore it;
    nothing happens when ``seed`` is None."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class LogitBias(LogitsProcessor):
    """Adds a fixed bias to the scores of some tokens (OpenAI's ``logit_bias``: -100 bans, 100 forces)."""

    def __init__(self, bias: dict[int, float]):
        self.ids = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        ids, values = self.ids.to(scores.device), self.values.to(scores.device, scores.dtype)
        return scores.index_add(1, ids, values[None].expand(scores.shape[0], -1))


class LogprobRecorder(LogitsProcessor):
    """Keeps the log-probabilities (B, V) of the step being decoded, for the token about to be chosen.

    Placed before a constraint it sees the model's own distribution (after the generation config's
    processors, before temperature and top-p); ``on_token`` reads ``last`` for the token just chosen.
    """

    def __init__(self) -> None:
        self.last: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores


class _Rows(StoppingCriteria):
    """Hands each new token of transformers' ``generate`` to ``on_token``; stops the rows that are done."""

    def __init__(self, batch_size: int, on_token: OnToken, eos: set[int]):
        self.done = [False] * batch_size
        self.on_token = on_token
        self.eos = eos

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        for row, token in enumerate(input_ids[:, -1].tolist()):
            if not self.done[row]:
                self.done[row] = bool(self.on_token(row, token)) or token in self.eos
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


class Decoder:
    """Decodes with ``blip``'s LLM; one per model, so the lean loop's greedy head is built once."""

    def __init__(self, blip: Blip2, eos_token_id: int | None, pad_token_id: int, greedy_head: bool = True):
        blip.require_llm()
        self.blip = blip
        self.eos = {eos_token_id} if eos_token_id is not None else set()
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.greedy_head = greedy_head
        self.lean_fits = plain_greedy(blip)  # the lean loop gives exactly transformers' greedy tokens
        self._lean: GreedyDecoder | None = None
        self._joins: bool | None = None
        self._lock = threading.Lock()

    @property
    def lean(self) -> GreedyDecoder:
        with self._lock:
            if self._lean is None:
                self._lean = GreedyDecoder(self.blip.llm, self.greedy_head)
            return self._lean

    def collector(self, out: list[list[int]], on_token: OnToken | None = None) -> OnToken:
        """An ``on_token`` that appends each row's tokens to ``out[row]`` (EOS ends the row, unrecorded) and
        passes them on to ``on_token``."""

        def sink(row: int, token: int) -> bool:
            stop = bool(on_token(row, token)) if on_token is not None else False
            if token in self.eos:
                return True
            out[row].append(token)
            return stop

        return sink

    def joins(self, sampling: Sampling) -> bool:
        """Whether rows decoded with ``sampling`` can be batched continuously (``continuous``)."""
        if self._joins is None:  # a fact of the model: computing it twice is harmless
            self._joins = self.lean_fits and joinable(self.blip.llm)
        return self.path(sampling) == "lean" and self._joins

    def continuous(
        self, rows: Iterable[Row], slots: int, admit_at: int | None = None
    ) -> Iterator[ContinuousBatch]:
        """Greedy decoding of ``rows`` with at most ``slots`` at once, newcomers taking the place of finished
        rows (``blipkit.models.continuous``); only where ``joins(GREEDY)``."""
        return decode_continuously(self.lean, rows, slots, admit_at)

    def continuous_batch(self, slots: int, admit_at: int | None = None) -> ContinuousBatch:
        """An empty continuous batch over the lean loop, for callers that admit rows themselves (the
        server); only where ``joins(GREEDY)``."""
        return ContinuousBatch(self.lean, slots, admit_at)

    def path(self, sampling: Sampling) -> str:
        """Which loop ``generate`` takes for ``sampling``: ``"lean"`` or ``"transformers"``."""
        return "lean" if sampling.greedy and self.lean_fits else "transformers"

    @torch.inference_mode()
    def generate(
        self,
        inputs: LLMInputs,
        max_new_tokens: int,
        sampling: Sampling = GREEDY,
        on_token: OnToken | None = None,
        prefix_kv: Sequence[KV] | None = None,
    ) -> list[list[int]]:
        """New token ids per row, end-of-sequence excluded.

        With ``prefix_kv`` (one entry per row) the cache already holds the visual prompt: ``inputs`` is the
        layout ``[visual prompt][pad][text]`` with text left-padded (``blipkit.models.prefix_cache``).
        """
        B = inputs.embeds.shape[0]
        out: list[list[int]] = [[] for _ in range(B)]
        sink = self.collector(out, on_token)
        if self.path(sampling) == "lean":
            if prefix_kv is not None:
                self.lean.run(inputs.text(), max_new_tokens, sink, stack_kv(self.blip.llm, prefix_kv))
            else:
                packed = inputs if inputs.packed else inputs.left_packed()
                self.lean.run(packed, max_new_tokens, sink)
            return out
        if sampling.num_beams > 1 and on_token is not None:
            raise ValueError("tokens cannot be streamed from beam search")
        with seeded(sampling.seed if sampling.do_sample else None, inputs.embeds.device):
            return self._transformers(inputs, max_new_tokens, sampling, sink, out, prefix_kv)

    def _transformers(
        self,
        inputs: LLMInputs,
        max_new_tokens: int,
        sampling: Sampling,
        sink: OnToken,
        out: list[list[int]],
        prefix_kv: Sequence[KV] | None,
    ) -> list[list[int]]:
        """The transformers path of ``generate``: per-step tokens go to ``sink``, which fills ``out``."""
        B = inputs.embeds.shape[0]
        kwargs = {
            "max_new_tokens": max_new_tokens,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            **sampling.generate_kwargs(),
        }
        if sampling.num_beams == 1:
            kwargs["stopping_criteria"] = StoppingCriteriaList([_Rows(B, sink, self.eos)])
        if prefix_kv is not None:
            llm = self.blip.llm
            kwargs[cache_keyword(llm)] = stack_kv(llm, prefix_kv)
            # generate slices the embeddings past the cached length: only [pad ...][text] runs through the LLM
            tokens = llm.generate(inputs_embeds=inputs.embeds, attention_mask=inputs.mask, **kwargs)
        else:
            tokens = self.blip.hf_generate(inputs, **kwargs)
        if sampling.num_beams > 1:  # no per-step sink: cut each sequence at its end token
            return [self._until_eos(row) for row in tokens.tolist()]
        return out

    def _until_eos(self, row: list[int]) -> list[int]:
        for i, token in enumerate(row):
            if token in self.eos:
                return row[:i]
        return row
