"""The ``blipkit`` command. Thin: parses arguments and calls the Python API.

Exit codes: 0 all done, 3 finished with some failed items, 2 usage error, 1 crash.
"""

from __future__ import annotations

import argparse
import importlib
import sys

EXIT_OK, EXIT_CRASH, EXIT_USAGE, EXIT_SOME_FAILED = 0, 1, 2, 3


class UsageError(Exception):
    """A mistake in what the user asked for: printed as one line, exit code 2."""


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="default",
        help="'default' (embedded), a transformers BLIP-2 dir or a blipkit checkpoint dir",
    )
    p.add_argument(
        "--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="weights dtype (default fp32)"
    )
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blipkit",
        description="BLIP-2 style vision-language models: caption, ask, chat, classify, similarity.",
        epilog="Examples:\n  blipkit caption examples/ --prompt 'a photo of'\n"
        "  blipkit ask examples/red_circle.png 'what shape is in the image?'\n"
        "  echo 'what color is it?' | blipkit chat examples/red_circle.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("ask", help="answer a question about an image")
    p.add_argument("image")
    p.add_argument("question")
    p.add_argument("--max-new-tokens", type=int, default=None)
    _model_arg(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("chat", help="chat about an image; one turn per line on stdin")
    p.add_argument("image")
    p.add_argument("--max-new-tokens", type=int, default=30)
    _model_arg(p)
    p.set_defaults(func=cmd_chat)
    for register in _plugins():
        register(sub, _model_arg)
    return parser


def _plugins() -> list:
    """``register(subparsers, add_model_args)`` of each command group that lives in a sub-package."""
    found = []
    for module in (
        "blipkit.train.cli",
        "blipkit.batch.cli",
        "blipkit.retrieval.cli",
        "blipkit.eval.cli",
        "blipkit.serve.cli",
    ):
        try:
            found.append(importlib.import_module(module).register)
        except ModuleNotFoundError as e:
            if e.name is None or not module.startswith(e.name):
                raise
    return found


def _load(args: argparse.Namespace):
    import blipkit

    return blipkit.load(args.model, dtype=args.dtype, device=args.device)


def cmd_ask(args: argparse.Namespace) -> int:
    model = _load(args)
    print(model.ask(args.image, args.question, max_new_tokens=args.max_new_tokens))
    return EXIT_OK


def cmd_chat(args: argparse.Namespace) -> int:
    model = _load(args)
    chat = model.chat(args.image, max_new_tokens=args.max_new_tokens)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        if line.strip():
            print(chat.send(line.strip()), flush=True)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from blipkit.assets import AssetError
    from blipkit.errors import CapabilityError
    from blipkit.loading import CheckpointError
    from blipkit.processing import ImageError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":  # only training takes free-form --key=value overrides
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except (
        UsageError,
        ImageError,
        CheckpointError,
        AssetError,
        FileNotFoundError,
        CapabilityError,
        ValueError,
    ) as e:
        print(f"blipkit: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
