"""transformers LLaVA checkpoints (``LlavaForConditionalGeneration``, llava-hf layout) -> blipkit ``Llava``.

Key layouts found on disk (``save_pretrained`` of transformers 5 writes the legacy top-level names back):

    transformers 4.x (llava-hf/llava-1.5-7b-hf)   transformers 5.x save          5.x in memory
    vision_tower.vision_model.*                   vision_tower.*                 model.vision_tower.*
    multi_modal_projector.linear_{1,2}.*          multi_modal_projector.*        model.multi_modal_projector.*
    language_model.model.*                        language_model.model.*         model.language_model.*
    language_model.lm_head.weight                 language_model.lm_head.weight  lm_head.weight

They map onto blipkit's ``vision.model.*`` (the transformers 5 vision model), ``projector.linear_{1,2}.*``
and ``llm.*`` (the transformers causal LM, in its own names). Every source key is mapped or listed in
``SKIPPED`` with its reason; anything else is a ``CheckpointError`` naming it. Loading is strict: each part
is checked for missing, unexpected and mis-shaped keys before anything is copied.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from blipkit.config import LLMConfig, check_type
from blipkit.errors import CheckpointError, ConfigError
from blipkit.models import towers
from blipkit.models.llava import Llava, LlavaConfig, ProjectorConfig
from blipkit.models.towers import TowerConfig, VisionTower, build_tower
from blipkit.parts import build_llm, check_remote_code, load_tokenizer, read_config
from blipkit.processing import ImageProcessor
from blipkit.state_dicts import check_state_dict, read_state_dict

ARCHITECTURE = "LlavaForConditionalGeneration"
VISION_MODEL_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip", "dinov2": "dinov2"}

# source prefix -> blipkit prefix, first match wins; "{base}" is the causal LM's base_model_prefix ("model")
PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_model.", "vision.model."),
    ("model.vision_tower.", "vision.model."),
    ("vision_tower.vision_model.", "vision.model."),
    ("vision_tower.", "vision.model."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
    ("model.language_model.", "llm.{base}."),  # the base model alone
    ("language_model.", "llm."),  # the whole causal LM
    ("lm_head.", "llm.lm_head."),
)
# key endings dropped on purpose, with the reason
SKIPPED = {
    **{f"vision.model.{k}": why for k, why in towers.SKIPPED.items()},
    "rotary_emb.inv_freq": "rotary frequencies that older transformers saved; the LLM rebuilds them",
}


def detect(raw: dict[str, Any]) -> bool:
    """Whether a config.json is a transformers LLaVA one (not the original repo's: it shares model_type)."""
    if "mm_vision_tower" in raw:
        return False
    archs = raw.get("architectures") or []
    return ARCHITECTURE in archs or (
        raw.get("model_type") == "llava" and "vision_config" in raw and "text_config" in raw
    )


# --- keys ---------------------------------------------------------------------------------------------------
def _skipped(new: str) -> bool:
    return any(new == k or new.endswith("." + k) for k in SKIPPED)


def filter_hf(state_dict: dict[str, Tensor], base_prefix: str = "model") -> dict[str, Tensor]:
    """transformers LLaVA state dict (any layout above) -> blipkit names; ``base_prefix`` is the causal LM's
    ``base_model_prefix`` (where ``model.language_model.*`` goes)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        for src, dst in PREFIXES:
            if key.startswith(src):
                new = dst.format(base=base_prefix) + key[len(src) :]
                break
        else:
            raise CheckpointError(
                f"unknown checkpoint key {key!r}: not under any of {[p for p, _ in PREFIXES]}"
            )
        if _skipped(new):
            continue
        if new in out:
            raise CheckpointError(f"checkpoint key {key!r} duplicates another one ({new!r} in blipkit names)")
        out[new] = value
    return out


# --- configs ------------------------------------------------------------------------------------------------
_REQUIRED = object()


def get_field(d: dict[str, Any], key: str, hint: Any, default: Any = _REQUIRED, where: str = "") -> Any:
    """``d[key]`` checked against ``hint``; missing (or null) is ``default``, or a ConfigError naming it."""
    value = d.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"{where}{key} is missing")
        return default
    check_type(hint, value, f"{where}{key}")
    return value


def causal_lm_type(text_config: dict[str, Any], where: str) -> str:
    """The text config's model_type, checked to be a causal LM transformers knows."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = get_field(
        text_config, "model_type", str, "llama", where
    )  # transformers' LlavaConfig default
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(
            f"{where}model_type {model_type!r} is not a causal language model transformers knows"
        )
    return model_type


