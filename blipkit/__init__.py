"""blipkit: BLIP-2 style vision-language models — Q-Former bridges between frozen image encoders and LLMs."""

from __future__ import annotations

import os

import torch

from blipkit.api import Chat, Model
from blipkit.config import Blip2Config, get_config, list_configs, list_models
from blipkit.loading import CheckpointError, load_checkpoint, save_checkpoint
from blipkit.processing import ImageError, ImageProcessor, load_image

__version__ = "0.1.0"
__all__ = [
    "Blip2Config",
    "Chat",
    "CheckpointError",
    "ImageError",
    "ImageProcessor",
    "Model",
    "get_config",
    "list_configs",
    "list_models",
    "load",
    "load_checkpoint",
    "load_image",
    "save_checkpoint",
]


def load(
    name_or_path: str | os.PathLike = "default",
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    batch_size: int = 16,
    trust_remote_code: bool = False,
) -> Model:
    """Load ``"default"`` (the embedded offline model), a transformers BLIP-2 dir or a blipkit checkpoint.

    ``trust_remote_code=True`` lets referenced transformers dirs run the Python code they ship; only for
    checkpoints you trust (without it such a dir is a ``CheckpointError``).
    """
    loaded = load_checkpoint(name_or_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return Model(loaded, batch_size=batch_size)
