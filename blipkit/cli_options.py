"""Options every ``blipkit`` command that runs a model shares, and the one way they load it."""

from __future__ import annotations

import argparse
from typing import Any

DTYPES = ("fp32", "bf16", "fp16")
QUANTIZE = ("int8", "8bit", "4bit")  # blipkit.models.quantize.MODES, without importing torch for --help


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--revision``, ``--dtype``, ``--device`` and ``--trust-remote-code``."""
    p.add_argument(
        "--model",
        default="default",
        help="a model name ('default': embedded; see `blipkit models`), a checkpoint dir (transformers "
        "BLIP-2/InstructBLIP/LLaVA/CLIP/SigLIP, original LLaVA, blipkit) or a Hugging Face hub id such as "
        "Salesforce/blip2-opt-2.7b (default: default)",
    )
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub id (default: main)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="frozen weights' dtype (default fp32)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default cpu)")
    p.add_argument(
        "--quantize",
        default=None,
        choices=QUANTIZE,
        help="frozen LLM and vision encoder in 8 bits: int8 (CPU), 8bit or 4bit (CUDA, bitsandbytes)",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run Python code shipped inside a checkpoint dir (only for checkpoints you trust)",
    )


def add_via_caption(p: argparse.ArgumentParser) -> None:
    """``--via-caption``: the naive baseline, the LLM reads the model's caption instead of the image."""
    p.add_argument(
        "--via-caption",
        action="store_true",
        help="caption the image, then let the LLM answer from the caption alone (no image tokens)",
    )


def load_model(args: argparse.Namespace, model: str | None = None) -> Any:
    """The ``blipkit.Model`` the options name (``model`` overrides ``--model``; ``--via-caption`` wraps it in
    the caption-then-LLM bridge)."""
    loaded = _load(args, model)
    if not getattr(args, "via_caption", False):
        return loaded
    from blipkit import via_caption

    return via_caption(loaded)


def _load(args: argparse.Namespace, model: str | None) -> Any:
    import blipkit

    return blipkit.load(
        model or args.model,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=getattr(args, "trust_remote_code", False),
        revision=getattr(args, "revision", None),
        quantize=getattr(args, "quantize", None),
    )
