"""CLIP / SigLIP / DINOv2 / EVA vision towers as frozen encoders for a Q-Former: the features are
transformers' ``hidden_states[feature_layer]`` of the same tower, and blipkit's trainer runs a stage-1 and a
stage-2 step on each (finite loss, trained parameters changed)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from hf_tiny import make_blip2
from tiny_assets import tiny_assets
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from blipkit.config import VisionConfig
from blipkit.errors import CheckpointError, ConfigError
from blipkit.loading import build_vision
from blipkit.models.towers import VisionTower
from blipkit.models.vision import Dinov2Encoder, EvaViT
from blipkit.train.config import load_config
from blipkit.train.distributed import DistEnv
from blipkit.train.loop import Trainer

IMAGE_SIZE, PATCH = 28, 14  # 4 patches (+ [CLS] for CLIP, DINOv2, EVA)
WIDTH, LAYERS = 16, 3
_TOWER = {
    "hidden_size": WIDTH,
    "intermediate_size": 24,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 2,
}
_VISION = {**_TOWER, "image_size": IMAGE_SIZE, "patch_size": PATCH}
_TEXT = {**_TOWER, "num_hidden_layers": 1, "vocab_size": 40, "max_position_embeddings": 16}


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved away from its init (LayerNorms at 1/0 would hide a wrong read)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model.eval()


# name -> (blipkit vision kind, a function building the transformers model)
TOWERS = {
    "clip": (
        "clip",
        lambda: CLIPModel(CLIPConfig(text_config=_TEXT, vision_config=_VISION, projection_dim=8)),
    ),
    "clip-vision": ("clip", lambda: CLIPVisionModel(CLIPVisionConfig(**_VISION))),
    "siglip": ("siglip", lambda: SiglipModel(SiglipConfig(text_config=_TEXT, vision_config=_VISION))),
    "siglip-vision": ("siglip", lambda: SiglipVisionModel(SiglipVisionConfig(**_VISION))),
    "dinov2": ("dinov2", lambda: Dinov2Model(Dinov2Config(**_VISION))),
}


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, tuple[str, Path, torch.nn.Module]]:
    """name -> (kind, save_pretrained dir, the transformers vision model); "eva" is a BLIP-2 dir."""
    root = tmp_path_factory.mktemp("towers")
    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for i, (name, (kind, build)) in enumerate(TOWERS.items()):
            model = _perturb(build(), seed=i)
            model.save_pretrained(root / name)
            out[name] = (kind, root / name, getattr(model, "vision_model", model))
    blip2 = make_blip2(root / "eva", retrieval=True, image_size=IMAGE_SIZE)
    out["eva"] = ("eva", root / "eva", blip2.vision_model.eval())
    return out


def _eva_config(**extra) -> VisionConfig:
    """The vision block of ``make_blip2``'s BLIP-2 ViT (hidden 32, 2 layers, 4 heads, MLP 37)."""
    return VisionConfig(
        kind="eva",
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=37,
        **extra,
    )


def _vision_config(towers, name: str, feature_layer: int = -1, select: str = "full") -> VisionConfig:
    kind, path, _ = towers[name]
    if kind == "eva":
        return _eva_config(pretrained=str(path))
    return VisionConfig(
        kind=kind,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        pretrained=str(path),
        feature_layer=feature_layer,
        select=select,
    )


def _pixels(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7))


FEATURE_CASES = [
    ("clip", -1, "full"),
    ("clip", -2, "full"),  # BLIP-2's rule: the second-to-last block
    ("clip", 0, "full"),  # the embeddings (after CLIP's pre_layrnorm)
    ("clip-vision", -2, "default"),  # LLaVA's: patches only
    ("siglip", -2, "full"),
    ("siglip-vision", -1, "full"),
    ("siglip-vision", -1, "default"),  # no [CLS]: the same patches
    ("dinov2", -2, "full"),
    ("dinov2", 1, "default"),
    # last_hidden_state (final LayerNorm), [CLS] dropped
    ("dinov2", -1, "default"),
]


@torch.inference_mode()
@pytest.mark.parametrize("name, feature_layer, select", FEATURE_CASES)
def test_features_are_hidden_states_of_the_layer(towers, name, feature_layer, select):
    _, _, hf = towers[name]
    vision = build_vision(_vision_config(towers, name, feature_layer, select), None, None)
    assert isinstance(vision, VisionTower)
    out = hf(pixel_values=_pixels(), output_hidden_states=True)
    if name == "dinov2" and feature_layer == -1:
        expected = out.last_hidden_state
    else:
        expected = out.hidden_states[feature_layer]  # (B, P, Dv), before any final LayerNorm
    if select == "default" and not name.startswith("siglip"):
        expected = expected[:, 1:]  # [CLS] dropped
    got = vision(_pixels())
    assert got.shape == expected.shape and vision.hidden_size == WIDTH
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@torch.inference_mode()
def test_dinov2_last_layer_and_eva_are_unchanged(towers):
    """DINOv2 at -1 with every token is still ``Dinov2Encoder`` (``last_hidden_state``), EVA still ``EvaViT``
    (the last block after the post-LayerNorm, as ``Blip2VisionModel``)."""
    for name, cls in (("dinov2", Dinov2Encoder), ("eva", EvaViT)):
        vision = build_vision(_vision_config(towers, name), None, None)
        assert type(vision) is cls
        _, _, hf = towers[name]
        expected = hf(pixel_values=_pixels()).last_hidden_state
        if name == "dinov2":
            assert torch.equal(vision(_pixels()), expected)
        else:
            torch.testing.assert_close(vision(_pixels()), expected, atol=1e-5, rtol=1e-5)


