"""The original LLaVA repo's checkpoints (haotian-liu/LLaVA, e.g. ``liuhaotian/llava-v1.5-7b``) -> ``Llava``.

Such a dir holds the language model with the projector (``LlavaLlamaForCausalLM``): a Llama config.json plus
``mm_*`` fields, and the weights

    model.embed_tokens.weight, model.layers.*, model.norm.weight, lm_head.weight   the LLM (Llama names)
    model.mm_projector.{0,2}.{weight,bias}                                         mlp2x_gelu
    model.mm_projector.{weight,bias}                                               linear
    model.vision_tower.vision_tower.vision_model.*                                 only some fine-tunes

The vision tower is a separate CLIP dir named by ``mm_vision_tower`` (a hub id such as
``openai/clip-vit-large-patch14-336``, or a local path), read at ``mm_vision_select_layer`` with
``mm_vision_select_feature`` ("patch": no CLS, "cls_patch": with it); its preprocessor config is the image
processor, after ``expand2square`` when ``image_aspect_ratio`` is "pad". The tokenizer has no image token:
the prompt is split at "<image>" and ``IMAGE_TOKEN_INDEX`` (-200) goes between the pieces, so the model's
``image_token_index`` is -200. Conversations use the ``llava_v1`` template.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from blipkit.config import LLMConfig, check_type
from blipkit.convert.hf_llava import (
    build_model,
    causal_lm_type,
    get_field,
    image_processor,
    resolve_tower,
)
from blipkit.errors import CheckpointError, ConfigError
from blipkit.models import towers
from blipkit.models.llava import ORIGINAL_IMAGE_TOKEN_INDEX, Llava, LlavaConfig, ProjectorConfig
from blipkit.models.towers import TowerConfig
from blipkit.parts import check_remote_code, load_tokenizer, read_config
from blipkit.processing import ImageProcessor
from blipkit.state_dicts import read_state_dict

# architectures -> the transformers model_type of their language model (None: detected, not supported)
ARCHITECTURES = {
    "LlavaLlamaForCausalLM": "llama",
    "LlavaMistralForCausalLM": "mistral",
    "LlavaMptForCausalLM": None,
}
MODEL_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral", "llava_mpt": None}
SELECT_FEATURES = {"patch": "default", "cls_patch": "full"}
PROJECTORS = {"linear", "mlp2x_gelu"}

# the config fields of the LLaVA wrapper (not of its language model)
LLAVA_FIELDS = {
    "freeze_mm_mlp_adapter",
    "freeze_mm_vision_resampler",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "tune_mm_mlp_adapter",
    "tune_mm_vision_resampler",
    "unfreeze_mm_vision_tower",
    "use_mm_proj",
}

# source prefix -> blipkit prefix; the first match wins
PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.mm_projector.0.", "projector.linear_1."),
    ("model.mm_projector.2.", "projector.linear_2."),
    ("model.mm_projector.", "projector.linear_1."),  # linear: weight, bias
    ("model.vision_tower.vision_tower.vision_model.", "vision.model."),
    ("model.embed_tokens.", "llm.model.embed_tokens."),
    ("model.layers.", "llm.model.layers."),
    ("model.norm.", "llm.model.norm."),
    ("lm_head.", "llm.lm_head."),
)
TOWER_PREFIX = "model.vision_tower."
SKIPPED = {
    TOWER_PREFIX: "the vision tower is loaded from mm_vision_tower (unfreeze_mm_vision_tower is not set, so "
    "the original repo ignores these copies too)",
    "rotary_emb.inv_freq": "rotary frequencies that older transformers saved; the LLM rebuilds them",
    "embeddings.position_ids": "constant buffer (arange) that older transformers saved; rebuilt by the model",
}


def detect(raw: dict[str, Any]) -> bool:
    """Whether a config.json is the original repo's (``mm_vision_tower``, or a ``Llava*ForCausalLM``)."""
    archs = raw.get("architectures") or []
    return "mm_vision_tower" in raw or any(a in ARCHITECTURES for a in archs if isinstance(a, str))


# --- configs ------------------------------------------------------------------------------------------------
def _language_model_type(raw: dict[str, Any], lead: str) -> str:
    archs = [a for a in raw.get("architectures") or [] if a in ARCHITECTURES]
    if archs:
        name, model_type = archs[0], ARCHITECTURES[archs[0]]
    else:
        name = raw.get("model_type")
        if name not in MODEL_TYPES:
            raise ConfigError(f"{lead}architectures names no LLaVA model ({sorted(ARCHITECTURES)})")
        model_type = MODEL_TYPES[name]
    if model_type is None:
        raise ConfigError(
            f"{lead}{name} is not supported: blipkit loads the original repo's Llama and Mistral LLaVA "
            f"models ({sorted(k for k, v in ARCHITECTURES.items() if v)})"
        )
    return model_type


