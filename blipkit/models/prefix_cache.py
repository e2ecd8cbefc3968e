"""The LLM's keys and values over the visual prompt, computed once per image and reused for every question.

With a decoder-only LLM and a visual prompt that does not read the question (``bridge.text_input`` off), the
visual prompt always fills positions 0..Q-1 of the LLM sequence, so its keys and values in every layer are
the same whatever text follows. ``compute_prefix_kv`` computes them for new images; ``stack_kv`` puts the
cached rows of a batch into a fresh ``DynamicCache``, and ``blipkit.models.decoding`` runs the LLM over the
text tokens only, with this layout (left-padded text, padding between the prefix and the text)::

    [visual prompt, Q, from the cache][pad ..., mask 0][text]

Position ids come from the attention mask (``positions_from_mask``), so every row's prefix sits at 0..Q-1
and its text continues at Q whatever its length: learned positions (OPT) and rotary ones (Llama) see the same
positions as in the uncached layout ``[pad ...][visual prompt][text]`` of left-packed generation, and the
padding is masked out, so both give the same logits. Models outside that case (question-aware bridges,
encoder-decoder LLMs, LLMs whose cache is not a plain per-layer key/value store) are not served from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from blipkit.models.blip2 import Blip2
from blipkit.models.llm_io import cache_keyword, new_cache, takes

KV = tuple[tuple[Tensor, Tensor], ...]  # per LLM layer: (keys, values), each (n, H, Q, d)


def supports_prefix_kv(blip: Blip2) -> bool:
    """True when the visual prompt's keys/values can be cached: decoder-only LLM, a text-independent prompt
    at the front of the sequence (BLIP-2; LLaVA splices the image inside its template)."""
    if getattr(blip.config, "family", "blip2") != "blip2":
        return False
    if not blip.has_llm or blip.is_encoder_decoder or blip.config.bridge.text_input:
        return False
    gen = getattr(blip.llm, "generation_config", None)
    return getattr(gen, "cache_implementation", None) is None  # generate refuses a cache object otherwise


@torch.inference_mode()
def compute_prefix_kv(llm: nn.Module, prefix: Tensor) -> KV | None:
    """Keys/values of every LLM layer over ``prefix`` (n, Q, D) at positions 0..Q-1.

    None when the LLM's cache is not a plain per-layer store of all Q positions (linear attention, shared
    layers, a sliding window shorter than Q): such models cannot reuse a cached prefix.
    """
    n, Q = prefix.shape[:2]
    cache = new_cache(llm)
    mask = torch.ones(n, Q, dtype=torch.long, device=prefix.device)
    kwargs: dict[str, Any] = {cache_keyword(llm): cache}
    if takes(llm, "position_ids"):
        kwargs["position_ids"] = torch.arange(Q, device=prefix.device)[None].expand(n, -1)
    if takes(llm, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1  # the logits are not needed: project one position only
    llm(inputs_embeds=prefix, attention_mask=mask, use_cache=True, **kwargs)
    layers = getattr(cache, "layers", [])
    plain = (DynamicLayer, DynamicSlidingWindowLayer)
    if not layers or any(type(layer) not in plain or layer.keys.shape[-2] != Q for layer in layers):
        return None
    return tuple((layer.keys, layer.values) for layer in layers)


def row_kv(kv: KV, i: int) -> KV:
    """Row ``i`` of a batched ``kv`` as its own tensors (1, H, Q, d), sharing no storage with the batch."""
    return tuple((k[i : i + 1].clone(), v[i : i + 1].clone()) for k, v in kv)


def stack_kv(llm: nn.Module, rows: Sequence[KV]) -> DynamicCache:
    """A fresh batch cache holding ``rows`` in order; generation grows it, never the rows themselves."""
    cache = new_cache(llm)
    for i, layer in enumerate(zip(*rows, strict=True)):  # layer: one (keys, values) per row
        cache.update(torch.cat([k for k, _ in layer]), torch.cat([v for _, v in layer]), i)  # (B, H, Q, d)
    return cache