def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> LlavaConfig:
    """Translate a transformers ``LlavaConfig`` dict (config.json) into a blipkit ``LlavaConfig``.

    Fields transformers gives a default (``vision_feature_layer`` -2, ``vision_feature_select_strategy``
    "default", ``projector_hidden_act`` "gelu", ``multimodal_projector_bias`` true) take it here too.
    """
    lead = f"{source}: "
    check_type(dict, raw, f"{lead}the config")
    vision = get_field(raw, "vision_config", dict, where=lead)
    text = dict(get_field(raw, "text_config", dict, where=lead))
    v_lead = f"{lead}vision_config."
    v_type = get_field(vision, "model_type", str, "clip_vision_model", v_lead)  # transformers' default
    if v_type not in VISION_MODEL_TYPES:
        raise ConfigError(
            f"{v_lead}model_type {v_type!r} is not supported; expected one of {sorted(VISION_MODEL_TYPES)}"
        )
    kind = VISION_MODEL_TYPES[v_type]
    text["model_type"] = causal_lm_type(text, f"{lead}text_config.")
    index = raw.get("image_token_index", raw.get("image_token_id"))
    if index is None:
        raise ConfigError(f"{lead}image_token_index (or image_token_id) is missing")
    check_type(int, index, f"{lead}image_token_index")
    layer = get_field(raw, "vision_feature_layer", int | list[int], -2, lead)
    if isinstance(layer, list) and not layer:
        raise ConfigError(f"{lead}vision_feature_layer must not be an empty list")
    if kind == "dinov2":  # transformers' -1 is the last block before the final LayerNorm: absolute indices
        layer = _absolute_layers(layer, get_field(vision, "num_hidden_layers", int, 12, v_lead))
    select = get_field(raw, "vision_feature_select_strategy", str, "default", lead)
    if select not in towers.SELECTS:
        raise ConfigError(
            f"{lead}vision_feature_select_strategy {select!r} is not supported; expected one of "
            f"{list(towers.SELECTS)}"
        )
    if select == "default" and kind == "siglip":
        raise ConfigError(
            f"{lead}vision_feature_select_strategy 'default' with a SigLIP tower is not supported: SigLIP "
            "has no CLS token, and transformers would drop its first patch instead"
        )
    from transformers.activations import ACT2FN

    act = get_field(raw, "projector_hidden_act", str, "gelu", lead)
    if act not in ACT2FN:
        raise ConfigError(f"{lead}projector_hidden_act {act!r} is not an activation transformers knows")
    return LlavaConfig(
        name="hf-llava",
        vision=TowerConfig(kind=kind, hf_config={**vision, "model_type": v_type}),
        feature_layer=layer,
        select=select,
        projector=ProjectorConfig(
            kind="mlp2x_gelu", act=act, bias=get_field(raw, "multimodal_projector_bias", bool, True, lead)
        ),
        image_token_index=index,
        llm=LLMConfig(kind="causal", hf_config=text),
    )


# --- building -----------------------------------------------------------------------------------------------
def _causal_lm(hf_config: dict[str, Any]) -> tuple[Any, type]:
    """(transformers config, causal LM class) of a text config dict."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

    config = AutoConfig.for_model(**hf_config)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ConfigError(
            f"text config model_type {config.model_type!r} has no causal LM class in transformers"
        )
    return config, MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def base_model_prefix(cfg: LlavaConfig) -> str:
    """Where the causal LM keeps its base model (``model`` for Llama, Mistral, Qwen2, ...)."""
    return _causal_lm(cfg.llm.hf_config or {})[1].base_model_prefix


def check_llm_state_dict(hf_config: dict[str, Any], state_dict: dict[str, Tensor], where: str) -> None:
    """Strict names and shapes of a causal LM's state dict (a weight tied to another may be absent)."""
    config, cls = _causal_lm(hf_config)
    with torch.device("meta"):
        llm = cls._from_config(config)
    tied = set(getattr(llm, "all_tied_weights_keys", None) or {})
    expected = {k: v for k, v in llm.state_dict().items() if k in state_dict or k not in tied}
    check_state_dict(expected, state_dict, where)


def resolve_tower(ref: str, base: Path | None = None) -> Path:
    """A vision tower reference: a local dir (a relative one is tried from ``base`` first) or a hub id,
    resolved through ``blipkit.hub``."""
    p = Path(ref).expanduser()
    if base is not None and not p.is_absolute() and (base / p).is_dir():
        return base / p
    if p.is_dir():
        return p
    from blipkit import hub

    if hub.is_hub_id(ref):
        return hub.snapshot(ref)
    raise CheckpointError(f"vision tower {ref!r} is neither a local directory nor a hub id")


def _parts(state_dict: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    prefixes = {"vision": "vision.model.", "projector": "projector.", "llm": "llm."}
    parts: dict[str, dict[str, Tensor]] = {name: {} for name in prefixes}
    unknown = []
    for key, value in state_dict.items():
        for name, prefix in prefixes.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix) :]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"checkpoint: unexpected keys {sorted(unknown)}")
    return parts


