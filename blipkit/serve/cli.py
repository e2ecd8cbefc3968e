"""``blipkit serve``: run the OpenAI- and Ollama-compatible server and web chat page with uvicorn."""

from __future__ import annotations

import argparse
import errno
import math
import re
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from blipkit.cli_options import add_via_caption, load_model
from blipkit.errors import EXIT_CRASH, EXIT_USAGE

MISSING = "blipkit serve needs FastAPI and uvicorn: pip install 'blipkit[serve]'"


def _checked(flag: str, kind: type, ok: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """An argparse ``type=`` reading a ``kind`` number for ``flag`` that must satisfy ``ok`` (``rule``)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"{flag} must be {rule}, got {text}")
        return value

    return parse


def _domains(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"--allowed-media-domains needs host names, got {text!r}")
    return names


def _usage_error(message: str) -> NoReturn:
    """Print argparse's complaint as one line, ``blipkit: error: ...``, and exit 2."""
    found = re.fullmatch(r"argument (\S+): (\1 .*)", message, re.S)  # the flag's own message names it
    print(f"blipkit: error: {found[2] if found else message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def register(subparsers: argparse._SubParsersAction, add_model_args: Callable) -> None:
    p = subparsers.add_parser("serve", help="OpenAI- and Ollama-compatible API and web chat page")
    p.error = _usage_error  # type: ignore[method-assign]
    p.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument(
        "--port",
        type=_checked("--port", int, lambda v: 1 <= v <= 65535, "between 1 and 65535"),
        default=8000,
        help="port to listen on (default 8000)",
    )
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* and /api/* requests"
    )
    p.add_argument(
        "--allow-remote-images",
        action="store_true",
        help="let requests name http(s) image URLs to download (from public addresses only)",
    )
    p.add_argument(
        "--allowed-media-domains",
        type=_domains,
        default=None,
        metavar="HOST[,HOST...]",
        help="download remote images from these hosts only (implies --allow-remote-images)",
    )
    p.add_argument(
        "--max-image-mb",
        type=_checked("--max-image-mb", float, lambda v: v > 0, "over 0"),
        default=20.0,
        help="largest accepted image file (default 20 MB)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=_checked("--max-image-pixels", int, lambda v: v >= 1, "at least 1"),
        default=25_000_000,
        help="largest accepted width x height, read from the image header before decoding "
        "(default 25000000, 25 megapixels)",
    )
    p.add_argument(
        "--max-batch-size",
        type=_checked("--max-batch-size", int, lambda v: v >= 1, "at least 1"),
        default=8,
        help="requests generated together (default 8)",
    )
    p.add_argument(
        "--batch-window-ms",
        type=_checked("--batch-window-ms", float, lambda v: v >= 0, "at least 0"),
        default=10.0,
        help="how long a batch waits for more requests",
    )
    p.add_argument(
        "--cache-size",
        type=_checked("--cache-size", int, lambda v: v >= 0, "at least 0"),
        default=64,
        help="images whose visual prompt (and its LLM keys/values) are kept",
    )
    p.add_argument(
        "--cache-mb",
        type=_checked("--cache-mb", float, lambda v: v > 0, "over 0"),
        default=None,
        help="also cap the image cache's tensors at this many MB (LRU)",
    )
    add_model_args(p)
    add_via_caption(p)
    p.set_defaults(func=cmd_serve)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) the way uvicorn binds one; OSError if that cannot be done."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from blipkit.serve.app import create_app
    except ModuleNotFoundError as e:
        if e.name not in ("fastapi", "uvicorn", "starlette"):
            raise
        print(f"blipkit: error: {MISSING}", file=sys.stderr)
        return EXIT_USAGE

    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        reason = "the port is already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        print(f"blipkit: error: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
        return EXIT_CRASH
    with sock:
        model = load_model(args)
        app = create_app(
            model,
            model_name=Path(args.model).name or args.model,
            api_key=args.api_key,
            allow_remote_images=args.allow_remote_images,
            max_image_bytes=int(args.max_image_mb * 1024 * 1024),
            max_batch_size=args.max_batch_size,
            batch_window_ms=args.batch_window_ms,
            cache_size=args.cache_size,
            cache_bytes=None if args.cache_mb is None else int(args.cache_mb * 1024 * 1024),
            max_image_pixels=args.max_image_pixels,
            allowed_media_domains=args.allowed_media_domains,
        )
        print(f"blipkit: serving {args.model} on http://{args.host}:{args.port}/", file=sys.stderr)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0
