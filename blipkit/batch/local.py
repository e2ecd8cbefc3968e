"""The local engine: lazy listing -> worker decoding -> batched captioning -> resumable output."""

from __future__ import annotations

from itertools import chain

import torch

from blipkit.batch.decode import batches
from blipkit.batch.generate import Captioner
from blipkit.batch.job import Job, Progress, Summary, pending, result_rows, usable_cpus
from blipkit.batch.writers import Sink


def model_threads() -> int:
    """Torch threads for the model: every usable CPU. Decoding and resizing an image costs a few percent of
    captioning it, so the decoding workers mostly sleep; on 2 cores, giving them a core of their own made
    captioning a third slower (bench/caption_throughput.py's model, 48 JPEGs: 23.5 s vs 17.5 s)."""
    return usable_cpus()


def run_local(job: Job, sink: Sink) -> Summary:
    """Caption every pending image of ``job`` into ``sink``; results are written batch by batch."""
    import blipkit

    summary = Summary()
    items = pending(job, sink, summary)
    first = next(items, None)
    if first is None:  # everything is in the output already: no need for the model
        return summary
    torch.set_num_threads(job.threads or model_threads())
    model = blipkit.load(
        job.model,
        dtype=job.dtype,
        device=job.device,
        batch_size=job.batch_size,
        trust_remote_code=job.trust_remote_code,
    )
    captioner = Captioner(model, job.prompt, job.max_new_tokens, job.num_beams)
    progress = Progress(job, summary)
    try:
        for batch in batches(model.processor, chain([first], items), job.batch_size, job.workers):
            captions = {}
            if batch.pixels is not None:
                captions = dict(zip(batch.ok, captioner(batch.pixels), strict=True))
            sink.write(result_rows(batch.keys, captions, batch.errors))
            summary.captioned += len(captions)
            summary.failed += len(batch.errors)
            progress.update(len(batch.keys))
    finally:
        progress.close()
    return summary
