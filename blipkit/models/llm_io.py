"""Small facts about transformers LLM call signatures, shared by the decoding loops."""

from __future__ import annotations

import inspect

from torch import nn
from transformers import DynamicCache


def cache_keyword(module: nn.Module) -> str:
    """The keyword under which ``module`` takes its key/value cache (it changed within transformers 5.x)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def new_cache(llm: nn.Module) -> DynamicCache:
    """An empty key/value cache laid out for ``llm``'s decoder."""
    return DynamicCache(config=llm.config.get_text_config(decoder=True))


def takes(module: nn.Module, name: str) -> bool:
    """Whether ``module.forward`` has a parameter called ``name``."""
    return name in inspect.signature(module.forward).parameters
