"""``blipkit export CHECKPOINT --to transformers OUT``: a model as a dir transformers' own classes load."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from blipkit.cli_options import DTYPES
from blipkit.convert.export_transformers import TARGETS
from blipkit.errors import EXIT_OK, UsageError


def register(subparsers, add_model_args: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Add the ``export`` command (the checkpoint is its first argument, not --model)."""
    p = subparsers.add_parser(
        "export",
        help="write a model as a dir transformers' own classes load (BLIP-2, LLaVA)",
        description="Write CHECKPOINT as a save_pretrained dir that transformers' own classes load: BLIP-2 "
        "models (EVA ViT + Q-Former + linear bridge) as Blip2ForConditionalGeneration, LLaVA models as "
        "LlavaForConditionalGeneration, with the tokenizer and the processor AutoProcessor loads. A model "
        "transformers cannot represent exactly is refused, naming what and which class could.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a model name, checkpoint dir or hub id")
    p.add_argument("out", metavar="OUT", help="the directory to write (absent or empty, or see --overwrite)")
    p.add_argument("--to", required=True, metavar="FORMAT", help=f"the format to write: {', '.join(TARGETS)}")
    p.add_argument("--overwrite", action="store_true", help="replace OUT when it exists and is not empty")
    p.add_argument(
        "--dtype", default="fp32", choices=DTYPES, help="dtype of the written weights (default fp32)"
    )
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub id (default: main)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run Python code shipped inside a checkpoint dir (only for checkpoints you trust)",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    if args.to not in TARGETS:
        raise UsageError(f"--to {args.to!r} is not a format blipkit exports; known: {', '.join(TARGETS)}")
    import blipkit
    from blipkit.convert import export_transformers
    from blipkit.loading import torch_dtype

    out = Path(args.out)
    export_transformers.check_out_dir(out, args.overwrite)  # before the model loads
    model = blipkit.load(
        args.checkpoint, dtype=args.dtype, trust_remote_code=args.trust_remote_code, revision=args.revision
    )
    result = export_transformers.export(model, out, overwrite=args.overwrite, dtype=torch_dtype(args.dtype))
    print(result.summary())
    return EXIT_OK
