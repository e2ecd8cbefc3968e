"""The Ray Data engine: a dataset of images -> ``map_batches`` over a pool of model actors -> the same sinks.

The driver lists the pending images (resume works as in the local engine) and writes every result batch as it
streams back, so outputs, resume and ``kill -9`` behave the same. Image files become a dataset of paths;
webdataset shards and parquet files are read by Ray Data's own readers (``read_webdataset``,
``read_parquet``), keeping only the pending samples. A shard the driver could not list in full is read by
the driver instead (what it holds before the fault). Images and the model must be readable from every node
(shared storage, or ``--model default``). ``ray.init()`` joins the cluster named by ``RAY_ADDRESS`` and
otherwise starts a local instance.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from blipkit.batch.decode import decode_one
from blipkit.batch.files import key_of
from blipkit.batch.job import Job, Progress, Summary, pending, result_rows
from blipkit.batch.writers import Sink
from blipkit.data import formats
from blipkit.errors import ImageError, UsageError
from blipkit.extras import require

NOT_RETURNED = "Ray Data returned no result for this sample"


class CaptionActor:
    """Loads the model once per actor; each call decodes a batch (a ``path`` or a ``data`` column of image
    bytes, named by ``key``) and captions the readable ones."""

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
            quantize=job.quantize,
            batch_size=job.batch_size,
            trust_remote_code=job.trust_remote_code,
        )
        self.captioner = Captioner(self.model, job.prompt, job.max_new_tokens, job.num_beams)
        self.pool = ThreadPoolExecutor(max(1, job.workers))  # Pillow decodes without holding the GIL

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        keys = list(batch["key"])
        images = list(batch["path"]) if "path" in batch else [_bytes(d) for d in batch["data"]]
        decoded = list(self.pool.map(lambda p: decode_one(self.model.processor, p), images))
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


def _bytes(value) -> bytes | None:
    """A cell of image bytes as read by Ray (a missing one is None, NaN or NA; HF's struct is a dict)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value) if isinstance(value, (bytes, bytearray)) and value else None


def _keep(rows: list[tuple[str, object]], todo: set[str]) -> dict[str, list]:
    """A batch ``{"key", "data"}`` of the (name, image) rows that are pending."""
    kept = [(key, _bytes(data)) for key, data in rows if key in todo]
    keys, data = [k for k, _ in kept], [d for _, d in kept]
    return {"key": np.array(keys, dtype=object), "data": np.array(data, dtype=object)}


def _is_image_member(extension: str) -> bool:
    return extension.lower() in formats.IMAGE_MEMBERS


def _shard_rows(batch, todo: set[str]) -> dict[str, list]:
    """``read_webdataset`` rows -> pending ``{"key", "data"}``: the first image member of each sample."""
    images = [c for c in batch.columns if c.lower() in formats.IMAGE_MEMBERS]
    rows = []
    for _, row in batch.iterrows():
        data = next((row[c] for c in images if _bytes(row[c]) is not None), None)
        rows.append((str(formats.SampleId(row["__url__"], row["__key__"])), data))
    return _keep(rows, todo)


def _parquet_rows(batch, todo: set[str], key: str, image: str) -> dict[str, list]:
    """``read_parquet`` rows -> pending ``{"key", "data"}``."""
    names = [str(formats.SampleId(p, str(k))) for p, k in zip(batch["path"], batch[key], strict=True)]
    return _keep(list(zip(names, batch[image], strict=True)), todo)


def _parquet_columns(path: str) -> tuple[str, str] | None:
    """(key column, image column) of a parquet file; None when unreadable (its error row is written)."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception:  # pyarrow's errors for a file that is not parquet
        return None
    image = formats.image_column(schema)
    if image is None:
        return None
    if formats.KEY_COLUMN not in schema.names:
        raise UsageError(
            f"{path} has no {formats.KEY_COLUMN!r} column: Ray Data cannot number its rows; "
            "use --engine local, which names them by row number"
        )
    return formats.KEY_COLUMN, image


def held_dataset(ray, job: Job, todo: set[str]) -> tuple[object | None, dict[str, str]]:
    """(the pending samples of ``job``'s shards and parquet files as a Ray dataset ``{"key", "data"}``, or
    None; {name: reason} for those the driver found unreadable)."""
    shards, parquets = [], defaultdict(list)
    driver_read, failed = [], {}  # shards that cannot be read in full: the driver reads what they hold
    for path in job.paths:
        source = key_of(Path(path))
        if formats.kind_of(path) == "parquet":
            if (columns := _parquet_columns(path)) is not None:
                parquets[columns].append(source)
        elif formats.tar_members(path)[1] is None:
            shards.append(source)
        else:
            for sample in formats.shard_samples(path):
                if str(sample.id) in todo and isinstance(sample.image, formats.TarMember):
                    try:
                        driver_read.append({"key": str(sample.id), "data": sample.image.read()})
                    except ImageError as e:
                        failed[str(sample.id)] = e.reason
    parts = []
    if shards:
        ds = ray.data.read_webdataset(shards, decoder=None, suffixes=_is_image_member)
        parts.append(ds.map_batches(_shard_rows, batch_format="pandas", fn_kwargs={"todo": todo}))
    for (key, image), files in parquets.items():
        ds = ray.data.read_parquet(files, include_paths=True).select_columns([key, image, "path"])
        kwargs = {"todo": todo, "key": key, "image": image}
        parts.append(ds.map_batches(_parquet_rows, batch_format="pandas", fn_kwargs=kwargs))
    if driver_read:
        parts.append(ray.data.from_items(driver_read))
    return (parts[0].union(*parts[1:]) if parts else None), failed


def run_ray(job: Job, sink: Sink) -> Summary:
    """Caption the pending images of ``job`` on Ray Data; this process writes results as they arrive."""
    ray = require("ray", "blipkit caption --engine ray", "ray")
    require("ray.data", "blipkit caption --engine ray", "ray")

    summary = Summary()
    keyed = job.inputs.keyed()
    todo = {str(key): (key, image) for key, image in pending(job, sink, summary, images=not keyed)}
    if not todo:
        return summary
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level="ERROR")
    gpu = 1 if (job.device or "cpu").startswith("cuda") else 0
    if keyed:
        ds, failed = held_dataset(ray, job, set(todo))
        write(sink, summary, [(todo.pop(name)[0], False, reason) for name, reason in failed.items()])
    else:
        ds = ray.data.from_items([{"key": name, "path": path} for name, (_, path) in todo.items()])
    if ds is None:  # nothing left that Ray Data can read
        write(sink, summary, [(key, False, NOT_RETURNED) for key, _ in todo.values()])
        return summary
    ds = ds.map_batches(
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
            results = zip(out["key"], out["ok"], out["text"], strict=True)
            # each once: a shard named twice is read twice
            rows = [(todo.pop(str(k))[0], ok, str(text)) for k, ok, text in results if str(k) in todo]
            write(sink, summary, rows)
            progress.update(len(rows))
        write(sink, summary, [(key, False, NOT_RETURNED) for key, _ in todo.values()])
    finally:
        progress.close()
    return summary


def write(sink: Sink, summary: Summary, rows: list[tuple[str, bool, str]]) -> None:
    """Write (name, ok, caption or reason) rows and count them."""
    captions = {k: text for k, ok, text in rows if ok}
    errors = {k: text for k, ok, text in rows if not ok}
    sink.write(result_rows([k for k, _, _ in rows], captions, errors))
    summary.captioned += len(captions)
    summary.failed += len(errors)
