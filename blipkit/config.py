"""Dataclass configs. Named architectures live as JSON files in ``blipkit/configs/`` (file stem = name).

A model config has five blocks, each unpacked into its dataclass with ``**``; an unknown key is an error.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class VisionConfig:
    kind: str = (
        "eva"  # "eva": BLIP-2's EVA ViT (weights in the checkpoint); "dinov2": a transformers Dinov2Model
    )
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1408  # ViT-g
    num_layers: int = 39  # ViT-g has 40 blocks; BLIP-2 drops the last one
    num_heads: int = 16
    intermediate_size: int = 6144
    layer_norm_eps: float = 1e-6
    pretrained: str | None = None  # dinov2 only: an asset name ("asset:dinov2-s14") or a transformers dir


@dataclass
class QFormerConfig:
    hidden_size: int = 768  # bert-base
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    num_query_tokens: int = 32
    cross_attention_frequency: int = 2  # queries read the image in layers 0, k, 2k, ...
    encoder_hidden_size: int = 1408  # vision width (K/V input of cross-attention)
    vocab_size: int = 30523  # bert-base-uncased + the [DEC] token (LAVIS)
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    embed_dim: int = 256  # ITC space
    text_path: bool = True  # word/position embeddings, text FFN, ITC/ITM heads
    lm_head: bool = True  # ITG head (BERT LM head tied to the word embeddings); needs text_path
    pad_token_id: int = 0
    bos_token_id: int = 30522  # [DEC], the first token of ITG text
    cls_token_id: int = 101  # [CLS], the first token of ITC / ITM text
    temperature: float = 0.07  # initial ITC temperature (learnable)


@dataclass
class BridgeConfig:
    kind: str = "linear"  # "linear" (BLIP-2) or "mlp" (LLaVA: Linear -> GELU -> Linear)
    llm_hidden_size: int = 2560  # OPT-2.7b
    text_input: bool = (
        False  # the prompt's tokens join the Q-Former's self-attention (question-aware queries)
    )


@dataclass
class LLMConfig:
    kind: str = "causal"  # "causal" (AutoModelForCausalLM), "seq2seq" (AutoModelForSeq2SeqLM) or "none"
    pretrained: str | None = (
        None  # a transformers dir or asset name; None when the checkpoint carries the weights
    )
    hf_config: dict[str, Any] | None = None  # transformers text config, used when pretrained is None
    tokenizer: str | None = None  # where the tokenizer lives (defaults to pretrained / the checkpoint dir)
    max_context: int | None = None  # tokens the LLM can attend to (None: from its config)


@dataclass
class PromptConfig:
    caption: str | None = None  # prompt used by caption() when none is given
    vqa: str = "Question: {} Answer:"
    chat_separator: str = " "
    vqa_max_new_tokens: int = 10
    classify: str = "a photo of {}"  # zero-shot label template (measure per model: bench/retrieval_goals.py)


@dataclass
class Blip2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    processor: dict[str, Any] = field(default_factory=dict)  # ImageProcessor fields
    qformer_tokenizer: str | None = None  # tokenizer of the Q-Former text path (a dir or asset name)
    name: str = "blip2"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Blip2Config:
        blocks = {
            "vision": VisionConfig,
            "qformer": QFormerConfig,
            "bridge": BridgeConfig,
            "llm": LLMConfig,
            "prompts": PromptConfig,
        }
        _check_keys(cls, d, "model config")
        kwargs = {k: (blocks[k](**_checked(blocks[k], v, k)) if k in blocks else v) for k, v in d.items()}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> Blip2Config:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _check_keys(cls: type, d: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; known: {sorted(known)}")


def _checked(cls: type, d: dict[str, Any], where: str) -> dict[str, Any]:
    _check_keys(cls, d, f"'{where}' block")
    return d


def list_models() -> list[str]:
    """Names of the architecture configs shipped in ``blipkit/configs``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_config(name: str) -> Blip2Config:
    path = CONFIG_DIR / f"{name}.json"
    if not path.exists():
        raise KeyError(f"unknown model config {name!r}; known: {list_models()}")
    return Blip2Config.from_json(path)
