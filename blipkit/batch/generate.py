"""Batched captioning of preprocessed images: a lean greedy loop over the LLM with a KV cache.

Every row of a batch shares one prompt, so no row is padded; a row that emits EOS is dropped from the batch
(and from the cache) at once. Where it is exact and pays, the next token comes from a ``GreedyHead`` (a bf16
pass over the vocabulary, checked in fp32) instead of the full fp32 output projection. Beam search,
sampling, encoder-decoder LLMs and checkpoints whose generation config asks for logit processing go through
``Model.generate`` instead.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache

from blipkit.api import Model
from blipkit.models.greedy_head import greedy_head_for
from blipkit.models.llm_io import cache_keyword, takes

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


def plain_greedy_ok(model: Model, num_beams: int) -> bool:
    """True when the lean loop gives exactly what transformers' greedy ``generate`` would."""
    blip = model.model
    if num_beams != 1 or not blip.has_llm or blip.is_encoder_decoder:
        return False
    gen = getattr(blip.llm, "generation_config", None)
    return gen is None or all(getattr(gen, k, None) in ok for k, ok in _NEUTRAL.items())


class Captioner:
    """Captions (B, 3, S, S) pixel batches with ``model``; greedy batches take the lean loop."""

    def __init__(
        self,
        model: Model,
        prompt: str | None = None,
        max_new_tokens: int = 30,
        num_beams: int = 1,
        greedy_head: bool = True,
    ):
        model._require_llm()
        self.model = model
        self.prompt = prompt if prompt is not None else (model.config.prompts.caption or "")
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.fast = plain_greedy_ok(model, num_beams)
        tok = model.tokenizer
        self.eos = tok.eos_token_id
        if self.fast:
            ids = tok(self.prompt, return_tensors="pt")["input_ids"]  # (1, T): the prompt tokens, BOS first
            self.prompt_ids = ids.to(model.device)
            llm = model.model.llm
            self.head = greedy_head_for(llm) if greedy_head else None  # None: argmax of the LLM's logits
            self._body = llm.base_model if self.head is not None else llm
            self._cache_arg = cache_keyword(self._body)
            self._positions = takes(self._body, "position_ids")

    def __call__(self, pixel_values: Tensor) -> list[str]:
        if not self.fast:
            prompts = [self.prompt] * pixel_values.shape[0]
            return self.model.generate(pixel_values, prompts, self.max_new_tokens, self.num_beams)
        tokens = self.greedy(pixel_values.to(self.model.device))
        return [t.strip() for t in self.model.tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    def _next_tokens(self, step_in: dict, cache: DynamicCache) -> Tensor:
        """The greedy next token of every row (b,), the cache grown by this step's positions."""
        kwargs = {**step_in, self._cache_arg: cache, "use_cache": True}
        if self.head is None:
            return self._body(**kwargs, logits_to_keep=1).logits[:, -1].argmax(-1)
        return self.head(self._body(**kwargs)[0][:, -1])  # base model's last hidden state (b, D)

    @torch.inference_mode()
    def greedy(self, pixel_values: Tensor) -> list[list[int]]:
        """New token ids per image, EOS excluded."""
        blip, llm = self.model.model, self.model.model.llm
        B = pixel_values.shape[0]
        kw = {}
        if blip.config.bridge.text_input:
            kw = self.model._qformer_text([self.prompt] * B)
        prefix = blip._prefix(pixel_values, **kw)  # (B, Q, Dl)
        text = llm.get_input_embeddings()(self.prompt_ids).expand(B, -1, -1)  # (B, T, Dl)
        embeds = torch.cat([prefix, text], dim=1)  # (B, L, Dl), no padding anywhere
        L = embeds.shape[1]
        cache = DynamicCache(config=llm.config)
        out: list[list[int]] = [[] for _ in range(B)]
        alive = torch.arange(B)  # original row of each batch row still generating
        step_in: dict = {"inputs_embeds": embeds}
        for step in range(self.max_new_tokens):
            if self._positions:  # step 0 reads positions 0..L-1, step s >= 1 one token at L + s - 1
                start, n = (0, L) if step == 0 else (L + step - 1, 1)
                pos = torch.arange(start, start + n, device=embeds.device)
                step_in["position_ids"] = pos[None].expand(len(alive), -1)
            next_ids = self._next_tokens(step_in, cache)  # (b,)
            finished = (
                next_ids == self.eos if self.eos is not None else torch.zeros_like(next_ids, dtype=bool)
            )
            for row, tok, fin in zip(alive.tolist(), next_ids.tolist(), finished.tolist(), strict=True):
                if not fin:
                    out[row].append(tok)
            if bool(finished.any()):
                keep = (~finished).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                cache.batch_select_indices(keep)
                alive, next_ids = alive[keep.cpu()], next_ids[keep]
            step_in = {"input_ids": next_ids[:, None]}
        return out
