"""blipkit: BLIP-2 style vision-language models — Q-Former bridges between frozen image encoders and LLMs."""

from __future__ import annotations

import os

import torch

from blipkit.api import Chat, Model
from blipkit.caption_bridge import CaptionThenLLM, is_bridge, load_bridge
from blipkit.config import Blip2Config, get_config, list_configs, list_models
from blipkit.loading import CheckpointError, load_checkpoint, locate, save_checkpoint
from blipkit.models.family import FAMILIES
from blipkit.parts import read_config
from blipkit.processing import ImageError, ImageProcessor, load_image

__version__ = "0.1.0"
__all__ = [
    "Blip2Config",
    "CaptionThenLLM",
    "Chat",
    "CheckpointError",
    "ImageError",
    "ImageProcessor",
    "Model",
    "get_config",
    "list_configs",
    "list_families",
    "list_models",
    "load",
    "load_checkpoint",
    "load_image",
    "save_checkpoint",
    "via_caption",
]


def list_families() -> dict[str, dict]:
    """Every model family: what it covers, the checkpoint formats it loads, and what its models can do."""
    import copy

    return copy.deepcopy(FAMILIES)


def load(
    name_or_path: str | os.PathLike = "default",
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    batch_size: int = 16,
    trust_remote_code: bool = False,
    revision: str | None = None,
    kernels: str = "auto",
) -> Model:
    """Load a model by name (``"default"``: the embedded offline model), directory or Hugging Face hub id.

    Directories: transformers BLIP-2 / InstructBLIP / LLaVA / CLIP / SigLIP ``save_pretrained`` dirs, the
    original LLaVA repo's layout, or blipkit checkpoints. Hub ids (``Salesforce/blip2-opt-2.7b``) come from
    the Hugging Face cache, or are downloaded where the hub can be reached; ``revision`` picks a branch, tag
    or commit. ``trust_remote_code=True`` lets transformers dirs run the Python code they ship; only for
    checkpoints you trust (without it such a dir is a ``CheckpointError``). ``kernels``: the frozen fp32
    layers' CPU kernels, ``"auto"`` (oneDNN with packed weights where it is faster on this CPU, timed once),
    ``"onednn"`` or ``"default"`` (torch's own); ``$BLIPKIT_KERNELS`` sets it for every load.
    """
    kernels = os.environ.get("BLIPKIT_KERNELS", kernels)
    options = {"dtype": dtype, "device": device, "trust_remote_code": trust_remote_code, "kernels": kernels}
    path = locate(name_or_path, revision)
    if is_bridge(read_config(path / "config.json")):  # the caption-then-LLM bridge (``default-photo``)
        return load_bridge(path, batch_size=batch_size, **options)
    return Model(load_checkpoint(path, **options), batch_size=batch_size)


def via_caption(model: Model) -> CaptionThenLLM:
    """``model`` as the naive baseline: it captions the image, then its LLM answers from the caption alone."""
    return CaptionThenLLM.from_model(model)
