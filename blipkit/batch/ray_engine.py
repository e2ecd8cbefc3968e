"""The Ray Data engine: a dataset of paths -> ``map_batches`` over a pool of model actors -> the same sinks.

The driver lists the pending images (resume works as in the local engine) and writes every result batch as it
streams back, so outputs, resume and ``kill -9`` behave the same. Images and the model must be readable from
every node (shared storage, or ``--model default``). ``ray.init()`` joins the cluster named by
``RAY_ADDRESS`` and otherwise starts a local instance.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from blipkit.batch.decode import decode_one
from blipkit.batch.job import Job, Progress, Summary, pending, result_rows
from blipkit.batch.writers import Sink
from blipkit.extras import require


class CaptionActor:
    """Loads the model once per actor; each call decodes a batch of paths and captions the readable ones."""

    def __init__(self, job: Job):
        import torch

        import blipkit
        from blipkit.batch.generate import Captioner

        if job.threads:
            torch.set_num_threads(job.threads)
        self.model = blipkit.load(
            job.model,
            dtype=job.dtype,
            device=job.device,
            batch_size=job.batch_size,
            trust_remote_code=job.trust_remote_code,
        )
        self.captioner = Captioner(self.model, job.prompt, job.max_new_tokens, job.num_beams)
        self.pool = ThreadPoolExecutor(max(1, job.workers))  # Pillow decodes without holding the GIL

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        keys, paths = list(batch["key"]), list(batch["path"])
        decoded = list(self.pool.map(lambda p: decode_one(self.model.processor, p), paths))
        ok = [k for k, (px, _) in zip(keys, decoded, strict=True) if px is not None]
        captions = {}
        if ok:
            pixels = torch.stack([px for px, _ in decoded if px is not None])
            captions = dict(zip(ok, self.captioner(pixels), strict=True))
        return {
            "key": np.array(keys, dtype=object),
            "ok": np.array([k in captions for k in keys]),
            "text": np.array(
                [captions.get(k, err) for k, (_, err) in zip(keys, decoded, strict=True)], dtype=object
            ),
        }


def run_ray(job: Job, sink: Sink) -> Summary:
    """Caption the pending images of ``job`` on Ray Data; this process writes results as they arrive."""
    ray = require("ray", "blipkit caption --engine ray", "ray")
    require("ray.data", "blipkit caption --engine ray", "ray")

    summary = Summary()
    todo = [{"key": key, "path": path} for key, path in pending(job, sink, summary)]  # names only
    if not todo:
        return summary
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level="ERROR")
    gpu = 1 if (job.device or "cpu").startswith("cuda") else 0
    ds = ray.data.from_items(todo).map_batches(
        CaptionActor,
        fn_constructor_kwargs={"job": job},
        batch_size=job.batch_size,
        batch_format="numpy",
        concurrency=job.concurrency,
        num_cpus=job.threads or 1,
        num_gpus=gpu,
    )
    progress = Progress(job, summary)
    try:
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            keys = [str(k) for k in out["key"]]
            rows = list(zip(keys, out["ok"], out["text"], strict=True))
            captions = {k: str(text) for k, ok, text in rows if ok}
            errors = {k: str(text) for k, ok, text in rows if not ok}
            sink.write(result_rows(keys, captions, errors))
            summary.captioned += len(captions)
            summary.failed += len(errors)
            progress.update(len(keys))
    finally:
        progress.close()
    return summary
