"""A lean greedy decoding loop for decoder-only LLMs (``blipkit.models.decoding`` decides when it runs).

Rows start from input embeddings (after an optionally pre-filled key/value cache), take the argmax token at
every step, and leave the batch and the cache as soon as their caller says they are done, so finished rows
cost nothing. No logits processors or stopping-criteria machinery run per step; the next token comes from a
``GreedyHead`` where that is exact and pays (see ``greedy_head_for``), else from the LLM's own logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from blipkit.models.blip2 import Blip2
from blipkit.models.greedy_head import greedy_head_for
from blipkit.models.llm_io import LLMInputs, cache_keyword, new_cache, takes

OnToken = Callable[[int, int], bool]  # (row, token) -> True when the row is done

# generation-config fields that change greedy decoding, with their neutral values
_NEUTRAL = {
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
}


def plain_greedy(blip: Blip2) -> bool:
    """True when ``GreedyDecoder`` gives exactly what transformers' greedy ``generate`` would for ``blip``: a
    decoder-only LLM whose generation config asks for no logit processing."""
    if not blip.has_llm or blip.is_encoder_decoder:
        return False
    gen = getattr(blip.llm, "generation_config", None)
    return gen is None or all(getattr(gen, k, None) in ok for k, ok in _NEUTRAL.items())


class GreedyDecoder:
    """Greedy decoding with ``llm``; ``greedy_head=False`` always projects the full vocabulary."""

    def __init__(self, llm: nn.Module, greedy_head: bool = True):
        self.llm = llm
        self.head = greedy_head_for(llm) if greedy_head else None  # None: argmax of the LLM's logits
        self.body = llm.base_model if self.head is not None else llm
        self.cache_arg = cache_keyword(self.body)
        self.positions = takes(self.body, "position_ids")

    def next_tokens(self, inputs: dict, cache: DynamicCache) -> Tensor:
        """The argmax token of every row (b,); the cache grows by this step's positions."""
        kwargs = {**inputs, self.cache_arg: cache, "use_cache": True}
        if self.head is None:
            return self.body(**kwargs, logits_to_keep=1).logits[:, -1].argmax(-1)
        return self.head(self.body(**kwargs)[0][:, -1])  # the base model's last hidden state (b, D)

    @torch.inference_mode()
    def run(
        self, inputs: LLMInputs, max_new_tokens: int, on_token: OnToken, cache: DynamicCache | None = None
    ) -> None:
        """Decode after ``inputs``, handing each new token to ``on_token(row, token)``.

        ``cache`` may already hold the first P positions of every row (``inputs`` then holds the rest, with a
        mask over all P + T positions, as ``LLMInputs.text`` gives). Padding may sit anywhere but after a
        row's last token.
        """
        embeds, attention_mask = inputs.embeds, inputs.mask
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("greedy decoding needs every row to end on a real token (left-pack the inputs)")
        B = embeds.shape[0]
        cache = cache if cache is not None else new_cache(self.llm)
        padded = not bool(attention_mask.all())  # without padding the LLM may skip building a mask
        last = inputs.position_ids[:, -1]  # (B,) position of each row's latest token
        step: dict = {"inputs_embeds": embeds}
        if padded:
            step["attention_mask"] = attention_mask
        if self.positions:
            step["position_ids"] = inputs.position_ids
        alive = torch.arange(B)  # the original row of each batch row still decoding
        for _ in range(max_new_tokens):
            next_ids = self.next_tokens(step, cache)  # (b,)
            done = torch.tensor(
                [on_token(row, tok) for row, tok in zip(alive.tolist(), next_ids.tolist(), strict=True)],
                dtype=torch.bool,
            )
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:
                    return
                cache.batch_select_indices(keep.to(next_ids.device))
                alive, next_ids = alive[keep], next_ids[keep.to(next_ids.device)]
                attention_mask, last = attention_mask[keep], last[keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(alive), 1)], dim=1)
            last = last + 1
            step = {"input_ids": next_ids[:, None]}
            if padded:
                step["attention_mask"] = attention_mask
            if self.positions:
                step["position_ids"] = last[:, None]