def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> LlavaConfig:
    """Translate an original-repo LLaVA config.json into a blipkit ``LlavaConfig`` (tower by reference)."""
    lead = f"{source}: "
    check_type(dict, raw, f"{lead}the config")
    lm_type = _language_model_type(raw, lead)
    tower = get_field(raw, "mm_vision_tower", str, where=lead)
    projector = get_field(raw, "mm_projector_type", str, "linear", lead)  # the repo's default
    if projector not in PROJECTORS:
        raise ConfigError(
            f"{lead}mm_projector_type {projector!r} is not supported; expected one of {sorted(PROJECTORS)}"
        )
    layer = get_field(raw, "mm_vision_select_layer", int, where=lead)
    feature = get_field(raw, "mm_vision_select_feature", str, "patch", lead)
    if feature not in SELECT_FEATURES:
        raise ConfigError(
            f"{lead}mm_vision_select_feature {feature!r} is not supported; expected one of "
            f"{sorted(SELECT_FEATURES)}"
        )
    if get_field(raw, "mm_use_im_start_end", bool, False, lead):
        raise ConfigError(
            f"{lead}mm_use_im_start_end=true (<im_start>/<im_end> around the image) is unsupported"
        )
    merge = get_field(raw, "mm_patch_merge_type", str, "flat", lead)
    if merge != "flat":
        raise ConfigError(f"{lead}mm_patch_merge_type {merge!r} is not supported (only 'flat': LLaVA-1.5)")
    aspect = get_field(raw, "image_aspect_ratio", str, "square", lead)
    if aspect not in ("pad", "square"):
        raise ConfigError(f"{lead}image_aspect_ratio {aspect!r} is not supported; expected 'pad' or 'square'")
    get_field(raw, "mm_hidden_size", int, None, lead)  # checked against the tower once it is built
    text = {k: v for k, v in raw.items() if not k.startswith("mm_") and k not in LLAVA_FIELDS}
    text["model_type"] = lm_type
    text["architectures"] = [_causal_lm_name(lm_type)]
    causal_lm_type(text, lead)
    return LlavaConfig(
        name="llava-original",
        vision=TowerConfig(kind="clip", pretrained=tower),
        feature_layer=layer,
        select=SELECT_FEATURES[feature],
        projector=ProjectorConfig(kind=projector, act="gelu", bias=True),  # nn.GELU(): exact erf GELU
        image_token_index=ORIGINAL_IMAGE_TOKEN_INDEX,
        llm=LLMConfig(kind="causal", hf_config=text),
        template="llava_v1",
        processor={"pad_to_square": aspect == "pad"},
    )


def _causal_lm_name(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]


# --- keys ---------------------------------------------------------------------------------------------------
def _skipped(key: str) -> bool:
    return any(key.endswith("." + k) or key == k for k in SKIPPED if not k.endswith("."))


def filter_original(state_dict: dict[str, Tensor], tower_from_checkpoint: bool = False) -> dict[str, Tensor]:
    """Original-repo state dict -> blipkit names. Its ``model.vision_tower.*`` copies are used only with
    ``tower_from_checkpoint`` (``unfreeze_mm_vision_tower``), else skipped (``SKIPPED``)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if _skipped(key) or (key.startswith(TOWER_PREFIX) and not tower_from_checkpoint):
            continue
        for src, dst in PREFIXES:
            if key.startswith(src):
                out[dst + key[len(src) :]] = value
                break
        else:
            raise CheckpointError(
                f"unknown checkpoint key {key!r}: not under any of {[p for p, _ in PREFIXES]}"
            )
    return out


def read_weights(path: Path) -> dict[str, Tensor]:
    """All tensors of the dir: safetensors, else the repo's ``pytorch_model*.bin`` shards (read as plain
    tensors, ``weights_only``: no code in them runs)."""
    if any(path.glob("*.safetensors")):
        return read_state_dict(path)
    index = path / "pytorch_model.bin.index.json"
    if index.exists():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"no *.safetensors or pytorch_model*.bin weights in {path}")
    out: dict[str, Tensor] = {}
    for file in files:
        out.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    return out


# --- loading ------------------------------------------------------------------------------------------------
def load(
    path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[Llava, Any, ImageProcessor]:
    """An original-repo LLaVA dir -> (``Llava``, tokenizer, ``ImageProcessor``)."""
    path = Path(path)
    raw = read_config(path / "config.json")
    cfg = config_from_hf(raw, str(path / "config.json"))
    check_remote_code(path, trust_remote_code)
    tower_dir = resolve_tower(cfg.vision.pretrained, path)
    kind, vision_config = towers.tower_config(tower_dir)
    if kind != "clip":
        raise ConfigError(
            f"mm_vision_tower {cfg.vision.pretrained!r} is a {kind} model; the original repo reads CLIP ones"
        )
    _check_width(vision_config, cfg, raw.get("mm_hidden_size"), path)
    weights = read_weights(path)
    from_checkpoint = bool(raw.get("unfreeze_mm_vision_tower")) and any(
        k.startswith(TOWER_PREFIX) for k in weights
    )
    state_dict = filter_original(weights, from_checkpoint)
    cfg.vision = TowerConfig(kind="clip", hf_config=vision_config, pretrained=str(tower_dir))
    pad = cfg.processor.get("pad_to_square", False)
    processor = dataclasses.replace(image_processor(tower_dir), pad_to_square=pad)
    sources = {"llm": "model.*, lm_head.*", "projector": "model.mm_projector.*"}
    model = build_model(cfg, state_dict, dtype, path, trust_remote_code, sources)
    tokenizer = load_tokenizer(path, trust_remote_code)
    cfg.processor = processor.to_dict()
    return model, tokenizer, processor


def _check_width(
    vision_config: dict[str, Any], cfg: LlavaConfig, mm_hidden_size: int | None, path: Path
) -> None:
    """``mm_hidden_size`` must be the width of the tower's features (one layer is read)."""
    from transformers import CLIPVisionConfig

    width = CLIPVisionConfig.from_dict(dict(vision_config)).hidden_size
    if mm_hidden_size is not None and mm_hidden_size != width:
        raise ConfigError(
            f"{path}/config.json: mm_hidden_size {mm_hidden_size} but the vision tower "
            f"{cfg.vision.pretrained!r} is {width} wide"
        )
