"""The FastAPI application: OpenAI-compatible chat / completions / embeddings / models endpoints, Ollama's
API (``blipkit.serve.ollama``) and the web chat page."""

from __future__ import annotations

import asyncio
import base64
import hmac
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from blipkit.api import Model
from blipkit.errors import CapabilityError, UsageError
from blipkit.processing import ImageError, load_image
from blipkit.serve.body import json_body as _json_body
from blipkit.serve.chat import add_chat_route
from blipkit.serve.completions import add_completion_route
from blipkit.serve.constrained import JsonConstraint, JsonGrammars, vocab_size
from blipkit.serve.engine import Engine
from blipkit.serve.errors import APIError, error_body
from blipkit.serve.images import (
    FETCH_TIMEOUT_S,
    check_image_url,
    decode_data_uri,
    fetch_remote,
    image_hash,
    normalize_domains,
    open_image,
    release_memory,
)
from blipkit.serve.jobs import ImageRef
from blipkit.serve.messages import ChatRequest, ImagePart
from blipkit.serve.ollama import add_ollama_routes
from blipkit.serve.options import Options
from blipkit.text import Prompt

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000
TRIM_AFTER_PIXELS = 2_000_000  # decodes this large give their memory back to the OS afterwards
FETCH_WORKERS = 32
MAX_EMBEDDING_INPUTS = 2048
CAPTION_CACHE = 256  # captions kept per image hash by caption-then-LLM servers


class Server:
    """What the routes share: the model, its engine and the server options."""

    def __init__(
        self,
        model: Model,
        name: str,
        api_key: str | None,
        allow_remote_images: bool,
        max_image_bytes: int,
        engine: Engine | None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        allowed_media_domains: Iterable[str] | None = None,
        allow_private_networks: bool = False,
        image_fetch_timeout_s: float = FETCH_TIMEOUT_S,
    ):
        self.model = model
        self.names = {name, model.config.name}
        self.name = name
        self.api_key = api_key
        self.allow_remote_images = allow_remote_images
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.allowed_media_domains = normalize_domains(allowed_media_domains)
        self.allow_private_networks = allow_private_networks
        self.image_fetch_timeout_s = image_fetch_timeout_s
        self.fetcher = ThreadPoolExecutor(FETCH_WORKERS, thread_name_prefix="blipkit-fetch")
        self.engine = engine
        self.lock = engine.lock if engine is not None else threading.Lock()
        self.via_caption = model.family == "caption"
        self.captions: OrderedDict[str, str] = OrderedDict()  # image hash -> caption (bridge models)
        self.created = int(time.time())
        self.body_limit = max_image_bytes * 4 // 3 + 1024 * 1024  # one base64 image plus the rest
        # LLaVA splices an image at each image token of its prompt; other families read one image
        self.takes_several_images = model.family == "llava" and model.text.settings.image_token is not None
        self._grammars: JsonGrammars | None = None

    async def json_body(self, request: Request) -> Any:
        return await _json_body(request, self.body_limit)

    def require_generation(self, capability: str) -> None:
        """A 400 naming what the model can do when it cannot generate text."""
        if self.engine is None:
            raise APIError(
                f"model {self.name!r} cannot {capability}; it can: {', '.join(self.model.capabilities)}",
                400,
                "unsupported_by_model",
                "model",
            )

    async def constraint(self, options: Options) -> JsonConstraint | None:
        """The JSON grammar the options ask for (compiled off the event loop), else None."""
        size = vocab_size(self.model.model.llm) if options.logit_bias else 0
        bad = [t for t in options.logit_bias if t >= size]
        if bad:
            raise APIError(
                f"logit_bias names token ids past the vocabulary ({size} tokens): {bad}",
                400,
                "invalid_value",
                "logit_bias",
            )
        if not options.json:
            return None
        if self._grammars is None:
            self._grammars = JsonGrammars(self.model.tokenizer, vocab_size(self.model.model.llm))
        return await asyncio.to_thread(self._grammars.constraint, options.json_schema, "response_format")

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested not in self.names:
            raise APIError(
                f"model {requested!r} is not served here; available: {self.name!r}",
                404,
                "model_not_found",
                "model",
            )

    async def image_ref(self, image: ImagePart) -> ImageRef:
        """(hash, cached features, pixels) of one image of a request.

        Downloads run in their own threads, so slow origins do not hold up decoding or other requests.
        """
        data = None
        if check_image_url(image.url, self.allow_remote_images, image.param) == "remote":
            data = await asyncio.get_running_loop().run_in_executor(
                self.fetcher, self.download, image.url, image.param
            )
        return await asyncio.to_thread(self.decode, image, data)

    def download(self, url: str, param: str) -> bytes:
        return fetch_remote(
            url,
            self.max_image_bytes,
            param,
            allow_private_networks=self.allow_private_networks,
            allowed_domains=self.allowed_media_domains,
            timeout_s=self.image_fetch_timeout_s,
        )

    async def image_bytes(self, url: str, param: str) -> bytes:
        """The bytes behind an image URL (a data URI, or a download where remote images are allowed)."""
        if check_image_url(url, self.allow_remote_images, param) == "remote":
            return await asyncio.get_running_loop().run_in_executor(self.fetcher, self.download, url, param)
        return await asyncio.to_thread(decode_data_uri, url, self.max_image_bytes, param)

    def caption_prompt(self, key: str, pixels: Any, req: ChatRequest) -> Prompt:
        """Blocking: the bridge's prompt for the request, with its image's caption (kept per image)."""
        caption = self.captions.pop(key, None)
        if caption is None:
            caption = self.model.describe(pixels)[0]
        self.captions[key] = caption
        while len(self.captions) > CAPTION_CACHE:
            self.captions.popitem(last=False)
        if req.message is None:  # an image without a question: its caption
            return self.model.text.prompt(f"Describe the image. {caption}", req.max_tokens)
        try:
            return self.model.text.chat(
                req.history, req.message, req.max_tokens, self.model.template_for(caption)
            )
        except UsageError as e:
            raise APIError(str(e), 400, "context_length_exceeded", "max_tokens") from e

    def decode(self, image: ImagePart, data: bytes | None) -> ImageRef:
        """Blocking: (hash, cached features, pixels) of a data URI's or a download's bytes."""
        if data is None:
            data = decode_data_uri(image.url, self.max_image_bytes, image.param)
        key = image_hash(data)
        features = None if self.via_caption else self.engine.cached(key)
        if features is not None:
            return key, features, None
        return key, None, self.pixels(data, image.param)

    def pixels(self, data: bytes, param: str) -> torch.Tensor:
        """Blocking: the processed (1, 3, S, S) image of encoded image bytes."""
        processor = self.model.processor
        image = open_image(data, self.max_image_pixels, param, 2 * processor.image_size)
        pixels = image.width * image.height
        try:
            return processor.preprocess(load_image(image))[None]
        except ImageError as e:
            raise APIError(f"cannot decode image: {e.reason}", 400, "invalid_image", param) from e
        finally:
            image.close()
            del image
            if pixels >= TRIM_AFTER_PIXELS:
                release_memory()