def build_vision(
    cfg: LlavaConfig, state_dict: dict[str, Tensor], dtype: torch.dtype, base: Path | None
) -> VisionTower:
    """The tower from the checkpoint's own weights, else from ``cfg.vision.pretrained``."""
    spec = cfg.vision
    common = {"dtype": dtype, "feature_layer": cfg.feature_layer, "select": cfg.select}
    if state_dict:
        if spec.hf_config is None:
            raise ConfigError("vision.hf_config is needed to build the tower from the checkpoint's weights")
        return build_tower(spec.kind, hf_config=spec.hf_config, state_dict=state_dict, **common)
    if not spec.pretrained:
        raise CheckpointError("checkpoint: no vision tower weights (vision_tower.*) and no vision.pretrained")
    return build_tower(spec.kind, source=resolve_tower(spec.pretrained, base), **common)


# where each part's keys come from in a transformers LLaVA checkpoint, for messages
SOURCES = {"llm": "language_model.*", "projector": "multi_modal_projector.*"}


def build_model(
    cfg: LlavaConfig,
    state_dict: dict[str, Tensor],
    dtype: torch.dtype = torch.float32,
    base: Path | None = None,
    trust_remote_code: bool = False,
    sources: dict[str, str] = SOURCES,
) -> Llava:
    """A ``Llava`` from its config and a blipkit-named state dict (``vision.model.*`` optional when
    ``cfg.vision.pretrained`` names the tower), every part loaded strictly; ``sources`` names where the
    ``llm`` and ``projector`` keys come from, in messages."""
    parts = _parts(state_dict)
    vision = build_vision(cfg, parts["vision"], dtype, base)
    if not parts["llm"]:
        raise CheckpointError(f"checkpoint: no language model weights ({sources['llm']})")
    check_llm_state_dict(
        cfg.llm.hf_config or {}, parts["llm"], f"checkpoint, language model ({sources['llm']})"
    )
    llm = build_llm(cfg.llm, parts["llm"], base, dtype, trust_remote_code)
    with torch.device("meta"):  # only the projector is new; it is filled below
        model = Llava(cfg, vision, llm)
    expected = model.projector.state_dict()
    check_state_dict(expected, parts["projector"], f"checkpoint, projector ({sources['projector']})")
    model.projector.load_state_dict(parts["projector"], strict=True, assign=True)
    model.projector.to(dtype)
    return model.eval()


# --- tokenizer, template and processor ----------------------------------------------------------------------
def chat_template(path: Path) -> str | None:
    """The chat template a processor dir ships beside its tokenizer (chat_template.jinja / .json, or in
    processor_config.json), if any."""
    jinja = path / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    for name in ("chat_template.json", "processor_config.json"):
        file = path / name
        if file.exists():
            d = json.loads(file.read_text())
            if isinstance(d, dict) and isinstance(d.get("chat_template"), str):
                return d["chat_template"]
    return None


def template_for(tokenizer: Any, path: Path) -> str:
    """ "tokenizer" when the tokenizer (or its processor dir) has a chat_template, else "llava_v1"; a
    template found only in the processor's files is given to the tokenizer."""
    if getattr(tokenizer, "chat_template", None):
        return "tokenizer"
    found = chat_template(path)
    if found:
        tokenizer.chat_template = found
        return "tokenizer"
    return "llava_v1"


def image_processor(path: Path) -> ImageProcessor:
    """The ``ImageProcessor`` of a transformers dir (preprocessor_config.json, or processor_config.json)."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        file = path / name
        if file.exists():
            d = json.loads(file.read_text())
            d = d.get("image_processor", d) if isinstance(d, dict) else d
            if not isinstance(d, dict):
                raise ConfigError(f"{file}: not an image processor config")
            return ImageProcessor.from_hf_dict(d)
    raise ConfigError(f"{path}: no preprocessor_config.json (the image processor's settings)")


def load(
    path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[Llava, Any, ImageProcessor]:
    """A transformers LLaVA ``save_pretrained`` dir -> (``Llava``, tokenizer, ``ImageProcessor``)."""
    path = Path(path)
    cfg = config_from_hf(read_config(path / "config.json"), str(path / "config.json"))
    check_remote_code(path, trust_remote_code)
    state_dict = filter_hf(read_state_dict(path), base_model_prefix(cfg))
    processor = image_processor(path)
    model = build_model(cfg, state_dict, dtype, path, trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code)
    cfg.template = template_for(tokenizer, path)
    cfg.processor = processor.to_dict()
    return model, tokenizer, processor


def _absolute_layers(layer: int | list[int], depth: int) -> int | list[int]:
    """``hidden_states`` indices (``depth`` + 1 of them) with negative ones counted from the end, for a
    tower where blipkit's -1 would mean the output after the final LayerNorm."""
    if isinstance(layer, list):
        return [i if i >= 0 else depth + 1 + i for i in layer]
    return layer if layer >= 0 else depth + 1 + layer
