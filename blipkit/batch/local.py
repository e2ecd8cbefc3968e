"""The local engine: lazy listing -> worker decoding -> batched model calls -> resumable output."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import chain

import torch
from torch import Tensor

from blipkit.batch.decode import Batch, batches
from blipkit.batch.generate import Captioner
from blipkit.batch.job import Job, Progress, Summary, pending, result_rows, usable_cpus
from blipkit.batch.writers import Sink
from blipkit.processing import ImageProcessor

Predict = Callable[[Tensor], list]  # (B, 3, S, S) pixels -> one result per image


def model_threads() -> int:
    """Torch threads for the model: every usable CPU. Decoding and resizing an image costs a few percent of
    captioning it, so the decoding workers mostly sleep; on 2 cores, giving them a core of their own made
    captioning a third slower (bench/caption_throughput.py's model, 48 JPEGs: 23.5 s vs 17.5 s)."""
    return usable_cpus()


def run_local(job: Job, sink: Sink) -> Summary:
    """Caption every pending image of ``job`` into ``sink``; results are written batch by batch."""

    def load() -> tuple[ImageProcessor, Predict]:
        import blipkit

        model = blipkit.load(
            job.model,
            dtype=job.dtype,
            device=job.device,
            quantize=job.quantize,
            batch_size=job.batch_size,
            trust_remote_code=job.trust_remote_code,
        )
        return model.processor, Captioner(model, job.prompt, job.max_new_tokens, job.num_beams)

    return run_pending(job, sink, load)


def predictions(predict: Predict, batches: Iterable[Batch]) -> Iterator[tuple[Batch, list]]:
    """Each batch with the results for its readable images, in order: through ``predict.stream`` where the
    predictor has one (continuous batching), else batch by batch."""
    stream = getattr(predict, "stream", None)
    if stream is not None:
        yield from stream(batches)
        return
    for batch in batches:
        yield batch, [] if batch.pixels is None else predict(batch.pixels)


def run_pending(
    job: Job,
    sink: Sink,
    load: Callable[[], tuple[ImageProcessor, Predict]],
    column: str = "caption",
    verb: str = "captioned",
    desc: str = "caption",
) -> Summary:
    """Run ``predict`` on every pending image of ``job``; rows ``{"path", column}`` go to ``sink`` per batch.

    ``load()`` gives the model's (processor, predict); it is called only when some image is pending. ``verb``
    and ``desc`` name the work in the summary line and on the progress bar.
    """
    summary = Summary(verb=verb)
    items = pending(job, sink, summary)
    first = next(items, None)
    if first is None:  # everything is in the output already: no need for the model
        return summary
    torch.set_num_threads(job.threads or model_threads())
    processor, predict = load()
    progress = Progress(job, summary, desc=desc)
    try:
        for batch, predicted in predictions(
            predict, batches(processor, chain([first], items), job.batch_size, job.workers)
        ):
            results = dict(zip(batch.ok, predicted, strict=True))
            sink.write(result_rows(batch.keys, results, batch.errors, column))
            summary.captioned += len(results)
            summary.failed += len(batch.errors)
            progress.update(len(batch.keys))
    finally:
        progress.close()
    return summary
