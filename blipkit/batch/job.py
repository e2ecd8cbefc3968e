"""What a batch run (captioning, tagging) is asked to do, what it did, and the pieces the engines share."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

from blipkit.batch.decode import Item
from blipkit.batch.writers import SampleId, Sink
from blipkit.data.formats import Inputs, Unreadable

EXIT_OK, EXIT_SOME_FAILED = 0, 3


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """Decoding processes: one per four CPUs, at least one (it decodes the next batch during this one)."""
    return min(4, max(1, usable_cpus() // 4))


@dataclass
class Job:
    paths: list[str]  # image files, folders, lists, shards, parquet files, imagefolder dirs (``Inputs``)
    out: str | None = None
    format: str = "jsonl"
    recursive: bool = False
    overwrite: bool = False
    prompt: str | None = None
    batch_size: int = 8
    max_new_tokens: int = 30
    num_beams: int = 1
    model: str = "default"
    dtype: str | None = None
    quantize: str | None = None
    device: str | None = None
    trust_remote_code: bool = False  # let the checkpoint's dirs run the Python code they ship
    workers: int = field(default_factory=default_workers)
    threads: int | None = None
    progress: bool = False
    concurrency: int = 1

    @cached_property
    def inputs(self) -> Inputs:
        return Inputs(tuple(self.paths), self.recursive)


@dataclass
class Summary:
    captioned: int = 0  # images with a result (a caption, or tags)
    skipped: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    verb: str = "captioned"  # what ``line()`` says was done to the ``captioned`` ones

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.failed else EXIT_OK

    def line(self) -> str:
        return f"{self.verb} {self.captioned}, skipped {self.skipped}, failed {self.failed}"


def pending(job: Job, sink: Sink, summary: Summary, images: bool = True) -> Iterator[Item]:
    """(name, image) of the samples not yet in the output, each once, lazily; counts the skipped ones.

    The name is a resolved path or a ``SampleId``; the image a path, bytes or a loader (``None`` with
    ``images=False``). A sample the output cannot hold (``sink.conflict``), or one without a readable image
    (a shard member missing, a shard cut short), gets its error row here and is not captioned.
    """
    seen: set[str] = set()
    for sample in job.inputs.samples(images=images):
        key = sample.id
        if key in seen or sink.is_done(key):
            summary.skipped += key not in seen
            seen.add(key)
            continue
        seen.add(key)
        reason = sample.image.reason if isinstance(sample.image, Unreadable) else sink.conflict(key)
        if reason is not None:
            sink.write(result_rows([key], {}, {key: reason}))
            summary.failed += 1
            continue
        yield key, sample.image


def row_name(key: str) -> dict[str, str]:
    """The columns naming a sample in an output row: ``{"path"}``, or ``{"key", "source"}`` (``SampleId``)."""
    return key.fields() if isinstance(key, SampleId) else {"path": key}


def result_rows(
    keys: list[str], results: dict[str, object], errors: dict[str, str], column: str = "caption"
) -> list[dict]:
    """Output rows in input order: ``{"path", column}`` (``"caption"``) or ``{"path", "error"}``, with
    ``{"key", "source"}`` in place of ``"path"`` for samples of shards and parquet files."""
    return [row_name(k) | ({column: results[k]} if k in results else {"error": errors[k]}) for k in keys]


class Progress:
    """A tqdm bar (images/s, ETA) on stderr; the files are counted in a background thread for the total."""

    def __init__(self, job: Job, summary: Summary, enabled: bool | None = None, desc: str = "caption"):
        self.summary = summary
        self.found: int | None = None
        self.bar = None
        if enabled if enabled is not None else (job.progress or sys.stderr.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=None, unit="img", desc=desc, file=sys.stderr, dynamic_ncols=True)
            threading.Thread(target=self._count, args=(job,), daemon=True).start()

    def _count(self, job: Job) -> None:
        try:
            self.found = sum(1 for _ in job.inputs.samples(images=False))
        except Exception:  # only the bar's total: reading the inputs reports its errors elsewhere
            pass

    def update(self, n: int) -> None:
        if self.bar is None:
            return
        if self.found is not None:  # the skipped ones are not work: leave them out of the total
            self.bar.total = max(self.found - self.summary.skipped, self.bar.n + n)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
