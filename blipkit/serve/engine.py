"""Dynamic batching of chat requests over one model, with per-image feature caching and token streaming.

Requests wait in a queue; a worker thread takes up to ``max_batch_size`` of them (waiting at most
``batch_window_ms`` for more after the first), groups those that decode alike (greedy, or sampling with
the same temperature / top-p) and runs each group as one ``generate`` call. New tokens reach each request
as they are produced.

The image side comes from an LRU cache keyed by image hash when the image was seen before:

* decoder-only LLM, visual prompt independent of the text (``bridge.text_input`` off): the visual prompt
  (Q-Former + bridge output) and the LLM's keys/values over it, so that a follow-up question runs neither
  the vision encoder nor the LLM over the Q prompt positions, only its own text (``blipkit.serve.prefix``);
* question-aware bridges (the prompt joins the Q-Former, so the visual prompt depends on the text): the
  vision encoder's features;
* encoder-decoder LLMs (T5), or LLMs whose cache cannot be reused that way: the visual prompt only, the LLM
  reading [visual prompt; text] whole for every question.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import StoppingCriteria, StoppingCriteriaList

from blipkit.api import Model
from blipkit.models.blip2 import left_pack
from blipkit.models.greedy import GreedyDecoder, plain_greedy
from blipkit.processing import load_image
from blipkit.serve.cache import FeatureCache, ImageEntry
from blipkit.serve.errors import APIError
from blipkit.serve.messages import fit_prompt
from blipkit.serve.prefix import (
    compute_prefix_kv,
    generate_after_prefix,
    row_kv,
    stack_kv,
    supports_prefix_kv,
)

log = logging.getLogger("blipkit.serve")


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" (end of sequence) or "length" (max_tokens reached)
    prompt_tokens: int
    completion_tokens: int
    cached_image: bool


@dataclass
class Job:
    """One chat completion: its inputs, decoding options, and where its events go.

    ``emit`` receives ``("delta", str)`` while streaming, then ``("done", Result)`` or
    ``("error", Exception)``.
    """

    key: str  # image hash
    ids: list[int]  # LLM prompt tokens
    prompt: str
    emit: Callable[[tuple[str, Any]], None]
    features: ImageEntry | None = None  # the image's cache entry, when it was cached
    pixels: Tensor | None = None  # (1, 3, S, S) when the image was not cached
    max_tokens: int = 30
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    finished: bool = False

    @property
    def sampling(self) -> tuple:
        """Jobs with equal keys can share one ``generate`` call."""
        if not self.temperature:  # omitted or 0: greedy
            return (False,)
        return (True, float(self.temperature), float(self.top_p if self.top_p is not None else 1.0))


class _Rows(StoppingCriteria):
    """Hands each new token to its job, and stops the rows whose job is finished or cancelled."""

    def __init__(self, engine: Engine, jobs: list[Job]):
        self.engine = engine
        self.jobs = jobs

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        last = input_ids[:, -1].tolist()
        done = []
        for job, token in zip(self.jobs, last, strict=True):
            if not job.finished:
                self.engine._on_token(job, token)
            done.append(job.finished or job.cancelled)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Engine:
    """Runs chat jobs on ``model`` in batches, from a worker thread."""

    def __init__(
        self,
        model: Model,
        max_batch_size: int = 8,
        batch_window_ms: float = 10.0,
        cache_size: int = 64,
        cache_bytes: int | None = None,
        prefix_kv: bool = True,
        greedy_head: bool = True,
    ):
        """Keeps ``cache_size`` images cached (and at most ``cache_bytes`` of tensors, if given).

        With ``prefix_kv`` an entry also holds the LLM's keys/values over the visual prompt, where the model
        allows it (see ``blipkit.serve.prefix``). Greedy batches of decoder-only LLMs decode in the lean loop,
        with the exact bf16 ``GreedyHead`` unless ``greedy_head`` is False.
        """
        model._require_llm()
        self.model = model
        self.max_batch_size = max(1, max_batch_size)
        self.batch_window = max(0.0, batch_window_ms) / 1000
        self.cache = FeatureCache(cache_size, cache_bytes)
        self.lock = threading.Lock()  # one model call at a time (generation, embeddings)
        self.batches = 0
        self.largest_batch = 0
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        tok = model.tokenizer
        self._eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        self._pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        # with question-aware queries the visual prompt depends on the text: cache the ViT features instead
        self.question_aware = bool(model.config.bridge.text_input)
        # worth it only when entries are kept: the prefix run once per image instead of once per question
        self.prefix_kv = prefix_kv and self.cache.capacity > 0 and supports_prefix_kv(model.model)
        blip = model.model  # greedy batches take the lean loop where it gives generate's tokens
        self.decoder = GreedyDecoder(blip.llm, greedy_head) if plain_greedy(blip) else None

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="blipkit-serve-engine", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
        self._thread = None

    # --- request side -----------------------------------------------------------------------------
    def context_window(self) -> int:
        llm_cfg = self.model.model.llm.config
        limit = self.model.config.llm.max_context or getattr(llm_cfg, "max_position_embeddings", None)
        return int(limit or getattr(llm_cfg, "n_positions", None) or 512)

    def prompt(
        self, history: list[tuple[str, str]], message: str | None, max_tokens: int
    ) -> tuple[str, list[int]]:
        """Prompt text and LLM token ids for a turn; old turns are dropped when the context window is full."""
        prompts = self.model.config.prompts
        budget = self.context_window() - self.model.config.qformer.num_query_tokens - max_tokens
        if budget < 1:
            raise APIError(
                f"max_tokens={max_tokens} leaves no room for the prompt in the model's context window "
                f"({self.context_window()} tokens)",
                400,
                "context_length_exceeded",
                "max_tokens",
            )
        tok = self.model.tokenizer
        if message is None:  # an image without a question: caption it
            text = prompts.caption or ""
        else:
            text, _ = fit_prompt(
                history,
                message,
                lambda t: len(tok(t)["input_ids"]),
                budget,
                prompts.vqa,
                prompts.chat_separator,
            )
        return text, tok(text)["input_ids"][-budget:]

    def cached(self, key: str) -> ImageEntry | None:
        return self.cache.get(key)

    def pixels(self, data: bytes) -> Tensor:
        """Decode and preprocess one image (raises ImageError): (1, 3, S, S)."""
        return self.model.processor.preprocess(load_image(data))[None]

    def submit(self, job: Job) -> None:
        if job.features is None and job.pixels is None:
            raise ValueError("a job needs cached features or pixels")
        self.start()
        self._queue.put(job)

    def run(self, data: bytes, key: str, prompt_ids: list[int], prompt: str = "", **options: Any) -> Result:
        """Blocking helper: one job from any thread, waiting for its result (benchmarks, scripts)."""
        done: Future[Result] = Future()

        def emit(event: tuple[str, Any]) -> None:
            if event[0] == "done":
                done.set_result(event[1])
            elif event[0] == "error":
                done.set_exception(event[1])

        features = self.cached(key)
        pixels = None if features is not None else self.pixels(data)
        self.submit(Job(key, prompt_ids, prompt, emit, features=features, pixels=pixels, **options))
        return done.result()

    def stats(self) -> dict[str, Any]:
        cache = {**self.cache.stats(), "prefix_kv": self.prefix_kv}
        return {"batches": self.batches, "largest_batch": self.largest_batch, "cache": cache}

    # --- worker side ------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            deadline = time.monotonic() + self.batch_window
            while len(batch) < self.max_batch_size:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            batch = [j for j in batch if not j.cancelled]
            batch.sort(key=lambda j: j.sampling)
            for _, group in itertools.groupby(batch, key=lambda j: j.sampling):
                self._run(list(group))

    @torch.inference_mode()
    def _entries(self, jobs: list[Job]) -> list[ImageEntry]:
        """The cache entry of each job's image: from the job, the cache, or one pass over the new images."""
        todo: dict[str, Tensor] = {}
        for job in jobs:
            if job.features is None and job.key not in todo:
                found = self.cache.get(job.key, count=False)
                if found is not None:
                    job.features = found
                else:
                    todo[job.key] = job.pixels
        new = dict(zip(todo, self._encode(list(todo.values())), strict=True)) if todo else {}
        for key, entry in new.items():
            self.cache.put(key, entry)
        return [job.features if job.features is not None else new[job.key] for job in jobs]

    def _encode(self, pixels: list[Tensor]) -> list[ImageEntry]:
        """Entries for new images (1, 3, S, S) each, from one vision (+ Q-Former, + LLM prefix) pass."""
        blip = self.model.model
        embeds = blip.encode_image(torch.cat(pixels).to(self.model.device))  # (n, P, Dv)
        n = embeds.shape[0]
        if self.question_aware:
            return [ImageEntry(embeds[i : i + 1].clone()) for i in range(n)]
        prefix = blip._prefix(None, image_embeds=embeds)  # (n, Q, Dl) in the LLM's dtype
        kv = compute_prefix_kv(blip.llm, prefix) if self.prefix_kv else None
        if self.prefix_kv and kv is None:
            log.info("the LLM's cache cannot hold a reusable prefix: caching the visual prompt only")
            self.prefix_kv = False
        return [ImageEntry(prefix[i : i + 1].clone(), row_kv(kv, i) if kv else None) for i in range(n)]

    def _batch_ids(self, rows: list[list[int]], left: bool = False) -> tuple[Tensor, Tensor]:
        """Token ids and mask (B, T), padded on the right, or on the ``left``."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            span = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, span] = torch.tensor(r, dtype=torch.long)
            mask[i, span] = 1
        return ids.to(self.model.device), mask.to(self.model.device)

    def _run(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(jobs))
        first = jobs[0]
        options: dict[str, Any] = {
            "max_new_tokens": max(j.max_tokens for j in jobs),
            "num_beams": 1,
            "do_sample": first.sampling[0],
            "eos_token_id": sorted(self._eos) or None,
            "pad_token_id": self._pad,
            "stopping_criteria": StoppingCriteriaList([_Rows(self, jobs)]),
        }
        if first.sampling[0]:
            options.update(temperature=first.sampling[1], top_p=first.sampling[2], top_k=0)
        try:
            with self.lock:
                self._generate(jobs, self._entries(jobs), options)
            for job in jobs:
                if not job.finished:
                    self._finish(job, "length")
        except Exception as e:  # a failed batch fails its jobs, not the server
            log.exception("generation failed for a batch of %d", len(jobs))
            for job in jobs:
                if not job.finished:
                    job.finished = True
                    self._emit(job, ("error", e))

    def _generate(self, jobs: list[Job], entries: list[ImageEntry], options: dict[str, Any]) -> None:
        """One decoding run for the batch; tokens reach the jobs as they are produced.

        Greedy batches take the lean loop (``GreedyDecoder``); sampling, and LLMs it does not fit, go through
        transformers' ``generate`` with the jobs' stopping criteria.
        """
        blip = self.model.model
        feats = torch.cat([e.features for e in entries])  # (B, Q, Dl) or (B, P, Dv)
        rows = [j.ids for j in jobs]
        greedy = self.decoder is not None and not options["do_sample"]
        if all(e.kv is not None for e in entries) and all(rows):
            ids, mask = self._batch_ids(rows, left=True)  # the prefix comes first, from the cache
            kv = [e.kv for e in entries]
            if not greedy:
                generate_after_prefix(blip, feats, kv, ids, mask, **options)
                return
            embeds, full_mask = blip._inputs(feats, ids, mask)  # (B, Q+T, Dl), (B, Q+T)
            text = embeds[:, feats.shape[1] :]  # the LLM reads only the text: the prefix is in the cache
            self.decoder.run(
                text, options["max_new_tokens"], self._row_sink(jobs), stack_kv(blip.llm, kv), full_mask
            )
            return
        ids, mask = self._batch_ids(rows)
        if self.question_aware:
            q_ids, q_mask = self._qformer_ids([j.prompt for j in jobs])
            visual = {"image_embeds": feats, "qformer_input_ids": q_ids, "qformer_attention_mask": q_mask}
        else:
            visual = {"prefix": feats}
        if not greedy:
            blip.generate(None, ids, mask, **visual, **options)
            return
        embeds, full_mask = left_pack(*blip._inputs(blip._prefix(None, **visual), ids, mask))  # padding first
        self.decoder.run(embeds, options["max_new_tokens"], self._row_sink(jobs), attention_mask=full_mask)

    def _row_sink(self, jobs: list[Job]) -> Callable[[int, int], bool]:
        """``on_token`` for the lean loop: row i's tokens go to ``jobs[i]``; done once it is finished."""

        def on_token(row: int, token: int) -> bool:
            job = jobs[row]
            if not job.finished:
                self._on_token(job, token)
            return job.finished or job.cancelled

        return on_token

    def _qformer_ids(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        enc = self.model.qformer_tokenizer(texts, padding=True, return_tensors="pt")
        return enc["input_ids"].to(self.model.device), enc["attention_mask"].to(self.model.device)

    def _on_token(self, job: Job, token: int) -> None:
        if job.cancelled:
            job.finished = True
            return
        if token in self._eos:
            self._finish(job, "stop")
            return
        job.tokens.append(token)
        if job.stream:
            text = self.model.tokenizer.decode(job.tokens, skip_special_tokens=True).lstrip()
            if text.startswith(job.sent) and len(text) > len(job.sent) and not text.endswith("\ufffd"):
                self._emit(job, ("delta", text[len(job.sent) :]))
                job.sent = text
        if len(job.tokens) >= job.max_tokens:
            self._finish(job, "length")

    def _finish(self, job: Job, reason: str) -> None:
        job.finished = True
        text = self.model.tokenizer.decode(job.tokens, skip_special_tokens=True).strip()
        if job.stream and text.startswith(job.sent) and len(text) > len(job.sent):
            self._emit(job, ("delta", text[len(job.sent) :]))
        prompt_tokens = len(job.ids) + self.model.config.qformer.num_query_tokens
        self._emit(job, ("done", Result(text, reason, prompt_tokens, len(job.tokens), job.pixels is None)))

    @staticmethod
    def _emit(job: Job, event: tuple[str, Any]) -> None:
        try:
            job.emit(event)
        except Exception:  # the client's event loop is gone
            job.cancelled = True
