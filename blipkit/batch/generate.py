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

from blipkit.api import Model
from blipkit.models.greedy import GreedyDecoder, plain_greedy


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
        self.fast = num_beams == 1 and plain_greedy(model.model)  # the lean loop gives generate's tokens
        tok = model.tokenizer
        self.eos = tok.eos_token_id
        if self.fast:
            ids = tok(self.prompt, return_tensors="pt")["input_ids"]  # (1, T): the prompt tokens, BOS first
            self.prompt_ids = ids.to(model.device)
            self.decoder = GreedyDecoder(model.model.llm, greedy_head)

    def __call__(self, pixel_values: Tensor) -> list[str]:
        if not self.fast:
            prompts = [self.prompt] * pixel_values.shape[0]
            return self.model.generate(pixel_values, prompts, self.max_new_tokens, self.num_beams)
        tokens = self.greedy(pixel_values.to(self.model.device))
        return [t.strip() for t in self.model.tokenizer.batch_decode(tokens, skip_special_tokens=True)]

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
        out: list[list[int]] = [[] for _ in range(B)]

        def on_token(row: int, token: int) -> bool:
            if token == self.eos:
                return True
            out[row].append(token)
            return False

        # every row shares the prompt: no padding anywhere
        self.decoder.run(torch.cat([prefix, text], dim=1), self.max_new_tokens, on_token)
        return out
