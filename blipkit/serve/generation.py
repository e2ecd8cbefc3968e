"""One request's generation: its choices as engine jobs, their events merged, whatever API asked.

A chat becomes jobs in one of four ways:

- one image (any generative family): the model's prompt with the image, batched with other requests and
  served from the image cache (``Engine.submit``);
- several images, for families that read them (LLaVA): the conversation written with an image placeholder
  where each image stood, every placeholder replaced by its image's visual prompt (one job per batch);
- an image through its caption (the caption-then-LLM bridge): the caption in the LLM's prompt;
- no image: the model's LLM reading the text alone (``Engine.run_text``).

Families that read one image answer a 400 naming that limit when a conversation holds several.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from blipkit.errors import UsageError
from blipkit.serve.engine import Engine
from blipkit.serve.errors import APIError
from blipkit.serve.jobs import Job, Result
from blipkit.serve.messages import ChatRequest
from blipkit.serve.options import Options
from blipkit.text import Prompt

if TYPE_CHECKING:
    from blipkit.serve.app import Server

MAX_IMAGES = 8  # images per conversation, for families that read several
_SEED_SPAN = 2**64  # torch seeds: choice i > 0 samples with (seed + i) mod 2^64


class Generation:
    """The jobs of one request (one per choice) and their events, merged on the event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()
        self.jobs: list[Job] = []
        self.started_ns = time.perf_counter_ns()

    def emitter(self, index: int) -> Callable[[tuple[str, Any]], None]:
        """Where choice ``index``'s job sends its events (from the engine's thread)."""

        def emit(event: tuple[str, Any]) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, *event))

        return emit

    async def events(self) -> AsyncIterator[tuple[int, str, Any]]:
        """(choice, kind, value) as they come, until every job is done or failed."""
        left = len(self.jobs)
        while left:
            index, kind, value = await self.queue.get()
            left -= kind in ("done", "error")
            yield index, kind, value

    async def results(self) -> list[Result]:
        """Each choice's result; a failed job is a 500."""
        out: list[Any] = [None] * len(self.jobs)
        async for index, kind, value in self.events():
            if kind == "error":
                raise failed(value)
            if kind == "done":
                out[index] = value
        return out

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancelled = True

    def elapsed_ns(self) -> int:
        return time.perf_counter_ns() - self.started_ns


def failed(error: Exception) -> APIError:
    return APIError(f"generation failed: {error}", 500, "generation_failed", type="server_error")


def fitted_prompt(engine: Engine, req: ChatRequest) -> Prompt:
    """The request's prompt fitted to the model's windows; a turn that cannot fit is a 400."""
    try:
        if req.raw:
            return engine.model.text.prompt(req.message or "", req.max_tokens)
        return engine.prompt(req.history, req.message, req.max_tokens)
    except UsageError as e:
        raise APIError(str(e), 400, "context_length_exceeded", "max_tokens") from e


def text_prompt(srv: Server, req: ChatRequest) -> Prompt:
    """The prompt of a conversation without images: the model's template with no image placeholder."""
    text = srv.model.text
    history, message = req.conversation()
    if message is None:
        raise APIError("the last user message has no text and no image", 400, "invalid_messages", "messages")
    try:
        if req.raw:
            return raw_prompt(srv, message, req.max_tokens)
        return text.chat(history, message, req.max_tokens, text.template.with_image(""))
    except UsageError as e:
        raise APIError(str(e), 400, "context_length_exceeded", "max_tokens") from e


def raw_prompt(srv: Server, text: str, max_tokens: int) -> Prompt:
    """``text`` as it is (no template), fitted to the LLM's window: a long one keeps its end."""
    processor = srv.model.text
    budget = processor.llm_context - max_tokens
    if budget < 1:
        raise APIError(
            f"max_tokens={max_tokens} leaves no room for the prompt in the model's context window "
            f"({processor.llm_context} tokens)",
            400,
            "context_length_exceeded",
            "max_tokens",
        )
    ids, cut = processor.llm_ids(text, budget)
    return Prompt(text, ids, text, truncated=cut)


