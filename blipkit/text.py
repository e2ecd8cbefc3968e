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

from blipkit.config import PromptConfig
from blipkit.errors import CapabilityError, UsageError
from blipkit.templates import TOKENIZER, Template, TokenizerTemplate, get_template

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


def pad(
    rows: Sequence[Sequence[int]], pad_id: int, side: str = "right", width: int | None = None
) -> tuple[Tensor, Tensor]:
    """Ragged token lists -> (B, T) ids and (B, T) mask, padded on ``side`` (to ``width`` when given)."""
    width = max(max((len(r) for r in rows), default=0), width or 0)
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


@dataclass(frozen=True)
class TextSettings:
    """What a model's text side needs to know of its config, whichever family it is."""

    prompts: PromptConfig
    visual_tokens: int  # LLM positions the image takes: the queries (BLIP-2) or the patches (LLaVA)
    embed_max_tokens: int = 64  # the window of the text that is embedded or read with the queries
    embed_padding: str = "longest"  # or "max_length" (SigLIP pools at the last position)
    question_aware: bool = False  # the prompt joins the Q-Former's queries
    template: str = "blip2"
    image_token: str | None = None  # the image's placeholder in the prompt text (LLaVA); None: a prefix
    image_token_index: int | None = None  # its id (negative when the tokenizer has no such token)

    @classmethod
    def of(cls, config: Any, visual_tokens: int | None = None) -> TextSettings:
        """The settings of a family config (``Blip2Config``, ``LlavaConfig`` or ``DualEncoderConfig``)."""
        family = getattr(config, "family", "blip2")
        if family == "blip2":
            q = config.qformer
            return cls(
                config.prompts,
                q.num_query_tokens if visual_tokens is None else visual_tokens,
                min(q.max_text_tokens, q.max_position_embeddings),
                question_aware=bool(config.bridge.text_input),
            )
        if family == "llava":
            return cls(
                config.prompts,
                visual_tokens or 0,
                template=config.template,
                image_token=config.image_token,
                image_token_index=config.image_token_index,
            )
        if family == "caption":
            return cls(config.prompts, 0, template=config.template)
        return cls(config.prompts, 0, config.text_max_tokens, config.text_padding)


