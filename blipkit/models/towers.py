"""Frozen transformers vision towers (CLIP, SigLIP, DINOv2) read at chosen hidden layers, as LLaVA reads them.

``VisionTower`` wraps a transformers ``CLIPVisionModel`` / ``SiglipVisionModel`` / ``Dinov2Model`` and returns
(B, P, Dv) features: ``hidden_states[feature_layer]`` (a list of layers is concatenated along the feature
axis, Dv = width x layers), with the CLS token dropped (``select="default"``, where the tower has one; SigLIP
has none) or kept (``"full"``). This is transformers' ``LlavaModel.get_image_features`` and the original LLaVA
repo's ``CLIPVisionTower.feature_select`` (``mm_vision_select_layer``; "patch" = default, "cls_patch" = full).

- CLIP / SigLIP: ``hidden_states[i]`` is the output of encoder layer i (0: the embeddings; CLIP's includes its
  ``pre_layrnorm``), never the ``post_layernorm``.
- DINOv2 with ``feature_layer=-1``: ``last_hidden_state``, which carries DINOv2's final LayerNorm.

Layers past the deepest one read are dropped after the strict load (they cannot change the features), so the
tower runs only as deep as needed: LLaVA-1.5 (layer -2) skips the last block of its CLIP.

``build_tower`` makes one from a transformers dir (a full ``CLIPModel`` / ``SiglipModel`` dir or a
``*VisionModel`` / ``Dinov2Model`` dir) or from (config dict, state dict), strictly (``blipkit.state_dicts``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from blipkit.errors import CheckpointError, ConfigError
from blipkit.state_dicts import check_state_dict, read_state_dict

KINDS = ("clip", "siglip", "dinov2")
SELECTS = ("default", "full")
_HAS_CLS = {"clip": True, "siglip": False, "dinov2": True}
# config.json model_type -> (kind, whether the vision part sits under "vision_model." in a full two-tower dir)
MODEL_TYPES = {
    "clip_vision_model": ("clip", False),
    "clip": ("clip", True),
    "siglip_vision_model": ("siglip", False),
    "siglip": ("siglip", True),
    "dinov2": ("dinov2", False),
}
# tensors some checkpoints store that the towers rebuild themselves
SKIPPED = {
    "embeddings.position_ids": "constant buffer (arange) that older transformers saved; rebuilt by the model",
}


@dataclass
class TowerConfig:
    """Which vision tower: its kind, its transformers vision config and where its weights are."""

    kind: str = "clip"  # "clip" | "siglip" | "dinov2"
    hf_config: dict[str, Any] | None = None  # the vision model's transformers config (None: from pretrained)
    pretrained: str | None = None  # a transformers dir / hub id; None when the checkpoint carries the weights


def _classes(kind: str) -> tuple[type, type]:
    """(config class, model class) of a tower kind."""
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    table = {
        "clip": (CLIPVisionConfig, CLIPVisionModel),
        "siglip": (SiglipVisionConfig, SiglipVisionModel),
        "dinov2": (Dinov2Config, Dinov2Model),
    }
    if kind not in table:
        raise ConfigError(f"unknown vision tower kind {kind!r}; expected one of {list(KINDS)}")
    return table[kind]


def _layer_list(model: nn.Module) -> nn.ModuleList:
    encoder = model.encoder
    return encoder.layers if hasattr(encoder, "layers") else encoder.layer  # CLIP/SigLIP | DINOv2


class VisionTower(nn.Module):
    """A transformers vision model read at ``feature_layer`` (see the module docstring)."""

    def __init__(
        self, kind: str, model: nn.Module, feature_layer: int | list[int] = -1, select: str = "full"
    ):
        super().__init__()
        if select not in SELECTS:
            raise ConfigError(f"vision feature select {select!r} is not one of {list(SELECTS)}")
        layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ConfigError(
                f"feature_layer must be an int or a non-empty list of ints, got {feature_layer!r}"
            )
        self.kind = kind
        self.model = model
        self.feature_layer = feature_layer
        self.select = select
        num_states = model.config.num_hidden_layers + 1  # the embeddings, then one per encoder layer
        bad = [i for i in layers if not -num_states <= i < num_states]
        if bad:
            raise ConfigError(
                f"feature_layer {feature_layer!r}: {bad} out of range for a {num_states - 1}-layer tower"
            )
        # DINOv2's last layer is read after its final LayerNorm (last_hidden_state), as Dinov2Model returns it
        self.final_norm = kind == "dinov2" and feature_layer == -1
        self.layers = [i % num_states for i in layers]  # absolute hidden_states indices
        if not self.final_norm:
            # blocks past the deepest one read cannot change the features; one block stays even for layer 0,
            # as transformers records the initial hidden state at the first block's input
            depth = max(1, max(self.layers))
            del _layer_list(model)[depth:]
            model.config.num_hidden_layers = depth

    @property
    def width(self) -> int:
        """The width of one hidden layer."""
        return self.model.config.hidden_size

    @property
    def hidden_size(self) -> int:
        """Dv: the width times the number of layers read."""
        return self.width * len(self.layers)

    @property
    def has_cls(self) -> bool:
        return _HAS_CLS[self.kind]

    @property
    def num_tokens(self) -> int:
        """P: feature rows per image."""
        cfg = self.model.config
        patches = (cfg.image_size // cfg.patch_size) ** 2
        return patches + int(self.has_cls and self.select == "full")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, P, Dv)."""
        x = pixel_values.to(self.dtype)
        if self.final_norm:
            feats = [self.model(pixel_values=x).last_hidden_state]  # (B, P, D)
        else:
            hidden = self.model(pixel_values=x, output_hidden_states=list(self.layers)).hidden_states
            feats = [hidden[i] for i in self.layers]  # each (B, P, D)
        if self.select == "default" and self.has_cls:
            feats = [f[:, 1:] for f in feats]  # drop the CLS token
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)  # (B, P, D * layers)


