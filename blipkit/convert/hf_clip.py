"""transformers CLIP / SigLIP checkpoints (``CLIPModel``, ``SiglipModel``) <-> blipkit ``DualEncoder``.

The towers are transformers' own ``CLIPVisionModel`` / ``CLIPTextModel`` (SigLIP: ``SiglipVisionModel`` /
``SiglipTextModel``). In transformers 5 these hold their layers directly (no inner ``vision_model`` /
``text_model``), so a tower's keys keep transformers' names under ``vision.`` / ``text.``. Every source key
is mapped or listed in ``SKIPPED`` with its reason; anything else is a ``CheckpointError`` naming it. The
reverse map is the inverse of the forward one.

Loading is ``read -> detect -> config_from_hf -> strict check (in the checkpoint's own names) -> filter_hf ->
fill``: ``load(path, dtype)`` returns the model, its tokenizer and its image processor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from blipkit.config import PromptConfig, check_type
from blipkit.errors import CheckpointError, ConfigError
from blipkit.models.clip import DualEncoder, DualEncoderConfig, empty, fill, hf_config_class
from blipkit.parts import read_config
from blipkit.processing import ImageProcessor
from blipkit.state_dicts import check_state_dict, read_state_dict

# source -> blipkit; "*" stands for the rest of the key (a tower's own transformers names)
HF_TO_BLIPKIT: dict[str, str] = {
    "vision_model.*": "vision.*",
    "text_model.*": "text.*",
    "visual_projection.weight": "visual_projection.weight",  # CLIP only (no bias)
    "text_projection.weight": "text_projection.weight",  # CLIP only (no bias)
    "logit_scale": "logit_scale",  # CLIP () / SigLIP (1,)
    "logit_bias": "logit_bias",  # SigLIP only (1,)
}
BLIPKIT_TO_HF: dict[str, str] = {v: k for k, v in HF_TO_BLIPKIT.items()}
SKIPPED = {
    "vision_model.embeddings.position_ids": "constant buffer (arange), saved by transformers < 4.31; rebuilt",
    "text_model.embeddings.position_ids": "constant buffer (arange), saved by transformers < 4.31; rebuilt",
}

_ARCHITECTURES = {"clip": "CLIPModel", "siglip": "SiglipModel"}
_PADDING = {"clip": "longest", "siglip": "max_length"}


def detect(raw_config: dict[str, Any]) -> str | None:
    """ "clip" / "siglip" for a transformers ``CLIPModel`` / ``SiglipModel`` config.json dict; None otherwise.

    ``model_type`` decides; when ``architectures`` is given it must name the dual-encoder class (a
    ``CLIPForImageClassification`` shares ``model_type`` "clip" but has no text tower).
    """
    if not isinstance(raw_config, dict):
        return None
    architectures = raw_config.get("architectures") or []
    if not isinstance(architectures, list):
        return None
    kind = raw_config.get("model_type")
    if kind in _ARCHITECTURES:
        return kind if not architectures or _ARCHITECTURES[kind] in architectures else None
    if kind is None:
        return next((k for k, cls in _ARCHITECTURES.items() if cls in architectures), None)
    return None


# --- keys ---------------------------------------------------------------------------------------------------
def _rename(key: str, table: dict[str, str]) -> str | None:
    """``key`` through ``table`` (exact names first, then the ``prefix.*`` entries); None when skipped."""
    if key in SKIPPED:
        return None
    if key in table and not key.endswith("*"):
        return table[key]
    for src, dst in table.items():
        if src.endswith("*") and key.startswith(src[:-1]):
            return dst[:-1] + key[len(src) - 1 :]
    raise CheckpointError(
        f"unknown checkpoint key {key!r} (known: {sorted(table)}; skipped: {sorted(SKIPPED)})"
    )


def filter_hf(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers CLIP / SigLIP state dict -> blipkit names (``SKIPPED`` keys dropped)."""
    out = {}
    for key, value in state_dict.items():
        new = _rename(key, HF_TO_BLIPKIT)
        if new is not None:
            out[new] = value
    return out


def to_hf(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """blipkit ``DualEncoder`` state dict -> transformers names (inverse of ``filter_hf``)."""
    return {_rename(k, BLIPKIT_TO_HF): v for k, v in state_dict.items()}


# --- configs ------------------------------------------------------------------------------------------------
# fields blipkit reads or relies on, with their JSON types; a field config.json leaves out takes transformers'
# default (save_pretrained writes only what differs from it)
_TOWER = {
    "hidden_size": int,
    "intermediate_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "hidden_act": str,
    "layer_norm_eps": float,
}
_VISION = {**_TOWER, "image_size": int, "patch_size": int, "num_channels": int, "vision_use_head": bool}
_TEXT = {
    **_TOWER,
    "vocab_size": int,
    "max_position_embeddings": int,
    "eos_token_id": int | None,
    "pad_token_id": int | None,
    "bos_token_id": int | None,
    "projection_size": int | None,
}
_TOP = {
    "model_type": str,
    "architectures": list[str],
    "projection_dim": int,
    "logit_scale_init_value": float,
    "vision_config": dict,
    "text_config": dict,
}
_POSITIVE = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "vocab_size",
    "max_position_embeddings",
    "projection_size",
    "projection_dim",
)


def _check_fields(d: dict[str, Any], hints: dict[str, Any], where: str) -> None:
    """Each field of ``d`` that ``hints`` names has that type (and is >= 1 where it is a size)."""
    for key, hint in hints.items():
        if key in d:
            check_type(hint, d[key], f"{where}{key}")
            if key in _POSITIVE and d[key] is not None and d[key] < 1:
                raise ConfigError(f"{where}{key} must be >= 1, got {d[key]!r}")