class TextProcessor:
    """Tokenisation, prompts and windows of one model (``Model.text``).

    ``config`` is the model's family config; the "Q-Former" tokenizer is the tokenizer of whatever text is
    embedded or read with the image (the Q-Former's text path, or a dual encoder's text tower).
    """

    def __init__(
        self,
        config: Any,
        llm_tokenizer: Any | None,
        qformer_tokenizer: Any | None,
        llm_context: int | None = None,
        visual_tokens: int | None = None,
    ):
        self.config = config
        self.settings = s = TextSettings.of(config, visual_tokens)
        self.prompts = s.prompts
        self.llm_tokenizer = llm_tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        self._llm_context = llm_context  # from the LLM's config; ``llm.max_context`` overrides it
        self.qformer_max_tokens = s.embed_max_tokens
        self.num_query_tokens = s.visual_tokens
        self.question_aware = s.question_aware
        self.llm_pad_id = settle_pad_token(llm_tokenizer) if llm_tokenizer is not None else 0
        self.qformer_pad_id = settle_pad_token(qformer_tokenizer) if qformer_tokenizer is not None else 0
        self.template = self._template()

    def _template(self) -> Template | TokenizerTemplate | None:
        s = self.settings
        if self.llm_tokenizer is None:
            return None
        if s.template == TOKENIZER and getattr(self.llm_tokenizer, "chat_template", None):
            t: Template | TokenizerTemplate = TokenizerTemplate(self.llm_tokenizer)
        elif s.template == TOKENIZER:  # a plain LLM: BLIP-2's "Question: {} Answer:"
            t = get_template("blip2", self.prompts.vqa, self.prompts.chat_separator)
        else:
            t = get_template(s.template, self.prompts.vqa, self.prompts.chat_separator)
        return t.with_image(s.image_token + "\n") if s.image_token else t

    @classmethod
    def for_model(cls, model: Any, llm_tokenizer: Any | None, qformer_tokenizer: Any | None) -> TextProcessor:
        """The processor of a built model: its LLM's context window comes from the LLM's own config."""
        context = None
        if model.has_llm:
            llm_cfg = model.llm.config.get_text_config(decoder=True)
            context = getattr(llm_cfg, "max_position_embeddings", None) or getattr(
                llm_cfg, "n_positions", None
            )
        return cls(
            model.config,
            llm_tokenizer if model.has_llm else None,
            qformer_tokenizer,
            context,
            getattr(model, "num_visual_tokens", None),
        )

    @property
    def llm_context(self) -> int:
        """Tokens the LLM attends to: ``llm.max_context`` of the model config, else the LLM's own limit."""
        llm = getattr(self.config, "llm", None)  # read live: a caller may narrow it after loading
        return int(getattr(llm, "max_context", None) or self._llm_context or DEFAULT_CONTEXT)

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
        """LLM token ids of a prompt and whether it was cut: past ``budget`` it keeps its start up to the
        image placeholder (or the BOS token) and its end."""
        tok = self.require_llm()
        ids = self._tokenize(text)
        if budget is None or len(ids) <= budget:
            return ids, False
        head = 1 if ids and ids[0] == tok.bos_token_id and budget > 1 else 0
        image = self.settings.image_token_index
        if image is not None and image in ids:
            head = ids.index(image) + 1
            if head >= budget:
                raise UsageError(
                    f"the prompt's start up to the image takes {head} of the {budget} tokens it has"
                )
        log.warning("a prompt of %d tokens is cut to its last %d to fit the context window", len(ids), budget)
        return ids[:head] + ids[len(ids) - (budget - head) :], True

    def _tokenize(self, text: str) -> list[int]:
        """Token ids of a prompt. An image placeholder the tokenizer does not know becomes the image
        token index between separately tokenised pieces (the original LLaVA's ``tokenizer_image_token``)."""
        tok = self.require_llm()
        placeholder, index = self.settings.image_token, self.settings.image_token_index
        if placeholder is None or placeholder not in text or _knows(tok, placeholder, index):
            return tok(text)["input_ids"]
        chunks = text.split(placeholder)
        ids = tok(chunks[0])["input_ids"]
        for chunk in chunks[1:]:
            ids += [index, *tok(chunk, add_special_tokens=False)["input_ids"]]
        return ids

    def with_image(self, text: str) -> str:
        """``text`` with the image placeholder in front where the model needs one and it has none."""
        placeholder = self.settings.image_token
        if placeholder is None or placeholder in text:
            return text
        return f"{placeholder}\n{text}"

    def prompt(self, text: str, max_new_tokens: int) -> Prompt:
        """One prompt, fitted to the LLM window; the Q-Former reads the same text (cut to its own window)."""
        text = self.with_image(text)
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
        """Q-Former ids and mask (B, T), right-padded, cut to the Q-Former's window (padded to all of it where
        the text tower needs that: ``embed_padding = "max_length"``)."""
        rows = self.qformer_rows(texts)
        width = self.qformer_max_tokens if self.settings.embed_padding == "max_length" else None
        return pad(rows, self.qformer_pad_id, width=width)

    # --- prompts --------------------------------------------------------------------------------------------
    def caption_prompt(self, prompt: str | None = None) -> str:
        """The text a caption continues: ``prompt``, else the model's caption prompt (often empty).

        Chat-tuned families (a conversation template other than ``blip2``) take the prompt as an instruction
        ("Describe this image in detail.") in their template.
        """
        text = prompt if prompt is not None else (self.prompts.caption or "")
        if self.template is None or self.template.name == "blip2":
            return text
        return self.template.render([], text or "Describe the image.")

    def question(self, question: str, template: Template | TokenizerTemplate | None = None) -> str:
        """A question in the model's template ("Question: {} Answer:" for BLIP-2), or in ``template``."""
        if not question.strip():
            raise UsageError("the question is empty")
        template = template or self.template
        if template is None:
            return fill(self.prompts.vqa, question)
        return template.render([], question)

    def chat(
        self,
        history: Sequence[tuple[str, str]],
        message: str,
        max_new_tokens: int,
        template: Template | TokenizerTemplate | None = None,
    ) -> Prompt:
        """The prompt for ``message`` after ``history``: the most recent turns that fit each window.

        Turns are counted one by one (linear in the history), then the chosen text is checked exactly; a
        message too long on its own keeps its end in the LLM and is cut as in training in the Q-Former.
        """
        self.question(message)  # an empty message is a usage error
        budget = self.llm_budget(max_new_tokens)
        template = template or self.template

        def render(start: int) -> str:
            return template.render(history, message, start)

        pieces = template.pieces(history, message)
        start = _fit(pieces, render, _counter(self.require_llm()), budget)
        text = render(start)
        ids, cut = self.llm_ids(text, budget)
        qformer_text = text
        if self.question_aware and self.qformer_tokenizer is not None:
            q_start = _fit(pieces, render, _counter(self.qformer_tokenizer), self.qformer_max_tokens)
            qformer_text = render(max(start, q_start))
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


def _knows(tokenizer: Any, token: str, index: int | None) -> bool:
    """Whether ``tokenizer`` has ``token`` as one token (with id ``index`` when that is given)."""
    got = tokenizer.convert_tokens_to_ids(token)
    return got is not None and got != tokenizer.unk_token_id and (index is None or got == index)


def _fit(pieces: list[str], render: Callable[[int], str], count: Counter, budget: int) -> int:
    """The first turn to keep so that ``render(start)`` has at most ``budget`` tokens under ``count``.

    ``pieces`` are the rendered turns then the new message, each on its own: their sizes give the estimate,
    from the newest turn backwards; the rendered text is then checked exactly. ``len(pieces) - 1`` when only
    the new message is kept (even if it is too long alone).
    """
    n = len(pieces) - 1

    def fits(start: int) -> bool:
        return count([render(start)], True)[0] <= budget

    if not n:
        return 0
    sizes = count(pieces, False)  # one batch: each piece on its own
    total = count([render(n)], True)[0]  # the newest message with everything the whole text gets
    start = n
    while start > 0 and total + sizes[start - 1] <= budget:  # estimate, from the newest turn backwards
        start -= 1
        total += sizes[start]
    while start < n and not fits(start):  # the joined text may tokenise longer: drop more
        start += 1
    while start > 0 and fits(start - 1):  # or shorter: keep more
        start -= 1
    return start