def _embedding_inputs(value: Any) -> list[tuple[str, str]]:
    """``input`` of an embeddings request as ("text", text) / ("image", url) items.

    A string or a list whose items are strings (texts) or images, given as OpenAI's chat content parts
    ``{"type": "image_url", "image_url": {"url": ...}}`` or as ``{"image": url}`` (a data URI, or a URL where
    remote images are allowed).
    """
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise APIError(
            "'input' must be a string or a non-empty list of strings and images",
            400,
            "invalid_input",
            "input",
        )
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise APIError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request", 400, "too_many_inputs", "input")
    out = []
    for i, item in enumerate(items):
        url = None
        if isinstance(item, dict):
            part = item.get("image_url") if item.get("type") == "image_url" else None
            url = (
                part.get("url") if isinstance(part, dict) else part if part is not None else item.get("image")
            )
        if isinstance(item, str):
            out.append(("text", item))
        elif isinstance(url, str) and url:
            out.append(("image", url))
        else:
            raise APIError(
                f"input[{i}] must be a string, {{'type': 'image_url', 'image_url': {{'url': ...}}}} or "
                "{'image': url}",
                400,
                "invalid_input",
                f"input[{i}]",
            )
    return out


def create_app(
    model: Model,
    model_name: str | None = None,
    api_key: str | None = None,
    allow_remote_images: bool = False,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_batch_size: int = 8,
    batch_window_ms: float = 10.0,
    cache_size: int = 64,
    cache_bytes: int | None = None,
    engine: Engine | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    allowed_media_domains: Iterable[str] | None = None,
    allow_private_networks: bool = False,
    image_fetch_timeout_s: float = FETCH_TIMEOUT_S,
) -> FastAPI:
    """The blipkit server for ``model``. With ``api_key``, ``/v1/*`` and ``/api/*`` need
    ``Authorization: Bearer <key>``.

    The image cache keeps ``cache_size`` images (and at most ``cache_bytes`` of tensors, when given).
    ``engine`` lets callers share a batching engine (and its image cache) between apps or scripts.
    Images over ``max_image_pixels`` (width x height, read from the header) are refused undecoded.
    Remote images (``allow_remote_images``, or only the hosts in ``allowed_media_domains``) are fetched
    from public addresses only unless ``allow_private_networks``, within ``image_fetch_timeout_s`` in all.
    """
    if engine is None and model.model.has_llm:
        engine = Engine(model, max_batch_size, batch_window_ms, cache_size, cache_bytes)
    srv = Server(
        model,
        model_name or model.config.name,
        api_key,
        allow_remote_images or allowed_media_domains is not None,
        max_image_bytes,
        engine,
        max_image_pixels,
        allowed_media_domains,
        allow_private_networks,
        image_fetch_timeout_s,
    )
    body_limit = srv.body_limit

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        srv.fetcher.shutdown(wait=False, cancel_futures=True)
        if engine is not None:
            engine.stop()

    app = FastAPI(title="blipkit", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = srv

    def error(request: Request, status: int, body: dict[str, Any], **kwargs: Any) -> JSONResponse:
        """An error response; under ``/api/`` in Ollama's shape, ``{"error": "<message>"}``."""
        if request.url.path.startswith("/api/"):
            body = {"error": body["error"]["message"]}
        return JSONResponse(body, status_code=status, **kwargs)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error(request, exc.status, exc.body())

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error(request, exc.status_code, error_body(str(exc.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(str(exc.errors()), code="invalid_request"), status_code=400)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        return JSONResponse(error_body("client disconnected", code="client_disconnected"), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        body = error_body(
            "the server had an error processing the request", "server_error", code="internal_error"
        )
        return error(request, 500, body)

    @app.middleware("http")
    async def check_key(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path.startswith(("/v1/", "/api/")):
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), api_key.encode()
            ):
                body = error_body(
                    "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
                )
                return error(request, 401, body, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = engine.stats() if engine is not None else {}
        return {"status": "ok", "model": srv.name, "auth": bool(api_key), **stats}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {"id": srv.name, "object": "model", "created": srv.created, "owned_by": "blipkit"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        body = await _json_body(request, body_limit)
        if not isinstance(body, dict):
            raise APIError("request body must be a JSON object", 400, "invalid_body")
        srv.check_model(body.get("model"))
        items = _embedding_inputs(body.get("input"))
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise APIError(
                "encoding_format must be 'float' or 'base64'", 400, "invalid_value", "encoding_format"
            )
        dims = body.get("dimensions")
        if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims < 1):
            raise APIError("'dimensions' must be a positive integer", 400, "invalid_value", "dimensions")

        if not model.model.capabilities & {"embed"}:
            raise APIError(
                f"model {srv.name!r} cannot embed; it can: {', '.join(model.capabilities)}",
                400,
                "unsupported_by_model",
                "model",
            )
        texts = [(i, x) for i, (kind, x) in enumerate(items) if kind == "text"]
        images = [
            (i, await srv.image_bytes(x, f"input[{i}]"))
            for i, (kind, x) in enumerate(items)
            if kind == "image"
        ]

        def embed() -> Any:
            out: list[Any] = [None] * len(items)
            with srv.lock:
                if texts:
                    for (i, _), v in zip(
                        texts, model.embed_texts([t for _, t in texts]).float().cpu(), strict=True
                    ):
                        out[i] = v
                if images:
                    pixels = torch.cat([srv.pixels(data, f"input[{i}]") for i, data in images])
                    for (i, _), v in zip(images, model.embed_images(pixels).float().cpu(), strict=True):
                        out[i] = v
            return torch.stack(out)

        try:
            vectors = await asyncio.to_thread(embed)
        except CapabilityError as e:
            raise APIError(str(e), 400, "unsupported_by_model", "model") from e
        if dims is not None:
            if dims > vectors.shape[-1]:
                raise APIError(
                    f"'dimensions' must be at most {vectors.shape[-1]} for this model",
                    400,
                    "invalid_value",
                    "dimensions",
                )
            vectors = torch.nn.functional.normalize(vectors[:, :dims], dim=-1)
        tokens = sum(len(t.split()) for _, t in texts)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _encode_embedding(v, encoding)}
                for i, v in enumerate(vectors)
            ],
            "model": srv.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    add_chat_route(app, srv)
    add_completion_route(app, srv)
    add_ollama_routes(app, srv)

    return app


def _encode_embedding(vector: Any, encoding: str) -> list[float] | str:
    """A float32 vector as a list of floats, or as base64 of its little-endian float32 bytes."""
    if encoding == "float":
        return vector.tolist()
    return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
