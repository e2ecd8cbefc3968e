"""``blipkit caption``: caption files and folders into JSONL, CSV, Parquet or sidecar .txt files.

Also lists of images (.jsonl/.csv), webdataset .tar shards, parquet files with image bytes and Hugging Face
imagefolder dirs (``blipkit.data.formats``). The samples of shards and parquet files are rows
``{key, source, caption}`` or ``{key, source, error}``: the sample's key (img2dataset's ``key``, to join on)
and the file holding it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from blipkit.batch.files import missing_paths
from blipkit.batch.job import Job, Summary, default_workers
from blipkit.batch.writers import COLUMNS, FORMATS, Sink, open_sink, sample_columns
from blipkit.data.formats import Inputs
from blipkit.errors import EXIT_USAGE, UsageError


def register(subparsers, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the ``caption`` command."""
    p = subparsers.add_parser(
        "caption",
        help="caption images and folders (rows {path, caption} or {path, error}); resumes --out",
        description="Caption image files and folders. Rows {path, caption}, or {path, error} for files that "
        "cannot be read. An existing --out is resumed: images already in it are skipped. One run at a time "
        "writes an --out (it holds <out>.lock). Exit code 3 when some images failed. Also reads .jsonl/.csv "
        "lists of images (an image or path field), webdataset .tar shards and parquet files with image bytes "
        "(img2dataset's layouts: rows {key, source, caption}) and Hugging Face imagefolder dirs.",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="image files, folders, .jsonl/.csv lists, .tar shards, .parquet files, imagefolder dirs",
    )
    p.add_argument("--prompt", default=None, help="text the caption continues, e.g. 'a photo of'")
    p.add_argument("--out", default=None, help="output file (default: JSONL on stdout); resumed if it exists")
    p.add_argument(
        "--format",
        default=None,
        choices=FORMATS,
        help="jsonl, csv, parquet, or txt: a <image-stem>.txt next to each image "
        "(failures then go to --out as JSONL, or stdout); of images sharing a stem (a.jpg, a.png) "
        "only the first by name gets one, the others an error row "
        "(default: from the --out suffix, .jsonl .csv .parquet; jsonl on stdout)",
    )
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    p.add_argument("--batch-size", type=int, default=8, help="images per model batch (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=30, help="longest caption, in tokens (default 30)")
    p.add_argument(
        "--num-beams", type=int, default=1, help="beam search width; 1 is greedy decoding (default 1)"
    )
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming --out")
    p.add_argument(
        "--engine", default="local", choices=["local", "ray"], help="local, or Ray Data (many machines)"
    )
    p.add_argument(
        "--workers", type=int, default=None, help="image decoding processes (default: one per 4 CPUs, 1 to 4)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for the model (default: every CPU)",
    )
    p.add_argument("--concurrency", type=int, default=1, help="ray: number of model actors")
    p.add_argument(
        "--progress", action="store_true", help="show the progress bar even when not on a terminal"
    )
    add_model_args(p)
    p.set_defaults(func=cmd_caption)


SUFFIXES = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}


def output_format(args: argparse.Namespace) -> str:
    """``--format``, or the format ``--out``'s suffix names (JSONL on stdout)."""
    if args.format:
        return args.format
    if args.out is None:
        return "jsonl"
    suffix = os.path.splitext(args.out)[1].lower()
    if suffix not in SUFFIXES:
        raise UsageError(
            f"cannot tell the format of --out {args.out}: use a {', '.join(SUFFIXES)} suffix or give --format"
        )
    return SUFFIXES[suffix]


def job_from_args(args: argparse.Namespace) -> Job:
    for name in ("batch_size", "max_new_tokens", "num_beams", "concurrency"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    return Job(
        paths=args.paths,
        out=args.out,
        format=output_format(args),
        recursive=args.recursive,
        overwrite=args.overwrite,
        prompt=args.prompt,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        model=args.model,
        dtype=args.dtype,
        quantize=getattr(args, "quantize", None),
        device=args.device,
        trust_remote_code=getattr(args, "trust_remote_code", False),
        workers=args.workers if args.workers is not None else default_workers(),
        threads=args.threads,
        progress=args.progress,
        concurrency=args.concurrency,
    )


def report_missing(paths: list[str]) -> bool:
    """Print the error for the first path that does not exist; True if there was one."""
    missing = missing_paths(paths)
    if missing:
        print(f"blipkit: error: no such file or folder: {missing[0]}", file=sys.stderr)
    return bool(missing)


def no_images(inputs: Inputs) -> UsageError:
    """The error for inputs without a single image; shards and parquet files in a folder are named there."""
    folders = [Path(p) for p in inputs.paths if os.path.isdir(p)]
    held = [f"{d}/*{suffix}" for d in folders for suffix in (".tar", ".parquet") if any(d.glob(f"*{suffix}"))]
    hint = f" (shards and parquet files in a folder are read when named: {held[0]})" if held else ""
    return UsageError("no images found in " + " ".join(inputs.paths) + hint)


def run_job(
    job: Job, run: Callable[[Job, Sink], Summary], columns: tuple[str, ...] = COLUMNS, **options
) -> int:
    """Open ``job``'s output (``open_sink`` with ``columns`` and ``options``), ``run`` it, close it, print the
    summary. Samples of shards and parquet files get the ``sample_columns`` of ``columns``.

    Returns the exit code: 0, or 3 when some images failed. No images at all is a ``UsageError``.
    """
    inputs = job.inputs
    keyed = inputs.keyed()
    if keyed and job.format == "txt":
        raise UsageError(
            "--format txt writes a .txt next to each image file: shards and parquet files have "
            "none; use jsonl, csv or parquet"
        )
    if next(inputs.samples(images=False), None) is None:
        raise no_images(inputs)
    sink = open_sink(
        job.format, job.out, job.overwrite, sample_columns(columns) if keyed else columns, **options
    )
    try:
        summary = run(job, sink)
    finally:
        sink.close()
    print(summary.line(), file=sys.stderr)
    return summary.exit_code


def cmd_caption(args: argparse.Namespace) -> int:
    if report_missing(args.paths):
        return EXIT_USAGE
    job = job_from_args(args)
    if args.engine == "ray":
        from blipkit.batch.ray_engine import run_ray as run
    else:
        from blipkit.batch.local import run_local as run
    return run_job(job, run)
