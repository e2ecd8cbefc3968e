"""transformers BLIP-2 checkpoints <-> blipkit: key maps and config translation.

Covers ``Blip2ForConditionalGeneration`` and ``Blip2ForImageTextRetrieval`` (transformers 5 key names).
Every source key is either mapped or listed in ``SKIPPED`` with its reason; anything else is a ``KeyError``
naming the key. The reverse map is the inverse of the forward one.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from blipkit.config import (
    Blip2Config,
    BridgeConfig,
    LLMConfig,
    PromptConfig,
    QFormerConfig,
    VisionConfig,
    check_type,
)
from blipkit.errors import ConfigError

_LAYER = re.compile(r"\.(\d+)\.")

# module paths (each carries .weight and .bias); "{}" is a layer index
_MODULES = {
    "vision_model.embeddings.patch_embedding": "vision.patch_embed",
    "vision_model.encoder.layers.{}.layer_norm1": "vision.blocks.{}.norm1",
    "vision_model.encoder.layers.{}.self_attn.qkv": "vision.blocks.{}.attn.qkv",  # fused; bias = [q, k, v]
    "vision_model.encoder.layers.{}.self_attn.projection": "vision.blocks.{}.attn.proj",
    "vision_model.encoder.layers.{}.layer_norm2": "vision.blocks.{}.norm2",
    "vision_model.encoder.layers.{}.mlp.fc1": "vision.blocks.{}.mlp.fc1",
    "vision_model.encoder.layers.{}.mlp.fc2": "vision.blocks.{}.mlp.fc2",
    "vision_model.post_layernorm": "vision.norm",
    "qformer.layernorm": "qformer.embed_norm",
    "qformer.encoder.layer.{}.attention.attention.query": "qformer.layers.{}.self_attn.q",
    "qformer.encoder.layer.{}.attention.attention.key": "qformer.layers.{}.self_attn.k",
    "qformer.encoder.layer.{}.attention.attention.value": "qformer.layers.{}.self_attn.v",
    "qformer.encoder.layer.{}.attention.output.dense": "qformer.layers.{}.self_attn.o",
    "qformer.encoder.layer.{}.attention.output.LayerNorm": "qformer.layers.{}.self_norm",
    "qformer.encoder.layer.{}.crossattention.attention.query": "qformer.layers.{}.cross_attn.q",
    "qformer.encoder.layer.{}.crossattention.attention.key": "qformer.layers.{}.cross_attn.k",
    "qformer.encoder.layer.{}.crossattention.attention.value": "qformer.layers.{}.cross_attn.v",
    "qformer.encoder.layer.{}.crossattention.output.dense": "qformer.layers.{}.cross_attn.o",
    "qformer.encoder.layer.{}.crossattention.output.LayerNorm": "qformer.layers.{}.cross_norm",
    "qformer.encoder.layer.{}.intermediate_query.dense": "qformer.layers.{}.query_ffn.fc1",
    "qformer.encoder.layer.{}.output_query.dense": "qformer.layers.{}.query_ffn.fc2",
    "qformer.encoder.layer.{}.output_query.LayerNorm": "qformer.layers.{}.query_ffn.norm",
    "qformer.encoder.layer.{}.intermediate.dense": "qformer.layers.{}.text_ffn.fc1",
    "qformer.encoder.layer.{}.output.dense": "qformer.layers.{}.text_ffn.fc2",
    "qformer.encoder.layer.{}.output.LayerNorm": "qformer.layers.{}.text_ffn.norm",
    "language_projection": "bridge",
    "vision_projection": "qformer.vision_proj",
    "text_projection": "qformer.text_proj",
    "itm_head": "qformer.itm_head",
}
_PARAMETERS = {
    "query_tokens": "qformer.query_tokens",
    "vision_model.embeddings.class_embedding": "vision.cls_token",
    "vision_model.embeddings.position_embedding": "vision.pos_embed",
    "embeddings.word_embeddings.weight": "qformer.word_embeddings.weight",
    "embeddings.position_embeddings.weight": "qformer.position_embeddings.weight",
}
HF_TO_BLIPKIT: dict[str, str] = {
    **_PARAMETERS,
    **{f"{src}.{p}": f"{dst}.{p}" for src, dst in _MODULES.items() for p in ("weight", "bias")},
}
BLIPKIT_TO_HF: dict[str, str] = {v: k for k, v in HF_TO_BLIPKIT.items()}
SKIPPED = {
    "embeddings.position_ids": "constant buffer (arange), rebuilt by the model",
}
PREFIXES = {"language_model.": "llm."}  # whole sub-models, kept in transformers' own names

# one unambiguous key per format
_TELLTALES = {
    "qformer.encoder.layer.0.attention.attention.query.weight": "transformers",
    "Qformer.bert.encoder.layer.0.attention.self.query.weight": "lavis",
    "qformer.layers.0.self_attn.q.weight": "blipkit",
}


def detect_format(state_dict: dict[str, Any]) -> str:
    for key, fmt in _TELLTALES.items():
        if key in state_dict:
            return fmt
    raise ValueError(
        f"unrecognised checkpoint: none of {sorted(_TELLTALES)} among its {len(state_dict)} keys"
    )


def _template(key: str) -> tuple[str, list[str]]:
    """'a.3.b' -> ('a.{}.b', ['3'])."""
    return _LAYER.sub(".{}.", key), _LAYER.findall(key)


def _rename(
    key: str, table: dict[str, str], prefixes: dict[str, str], skipped: dict[str, str] = SKIPPED
) -> str | None:
    for src, dst in prefixes.items():
        if key.startswith(src):
            return dst + key[len(src) :]
    template, indices = _template(key)
    if template in skipped or key in skipped:
        return None
    if template not in table:
        raise KeyError(f"unknown checkpoint key {key!r} (no mapping for {template!r})")
    return table[template].format(*indices)


def map_keys(
    state_dict: dict[str, Tensor],
    table: dict[str, str],
    prefixes: dict[str, str] = PREFIXES,
    skipped: dict[str, str] = SKIPPED,
) -> dict[str, Tensor]:
    """Rename by ``table`` (layer-index templates), pass ``prefixes`` through, drop ``skipped``; an unknown
    key is a ``KeyError`` naming it. Shared with the other Q-Former formats (``hf_instructblip``)."""
    out = {}
    for key, value in state_dict.items():
        new = _rename(key, table, prefixes, skipped)
        if new is not None:
            out[new] = value
    return out


def filter_hf(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers BLIP-2 state dict -> blipkit names."""
    return map_keys(state_dict, HF_TO_BLIPKIT)


