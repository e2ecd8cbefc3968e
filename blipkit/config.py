"""Dataclass configs. Named architectures live as JSON files in ``blipkit/configs/`` (file stem = name).

A model config has five blocks, each unpacked into its dataclass; an unknown key, or a value whose JSON type
does not fit the field's annotation, is a ``ConfigError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blipkit.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class VisionConfig:
    """The frozen image encoder.

    ``kind``: "eva" (BLIP-2's EVA ViT, weights in the checkpoint, built from the fields below) or a
    transformers tower in ``pretrained`` (``blipkit.models.towers``): "dinov2" (``Dinov2Model``), "clip"
    (``CLIPModel`` / ``CLIPVisionModel``), "siglip" (``SiglipModel`` / ``SiglipVisionModel``).

    Which features the Q-Former reads (towers only; "eva" is read at its last built block, after its final
    LayerNorm): ``feature_layer`` indexes transformers' ``hidden_states`` (0 = the embeddings, i = the output
    of block i, never the post-LayerNorm; -1 = the last block, except that DINOv2 at -1 is read after its
    final LayerNorm, ``last_hidden_state``). BLIP-2's rule is the second-to-last block: its EVA ViT-g drops
    the last of its 40 blocks (``num_layers`` 39), so a full CLIP / SigLIP tower in BLIP-2's place reads
    ``feature_layer: -2`` (as LLaVA-1.5 does). ``select``: "full" keeps every token, [CLS] first where the
    tower has one (the Q-Former's cross-attention reads them all, as BLIP-2's does); "default" drops the
    [CLS] (LLaVA's "patch" features; SigLIP has no [CLS], so both give the patches).
    """

    kind: str = "eva"  # "eva" | "dinov2" | "clip" | "siglip"
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1408  # ViT-g
    num_layers: int = 39  # ViT-g has 40 blocks; BLIP-2 drops the last one
    num_heads: int = 16
    intermediate_size: int = 6144
    layer_norm_eps: float = 1e-6
    pretrained: str | None = None  # an asset name ("asset:dinov2-s14") or a transformers dir (eva: BLIP-2's)
    feature_layer: int = -1  # towers: the hidden_states index read (-2: BLIP-2's second-to-last block)
    select: str = "full"  # towers: "full" ([CLS] + patches) or "default" (patches only, as LLaVA)


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
    max_text_tokens: int = 64  # texts are cut to this many tokens (as in training); <= max positions
    layer_norm_eps: float = 1e-12
    embed_dim: int = 256  # ITC space
    text_path: bool = True  # word/position embeddings and the text FFN: the Q-Former reads text
    retrieval_heads: bool = True  # ITC/ITM heads + temperature; need text_path (InstructBLIP has none)
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
    def from_dict(cls, d: Any, source: str | None = None) -> Blip2Config:
        """Build from a JSON-like dict; ``source`` (e.g. the file's path) starts every error message."""
        return _build(cls, d, f"{source}: " if source else "", "")

    @classmethod
    def from_json(cls, path: str | Path) -> Blip2Config:
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))


def _show(value: Any) -> str:
    """A value as the config file spells it (null, true, 'text', [1, 2])."""
    return json.dumps(value) if value is None or isinstance(value, bool) else repr(value)


def type_matches(hint: Any, value: Any) -> bool:
    """Whether a JSON value fits a type annotation (bool is not an int; an int is a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(type_matches(a, value) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if dataclasses.is_dataclass(hint) or origin is dict or hint is dict:
        key, val = args or (Any, Any)
        return isinstance(value, dict) and all(
            type_matches(key, k) and type_matches(val, v) for k, v in value.items()
        )
    if origin in (list, tuple):
        item = args[0] if args else Any
        return isinstance(value, (list, tuple)) and all(type_matches(item, v) for v in value)
    return isinstance(value, origin or hint)


def type_name(hint: Any) -> str:
    """How an annotation reads in an error message: 'an int', 'a string or null', 'an object'."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(hint))
    if dataclasses.is_dataclass(hint) or hint is dict or typing.get_origin(hint) is dict:
        return "an object"
    names = {type(None): "null", bool: "true or false", int: "an int", float: "a number", str: "a string"}
    return names.get(hint, "a list" if typing.get_origin(hint) in (list, tuple) else str(hint))


def check_type(hint: Any, value: Any, where: str) -> None:
    """``ConfigError`` "where must be <type>, got <value>" unless ``value`` fits ``hint``."""
    if not type_matches(hint, value):
        raise ConfigError(f"{where} must be {type_name(hint)}, got {_show(value)}")


def config_from_dict(cls: type, d: Any, source: str | None = None) -> Any:
    """A config dataclass ``cls`` from a JSON-like dict, every field checked (``source`` starts messages)."""
    return _build(cls, d, f"{source}: " if source else "", "")


def _build(cls: type, d: Any, lead: str, prefix: str) -> Any:
    """A dataclass from a dict, every field checked against its annotation (blocks recursively)."""
    block = prefix.rstrip(".")
    check_type(dict, d, f"{lead}{block or 'the model config'}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(known))
    if unknown:
        where = f"'{block}' block" if block else "model config"
        raise ConfigError(f"{lead}unknown key(s) {unknown} in {where}; known: {sorted(known)}")
    kwargs = {}
    for key, value in d.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, lead, f"{prefix}{key}.")
        else:
            check_type(hint, value, f"{lead}{prefix}{key}")
            kwargs[key] = value
    return cls(**kwargs)


WEIGHTS_DIR = Path(__file__).parent / "weights"


def list_models() -> list[str]:
    """Names ``blipkit.load`` accepts on their own: the models shipped with their weights."""
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / "config.json").exists())


def describe_models() -> list[dict[str, Any]]:
    """Each name of ``list_models()`` with its family and capabilities, read from its config alone."""
    out = []
    for name in list_models():
        raw = json.loads((WEIGHTS_DIR / name / "config.json").read_text())
        cfg = raw.get("config", {})
        family = raw.get("family", "blip2")
        can = ["caption", "ask", "chat"]
        if family == "blip2":
            can = can if cfg.get("llm", {}).get("kind", "causal") != "none" else []
            q = cfg.get("qformer", {})
            if q.get("text_path", True) and q.get("retrieval_heads", True):
                can += ["embed", "match"]
        out.append({"name": name, "family": family, "capabilities": can})
    return out


def list_configs() -> list[str]:
    """Architectures shipped in ``blipkit/configs`` (for training; ``get_config(name)``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_config(name: str) -> Blip2Config:
    path = CONFIG_DIR / f"{name}.json"
    if not path.exists():
        raise ConfigError(f"unknown model config {name!r}; known: {list_configs()}")
    return Blip2Config.from_json(path)
