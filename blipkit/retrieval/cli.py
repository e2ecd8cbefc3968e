"""``blipkit index | search | classify | similarity | cluster``.

``classify`` and ``similarity`` are added only when the main parser does not already define them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from blipkit.batch.files import iter_images, key_of, load_listed
from blipkit.cli_options import load_model
from blipkit.errors import EXIT_OK, EXIT_SOME_FAILED, UsageError


def register(subparsers, add_model_args) -> None:
    p = subparsers.add_parser(
        "index",
        help="embed image folders into a searchable index (resumable)",
        description="Embed images into a searchable index; an existing one is extended. Reads image files, "
        "folders, .jsonl/.csv lists of images, webdataset .tar shards, parquet files with image bytes and "
        "Hugging Face imagefolder dirs; a sample of a shard or parquet file is named '<file>#<key>'.",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="FOLDER",
        help="image folders or files, .jsonl/.csv lists, .tar shards, .parquet files, imagefolder dirs",
    )
    p.add_argument("--out", required=True, metavar="INDEX", help="index folder (an existing one is extended)")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    p.add_argument("--batch-size", type=int, default=32, help="images per model batch (default 32)")
    p.add_argument("--overwrite", action="store_true", help="rebuild instead of extending --out")
    p.add_argument(
        "--progress", action="store_true", help="show the progress bar even when not on a terminal"
    )
    add_model_args(p)
    p.set_defaults(func=cmd_index)

    p = subparsers.add_parser(
        "search", help="search an index by text (ITC, optional ITM re-ranking) or image"
    )
    p.add_argument("index", metavar="INDEX", help="index folder written by 'blipkit index'")
    p.add_argument("text", nargs="?", default=None, help="text query")
    p.add_argument("--image", default=None, help="search by this example image instead of a text")
    p.add_argument("-k", type=int, default=5, help="number of results (default 5)")
    p.add_argument(
        "--rerank",
        type=int,
        default=0,
        metavar="K",
        help="re-rank the K best by ITM + ITC, printing itm_prob (text only; default 0: off)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "exact", "faiss"],
        help="exact (torch) or faiss; auto picks faiss for large indexes when installed (default auto)",
    )
    add_model_args(p)
    p.set_defaults(func=cmd_search, model=None)  # default: the model the index was built with

    p = subparsers.add_parser("classify", help="zero-shot classification against comma-separated labels")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--labels", required=True, help='e.g. "a cat,a dog"')
    p.add_argument(
        "--template",
        default=None,
        help="label template, e.g. 'a photo of {}' (default: the model's prompts.classify)",
    )
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    p.add_argument("--batch-size", type=int, default=16, help="images per model batch (default 16)")
    _finish(p, add_model_args, cmd_classify)

    p = subparsers.add_parser("similarity", help="image x text similarity matrix, optionally drawn")
    p.add_argument("--images", nargs="+", required=True, help="image files or folders")
    p.add_argument("--texts", nargs="+", required=True, help="texts to score against each image")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw the matrix as a heatmap")
    p.add_argument("--itm", action="store_true", help="ITM match probabilities instead of ITC cosine")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_args(p)
    p.set_defaults(func=cmd_similarity)

    p = subparsers.add_parser(
        "cluster", help="k-means on image embeddings: CSV + one contact sheet per cluster"
    )
    p.add_argument("paths", nargs="*", metavar="FOLDER", help="image folders or files")
    p.add_argument("-k", type=int, required=True, help="number of clusters")
    p.add_argument(
        "--out", required=True, metavar="DIR", help="folder for assignments.csv and the contact sheets"
    )
    p.add_argument("--index", default=None, help="cluster the images of this index (no model run)")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    p.add_argument("--seed", type=int, default=0, help="k-means random seed (default 0)")
    _finish(p, add_model_args, cmd_cluster)


def _finish(p: argparse.ArgumentParser, add_model_args, func) -> None:
    add_model_args(p)
    p.set_defaults(func=func)


class _Bar:
    """``on_batch(done, total)`` drawing a tqdm bar on stderr, when ``enabled``."""

    def __init__(self, desc: str, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(
            total=None, unit="img", desc=desc, file=sys.stderr, dynamic_ncols=True, disable=not enabled
        )

    def __call__(self, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def cmd_index(args: argparse.Namespace) -> int:
    from blipkit.batch.cli import no_images
    from blipkit.data.formats import Inputs
    from blipkit.retrieval.index import build_index, index_lock

    files = Inputs(tuple(args.paths), args.recursive)
    if next(files.samples(images=False), None) is None:
        raise no_images(files)
    with index_lock(args.out):  # before the model loads: a second run stops at once
        model = load_model(args)
        bar = _Bar("index", args.progress or sys.stderr.isatty())
        try:
            result = build_index(
                model, files, args.out, args.model, args.batch_size, args.overwrite, bar, lock=False
            )
        finally:
            bar.close()
    for path, reason in result.failed:
        print(json.dumps({"path": path, "error": reason}), file=sys.stderr)
    print(
        f"index {args.out}: {len(result.index)} images (added {result.added}, "
        f"already there {result.skipped}, "
        f"failed {len(result.failed)})",
        file=sys.stderr,
    )
    return EXIT_SOME_FAILED if result.failed else EXIT_OK


def cmd_search(args: argparse.Namespace) -> int:
    from blipkit.retrieval.index import ImageIndex
    from blipkit.retrieval.search import Searcher, rerank

    if (args.text is None) == (args.image is None):
        raise UsageError("give either a text query or --image FILE")
    if args.k < 1 or args.rerank < 0:
        raise UsageError("-k must be at least 1 and --rerank at least 0")
    if args.image is not None and args.rerank:
        raise UsageError("--rerank needs a text query (ITM scores image-text pairs)")
    index = ImageIndex.load(args.index)
    if not len(index):
        raise UsageError(f"index {args.index} is empty")
    model = load_model(args, args.model or index.meta.get("model", "default"))
    searcher = Searcher(index, args.backend)
    if args.text is not None:
        query = model.embed_texts([args.text])
        if query.shape[-1] != index.embeddings.shape[-1]:
            raise UsageError(f"index {args.index} was built with a different model: use --model")
        hits = searcher.search_texts(query, max(args.k, args.rerank))[0]
        if args.rerank:
            hits = rerank(model, hits, args.text, args.rerank)
    else:
        hits = searcher.search_images(model.embed_images([args.image]), args.k)[0]
    for rank, hit in enumerate(hits[: args.k], start=1):
        print(json.dumps(hit.to_dict(rank)))
    return EXIT_OK


def cmd_classify(args: argparse.Namespace) -> int:
    from blipkit.retrieval.zero_shot import classify_files, parse_labels

    labels = parse_labels(args.labels)
    if len(labels) < 2:
        raise UsageError(
            f"--labels has one label ({labels[0]!r}); zero-shot classification needs at least two, "
            "e.g. --labels 'a cat,a dog'"
        )
    files = list(iter_images(args.images, args.recursive))
    if not files:
        raise UsageError("no images found")
    model = load_model(args)
    failed = 0
    for row in classify_files(model, files, labels, args.template, args.batch_size):
        failed += "error" in row
        print(json.dumps(row), flush=True)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def cmd_similarity(args: argparse.Namespace) -> int:
    images = [str(f) for f in iter_images(args.images, recursive=False)]
    if not images:
        raise UsageError("no images found")
    model = load_model(args)
    sims = (model.match if args.itm else model.similarity)(images, args.texts).cpu()
    if args.json:
        print(json.dumps({"images": images, "texts": args.texts, "scores": sims.tolist()}))
    else:
        print(format_matrix([Path(p).name for p in images], args.texts, sims.tolist()))
    if args.plot:
        from blipkit.retrieval.plots import similarity_heatmap

        title = "Image-text match probability (ITM)" if args.itm else "Image-text similarity (ITC)"
        similarity_heatmap(images, args.texts, sims, args.plot, title=title)
        print(f"wrote {args.plot}", file=sys.stderr)
    return EXIT_OK


def format_matrix(rows: list[str], columns: list[str], values: list[list[float]]) -> str:
    """A plain-text table: one row per image, one column per text."""
    first = max(len(r) for r in rows)
    width = max(6, *(len(c) for c in columns))
    lines = [" " * first + "  " + "  ".join(f"{c:>{width}}" for c in columns)]
    lines += [
        f"{r:<{first}}  " + "  ".join(f"{v:>{width}.3f}" for v in row)
        for r, row in zip(rows, values, strict=True)
    ]
    return "\n".join(lines)


def cmd_cluster(args: argparse.Namespace) -> int:
    from blipkit.retrieval.cluster import kmeans, write_clusters

    if bool(args.paths) == bool(args.index):
        raise UsageError("give image folders or --index INDEX (one of them)")
    failed = 0
    if args.index:
        from blipkit.retrieval.index import ImageIndex

        index = ImageIndex.load(args.index)
        paths, embeddings = index.paths, index.pooled.numpy()
    else:
        from blipkit.processing import ImageError

        model = load_model(args)
        paths, chunks = [], []
        files = [key_of(f) for f in iter_images(args.paths, args.recursive)]
        for i in range(0, len(files), model.batch_size):
            images = []
            for f in files[i : i + model.batch_size]:
                try:
                    images.append(load_listed(f))
                    paths.append(f)
                except ImageError as e:
                    print(json.dumps({"path": f, "error": e.reason}), file=sys.stderr)
                    failed += 1
            if images:
                chunks.append(model.embed_images(images).cpu())
        if not chunks:
            raise UsageError("no readable images found")
        import torch

        embeddings = torch.cat(chunks).numpy()
    labels, distances = kmeans(embeddings, args.k, args.seed)
    sheets = write_clusters(paths, labels, distances, args.out)
    sizes = [int((labels == c).sum()) for c in range(args.k)]
    print(
        f"{len(paths)} images in {args.k} clusters (sizes {sizes}); wrote {args.out}/assignments.csv and "
        f"{len(sheets)} contact sheets",
        file=sys.stderr,
    )
    return EXIT_SOME_FAILED if failed else EXIT_OK