def to_hf(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """blipkit state dict -> transformers BLIP-2 names (inverse of ``filter_hf``)."""
    inverse_prefixes = {v: k for k, v in PREFIXES.items()}
    return {_rename(k, BLIPKIT_TO_HF, inverse_prefixes): v for k, v in state_dict.items() if k not in FILLED}


# parameters that transformers' checkpoints do not store, filled from the blipkit config
FILLED = {"qformer.temp": "transformers' retrieval model keeps no ITC temperature: QFormerConfig.temperature"}


def fill_missing(state_dict: dict[str, Tensor], config: Blip2Config) -> dict[str, Tensor]:
    """Add the ``FILLED`` parameters a transformers checkpoint lacks (only where the model has them)."""
    import torch

    out = dict(state_dict)
    if config.qformer.text_path and "qformer.temp" not in out:
        out["qformer.temp"] = torch.tensor(config.qformer.temperature)
    return out


# --- configs ---------------------------------------------------------------------------------------------
_SUPPORTED_ACT = ("gelu",)


_REQUIRED = object()


class _Section:
    """An object of a transformers config.json; a missing or mistyped field is a ``ConfigError`` naming it."""

    def __init__(self, d: Any, lead: str, name: str = ""):
        check_type(dict, d, f"{lead}{name or 'the config'}")
        self.d, self.lead, self.name = d, lead, name

    def path(self, key: str) -> str:
        """``lead`` + the field's dotted name, for messages."""
        return self.lead + self._name(key)

    def _name(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def section(self, key: str) -> _Section:
        return _Section(self.get(key), self.lead, self._name(key))

    def get(self, key: str, hint: Any = Any, default: Any = _REQUIRED) -> Any:
        """The field's value (``default`` when it is missing or null)."""
        value = self.d.get(key)
        if value is None and default is not _REQUIRED:
            return default
        if key not in self.d:
            raise ConfigError(f"{self.path(key)} is missing")
        check_type(hint, value, self.path(key))
        return value


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> Blip2Config:
    """Translate a transformers ``Blip2Config`` dict (config.json) into a blipkit config."""
    top = _Section(hf, f"{source}: ")
    v, q, t = top.section("vision_config"), top.section("qformer_config"), top.section("text_config")
    for block in (v, q):
        act = block.get("hidden_act", str, "gelu")
        if act not in _SUPPORTED_ACT:
            raise ConfigError(f"{block.path('hidden_act')} {act!r} is not supported, only {_SUPPORTED_ACT}")
    if not v.get("qkv_bias", bool, True):
        raise ConfigError(f"{v.path('qkv_bias')}=false is not supported")
    retrieval = "Blip2ForImageTextRetrieval" in top.get("architectures", list[str], [])
    text_path = q.get("use_qformer_text_input", bool, retrieval)
    decoder_only = top.get("use_decoder_only_language_model", bool, True)
    llm_hidden = t.get("hidden_size", int, None) or t.get("d_model", int, None)
    if t.get("model_type", str, None) == "opt":
        llm_hidden = t.get("word_embed_proj_dim", int, None) or llm_hidden
    if llm_hidden is None and not retrieval:
        raise ConfigError(f"{t.path('hidden_size')} is missing")
    return Blip2Config(
        name="hf-blip2-retrieval" if retrieval else "hf-blip2",
        vision=VisionConfig(
            kind="eva",
            image_size=v.get("image_size", int, 224),
            patch_size=v.get("patch_size", int, 14),
            hidden_size=v.get("hidden_size", int),
            num_layers=v.get("num_hidden_layers", int),
            num_heads=v.get("num_attention_heads", int),
            intermediate_size=v.get("intermediate_size", int),
            layer_norm_eps=v.get("layer_norm_eps", float, 1e-6),
        ),
        qformer=QFormerConfig(
            hidden_size=q.get("hidden_size", int),
            num_layers=q.get("num_hidden_layers", int),
            num_heads=q.get("num_attention_heads", int),
            intermediate_size=q.get("intermediate_size", int),
            num_query_tokens=top.get("num_query_tokens", int, 32),
            cross_attention_frequency=q.get("cross_attention_frequency", int, 2),
            encoder_hidden_size=q.get("encoder_hidden_size", int, v.get("hidden_size", int)),
            vocab_size=q.get("vocab_size", int, 30522),
            max_position_embeddings=q.get("max_position_embeddings", int, 512),
            max_text_tokens=q.get("max_position_embeddings", int, 512),  # transformers cuts nothing short
            layer_norm_eps=q.get("layer_norm_eps", float, 1e-12),
            embed_dim=top.get("image_text_hidden_size", int, 256),
            text_path=text_path,
            lm_head=False,  # transformers' BLIP-2 models carry no ITG head
            pad_token_id=q.get("pad_token_id", int, 0),
        ),
        bridge=BridgeConfig(kind="linear", llm_hidden_size=llm_hidden),
        llm=LLMConfig(kind="none" if retrieval else "causal" if decoder_only else "seq2seq", hf_config=t.d),
        prompts=PromptConfig(vqa="Question: {} Answer:" if decoder_only else "Question: {} Short answer:"),
    )
