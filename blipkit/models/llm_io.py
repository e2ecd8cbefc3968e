"""What goes into a frozen transformers LLM: the joined input embeddings, their mask and positions, and small
facts about LLM call signatures shared by the decoding paths."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import DynamicCache


def positions_from_mask(mask: Tensor) -> Tensor:
    """Position ids (B, L): each real token's count of real tokens before it; padding gets 0 (it is masked).

    The one position rule of blipkit: a row's visual prompt and text continue each other whatever padding
    sits before or between them, so left padding, right padding and a cached prefix give the same positions.
    """
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class LLMInputs:
    """The LLM's input sequence: [visual prompt; text] embeddings with their mask and position ids.

    ``prefix_len`` is the number of visual prompt positions at the front of every row (before any left
    packing). ``text_columns`` (optional) records where each text column of the caller's ``input_ids`` sits in
    the joined sequence, for layouts that splice the visual prompt inside the text (LLaVA: the image token's
    column points at the last image position, whose logits predict the next text token); None means the
    text follows the prefix, column t at ``prefix_len + t``.
    """

    embeds: Tensor  # (B, L, D)
    mask: Tensor  # (B, L) 1 on real tokens
    position_ids: Tensor  # (B, L)
    prefix_len: int  # Q
    packed: bool = False  # padding moved to the front (decoder-only generation)
    text_columns: Tensor | None = None  # (B, T) joined-sequence index of each text column

    def left_packed(self) -> LLMInputs:
        """The same rows with their padding moved to the front, keeping the order of real tokens."""
        order = torch.argsort(self.mask.to(torch.int8), dim=1, stable=True)  # zeros (padding) first
        embeds = self.embeds.gather(1, order[..., None].expand_as(self.embeds))
        mask = self.mask.gather(1, order)
        columns = None
        if self.text_columns is not None:  # where each old position went: the inverse permutation of order
            columns = torch.argsort(order, dim=1).gather(1, self.text_columns)
        return LLMInputs(embeds, mask, positions_from_mask(mask), self.prefix_len, True, columns)

    def text(self) -> LLMInputs:
        """The text columns alone, for an LLM whose key/value cache already holds the visual prompt; the mask
        still covers the cached positions, as the LLM's attention needs."""
        Q = self.prefix_len
        columns = None if self.text_columns is None else self.text_columns - Q
        return LLMInputs(self.embeds[:, Q:], self.mask, self.position_ids[:, Q:], 0, text_columns=columns)


def cache_keyword(module: nn.Module) -> str:
    """The keyword under which ``module`` takes its key/value cache (it changed within transformers 5.x)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def new_cache(llm: nn.Module) -> DynamicCache:
    """An empty key/value cache laid out for ``llm``'s decoder."""
    return DynamicCache(config=llm.config.get_text_config(decoder=True))


def takes(module: nn.Module, name: str) -> bool:
    """Whether ``module.forward`` has a parameter called ``name``."""
    return name in inspect.signature(module.forward).parameters


def generate_decoder_only(llm: nn.Module, inputs: LLMInputs, **kwargs) -> Tensor:
    """New tokens (B, N) from transformers' ``generate`` of a decoder-only ``llm`` after ``inputs`` (greedy,
    beams or sampling); the rows are left-packed first, as batched decoder-only generation needs."""
    packed = inputs if inputs.packed else inputs.left_packed()
    return llm.generate(inputs_embeds=packed.embeds, attention_mask=packed.mask, **kwargs)


def attach(llm: nn.Module) -> bool:
    """Prepare a frozen LLM for blipkit's calls (dense inputs to its output projection); returns whether its
    forward takes ``position_ids``."""
    head = llm.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(dense_inputs)
    return takes(llm, "position_ids")


def dense_inputs(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: tensor inputs made contiguous. Generation feeds the output projection a strided slice
    (the last position of each row); on CPU a bf16 matmul with such an input copies the whole weight matrix
    per call, about 100x slower than the same product on a dense input."""
    return tuple(a.contiguous() if isinstance(a, Tensor) else a for a in args)
