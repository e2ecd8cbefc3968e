"""Dynamic batching of chat requests over one model, with per-image feature caching and token streaming.

Requests wait in a queue; a worker thread takes up to ``max_batch_size`` of them (waiting at most
``batch_window_ms`` for more after the first while other requests are on their way, see ``arriving``; a
lone request starts at once), groups those that decode alike (greedy, or sampling with
the same temperature / top-p) and runs each group as one call of the model's decoder
(``blipkit.models.decoding``, which picks the loop). New tokens reach each request as they are produced.
Prompts are fitted by the model's text processor (``blipkit.text``).

The image side comes from an LRU cache keyed by image hash when the image was seen before:

* decoder-only LLM, visual prompt independent of the text (``bridge.text_input`` off): the visual prompt
  (Q-Former + bridge output) and the LLM's keys/values over it, so that a follow-up question runs neither
  the vision encoder nor the LLM over the Q prompt positions, only its own text
  (``blipkit.models.prefix_cache``);
* question-aware bridges (the prompt joins the Q-Former, so the visual prompt depends on the text): the
  vision encoder's features;
* encoder-decoder LLMs (T5), or LLMs whose cache cannot be reused that way: the visual prompt only, the LLM
  reading [visual prompt; text] whole for every question.

Greedy requests that overlap are batched continuously where the LLM allows it
(``blipkit.models.continuous``): a request that finished leaves the running batch at once and one waiting in
the queue takes its slot, so a one-word answer does not wait for a long description beside it. Jobs whose
decoding is their own (a seed, log-probabilities, a grammar, a logit bias, several images) run one per
batch. Stop sequences are matched on the decoded text as it grows; streamed text holds back what
could be the start of one. Jobs with no image run on the LLM alone (``run_text``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import Tensor

from blipkit.api import Model
from blipkit.models.blip2 import Visual
from blipkit.models.continuous import ContinuousBatch, split_rows
from blipkit.models.decoding import GREEDY
from blipkit.models.llm_io import LLMInputs, positions_from_mask
from blipkit.models.prefix_cache import compute_prefix_kv, row_kv, supports_prefix_kv
from blipkit.processing import load_image
from blipkit.serve.cache import FeatureCache, ImageEntry
from blipkit.serve.images import release_memory
from blipkit.serve.jobs import ImageRef, Job, Result, TokenLogprob, first_stop, held_back
from blipkit.text import Prompt

log = logging.getLogger("blipkit.serve")


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
        continuous: bool = True,
    ):
        """Keeps ``cache_size`` images cached (and at most ``cache_bytes`` of tensors, if given).

        With ``prefix_kv`` an entry also holds the LLM's keys/values over the visual prompt, where the model
        allows it (see ``blipkit.models.prefix_cache``). ``continuous`` batches overlapping greedy requests
        continuously where the LLM allows it; off, every batch decodes until its longest request is done.
        """
        model.require_llm()
        self.model = model
        self.max_batch_size = max(1, max_batch_size)
        self.batch_window = max(0.0, batch_window_ms) / 1000
        self.cache = FeatureCache(cache_size, cache_bytes)
        self.lock = threading.Lock()  # one model call at a time (generation, embeddings)
        self.batches = 0
        self.largest_batch = 0
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._arriving = 0  # requests being prepared (image, prompt) whose jobs are not submitted yet
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.decoder = model.decoder
        # with question-aware queries the visual prompt depends on the text: cache the ViT features instead
        self.question_aware = getattr(model.model, "question_aware", False)
        # worth it only when entries are kept: the prefix run once per image instead of once per question
        self.prefix_kv = prefix_kv and self.cache.capacity > 0 and supports_prefix_kv(model.model)
        self.continuous = continuous
        self._text_model: Model | None = None

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

    # --- request side (blocking: run them off the event loop) ------------------------------------------
    def prompt(self, history: list[tuple[str, str]], message: str | None, max_tokens: int) -> Prompt:
        """The fitted prompt of a turn (old turns dropped when a window is full); no message: caption."""
        text = self.model.text
        if message is None:  # an image without a question: caption it
            return text.prompt(text.caption_prompt(), max_tokens)
        return text.chat(history, message, max_tokens)

    def cached(self, key: str) -> ImageEntry | None:
        return self.cache.get(key)

    def pixels(self, data: bytes) -> Tensor:
        """Decode and preprocess one image (raises ImageError): (1, 3, S, S)."""
        return self.model.processor.preprocess(load_image(data))[None]

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Marks a request on its way to ``submit``: the worker waits the batch window for it, and only
        then (a lone request starts at once)."""
        with self._start_lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._start_lock:
                self._arriving -= 1

    def submit(self, job: Job) -> None:
        if job.features is None and job.pixels is None and not job.images:
            raise ValueError("a job needs cached features, pixels or images")
        self.start()
        self._queue.put(job)

    @property
    def text_model(self) -> Model:
        """The model's LLM reading text alone (the model itself for a caption-then-LLM bridge)."""
        if self._text_model is None:
            if self.model.family == "caption":
                self._text_model = self.model
            else:
                from blipkit.caption_bridge import CaptionThenLLM

                self._text_model = CaptionThenLLM.blind(self.model)
        return self._text_model

    def run_text(self, job: Job) -> None:
        """Generate for one job whose prompt holds all the model reads (a text-only prompt, or the
        caption-then-LLM bridge's: no image tokens, so no image cache nor batching by image); events reach
        ``job.emit`` as for batched jobs."""
        try:
            with self.lock:
                self.text_model.complete(
                    None, [job.prompt], job.max_tokens, job.decoding(), lambda _, t: self.deliver(job, t)
                )
            if not job.finished:
                self._finish(job, "length")
        except Exception as e:
            log.exception("generation failed")
            job.finished = True
            self._emit(job, ("error", e))

    def run(self, data: bytes, key: str, prompt: Prompt, **options: Any) -> Result:
        """Blocking helper: one job from any thread, waiting for its result (benchmarks, scripts)."""
        done: Future[Result] = Future()

        def emit(event: tuple[str, Any]) -> None:
            if event[0] == "done":
                done.set_result(event[1])
            elif event[0] == "error":
                done.set_exception(event[1])

        with self.arriving():
            features = self.cached(key)
            pixels = None if features is not None else self.pixels(data)
            self.submit(Job(key, prompt, emit, features=features, pixels=pixels, **options))
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
                if self._arriving == 0 and self._queue.empty():
                    break  # no other request on its way: waiting would only add latency
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            batch = [j for j in batch if not j.cancelled]
            batch.sort(key=lambda j: j.group)
            for _, group in itertools.groupby(batch, key=lambda j: j.group):
                jobs = list(group)
                if len(jobs) > 1 and self.joins(jobs[0]):
                    self.run_continuous(jobs)
                else:  # a lone request keeps the cached prefix of its image (no join to pay for)
                    self.run_batch(jobs)
            if self._queue.empty():  # idle after a burst: hand the heap's free pages back to the OS
                release_memory()

    def _entries(self, jobs: list[Job]) -> list[ImageEntry]:
        """The cache entry of each job's image: from the job, the cache, or one pass over the new images."""
        return self._lookup([(job.key, job.features, job.pixels) for job in jobs])

    @torch.inference_mode()
    def _lookup(self, refs: Sequence[ImageRef]) -> list[ImageEntry]:
        """The cache entry of each image: given, cached, or from one pass over the new images."""
        found: dict[str, ImageEntry] = {}
        todo: dict[str, Tensor] = {}
        for key, features, pixels in refs:
            if features is not None:
                found.setdefault(key, features)
            elif key not in found and key not in todo:
                cached = self.cache.get(key, count=False)
                if cached is not None:
                    found[key] = cached
                else:
                    todo[key] = pixels
        new = dict(zip(todo, self._encode(list(todo.values())), strict=True)) if todo else {}
        for key, entry in new.items():
            self.cache.put(key, entry)
        found |= new
        return [features if features is not None else found[key] for key, features, _ in refs]

    def _encode(self, pixels: list[Tensor]) -> list[ImageEntry]:
        """Entries for new images (1, 3, S, S) each, from one vision (+ Q-Former, + LLM prefix) pass."""
        blip = self.model.model
        embeds = blip.encode_image(torch.cat(pixels).to(self.model.device))  # (n, P, Dv)
        n = embeds.shape[0]
        if self.question_aware:
            return [ImageEntry(embeds[i : i + 1].clone()) for i in range(n)]
        prefix = blip.visual_prompt(Visual(image_embeds=embeds))  # (n, Q, Dl) in the LLM's dtype
        kv = compute_prefix_kv(blip.llm, prefix) if self.prefix_kv else None
        if self.prefix_kv and kv is None:
            log.info("the LLM's cache cannot hold a reusable prefix: caching the visual prompt only")
            self.prefix_kv = False
        return [ImageEntry(prefix[i : i + 1].clone(), row_kv(kv, i) if kv else None) for i in range(n)]

    def run_batch(self, jobs: list[Job]) -> None:
        """Generate for ``jobs`` (which decode alike) as one batch; every job ends done or failed."""
        if not jobs:
            return
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(jobs))
        try:
            with self.lock:
                if jobs[0].images is not None:  # a job of its own, with several images
                    self._generate_spliced(jobs[0])
                else:
                    self._generate(jobs, self._entries(jobs))
            for job in jobs:
                if not job.finished:
                    self._finish(job, "length")
        except Exception as e:  # a failed batch fails its jobs, not the server
            log.exception("generation failed for a batch of %d", len(jobs))
            self._fail(jobs, e)

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        """End the jobs not finished yet with ``error``."""
        for job in jobs:
            if not job.finished:
                job.finished = True
                self._emit(job, ("error", error))

    def _generate(self, jobs: list[Job], entries: list[ImageEntry]) -> None:
        """One decoding run for the batch; tokens reach the jobs as they are produced."""
        blip, text, device = self.model.model, self.model.text, self.model.device
        rows = [j.prompt.llm_ids for j in jobs]
        max_new = max(j.max_tokens for j in jobs)
        sampling = jobs[0].decoding()  # the group's (a job with processors of its own is alone)

        def on_token(row: int, token: int) -> bool:
            return self.deliver(jobs[row], token)

        if all(e.kv is not None for e in entries) and all(rows):
            feats = torch.cat([e.features for e in entries])  # (B, Q, Dl)
            ids, mask = text.llm_batch(rows, side="left")  # the prefix comes first, from the cache
            inputs = blip.llm_inputs(feats, ids.to(device), mask.to(device))  # [prefix][pad][text]
            kv = [e.kv for e in entries]
            self.decoder.generate(inputs, max_new, sampling, on_token, prefix_kv=kv)
            return
        self.decoder.generate(self._inputs(jobs, entries), max_new, sampling, on_token)

    def _inputs(self, jobs: list[Job], entries: list[ImageEntry]) -> LLMInputs:
        """The LLM inputs [visual prompt; text] of each job, from its cached features (no prefix cache)."""
        blip, text, device = self.model.model, self.model.text, self.model.device
        feats = torch.cat([e.features for e in entries])  # (B, Q, Dl) or (B, P, Dv)
        if self.question_aware:
            q_ids, q_mask = text.qformer_batch([j.prompt.qformer_text for j in jobs])
            visual = Visual(
                image_embeds=feats,
                qformer_input_ids=q_ids.to(device),
                qformer_attention_mask=q_mask.to(device),
            )
        else:
            visual = Visual(prefix=feats)
        ids, mask = text.llm_batch([j.prompt.llm_ids for j in jobs])
        return blip.llm_inputs(blip.visual_prompt(visual), ids.to(device), mask.to(device))

    # --- continuous batching ----------------------------------------------------------------------
    def joins(self, job: Job) -> bool:
        """Whether ``job`` can join a continuous batch: greedy, one image, no decoding of its own."""
        return self.continuous and job.group == (0,) and job.images is None and self.decoder.joins(GREEDY)

    def run_continuous(self, jobs: list[Job]) -> None:
        """Decode ``jobs`` in one continuous batch; while it runs, greedy requests from the queue take the
        slots of finished ones. A request that cannot join ends the intake (it runs next, in order)."""
        self.batches += 1
        batch = self.decoder.continuous_batch(self.max_batch_size)
        waiting: deque[Job] = deque(jobs)
        seen = list(jobs)
        held: list[Job | None] = []  # taken from the queue, not joinable: put back in front afterwards
        try:
            while waiting or batch.running:
                if batch.wants_rows():
                    while not held and len(waiting) < batch.free:
                        try:
                            job = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if job is not None and self.joins(job):
                            waiting.append(job)
                            seen.append(job)
                        elif job is None or not job.cancelled:
                            held.append(job)
                    take = [waiting.popleft() for _ in range(min(batch.free, len(waiting)))]
                    take = [j for j in take if not j.cancelled]
                    if take:
                        with self.lock:
                            self._admit(batch, take)
                        self.largest_batch = max(self.largest_batch, batch.running)
                if batch.running:
                    with self.lock:
                        batch.step()
        except Exception as e:  # a failed batch fails its jobs, not the server
            log.exception("generation failed for a continuous batch of %d", len(seen))
            self._fail(seen, e)
        finally:
            self._requeue(held)

    def _admit(self, batch: ContinuousBatch, jobs: list[Job]) -> None:
        """Join ``jobs`` to the running batch (their images encoded or taken from the cache)."""
        inputs = self._inputs(jobs, self._entries(jobs))
        rows = split_rows(inputs, 1, [partial(self.deliver, j) for j in jobs])
        batch.add(
            [
                replace(row, max_new_tokens=job.max_tokens, on_done=partial(self._ended, job))
                for row, job in zip(rows, jobs, strict=True)
            ]
        )

    def _ended(self, job: Job) -> None:
        """A row left the batch: a job not finished by EOS, a stop or its budget ends at its length."""
        if not job.finished:
            self._finish(job, "length")

    def _requeue(self, held: list[Job | None]) -> None:
        """Put jobs taken from the queue back in front of it, in order (``get`` counts no task done, so the
        queue's count of unfinished tasks already holds them)."""
        if not held:
            return
        with self._queue.mutex:
            self._queue.queue.extendleft(reversed(held))
            self._queue.not_empty.notify()

    def _generate_spliced(self, job: Job) -> None:
        """Decode one job whose prompt holds an image token per image (LLaVA with several images)."""
        entries = self._lookup(job.images or [])
        inputs = spliced_inputs(self.model, job.prompt.llm_ids, [e.features for e in entries])
        self.decoder.generate(inputs, job.max_tokens, job.decoding(), lambda _, t: self.deliver(job, t))

    def deliver(self, job: Job, token: int) -> bool:
        """Hand ``job`` its next token (streamed when asked); True once the job is finished."""
        if job.finished:
            return True
        if job.cancelled:
            job.finished = True
            return True
        job.first_token_ns = job.first_token_ns or time.perf_counter_ns()
        if token == self.model.text.eos_token_id:
            self._finish(job, "stop")
            return True
        if job.recorder is not None:
            job.logged.append(self._logprob(job, token))
        job.tokens.append(token)
        if job.stream or job.stop or job.recorder is not None:
            text = self.model.tokenizer.decode(job.tokens, skip_special_tokens=True).lstrip()
            if job.recorder is not None:
                job.logged[-1].end = len(text)
            cut = first_stop(text, job.stop)
            if cut is not None:
                self._finish(job, "stop", text[:cut])
                return True
            safe = len(text) - held_back(text, job.stop)
            shown = text[:safe]
            if job.stream and shown.startswith(job.sent) and len(shown) > len(job.sent):
                if not shown.endswith("\ufffd"):
                    self._stream(job, shown)
        if len(job.tokens) >= job.max_tokens:
            self._finish(job, "length")
        return job.finished

    def _stream(self, job: Job, text: str) -> None:
        """Send what ``text`` adds to the streamed text, after the log-probabilities of its tokens."""
        if job.recorder is not None:
            done = [e for e in job.logged[job.released :] if e.end <= len(text)]
            if done:
                job.released += len(done)
                self._emit(job, ("logprobs", done))
        if len(text) > len(job.sent):
            self._emit(job, ("delta", text[len(job.sent) :]))
            job.sent = text

    def _logprob(self, job: Job, token: int) -> TokenLogprob:
        """The log-probability of ``token`` at the step that chose it, with the step's top alternatives."""
        logprobs = job.recorder.last[0] if job.recorder.last is not None else None
        if logprobs is None:
            return TokenLogprob(self._piece(job.tokens, token), 0.0, [])
        values, ids = logprobs.topk(job.logprobs) if job.logprobs else (logprobs[:0], logprobs[:0].long())
        top = [
            (self._piece(job.tokens, i), float(v)) for v, i in zip(values.tolist(), ids.tolist(), strict=True)
        ]
        return TokenLogprob(self._piece(job.tokens, token), float(logprobs[token]), top)

    def _piece(self, before: list[int], token: int) -> str:
        """The text ``token`` adds after the tokens ``before`` (a few of them give the context)."""
        tok = self.model.tokenizer
        context = before[-4:]
        head = tok.decode(context)
        text = tok.decode([*context, token])
        return text[len(head) :] if text.startswith(head) else tok.decode([token])

    def _finish(self, job: Job, reason: str, text: str | None = None) -> None:
        """End ``job``: its text is the decoded tokens (``text``: cut before a stop sequence)."""
        job.finished = True
        cut = text is not None
        text = self.model.text.decode(job.tokens) if text is None else text
        logprobs = None
        if job.recorder is not None:
            logprobs = [e for e in job.logged if not cut or e.end <= len(text)]
        if job.stream:
            if job.recorder is not None and len(logprobs) > job.released:
                self._emit(job, ("logprobs", logprobs[job.released :]))
                job.released = len(logprobs)
            if text.startswith(job.sent) and len(text) > len(job.sent):
                self._emit(job, ("delta", text[len(job.sent) :]))
                job.sent = text
        visual = job.visual_tokens if job.visual_tokens is not None else self.model.text.num_query_tokens
        prompt_tokens = len(job.prompt.llm_ids) + visual
        cached = job.pixels is None and not job.images
        first, done = job.first_token_ns, time.perf_counter_ns()
        result = Result(text, reason, prompt_tokens, len(job.tokens), cached, logprobs, first or done, done)
        self._emit(job, ("done", result))

    @staticmethod
    def _emit(job: Job, event: tuple[str, Any]) -> None:
        try:
            job.emit(event)
        except Exception:  # the client's event loop is gone
            job.cancelled = True


def spliced_inputs(model: Model, ids: list[int], prefixes: list[Tensor]) -> LLMInputs:
    """One row of LLM inputs: the prompt's text with each image token replaced by its image's visual prompt
    ((1, P, Dl) each, in order), as LLaVA splices its one image, for any number of images."""
    blip, index = model.model, model.text.settings.image_token_index
    embed = blip.llm.get_input_embeddings()
    device = embed.weight.device
    marks = [i for i, t in enumerate(ids) if t == index]
    if len(marks) != len(prefixes):
        raise ValueError(f"{len(marks)} image tokens in the prompt for {len(prefixes)} images")
    pieces, start = [], 0
    for col, prefix in zip(marks, prefixes, strict=True):
        pieces += [
            embed(torch.tensor(ids[start:col], dtype=torch.long, device=device)),
            blip.visual_prompt(Visual(prefix=prefix))[0],
        ]
        start = col + 1
    pieces.append(embed(torch.tensor(ids[start:], dtype=torch.long, device=device)))
    embeds = torch.cat([p.to(embed.weight.dtype) for p in pieces])[None]  # (1, L, Dl)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
    return LLMInputs(embeds, mask, positions_from_mask(mask), 0, packed=True)