# --- building ---------------------------------------------------------------------------------------------
# transformers 5 renamed DINOv2's attention and SwiGLU weights in memory but still saves (and hub dirs hold)
# the old names, converting them inside from_pretrained (conversion_mapping.py "Dinov2Model"); the same
# renames, in order, so that the strict check sees the model's names
RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "dinov2": (
        ("attention.attention.query.", "attention.q_proj."),
        ("attention.attention.key.", "attention.k_proj."),
        ("attention.attention.value.", "attention.v_proj."),
        ("attention.output.dense.", "attention.o_proj."),
        ("mlp.weights_out.", "mlp.down_proj."),
    ),
}
# fused tensors split along dim 0: source ending -> target endings (DINOv2 giant's SwiGLU input projection)
SPLITS: dict[str, dict[str, tuple[str, ...]]] = {
    "dinov2": {
        "mlp.weights_in.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
        "mlp.weights_in.bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
    },
}


def normalize_keys(kind: str, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ``kind`` vision model's state dict in transformers 5 in-memory names: the ``vision_model.`` prefix
    of transformers 4 ``*VisionModel`` saves removed, ``RENAMES`` and ``SPLITS`` applied, ``SKIPPED``
    buffers dropped."""
    prefixed = bool(state_dict) and all(k.startswith("vision_model.") for k in state_dict)
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("vision_model.") if prefixed else key
        if key in SKIPPED:
            continue
        for src, dst in RENAMES.get(kind, ()):
            key = key.replace(src, dst)
        split = next((s for s in SPLITS.get(kind, {}) if key.endswith(s)), None)
        if split is None:
            out[key] = value
            continue
        targets = SPLITS[kind][split]
        for target, part in zip(targets, value.chunk(len(targets), dim=0), strict=True):
            out[key[: -len(split)] + target] = part.contiguous()
    return out


def _config_json(source: Path) -> tuple[str, dict[str, Any], bool]:
    """(kind, vision config dict, whether the dir holds two towers) of a transformers dir."""
    file = Path(source) / "config.json"
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read the vision tower's config ({e})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{file}: model_type {model_type!r} is not a vision tower ({sorted(MODEL_TYPES)})")
    kind, two_tower = MODEL_TYPES[model_type]
    if two_tower and not isinstance(raw.get("vision_config"), dict):
        raise ConfigError(f"{file}: vision_config is missing")
    return kind, raw["vision_config"] if two_tower else raw, two_tower


def tower_config(source: Path) -> tuple[str, dict[str, Any]]:
    """(kind, vision config dict) of a transformers dir: the vision part of a two-tower (CLIP/SigLIP) dir."""
    kind, config, _ = _config_json(source)
    return kind, config


def _read_source(kind: str, source: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(vision config dict, vision state dict) of a transformers dir holding a ``kind`` tower."""
    found, config, two_tower = _config_json(source)
    if found != kind:
        raise ConfigError(f"{source}/config.json holds a {found} vision model, not a {kind} one")
    return config, read_state_dict(source, "vision_model." if two_tower else "")


def build_tower(
    kind: str,
    *,
    source: Path | None = None,
    hf_config: dict[str, Any] | None = None,
    state_dict: dict[str, Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    feature_layer: int | list[int] = -1,
    select: str = "full",
) -> VisionTower:
    """A frozen ``VisionTower`` of ``kind`` ("clip" | "siglip" | "dinov2"), from a transformers dir
    (``source``) or from ``hf_config`` + ``state_dict`` (transformers 5 names of the vision model; 4.x
    ``vision_model.`` names are accepted). Loading is strict: a missing, unexpected or mis-shaped key is a
    ``CheckpointError`` naming it."""
    config_cls, model_cls = _classes(kind)
    if source is not None:
        hf_config, state_dict = _read_source(kind, Path(source))
    if hf_config is None or state_dict is None:
        raise CheckpointError(
            f"{kind} vision tower: give a transformers dir (source) or hf_config + state_dict"
        )
    config = config_cls.from_dict(dict(hf_config))
    state_dict = normalize_keys(kind, state_dict)
    with torch.device("meta"):
        expected = model_cls(config).state_dict()
    check_state_dict(expected, state_dict, f"{kind} vision tower")
    model, info = model_cls.from_pretrained(
        None, config=config, state_dict=state_dict, dtype=dtype, output_loading_info=True
    )
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise CheckpointError(f"{kind} vision tower: {problems} {info.get('error_msgs') or ''}".strip())
    model = model.eval().requires_grad_(False)
    return VisionTower(kind, model, feature_layer, select).eval()
