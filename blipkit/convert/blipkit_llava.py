"""blipkit checkpoints of the LLaVA family: ``config.json`` + ``projector.safetensors``.

``config.json`` is ``{"format": "blipkit", "family": "llava", "config": LlavaConfig.to_dict()}``; the
safetensors file holds the projector only (``projector.linear_1.*``, ``projector.linear_2.*``). The frozen
vision tower (``vision.pretrained``) and LLM (``llm.pretrained``, its tokenizer too unless
``llm.tokenizer``) are referenced by asset name (``asset:dinov2-s14``) or path, never copied. Loading is
strict: a missing, unexpected or mis-shaped projector key is a ``CheckpointError`` naming it.

The tower runs at the processor's image size (DINOv2 interpolates its position embeddings), so the visual
prompt has ``(image_size / patch_size / pool)^2`` rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from blipkit.config import LLMConfig
from blipkit.errors import CheckpointError, ConfigError
from blipkit.models.llava import Llava, LlavaConfig, ProjectorConfig
from blipkit.models.towers import TowerConfig, VisionTower, build_tower
from blipkit.processing import ImageProcessor
from blipkit.state_dicts import check_state_dict, read_state_dict

FAMILY = "llava"
PROJECTOR_FILE = "projector.safetensors"
DEFAULT_PROCESSOR = {  # the embedded BLIP-2 default's: its cached DINOv2 features serve both
    "image_size": 112,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "resample": "bicubic",
}


def detect(raw: dict[str, Any]) -> bool:
    """Whether a config.json is a blipkit LLaVA-family checkpoint."""
    return raw.get("format") == "blipkit" and raw.get("family") == FAMILY


def default_config(pool: int = 1) -> LlavaConfig:
    """The embedded ``default-llava`` architecture: DINOv2-S/14 patches (112 px: an 8 x 8 grid) averaged
    over ``pool`` x ``pool`` blocks -> 2-layer GELU MLP -> SmolLM2-135M-Instruct in its chat template."""
    cfg = LlavaConfig(
        name="default-llava",
        vision=TowerConfig(kind="dinov2", pretrained="asset:dinov2-s14"),
        feature_layer=-1,  # last_hidden_state, after DINOv2's final LayerNorm (the cached features)
        select="default",  # patches only
        pool=pool,
        projector=ProjectorConfig(kind="mlp2x_gelu", act="gelu"),
        llm=LLMConfig(kind="causal", pretrained="asset:smollm2-135m-instruct"),
        template="tokenizer",
        processor=dict(DEFAULT_PROCESSOR),
    )
    cfg.prompts.caption = "Describe the image."
    return cfg


def build_vision(cfg: LlavaConfig, base: Path | None, dtype: torch.dtype) -> VisionTower:
    """The frozen tower of ``cfg.vision.pretrained``, reporting the rows it gives at the processor's size."""
    from blipkit.parts import resolve

    if not cfg.vision.pretrained:
        raise CheckpointError("a blipkit LLaVA checkpoint needs vision.pretrained (an asset name or a dir)")
    tower = build_tower(
        cfg.vision.kind,
        source=resolve(cfg.vision.pretrained, base),
        dtype=dtype,
        feature_layer=cfg.feature_layer,
        select=cfg.select,
    )
    size = cfg.processor.get("image_size")
    if size:
        tower.model.config.image_size = size  # only sets the patch count (num_tokens); forward interpolates
    return tower


def build_model(
    cfg: LlavaConfig,
    projector: dict[str, torch.Tensor] | None,
    base: Path | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> Llava:
    """A ``Llava`` with frozen referenced parts; ``projector`` (``linear_1.*`` ...) is loaded strictly, or
    left freshly initialised (fp32) when None (training from scratch)."""
    from blipkit.parts import build_llm

    vision = build_vision(cfg, base, dtype).requires_grad_(False).eval()
    llm = build_llm(cfg.llm, None, base, dtype, trust_remote_code)
    if llm is None:
        raise ConfigError("a LLaVA model needs its language model (llm.kind 'causal')")
    model = Llava(cfg, vision, llm)
    if projector is not None:
        check_state_dict(model.projector.state_dict(), projector, f"checkpoint, projector ({PROJECTOR_FILE})")
        model.projector.load_state_dict(projector, strict=True)
    model.projector.float()  # the trained part runs in fp32 (it may be stored as fp16)
    return model.eval()


def read_projector(path: Path) -> dict[str, torch.Tensor]:
    """The projector tensors of a checkpoint dir, ``projector.`` prefix removed; other keys are errors."""
    file = Path(path) / PROJECTOR_FILE
    if not file.exists():
        raise CheckpointError(f"{path}: no {PROJECTOR_FILE}")
    tensors = read_state_dict(file)
    unknown = sorted(k for k in tensors if not k.startswith("projector."))
    if unknown:
        raise CheckpointError(f"{file}: unexpected keys {unknown}")
    return {k.removeprefix("projector."): v for k, v in tensors.items()}


def load(
    path: str | Path, raw: dict[str, Any], dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[Llava, Any, ImageProcessor]:
    """A blipkit LLaVA checkpoint dir -> (``Llava``, LLM tokenizer, ``ImageProcessor``)."""
    from blipkit.parts import load_tokenizer, resolve

    path = Path(path)
    cfg = LlavaConfig.from_dict(raw.get("config"), source=str(path / "config.json"))
    model = build_model(cfg, read_projector(path), path, dtype, trust_remote_code)
    tok_ref = cfg.llm.tokenizer or cfg.llm.pretrained
    tokenizer = load_tokenizer(resolve(tok_ref, path), trust_remote_code)
    return model, tokenizer, ImageProcessor.from_dict(cfg.processor)


def save_checkpoint(
    model: Llava, out_dir: str | os.PathLike, processor: ImageProcessor | None = None, fp16: bool = False
) -> Path:
    """Write ``config.json`` + ``projector.safetensors`` (fp16 with ``fp16``); frozen parts by reference."""
    cfg = model.config
    if not cfg.vision.pretrained or not cfg.llm.pretrained:
        raise CheckpointError(
            "saving a LLaVA checkpoint needs vision.pretrained and llm.pretrained references"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if processor is not None:
        cfg.processor = processor.to_dict()
    tensors = {}
    for k, v in model.projector.state_dict().items():
        v = v.detach().cpu()
        tensors[f"projector.{k}"] = (v.half() if fp16 and v.is_floating_point() else v).contiguous()
    save_file(tensors, str(out / PROJECTOR_FILE), metadata={"format": "pt"})
    config = {"format": "blipkit", "family": FAMILY, "config": cfg.to_dict()}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in (PROJECTOR_FILE, "config.json"):
        (out / name).chmod(0o644)
    return out
