"""The text side of a model, handed out with it: LLM and Q-Former tokenisation with their limits, prompt
templates, chat history fitting and decoding.

Every surface (the API, chat, batch captioning, the server, retrieval, training and evaluation) tokenises
through a ``TextProcessor``, so a text can never overrun a window:

- the LLM reads at most its context window less the visual prompt and the tokens to generate; a longer
  prompt keeps its beginning-of-sequence token and its end (the question, the latest turn);
- the Q-Former reads at most ``qformer.max_text_tokens`` tokens, cut as in training;
- a chat keeps the most recent turns that fit *both* windows, dropping the oldest first, each window on its
  own (the LLM usually keeps more of the history than the Q-Former).

The tokenizers' pad tokens are settled once, when the processor is built; nothing else changes them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from blipkit.config import Blip2Config
from blipkit.errors import CapabilityError, UsageError

log = logging.getLogger("blipkit")

Counter = Callable[[list[str], bool], list[int]]  # (texts, with special tokens) -> token count of each
DEFAULT_CONTEXT = 512  # tokens, for LLM configs that name no limit (relative positions: T5)


def fill(template: str, text: str) -> str:
    """``template`` with its ``{}`` filled by the stripped ``text``."""
    if "{}" not in template:
        raise UsageError(f"prompt template needs a '{{}}' placeholder, got {template!r}")
    return template.format(text.strip())


def settle_pad_token(tokenizer: Any) -> int:
    """The tokenizer's pad token id; one without a pad token pads with end-of-sequence (padding is masked)."""
    if tokenizer.pad_token_id is None:
        fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fallback is None:
            raise UsageError("the tokenizer has no pad, end-of-sequence or unknown token to pad with")
        tokenizer.pad_token = fallback
    return int(tokenizer.pad_token_id)


