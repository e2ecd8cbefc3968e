"""The frozen parts every family's loader builds, and the references that name them: asset names and paths,
JSON configs, transformers LLMs and tokenizers (never running code a checkpoint ships unless trusted)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from blipkit.config import LLMConfig
from blipkit.errors import CheckpointError, ConfigError
from blipkit.state_dicts import read_state_dict

REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")  # where transformers finds an ``auto_map``


# --- resolving references -----------------------------------------------------------------------------------
def resolve(ref: str, base: Path | None = None) -> Path:
    """An asset name ("asset:NAME"), or a path (relative paths are taken from ``base`` first)."""
    if ref.startswith("asset:"):
        from blipkit import assets

        return assets.resolve(ref)
    p = Path(ref).expanduser()
    if not p.is_absolute() and base is not None and (base / p).exists():
        return base / p
    if not p.exists():
        raise FileNotFoundError(f"referenced weights not found: {ref!r}")
    return p


def read_config(file: Path) -> dict[str, Any]:
    """A JSON object from ``file``; anything else is a ``ConfigError`` naming the file."""
    try:
        d = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{file}: must hold a JSON object, got {type(d).__name__}")
    return d


def check_remote_code(path: Path, trust_remote_code: bool = False) -> None:
    """Refuse a transformers dir whose config names Python code of its own (``auto_map``) unless trusted.

    transformers would import that code, or ask on stdin whether to; this fails before it gets the chance.
    """
    if trust_remote_code:
        return
    for name in REMOTE_CODE_FILES:
        file = Path(path) / name
        try:
            d = json.loads(file.read_text())
        except (OSError, ValueError):
            continue  # absent, or not JSON: transformers reports it without running anything
        if isinstance(d, dict) and d.get("auto_map"):
            raise CheckpointError(
                f"{file} has an auto_map: loading it runs Python code shipped in {path}; it was not run. "
                "Pass trust_remote_code=True (CLI: --trust-remote-code) if you trust it"
            )


def _is_hf_blip2(path: Path) -> bool:
    cfg = path / "config.json"
    return cfg.exists() and "qformer_config" in read_config(cfg)


# --- language models ----------------------------------------------------------------------------------------
def _llm_class(cfg: LLMConfig, hf_config: Any) -> type:
    from transformers import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
    )

    causal = cfg.kind == "causal"
    mapping = MODEL_FOR_CAUSAL_LM_MAPPING if causal else MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING
    if type(hf_config) in mapping:
        return mapping[type(hf_config)]
    return AutoModelForCausalLM if causal else AutoModelForSeq2SeqLM  # a trusted dir's own classes


def build_llm(
    cfg: LLMConfig,
    state_dict: dict[str, Tensor] | None,
    base: Path | None,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
) -> nn.Module | None:
    """A frozen transformers LLM, from a dir, an asset, a transformers BLIP-2 dir or (config, state dict)."""
    if cfg.kind == "none":
        return None
    from transformers import AutoConfig

    trust = {"trust_remote_code": trust_remote_code}
    hf_config = None
    if state_dict is None:
        if not cfg.pretrained:
            raise CheckpointError("llm needs weights: llm.pretrained (a transformers dir or asset name)")
        source = resolve(cfg.pretrained, base)
        if not _is_hf_blip2(source):
            check_remote_code(source, trust_remote_code)
            cls = _llm_class(cfg, AutoConfig.from_pretrained(source, **trust))
            return cls.from_pretrained(source, dtype=dtype, **trust).eval().requires_grad_(False)
        hf_config = json.loads((source / "config.json").read_text())["text_config"]
        state_dict = read_state_dict(source, "language_model.")
    hf_config = dict(hf_config or cfg.hf_config or {})
    if not hf_config:
        raise CheckpointError("llm.hf_config is empty and no llm.pretrained is given")
    config = AutoConfig.for_model(**hf_config)
    cls = _llm_class(cfg, config)
    llm, info = cls.from_pretrained(
        None, config=config, state_dict=state_dict, dtype=dtype, output_loading_info=True, **trust
    )
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise CheckpointError(f"language model: {problems} {info.get('error_msgs') or ''}".strip())
    return llm.eval().requires_grad_(False)


# --- tokenizers ---------------------------------------------------------------------------------------------
def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    """A transformers tokenizer dir (refused when it ships code that is not trusted)."""
    from transformers import AutoTokenizer

    check_remote_code(path, trust_remote_code)
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
