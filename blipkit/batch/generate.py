"""Batched captioning of preprocessed images, through the model's one decoding path.

Every row of a batch shares one prompt, so no row is padded; greedy batches take the lean loop (a row that
emits EOS leaves the batch at once) wherever it gives transformers' tokens: ``blipkit.models.decoding``
decides.
"""

from __future__ import annotations

from torch import Tensor

from blipkit.api import Model
from blipkit.models.decoding import Decoder, Sampling


class Captioner:
    """Captions (B, 3, S, S) pixel batches with ``model``; ``greedy_head=False`` always projects the full
    vocabulary in the lean loop (for comparisons)."""

    def __init__(
        self,
        model: Model,
        prompt: str | None = None,
        max_new_tokens: int = 30,
        num_beams: int = 1,
        greedy_head: bool = True,
    ):
        model.require_llm()
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.sampling = Sampling(num_beams=num_beams)
        self.prompt = model.text.prompt(model.text.caption_prompt(prompt), max_new_tokens)  # tokenised once
        text = model.text
        self.decoder = (
            model.decoder if greedy_head else Decoder(model.model, text.eos_token_id, text.llm_pad_id, False)
        )

    def __call__(self, pixel_values: Tensor) -> list[str]:
        return [self.model.text.decode(t) for t in self.tokens(pixel_values)]

    def tokens(self, pixel_values: Tensor) -> list[list[int]]:
        """New token ids per image, EOS excluded."""
        prompts = [self.prompt] * pixel_values.shape[0]
        return self.model.complete(
            pixel_values, prompts, self.max_new_tokens, self.sampling, decoder=self.decoder
        )
