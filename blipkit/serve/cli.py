"""``blipkit serve``: run the OpenAI-compatible server and web chat page with uvicorn."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

MISSING = "blipkit serve needs FastAPI and uvicorn: pip install 'blipkit[serve]'"


def register(subparsers: argparse._SubParsersAction, add_model_args: Callable) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible API and web chat page")
    p.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* requests")
    p.add_argument(
        "--allow-remote-images", action="store_true", help="let requests name http(s) image URLs to download"
    )
    p.add_argument("--max-image-mb", type=float, default=20.0, help="largest accepted image (default 20 MB)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests generated together (default 8)")
    p.add_argument(
        "--batch-window-ms", type=float, default=10.0, help="how long a batch waits for more requests"
    )
    p.add_argument(
        "--cache-size",
        type=int,
        default=64,
        help="images whose visual prompt (and its LLM keys/values) are kept",
    )
    p.add_argument(
        "--cache-mb",
        type=float,
        default=None,
        help="also cap the image cache's tensors at this many MB (LRU)",
    )
    add_model_args(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from blipkit.serve.app import create_app
    except ModuleNotFoundError as e:
        if e.name not in ("fastapi", "uvicorn", "starlette"):
            raise
        print(f"blipkit: error: {MISSING}", file=sys.stderr)
        return 2
    import blipkit

    model = blipkit.load(args.model, dtype=args.dtype, device=args.device)
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
    )
    print(f"blipkit: serving {args.model} on http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
