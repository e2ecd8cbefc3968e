"""``blipkit tag``: ImageNet-1k labels for photos (EfficientNet-Lite0) into JSONL, CSV, Parquet or .txt files.

The same machinery as ``blipkit caption``: lazy listing, worker decoding, resumable outputs, error rows for
images that cannot be read and exit code 3 when some failed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from torch import Tensor

from blipkit.batch.cli import SUFFIXES, output_format, report_missing, run_job
from blipkit.batch.job import Job, Summary, default_workers
from blipkit.batch.writers import FORMATS, Sink
from blipkit.errors import EXIT_USAGE, UsageError
from blipkit.processing import ImageProcessor

COLUMNS = ("path", "tags", "error")


def register(subparsers, add_model_args: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Add the ``tag`` command (it takes no --model: the tagger is the packaged EfficientNet-Lite0)."""
    p = subparsers.add_parser(
        "tag",
        help="tag photos with ImageNet-1k labels (rows {path, tags} or {path, error}); resumes --out",
        description="Tag image files and folders with the k most likely of the 1000 ImageNet-1k classes "
        "(EfficientNet-Lite0). Rows {path, tags: [{label, score}, ...]} best first, or {path, error} for "
        "files that cannot be read. An existing --out is resumed: images already in it are skipped. "
        "Exit code 3 when some images failed.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("-k", type=int, default=5, help="labels per image (default 5)")
    p.add_argument("--out", default=None, help="output file (default: JSONL on stdout); resumed if it exists")
    p.add_argument(
        "--format",
        default=None,
        choices=FORMATS,
        help="jsonl, csv, parquet (tags as a JSON string), or txt: a <image-stem>.txt next to each image "
        "with its labels, one a line (failures then go to --out as JSONL, or stdout) "
        f"(default: from the --out suffix, {' '.join(SUFFIXES)}; jsonl on stdout)",
    )
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    p.add_argument("--batch-size", type=int, default=16, help="images per model batch (default 16)")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming --out")
    p.add_argument(
        "--workers", type=int, default=None, help="image decoding processes (default: one per 4 CPUs, 1 to 4)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every CPU)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    p.add_argument(
        "--progress", action="store_true", help="show the progress bar even when not on a terminal"
    )
    p.set_defaults(func=cmd_tag)


def tags_text(row: dict) -> str:
    """A sidecar's text: the labels, best first, one a line."""
    return "\n".join(t["label"] for t in row["tags"])


def run_tagging(job: Job, sink: Sink, k: int = 5) -> Summary:
    """Tag every pending image of ``job`` into ``sink`` (rows ``{"path", "tags"}``), batch by batch."""
    from blipkit.batch.local import run_pending

    def load() -> tuple[ImageProcessor, Callable[[Tensor], list]]:
        from blipkit.models.tagger import PhotoTagger

        tagger = PhotoTagger(device=job.device)

        def predict(pixels: Tensor) -> list[list[dict]]:
            return [
                [{"label": label, "score": round(score, 4)} for label, score in tags]
                for tags in tagger.tag_pixels(pixels, k)
            ]

        return tagger.processor, predict

    return run_pending(job, sink, load, column="tags", verb="tagged", desc="tag")


def cmd_tag(args: argparse.Namespace) -> int:
    if report_missing(args.paths):
        return EXIT_USAGE
    if not 1 <= args.k <= 1000:
        raise UsageError("-k must be between 1 and 1000")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    job = Job(
        paths=args.paths,
        out=args.out,
        format=output_format(args),
        recursive=args.recursive,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        workers=args.workers if args.workers is not None else default_workers(),
        threads=args.threads,
        progress=args.progress,
        device=args.device,
    )
    return run_job(job, lambda job, sink: run_tagging(job, sink, args.k), columns=COLUMNS, text=tags_text)
