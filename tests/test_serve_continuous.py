"""The server's continuous batching: queued greedy requests take the slots of finished ones, answer what they
answer alone, and requests that decode otherwise run after, in order."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hf_tiny import make_blip2
from PIL import Image

import blipkit
from blipkit.serve.engine import Engine, Job

QUESTIONS = ["what is it?", "describe the picture", "why", "what color is the thing on the left?"]


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module", params=["opt", "llama"])
def model(request, tmp_path_factory) -> blipkit.Model:
    path = tmp_path_factory.mktemp(f"serve-continuous-{request.param}")
    make_blip2(path, llm=request.param, num_query_tokens=4)
    return blipkit.load(path)


def queued(engine: Engine, budgets: list[int], **options) -> list[tuple[Job, list]]:
    """Jobs (image i, a question, budgets[i] tokens) in the queue before the worker starts."""
    ran = []
    for i, budget in enumerate(budgets):
        events: list = []
        prompt = engine.prompt([], QUESTIONS[i % len(QUESTIONS)], budget)
        job = Job(f"img{i}", prompt, events.append, None, engine.pixels(png(i)), max_tokens=budget, **options)
        engine._queue.put(job)
        ran.append((job, events))
    return ran


def answers(ran: list[tuple[Job, list]]) -> list[tuple[list[int], str]]:
    out = []
    for job, events in ran:
        kind, result = events[-1]
        assert kind == "done", result
        out.append((job.tokens, result.finish_reason))
    return out


def alone(model: blipkit.Model, budgets: list[int]) -> list[tuple[list[int], str]]:
    """Each request in an engine of its own, one at a time: the reference."""
    engine = Engine(model, max_batch_size=1, continuous=False)
    ran = queued(engine, budgets)
    engine.start()
    engine.stop()
    return answers(ran)


BUDGETS = [1, 9, 2, 9, 1, 3, 9, 2]


def test_queued_requests_join_the_running_batch(model):
    engine = Engine(model, max_batch_size=3, batch_window_ms=200)
    ran = queued(engine, BUDGETS)
    assert all(engine.joins(job) for job, _ in ran)
    engine.start()
    engine.stop()
    assert answers(ran) == alone(model, BUDGETS)
    assert engine.batches == 1  # one continuous run took every request as slots freed
    assert engine.largest_batch == 3


def test_static_batches_wait_for_their_longest_request(model):
    engine = Engine(model, max_batch_size=3, batch_window_ms=200, continuous=False)
    ran = queued(engine, BUDGETS)
    engine.start()
    engine.stop()
    assert answers(ran) == alone(model, BUDGETS)
    assert engine.batches == 3


def test_a_request_that_cannot_join_runs_next_in_order(model):
    """A sampled request in the queue stops the intake; it runs after the running rows, then the rest."""
    engine = Engine(model, max_batch_size=2, batch_window_ms=200)
    first = queued(engine, [2, 9, 2])
    sampled = queued(engine, [4], temperature=0.8, seed=3)[0]
    job, _ = sampled
    assert not engine.joins(job)
    rest = queued(engine, [2, 5])
    engine.start()
    engine.stop()
    assert answers(first) == alone(model, [2, 9, 2])
    assert answers(rest) == alone(model, [2, 5])
    assert sampled[1][-1][0] == "done" and 1 <= len(job.tokens) <= 4
    assert engine.largest_batch == 2


def test_cancelled_requests_leave_and_free_their_slot(model):
    engine = Engine(model, max_batch_size=2, batch_window_ms=200)
    ran = queued(engine, [9, 9, 3])
    ran[1][0].cancelled = True
    engine.start()
    engine.stop()
    assert answers([ran[0], ran[2]]) == [alone(model, [9, 9, 3])[i] for i in (0, 2)]
