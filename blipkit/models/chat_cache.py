"""A chat's LLM key/value cache, kept from one turn to the next so that a turn runs only its new positions.

A turn's LLM sequence is the visual prompt and the rendered chat text. ``ChatCache`` keeps, after each turn,
the LLM's keys/values and one key per position they cover (``position_keys``): the token id of a text
position, ``("image", i)`` for visual position i. The generated answer is in the cache too, up to the token
before the last one decoded (the end-of-sequence token, or the token that hit the limit, is never fed back).
The next turn's prompt is compared with those keys; the cache is cut to their longest common prefix and only
the rest of the prompt runs through the LLM (``GreedyDecoder.run`` with the cache), at the positions it has
in the whole sequence. Keys and values at a position depend only on the inputs up to it, so the answer is the
one a full recompute gives. A prompt that changes earlier (oldest turns dropped to fit the window, a cut
prompt, an answer that tokenises differently when read back) just reuses less.

This holds only for decoder-only LLMs decoded greedily by the lean loop and a visual prompt that does not
read the text (``reusable``): a question-aware Q-Former reads the whole chat every turn, so its visual prompt
changes with each message. ``("image", i)`` stands for the chat's one image: a cache serves one chat.
"""

from __future__ import annotations

from typing import Any

from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from blipkit.models.decoding import Decoder, Sampling
from blipkit.models.greedy import GreedyDecoder
from blipkit.models.llm_io import LLMInputs, new_cache

Key = int | tuple[str, int]  # a text position's token id, or ("image", i) for visual position i


def reusable(blip: Any, decoder: Decoder, sampling: Sampling) -> bool:
    """Whether a chat turn with ``blip`` under ``sampling`` can reuse the earlier turns' cache exactly:
    greedy on the lean loop (a decoder-only LLM) and a visual prompt that does not read the text."""
    if getattr(blip, "question_aware", False) or getattr(blip, "is_encoder_decoder", True):
        return False
    return decoder.path(sampling) == "lean"


def position_keys(ids: list[int], inputs: LLMInputs, image_token: int | None) -> list[Key]:
    """One key per LLM position of a one-row ``inputs`` built from the token ids ``ids``.

    Text columns sit at ``inputs.text_columns`` (LLaVA) or after the ``prefix_len`` visual positions (BLIP-2);
    every other position, and the image token's own column, is visual.
    """
    L = inputs.embeds.shape[1]
    if inputs.text_columns is not None:
        columns = inputs.text_columns[0].tolist()
    else:
        columns = list(range(inputs.prefix_len, inputs.prefix_len + len(ids)))
    keys: list[Key | None] = [None] * L
    for token, column in zip(ids, columns, strict=True):
        if token != image_token:
            keys[column] = token
    n = 0
    for i, key in enumerate(keys):
        if key is None:
            keys[i] = ("image", n)
            n += 1
    return keys  # type: ignore[return-value]  # every None was replaced


def common_prefix(a: list[Key], b: list[Key]) -> int:
    """The length of the longest common prefix of ``a`` and ``b``."""
    n = 0
    for x, y in zip(a, b):  # noqa: B905 - stops at the shorter one on purpose
        if x != y:
            break
        n += 1
    return n


def cached_length(cache: DynamicCache) -> int | None:
    """Positions every layer of ``cache`` holds, or None when it is not a plain per-layer store of them all
    (sliding windows, linear attention, layers of different lengths): such a cache is not cut and reused."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    lengths = {layer.get_seq_length() for layer in layers}
    return lengths.pop() if len(lengths) == 1 else None


class ChatCache:
    """The LLM's keys/values over one chat's sequence so far and the key of every position they cover."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.keys: list[Key] = []
        self.reused = 0  # positions of the last prompt read from the cache

    def clear(self) -> None:
        self.cache, self.keys, self.reused = None, [], 0

    def generate(
        self, lean: GreedyDecoder, eos: set[int], inputs: LLMInputs, keys: list[Key], max_new_tokens: int
    ) -> list[int]:
        """Greedy new tokens after the one-row ``inputs`` (keys ``keys``, end-of-sequence excluded), running
        only the positions past what the cache shares with ``keys``; the cache then covers this turn."""
        if len(keys) != inputs.embeds.shape[1] or not bool(inputs.mask.all()):
            raise ValueError("a chat cache needs one unpadded row with a key per position")
        reuse = 0
        if self.cache is not None:
            reuse = min(common_prefix(self.keys, keys), len(keys) - 1)  # at least one position runs
        cache = self.cache if reuse > 0 else new_cache(lean.llm)
        if reuse > 0 and reuse < len(self.keys):
            cache.crop(reuse - len(self.keys))  # a negative count: the positions to drop from the end
        self.cache, self.keys, self.reused = None, [], reuse  # the cache grows in place from here
        tail = LLMInputs(inputs.embeds[:, reuse:], inputs.mask, inputs.position_ids[:, reuse:], 0)
        out: list[int] = []

        def sink(row: int, token: int) -> bool:
            if token in eos:
                return True
            out.append(token)
            return False

        lean.run(tail, max_new_tokens, sink, cache)
        length = cached_length(cache)
        fed = None if length is None else length - len(keys)  # answer tokens fed back: all but the last
        if fed is not None and 0 <= fed <= len(out) and fed >= len(out) - 1:
            self.cache, self.keys = cache, keys + out[:fed]
        return out
