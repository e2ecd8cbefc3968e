"""blipkit: BLIP-2 style vision-language models — Q-Former bridges between frozen image encoders and LLMs."""

from __future__ import annotations

import os

import torch

from blipkit.api import Chat, Model
from blipkit.caption_bridge import CaptionThenLLM, is_bridge, load_bridge
from blipkit.config import Blip2Config, get_config, list_configs, list_models
from blipkit.errors import UsageError
from blipkit.loading import (
    CheckpointError,
    check_device,
    load_checkpoint,
    locate,
    save_checkpoint,
    torch_dtype,
)
from blipkit.models.family import FAMILIES
from blipkit.models.fast_linear import accelerate
from blipkit.models.quantize import check_mode
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
    quantize: str | None = None,
) -> Model:
    """Load a model by name (``"default"``: the embedded offline model), directory or Hugging Face hub id.

    Directories: transformers BLIP-2 / InstructBLIP / LLaVA / CLIP / SigLIP ``save_pretrained`` dirs, the
    original LLaVA repo's layout, or blipkit checkpoints. Hub ids (``Salesforce/blip2-opt-2.7b``) come from
    the Hugging Face cache, or are downloaded where the hub can be reached; ``revision`` picks a branch, tag
    or commit. ``trust_remote_code=True`` lets transformers dirs run the Python code they ship; only for
    checkpoints you trust (without it such a dir is a ``CheckpointError``). ``kernels``: the frozen fp32
    layers' CPU kernels, ``"auto"`` (oneDNN with packed weights where it is faster on this CPU, timed once),
    ``"onednn"`` or ``"default"`` (torch's own); ``$BLIPKIT_KERNELS`` sets it for every load.
    ``quantize``: the frozen LLM and vision encoder in 8 bits, ``"int8"`` on CPU, ``"8bit"`` or ``"4bit"``
    (bitsandbytes) on CUDA (``Model.quantize``).
    """
    kernels = os.environ.get("BLIPKIT_KERNELS", kernels)
    if quantize is not None:
        check_device(device)  # no CUDA is the first thing to say, before a missing bitsandbytes
        check_mode(quantize, device, torch_dtype(dtype))
    fp32_kernels = "default" if quantize else kernels  # packed layers are chosen after quantizing
    options = {
        "dtype": dtype,
        "device": device,
        "trust_remote_code": trust_remote_code,
        "kernels": fp32_kernels,
    }
    path = locate(name_or_path, revision)
    if is_bridge(read_config(path / "config.json")):  # the caption-then-LLM bridge (``default-photo``)
        if quantize is not None:
            raise UsageError(
                f"{name_or_path}: quantization applies to image-to-LLM models, not to a caption bridge"
            )
        return load_bridge(path, batch_size=batch_size, **options)
    model = Model(load_checkpoint(path, **options), batch_size=batch_size)
    if quantize is not None:
        model.quantize(quantize)
        accelerate(model.model, kernels)  # the layers left in fp32
    return model


def via_caption(model: Model) -> CaptionThenLLM:
    """``model`` as the naive baseline: it captions the image, then its LLM answers from the caption alone."""
    return CaptionThenLLM.from_model(model)
