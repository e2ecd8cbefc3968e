"""Batched captioning of preprocessed images, through the model's one decoding path.

Every row of a batch shares one prompt, so no row is padded; greedy batches take the lean loop (a row that
emits EOS leaves the batch at once) wherever it gives transformers' tokens: ``blipkit.models.decoding``
decides. ``Captioner.stream`` also lets the next images take the slots of finished ones.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

from torch import Tensor

from blipkit.api import Model
from blipkit.batch.decode import Batch
from blipkit.models.decoding import Decoder, Sampling
from blipkit.text import Prompt


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

    def stream(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, list[str]]]:
        """Each batch with the captions of its readable images, in order. Batches are read as decoding needs
        them: greedy captions are batched continuously, an image taking the slot of one that finished."""
        read: deque[Batch] = deque()

        def inputs() -> Iterator[tuple[Tensor | None, list[Prompt]]]:
            for batch in batches:
                read.append(batch)
                yield batch.pixels, [self.prompt] * (0 if batch.pixels is None else batch.pixels.shape[0])

        done = self.model.complete_batches(inputs(), self.max_new_tokens, self.sampling, decoder=self.decoder)
        for tokens in done:
            yield read.popleft(), [self.model.text.decode(t) for t in tokens]

    def tokens(self, pixel_values: Tensor) -> list[list[int]]:
        """New token ids per image, EOS excluded."""
        prompts = [self.prompt] * pixel_values.shape[0]
        return self.model.complete(
            pixel_values, prompts, self.max_new_tokens, self.sampling, decoder=self.decoder
        )
