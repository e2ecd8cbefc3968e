"""A frozen LLM on its own, reading text only: the language side of the caption-then-LLM bridge.

It has the generation calls of the family contract (``blipkit.models.family``), so the one decoder
(``blipkit.models.decoding``) runs it: ``text_inputs(ids, mask) -> LLMInputs`` with no visual prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from blipkit.config import PromptConfig
from blipkit.models.llm_io import LLMInputs, attach, generate_decoder_only, positions_from_mask


@dataclass
class CaptionBridgeConfig:
    """The caption-then-LLM bridge: what captions the image, which LLM reads it, in which template."""

    captioner: str = "default"  # a model name/dir/hub id, or "asset:efficientnet-lite0" (a photo tagger)
    llm: str | None = None  # a transformers LLM dir or asset; None: the captioner's own LLM
    template: str = "tokenizer"  # the LLM tokenizer's chat_template where it has one, else "blip2"
    prompts: PromptConfig = field(default_factory=PromptConfig)
    processor: dict[str, Any] = field(default_factory=dict)
    name: str = "caption-then-llm"
    family: str = "caption"


class TextLLM(nn.Module):
    """A frozen causal or encoder-decoder LLM fed token embeddings of text alone."""

    capabilities = frozenset({"caption", "ask", "chat"})
    question_aware = False
    num_visual_tokens = 0

    def __init__(self, config: CaptionBridgeConfig, llm: nn.Module):
        super().__init__()
        self.config = config
        self.llm = llm.eval().requires_grad_(False)
        self.is_encoder_decoder = bool(getattr(llm.config, "is_encoder_decoder", False))
        self._llm_takes_positions = attach(llm)

    @property
    def has_llm(self) -> bool:
        return True

    def require_llm(self) -> None:
        """The bridge always has its language model."""

    def text_inputs(self, input_ids: Tensor, attention_mask: Tensor) -> LLMInputs:
        """Embeddings (B, T, Dl), mask and positions of right-padded text."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        return LLMInputs(embeds, attention_mask, positions_from_mask(attention_mask), 0)

    @torch.no_grad()
    def hf_generate(self, inputs: LLMInputs, **kwargs: Any) -> Tensor:
        """New tokens (B, N) from transformers' ``generate`` (see ``Blip2.hf_generate``)."""
        if self.is_encoder_decoder:
            return self.llm.generate(inputs_embeds=inputs.embeds, attention_mask=inputs.mask, **kwargs)[:, 1:]
        return generate_decoder_only(self.llm, inputs, **kwargs)
