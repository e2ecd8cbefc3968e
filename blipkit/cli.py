"""The ``blipkit`` command. Thin: parses arguments and calls the Python API.

Exit codes (``blipkit.errors``): 0 all done, 3 finished with some failed items, 2 usage error, 1 an
environment problem or a crash.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from blipkit.batch import cli as batch_cli
from blipkit.batch import tag_cli
from blipkit.cli_options import add_model_args, add_via_caption, load_model
from blipkit.convert import export_cli
from blipkit.errors import EXIT_CRASH, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, BlipkitError
from blipkit.eval import cli as eval_cli
from blipkit.retrieval import cli as retrieval_cli
from blipkit.serve import cli as serve_cli
from blipkit.train import cli as train_cli


def register(sub: argparse._SubParsersAction, add_model_args=add_model_args) -> None:
    """``ask`` and ``chat``."""
    p = sub.add_parser("ask", help="answer a question about an image")
    p.add_argument("image", help="an image file")
    p.add_argument("question", help="the question, in quotes")
    p.add_argument("--max-new-tokens", type=int, default=None, help="longest answer (default: the model's)")
    add_model_args(p)
    add_via_caption(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("models", help="the models blipkit loads by name, the families and what each can do")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("chat", help="chat about an image; one turn per line on stdin")
    p.add_argument("image", help="the image the conversation is about")
    p.add_argument("--max-new-tokens", type=int, default=30, help="longest answer per turn (default 30)")
    add_model_args(p)
    add_via_caption(p)
    p.set_defaults(func=cmd_chat)


# every command group, in the order ``blipkit --help`` lists them: register(subparsers, add_model_args)
COMMAND_GROUPS = (
    register,
    batch_cli.register,
    tag_cli.register,
    retrieval_cli.register,
    eval_cli.register,
    train_cli.register,
    serve_cli.register,
    export_cli.register,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blipkit",
        description="Vision-language models (BLIP-2, InstructBLIP, LLaVA, CLIP, SigLIP): caption, ask, chat, "
        "tag, classify, similarity, search, serve.",
        epilog="Examples:\n  blipkit caption examples/ --prompt 'a photo of'\n"
        "  blipkit ask examples/red_circle.png 'what shape is in the image?'\n"
        "  echo 'what color is it?' | blipkit chat examples/red_circle.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group(sub, add_model_args)
    return parser


def cmd_ask(args: argparse.Namespace) -> int:
    model = load_model(args)
    print(model.ask(args.image, args.question, max_new_tokens=args.max_new_tokens))
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from blipkit.config import describe_models
    from blipkit.models.family import FAMILIES

    named = describe_models()
    if args.json:
        print(json.dumps({"models": named, "families": FAMILIES}, indent=2))
        return EXIT_OK
    print("models by name (blipkit.load(NAME), --model NAME):")
    for m in named:
        print(f"  {m['name']:<16} {m['family']:<7} {', '.join(m['capabilities'])}")
    print("\nfamilies (a directory or a Hugging Face hub id in any of these formats):")
    for name, fam in FAMILIES.items():
        print(f"  {name:<7} {fam['models']}: {', '.join(fam['capabilities'])}")
        for fmt in fam["formats"]:
            print(f"            - {fmt}")
    return EXIT_OK


def cmd_chat(args: argparse.Namespace) -> int:
    model = load_model(args)
    chat = model.chat(args.image, max_new_tokens=args.max_new_tokens)
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            "one question per line; Ctrl-D (Ctrl-Z Enter on Windows) or an empty line twice to leave",
            file=sys.stderr,
        )
    empty = 0
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            empty += 1
            if interactive and empty >= 2:
                break
            continue
        empty = 0
        print(chat.send(line.strip()), flush=True)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
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
    except BlipkitError as e:
        print(f"blipkit: error: {e}", file=sys.stderr)
        return e.exit_code
    except FileNotFoundError as e:  # a path the user named
        print(f"blipkit: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:
        traceback.print_exc()
        print(
            f"blipkit: crashed ({type(e).__name__}): this is a bug in blipkit, not a mistake in the command; "
            "the traceback above says where",
            file=sys.stderr,
        )
        return EXIT_CRASH


if __name__ == "__main__":
    sys.exit(main())