def test_vision_config_errors(towers):
    with pytest.raises(ConfigError, match="feature_layer and vision.select apply to transformers towers"):
        build_vision(_eva_config(pretrained=str(towers["eva"][1]), feature_layer=-2), None, None)
    with pytest.raises(CheckpointError, match="vision.kind 'clip' needs vision.pretrained"):
        build_vision(VisionConfig(kind="clip"), None, None)
    with pytest.raises(ConfigError, match="unknown vision kind 'vit'"):
        build_vision(VisionConfig(kind="vit"), None, None)
    with pytest.raises(ConfigError, match="siglip.*not a clip"):  # a SigLIP dir named as CLIP
        build_vision(VisionConfig(kind="clip", pretrained=str(towers["siglip"][1])), None, None)
    with pytest.raises(ConfigError, match="select 'patch'"):
        build_vision(_vision_config(towers, "clip", -2, "patch"), None, None)
    with pytest.raises(ConfigError, match="out of range"):
        build_vision(_vision_config(towers, "clip", LAYERS + 1), None, None)


# --- training -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """tiny_assets' LLaMA, BERT tokenizer, question-aware model config and VQA JSONL."""
    return tiny_assets(tmp_path_factory.mktemp("tower-train"))


TRAIN_CASES = [
    pytest.param("clip", -2, "full", id="clip"),
    pytest.param("siglip-vision", -1, "full", id="siglip-vision"),
    pytest.param("dinov2", -2, "default", id="dinov2"),
    pytest.param("eva", -1, "full", id="eva"),
]
NUM_TOKENS = {"clip": 5, "siglip-vision": 4, "dinov2": 4, "eva": 5}


def _model_json(assets: Path, towers, name: str, feature_layer: int, select: str, out: Path) -> Path:
    model = json.loads((assets / "model.json").read_text())
    vision = dataclasses.asdict(_vision_config(towers, name, feature_layer, select))
    model["vision"] = vision
    model["qformer"]["encoder_hidden_size"] = vision["hidden_size"] if name == "eva" else WIDTH
    out.write_text(json.dumps(model))
    return out


def _trainer(assets: Path, model_json: Path, out: Path, stage: str) -> Trainer:
    values = {
        "model": model_json,
        "data": assets / "vqa.jsonl",
        "feature_cache": out / "features",  # one per run: the cache key does not hold the layer read
        "qformer_init": "none",
        "batch_size": 4,
        "max_steps": 1,
        "lr": 1e-3,
        "warmup_steps": 1,
        "warm_start_steps": 0,
        "stage1_weight": 0,
        "threads": 1,
        "progress": "false",
    }
    cfg = load_config(None, [f"--{k}={v}" for k, v in values.items()], stage=stage)
    return Trainer(cfg, out / "run", env=DistEnv())


@pytest.mark.parametrize("name, feature_layer, select", TRAIN_CASES)
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_one_training_step(assets, towers, tmp_path, name, feature_layer, select, stage):
    model_json = _model_json(assets, towers, name, feature_layer, select, tmp_path / "model.json")
    trainer = _trainer(assets, model_json, tmp_path, stage)
    dv = 32 if name == "eva" else WIDTH
    assert trainer.features.shape[2:] == (NUM_TOKENS[name], dv)  # (N, views, P, Dv) from this tower
    before = {k: v.detach().clone() for k, v in trainer.trainable.named_parameters()}
    row = trainer.train_step(0)
    losses = ["itc", "itm", "itg"] if stage == "stage1" else ["lm"]
    assert all(math.isfinite(row[k]) for k in ["loss", *losses]) and row["loss"] > 0, row
    params = dict(trainer.trainable.named_parameters())
    must_change = ["qformer.query_tokens", "qformer.layers.0.cross_attn.k.weight"]  # read the features
    if stage == "stage1":
        must_change += [
            "qformer.vision_proj.weight",
            "qformer.itm_head.weight",
            "qformer.lm_transform.weight",
        ]
    else:
        must_change += ["bridge.weight", "qformer.layers.0.text_ffn.fc1.weight"]  # question-aware
    for k in must_change:
        assert params[k].grad is not None and params[k].grad.abs().max() > 0, k
    for k, p in params.items():
        assert torch.isfinite(p).all(), k
        if p.grad is not None and p.grad.abs().max() > 0:
            assert not torch.equal(p.detach(), before[k]), k