def _check_tower(d: dict[str, Any], hints: dict[str, Any], lead: str, block: str, activations: Any) -> None:
    """``_check_fields``, a known activation, and a width its heads divide (for the fields ``d`` gives)."""
    _check_fields(d, hints, f"{lead}{block}.")
    if "hidden_act" in d and d["hidden_act"] not in activations:
        raise ConfigError(f"{lead}{block}.hidden_act {d['hidden_act']!r} is not a transformers activation")
    if "hidden_size" in d and "num_attention_heads" in d and d["hidden_size"] % d["num_attention_heads"]:
        raise ConfigError(
            f"{lead}{block}.hidden_size {d['hidden_size']} is not a multiple of "
            f"{block}.num_attention_heads {d['num_attention_heads']}"
        )


def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> DualEncoderConfig:
    """Translate a transformers ``CLIPConfig`` / ``SiglipConfig`` dict (config.json) into a blipkit config.

    A missing or mistyped field is a ``ConfigError`` naming it (``source`` starts the message).
    """
    from transformers.activations import ACT2FN

    lead = f"{source}: "
    check_type(dict, raw, f"{lead}the config")
    kind = detect(raw)
    if kind is None:
        raise ConfigError(
            f"{lead}model_type {raw.get('model_type')!r} / architectures {raw.get('architectures')!r}: "
            "not a transformers CLIPModel ('clip') or SiglipModel ('siglip') config"
        )
    _check_fields(raw, _TOP, lead)
    for block, hints in (("vision_config", _VISION), ("text_config", _TEXT)):
        if block not in raw:
            raise ConfigError(f"{lead}{block} is missing")
        _check_tower(raw[block], hints, lead, block, ACT2FN)

    try:  # fields config.json leaves out take transformers' defaults here
        hf = hf_config_class(kind).from_dict(dict(raw))
    except Exception as e:  # ValueError, TypeError, huggingface_hub's StrictDataclassError
        raise ConfigError(f"{lead}transformers rejects this config: {e}") from None
    vision, text = hf.vision_config, hf.text_config
    if vision.num_channels != 3:
        raise ConfigError(f"{lead}vision_config.num_channels must be 3 (RGB), got {vision.num_channels}")
    eos = text.eos_token_id
    if kind == "clip" and not (isinstance(eos, int) and 0 <= eos < text.vocab_size):
        raise ConfigError(
            f"{lead}text_config.eos_token_id must be a token id below vocab_size {text.vocab_size} "
            f"(CLIP pools the text at its EOS), got {eos!r}"
        )
    if kind == "siglip":
        if not vision.vision_use_head:
            raise ConfigError(
                f"{lead}vision_config.vision_use_head=false: no pooled image embedding to compare with texts"
            )
        text_width = text.projection_size or text.hidden_size
        if text_width != vision.hidden_size:
            raise ConfigError(
                f"{lead}text_config.projection_size {text_width} differs from vision_config.hidden_size "
                f"{vision.hidden_size}: the two embeddings cannot be compared"
            )
    return DualEncoderConfig(
        name=f"hf-{kind}",
        kind=kind,
        hf_config=raw,
        processor=default_processor(kind, vision.image_size).to_dict(),
        prompts=PromptConfig(classify="a photo of {}"),
        text_max_tokens=text.max_position_embeddings,
        text_padding=_PADDING[kind],
    )


def default_processor(kind: str, image_size: int) -> ImageProcessor:
    """transformers' CLIP / SigLIP image processor defaults for ``image_size``."""
    if kind == "clip":  # CLIPImageProcessor: shortest edge, centre crop, CLIP statistics
        return ImageProcessor(image_size=image_size, resize="shortest_edge", crop_size=image_size)
    return ImageProcessor(image_size=image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # Siglip


# --- loading ------------------------------------------------------------------------------------------------
def load_processor(path: Path, config: DualEncoderConfig) -> ImageProcessor:
    """``path``'s ``preprocessor_config.json`` (else the family's defaults), checked against the model."""
    file = path / "preprocessor_config.json"
    if file.exists():
        try:
            processor = ImageProcessor.from_hf_dict(read_config(file))
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from None
    else:
        processor = ImageProcessor.from_dict(config.processor)
    image_size = hf_config_class(config.kind).from_dict(config.hf_config).vision_config.image_size
    if processor.output_size != image_size:
        raise ConfigError(
            f"{file}: gives {processor.output_size}x{processor.output_size} images; the vision tower takes "
            f"vision_config.image_size {image_size}"
        )
    return processor


def load_tokenizer(path: Path) -> Any:
    """The transformers tokenizer saved in ``path`` (no code shipped with it is run)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: no tokenizer that loads without running its own code ({e})") from None


def load(path: Path, dtype: torch.dtype = torch.float32) -> tuple[DualEncoder, Any, ImageProcessor]:
    """A transformers ``CLIPModel`` / ``SiglipModel`` dir -> (model in eval mode, tokenizer, image processor).

    The safetensors are checked strictly in the checkpoint's own names: a missing, unexpected or mis-shaped
    key is a ``CheckpointError`` naming it. Floating-point tensors are cast to ``dtype``.
    """
    path = Path(path)
    config = config_from_hf(read_config(path / "config.json"), source=str(path / "config.json"))
    processor = load_processor(path, config)
    config.processor = processor.to_dict()
    state_dict = read_state_dict(path)
    model = empty(config)
    given = {k: v for k, v in state_dict.items() if k not in SKIPPED}
    check_state_dict(to_hf(model.state_dict()), given, str(path))
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in filter_hf(state_dict).items()}
    model = fill(model, cast, str(path)).requires_grad_(False)  # frozen, like every loaded tower
    return model, load_tokenizer(path), processor