def pad(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[Tensor, Tensor]:
    """Ragged token lists -> (B, T) ids and (B, T) mask, padded on ``side``."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(list(r), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


@dataclass
class Prompt:
    """What one generation reads: the LLM's prompt (text and token ids) and the Q-Former's text."""

    text: str
    llm_ids: list[int]
    qformer_text: str
    dropped_turns: int = 0  # oldest chat turns left out of the LLM prompt
    truncated: bool = False  # the LLM prompt lost its start


class TextProcessor:
    """Tokenisation, prompts and windows of one model (``Model.text``)."""

    def __init__(
        self,
        config: Blip2Config,
        llm_tokenizer: Any | None,
        qformer_tokenizer: Any | None,
        llm_context: int | None = None,
    ):
        self.config = config
        self.prompts = config.prompts
        self.llm_tokenizer = llm_tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        self._llm_context = llm_context  # from the LLM's config; ``llm.max_context`` overrides it
        q = config.qformer
        self.qformer_max_tokens = min(q.max_text_tokens, q.max_position_embeddings)
        self.num_query_tokens = q.num_query_tokens
        self.question_aware = bool(config.bridge.text_input)
        self.llm_pad_id = settle_pad_token(llm_tokenizer) if llm_tokenizer is not None else 0
        self.qformer_pad_id = settle_pad_token(qformer_tokenizer) if qformer_tokenizer is not None else 0

    @classmethod
    def for_model(cls, blip: Any, llm_tokenizer: Any | None, qformer_tokenizer: Any | None) -> TextProcessor:
        """The processor of a built model: its LLM's context window comes from the LLM's own config."""
        context = None
        if blip.has_llm:
            llm_cfg = blip.llm.config.get_text_config(decoder=True)
            context = getattr(llm_cfg, "max_position_embeddings", None) or getattr(
                llm_cfg, "n_positions", None
            )
        return cls(blip.config, llm_tokenizer if blip.has_llm else None, qformer_tokenizer, context)

    @property
    def llm_context(self) -> int:
        """Tokens the LLM attends to: ``llm.max_context`` of the model config, else the LLM's own limit."""
        return int(self.config.llm.max_context or self._llm_context or DEFAULT_CONTEXT)

    # --- the LLM --------------------------------------------------------------------------------------------
    def require_llm(self) -> Any:
        if self.llm_tokenizer is None:
            raise CapabilityError("this checkpoint has no language model: it cannot caption, answer or chat")
        return self.llm_tokenizer

    @property
    def eos_token_id(self) -> int | None:
        return self.require_llm().eos_token_id

    def llm_budget(self, max_new_tokens: int) -> int:
        """Prompt tokens the LLM can read when ``max_new_tokens`` follow the visual prompt and the prompt."""
        budget = self.llm_context - self.num_query_tokens - max_new_tokens
        if budget < 1:
            raise UsageError(
                f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's context "
                f"window ({self.llm_context} tokens, {self.num_query_tokens} of them the visual prompt)"
            )
        return budget

    def llm_ids(self, text: str, budget: int | None = None) -> tuple[list[int], bool]:
        """LLM token ids of a prompt and whether it was cut: past ``budget`` it keeps BOS and its end."""
        tok = self.require_llm()
        ids = tok(text)["input_ids"]
        if budget is None or len(ids) <= budget:
            return ids, False
        head = 1 if ids and ids[0] == tok.bos_token_id and budget > 1 else 0
        log.warning("a prompt of %d tokens is cut to its last %d to fit the context window", len(ids), budget)
        return ids[:head] + ids[len(ids) - (budget - head) :], True

    def prompt(self, text: str, max_new_tokens: int) -> Prompt:
        """One prompt, fitted to the LLM window; the Q-Former reads the same text (cut to its own window)."""
        ids, cut = self.llm_ids(text, self.llm_budget(max_new_tokens))
        return Prompt(text, ids, text, truncated=cut)

    def llm_batch(self, rows: Sequence[Sequence[int]], side: str = "right") -> tuple[Tensor, Tensor]:
        """Padded LLM ids and mask (B, T) from token lists."""
        return pad(rows, self.llm_pad_id, side)

    def decode(self, tokens: Sequence[int]) -> str:
        """Generated tokens as text, special tokens dropped, stripped."""
        return self.require_llm().decode(list(tokens), skip_special_tokens=True).strip()

    # --- the Q-Former --------------------------------------------------------------------------------------
    def require_qformer(self) -> Any:
        if self.qformer_tokenizer is None:
            raise CapabilityError(
                "this checkpoint has no Q-Former text path (a generation-only model): similarity, match, "
                "classify and text embeddings need a retrieval or stage-1 checkpoint"
            )
        return self.qformer_tokenizer

    def qformer_rows(self, texts: Sequence[str]) -> list[list[int]]:
        """Q-Former token ids ([CLS] ... [SEP]) of each text, cut to the Q-Former's window."""
        tok = self.require_qformer()
        return tok(list(texts), truncation=True, max_length=self.qformer_max_tokens)["input_ids"]

    def qformer_batch(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Q-Former ids and mask (B, T), right-padded, cut to the Q-Former's window."""
        return pad(self.qformer_rows(texts), self.qformer_pad_id)

    # --- prompts --------------------------------------------------------------------------------------------
    def caption_prompt(self, prompt: str | None = None) -> str:
        """The text a caption continues: ``prompt``, else the model's caption prompt (often empty)."""
        return prompt if prompt is not None else (self.prompts.caption or "")

    def question(self, question: str) -> str:
        """A question in the model's VQA template ("Question: {} Answer:")."""
        if not question.strip():
            raise UsageError("the question is empty")
        return fill(self.prompts.vqa, question)

    def chat(self, history: Sequence[tuple[str, str]], message: str, max_new_tokens: int) -> Prompt:
        """The prompt for ``message`` after ``history``: the most recent turns that fit each window.

        Turns are counted one by one (linear in the history), then the chosen text is checked exactly; a
        message too long on its own keeps its end in the LLM and is cut as in training in the Q-Former.
        """
        budget = self.llm_budget(max_new_tokens)
        turns = [f"{self.question(q)} {a.strip()}".rstrip() for q, a in history]
        last = self.question(message)
        start = _fit(turns, last, self.prompts.chat_separator, _counter(self.require_llm()), budget)
        text = self.prompts.chat_separator.join([*turns[start:], last])
        ids, cut = self.llm_ids(text, budget)
        qformer_text = text
        if self.question_aware and self.qformer_tokenizer is not None:
            q_start = _fit(
                turns,
                last,
                self.prompts.chat_separator,
                _counter(self.qformer_tokenizer),
                self.qformer_max_tokens,
            )
            qformer_text = self.prompts.chat_separator.join([*turns[max(start, q_start) :], last])
        return Prompt(text, ids, qformer_text, dropped_turns=start, truncated=cut)

    # --- training -------------------------------------------------------------------------------------------
    def lm_batch(
        self, prompts: Sequence[str], targets: Sequence[str], max_tokens: int, encoder_decoder: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """LLM inputs and labels for training, right-padded.

        Decoder-only: ids = prompt tokens + " target" tokens + eos, labels -100 except on the target (B, T).
        Encoder-decoder: ids = prompt tokens (encoder), labels = target tokens (decoder, -100 padding). The
        prompt is tokenised on its own, exactly as at inference; over-long prompts lose their start.
        """
        tok = self.require_llm()
        prompt_rows = tok(list(prompts))["input_ids"]
        if encoder_decoder:
            target_rows = tok(list(targets))["input_ids"]
            ids, mask = self.llm_batch([p[-max_tokens:] for p in prompt_rows])
            labels, label_mask = pad([t[:max_tokens] for t in target_rows], -100)
            return ids, mask, labels.masked_fill(label_mask == 0, -100)
        target_rows = tok([" " + t for t in targets], add_special_tokens=False)["input_ids"]
        rows, label_rows = [], []
        for p, t in zip(prompt_rows, target_rows, strict=True):
            t = (t + [tok.eos_token_id])[:max_tokens]
            p = p[max(0, len(p) + len(t) - max_tokens) :]
            rows.append(p + t)
            label_rows.append([-100] * len(p) + t)
        ids, mask = self.llm_batch(rows)
        labels, _ = pad(label_rows, -100)
        return ids, mask, labels

    def word_tokens(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """LLM tokens of " text" (no special tokens): (B, T) ids and mask, as a text reads after a prompt."""
        rows = self.require_llm()([" " + t for t in texts], add_special_tokens=False)["input_ids"]
        return self.llm_batch(rows)


def _counter(tokenizer: Any) -> Counter:
    """Token counts of texts under ``tokenizer``, with or without its special tokens."""
    return lambda texts, special: [len(r) for r in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def _fit(turns: list[str], last: str, sep: str, count: Counter, budget: int) -> int:
    """The first of ``turns`` to keep so that ``sep.join(turns[start:] + [last])`` has at most ``budget``
    tokens under ``count``; ``len(turns)`` when only ``last`` is kept (even if it is too long alone)."""

    def fits(start: int) -> bool:
        return count([sep.join([*turns[start:], last])], True)[0] <= budget

    if not turns:
        return 0
    sizes = count([*turns, last], False)  # one batch: each piece on its own
    total = count([last], True)[0]  # the newest piece with the special tokens the whole text gets
    start = len(turns)
    while start > 0 and total + sizes[start - 1] <= budget:  # estimate, from the newest turn backwards
        start -= 1
        total += sizes[start]
    while start < len(turns) and not fits(start):  # the joined text may tokenise longer: drop more
        start += 1
    while start > 0 and fits(start - 1):  # or shorter: keep more
        start -= 1
    return start