def spliced_prompt(srv: Server, req: ChatRequest) -> tuple[Prompt, int]:
    """The prompt of a conversation with several images, each at its own placeholder, and how many of the
    images it still holds (the oldest turns, their images with them, go first when the window is full)."""
    text = srv.model.text
    placeholder, index = text.settings.image_token, text.settings.image_token_index
    history, message = req.conversation(placeholder)
    if message is None:
        raise APIError("the last user message is empty", 400, "invalid_messages", "messages")
    if message.replace(placeholder, "").strip() == "":
        message = f"{message}\n{text.prompts.caption or 'Describe the images.'}"
    # room for every image: the window's own reckoning counts one image's positions
    reserve = req.max_tokens + (len(req.images) - 1) * (text.num_query_tokens - 1)
    try:
        prompt = text.chat(history, message, reserve, text.template.with_image(""))
    except UsageError as e:
        raise APIError(str(e), 400, "context_length_exceeded", "max_tokens") from e
    kept = prompt.llm_ids.count(index)
    if kept != prompt.text.count(placeholder):
        raise APIError(
            "the images and the last message do not fit the model's context window",
            400,
            "context_length_exceeded",
            "messages",
        )
    return prompt, kept


async def start_chat(srv: Server, req: ChatRequest) -> Generation:
    """Jobs for a chat request, started; see the module docstring for the ways a chat runs."""
    with srv.engine.arriving():  # requests that arrive together are batched together
        return await _start_chat(srv, req)


async def _start_chat(srv: Server, req: ChatRequest) -> Generation:
    engine = srv.engine
    gen = Generation()
    options = req.options
    constraint = await srv.constraint(options)
    distinct = req.distinct_images()
    if not distinct:
        prompt = await asyncio.to_thread(text_prompt, srv, req)
        return _run_text(srv, gen, prompt, options, constraint, visual_tokens=0)
    several = len(req.images) > 1 and srv.takes_several_images
    if len(distinct) > 1 and not several:
        raise APIError(
            f"model {srv.name!r} reads one image per conversation; this one has {len(distinct)}",
            400,
            "too_many_images",
            distinct[1].param,
        )
    if several:
        if len(req.images) > MAX_IMAGES:
            raise APIError(
                f"at most {MAX_IMAGES} images per conversation; this one has {len(req.images)}",
                400,
                "too_many_images",
                req.images[MAX_IMAGES].param,
            )
        refs = {image.url: await srv.image_ref(image) for image in distinct}
        prompt, kept = await asyncio.to_thread(spliced_prompt, srv, req)
        images = [refs[image.url] for image in req.images][len(req.images) - kept :]
        visual = kept * (srv.model.text.num_query_tokens - 1)  # each image token becomes P positions
        for job in _jobs(gen, "", prompt, options, constraint, images=images, visual_tokens=visual):
            engine.submit(job)
        return gen
    key, features, pixels = await srv.image_ref(distinct[0])
    if srv.via_caption:  # the caption-then-LLM bridge: the caption, not the image, reaches the LLM
        prompt = await asyncio.to_thread(srv.caption_prompt, key, pixels, req)
        return _run_text(srv, gen, prompt, options, constraint, key=key, pixels=pixels)
    prompt = await asyncio.to_thread(fitted_prompt, engine, req)  # tokenising is work: off the loop
    for job in _jobs(gen, key, prompt, options, constraint, features=features, pixels=pixels):
        engine.submit(job)
    return gen


async def start_text(srv: Server, prompt: Prompt, options: Options) -> Generation:
    """Jobs for a prompt with no image (``/v1/completions``, Ollama's generate without images), started."""
    gen = Generation()
    constraint = await srv.constraint(options)
    return _run_text(srv, gen, prompt, options, constraint, visual_tokens=0)


def _run_text(
    srv: Server, gen: Generation, prompt: Prompt, options: Options, constraint: Any, **fields: Any
) -> Generation:
    for job in _jobs(gen, fields.pop("key", "text"), prompt, options, constraint, **fields):
        gen.loop.run_in_executor(None, srv.engine.run_text, job)
    return gen


def _jobs(
    gen: Generation, key: str, prompt: Prompt, options: Options, constraint: Any, **fields: Any
) -> list[Job]:
    """One job per choice; choice i > 0 samples with the seed + i."""
    for i in range(options.n):
        seed = options.seed
        if seed is not None and i:
            seed = (seed + i) % _SEED_SPAN
        job = Job(
            key,
            prompt,
            gen.emitter(i),
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            stream=options.stream,
            stop=options.stop,
            seed=seed,
            logprobs=options.logprobs,
            constraint=constraint,
            logit_bias=options.logit_bias or None,
            **fields,
        )
        gen.jobs.append(job)
    return gen.jobs
