"""An OpenAI-compatible HTTP server with a web chat page: ``create_app(model)`` or ``blipkit serve``.

Needs the ``serve`` extra (FastAPI, uvicorn): ``pip install 'blipkit[serve]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["create_app"]


def create_app(model: Any, **options: Any) -> FastAPI:
    """The FastAPI app serving ``model``; see :func:`blipkit.serve.app.create_app` for the options."""
    from blipkit.serve.app import create_app as _create

    return _create(model, **options)
