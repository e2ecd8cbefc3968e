"""``blipkit eval vqa | vqa-model | caption | retrieval``: each writes a JSON report and a Markdown one."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from blipkit.cli_options import load_model
from blipkit.errors import EXIT_OK, UsageError


def register(subparsers, add_model_args) -> None:
    ev = subparsers.add_parser("eval", help="VQA accuracy, caption metrics, retrieval Recall@K")
    sub = ev.add_subparsers(dest="eval_command", metavar="TASK", required=True)

    p = sub.add_parser("vqa", help="VQA accuracy of predictions against human answers")
    p.add_argument("--predictions", required=True, help='JSONL rows {"question_id", "answer"}')
    p.add_argument("--annotations", required=True, help='JSONL rows {"question_id", "answers": [...]}')
    p.add_argument("--out", default=None, help="report JSON (a .md report is written beside it)")
    p.set_defaults(func=cmd_vqa)

    p = sub.add_parser("vqa-model", help="answer a VQA dataset with a model and score the answers")
    p.add_argument(
        "--dataset",
        default="easy-vqa",
        help="'easy-vqa' or a VQA JSONL file (image, question, answer) (default easy-vqa)",
    )
    p.add_argument("--split", default="test", choices=["train", "test"], help="easy-VQA split (default test)")
    p.add_argument("--image-root", default=None, help="folder that relative image paths start from")
    p.add_argument("--limit", type=int, default=0, help="a fixed random subset of N questions (seed 0)")
    p.add_argument("--batch-size", type=int, default=32, help="questions per model batch (default 32)")
    p.add_argument("--out", default=None, help="report JSON (.md and .predictions.jsonl beside it)")
    _progress_arg(p)
    add_model_args(p)
    p.set_defaults(func=cmd_vqa_model)

    p = sub.add_parser("caption", help="BLEU-1..4, METEOR, ROUGE-L, CIDEr of captions (pycocoevalcap)")
    p.add_argument("--predictions", required=True, help='JSONL rows {"image_id"|"path", "caption"}')
    p.add_argument("--references", required=True, help='JSONL rows {"image_id"|"path", "captions": [...]}')
    p.add_argument("--out", default=None, help="report JSON (a .md report is written beside it)")
    p.add_argument("--no-java", action="store_true", help="skip METEOR and the PTB tokenizer even with Java")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("retrieval", help="Recall@1/5/10 image<->text, ITC alone and with ITM re-ranking")
    p.add_argument("--pairs", default=None, help="captions JSONL/CSV (image, caption); default: easy-VQA")
    p.add_argument("--dataset", default="easy-vqa", help="used when --pairs is not given (default easy-vqa)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="easy-VQA split (default test)")
    p.add_argument("--image-root", default=None, help="folder that relative image paths start from")
    p.add_argument(
        "--limit", type=int, default=0, help="use the first N pairs (easy-VQA: N images) (default 0: all)"
    )
    p.add_argument(
        "--relevance",
        default="attribute",
        choices=["attribute", "caption"],
        help="easy-VQA: 'attribute' (default): the grammar's 35 captions against the images whose colour and "
        "shape are known, a caption relevant to every image it fits ('a red shape': all red images); "
        "'caption': each image's derived caption, relevant to the images with that same string",
    )
    p.add_argument(
        "--rerank",
        type=int,
        default=16,
        metavar="K",
        help="ITM re-ranks the K best (0: ITC only; default 16)",
    )
    p.add_argument("--out", default=None, help="report JSON (a .md report is written beside it)")
    _progress_arg(p)
    add_model_args(p)
    p.set_defaults(func=cmd_retrieval)


def _progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress", action="store_true", help="show the progress bar even when not on a terminal"
    )


def _show_progress(args: argparse.Namespace) -> bool:
    return args.progress or sys.stderr.isatty()


def _finish(args: argparse.Namespace, report: dict, markdown: str) -> int:
    """Write the reports (or print the summary when no --out)."""
    if args.out:
        from blipkit.eval.files import write_report

        js, md = write_report(args.out, report, markdown)
        print(f"wrote {js} and {md}", file=sys.stderr)
    summary = {k: v for k, v in report.items() if k not in ("per_question", "per_image")}
    summary = {k: v for k, v in summary.items() if not (isinstance(v, list) and len(v) > 20)}
    print(json.dumps(summary, indent=2))
    return EXIT_OK


def cmd_vqa(args: argparse.Namespace) -> int:
    from blipkit.eval.files import read_answers
    from blipkit.eval.markdown import vqa_markdown
    from blipkit.eval.vqa import vqa_accuracy

    predicted, _ = read_answers(args.predictions)
    truth, types = read_answers(args.annotations)
    several = sorted(q for q, a in predicted.items() if len(a) != 1)
    if several:
        raise UsageError(f"{args.predictions}: questions with more than one prediction, e.g. {several[:3]}")
    report = vqa_accuracy({q: a[0] for q, a in predicted.items()}, truth, types or None)
    return _finish(args, report, vqa_markdown(report))


def cmd_vqa_model(args: argparse.Namespace) -> int:
    from blipkit.data.sources import read_examples
    from blipkit.eval.markdown import vqa_markdown
    from blipkit.eval.vqa_model import evaluate_vqa_model

    spec = f"easy-vqa:{args.split}" if args.dataset == "easy-vqa" else args.dataset
    if args.dataset != "easy-vqa" and not Path(args.dataset).exists():
        raise UsageError(f"--dataset must be 'easy-vqa' or a VQA JSONL file, got {args.dataset!r}")
    _, examples = read_examples(spec, args.image_root)
    if examples and not hasattr(examples[0], "question"):
        raise UsageError(f"{args.dataset} has no questions (a captions file?)")
    model = load_model(args)
    report, rows = evaluate_vqa_model(
        model, examples, args.limit, args.batch_size, progress=_show_progress(args)
    )
    report = {"model": args.model, "dataset": args.dataset, "split": args.split, "limit": args.limit} | report
    if args.out:
        preds = Path(args.out).with_suffix(".predictions.jsonl")
        preds.parent.mkdir(parents=True, exist_ok=True)
        preds.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {preds}", file=sys.stderr)
    return _finish(args, report, vqa_markdown(report, "VQA accuracy of a model"))


def cmd_caption(args: argparse.Namespace) -> int:
    from blipkit.eval.captions import JAVA_HELP, caption_metrics, java_available
    from blipkit.eval.files import read_captions
    from blipkit.eval.markdown import caption_markdown

    predicted = read_captions(args.predictions)
    several = sorted(k for k, c in predicted.items() if len(c) != 1)
    if several:
        raise UsageError(
            f"{args.predictions}: images with more than one predicted caption, e.g. {several[:3]}"
        )
    use_java = java_available() and not args.no_java
    if not args.no_java and not use_java:
        print(f"blipkit: warning: {JAVA_HELP}", file=sys.stderr)
    report = caption_metrics(
        {k: c[0] for k, c in predicted.items()}, read_captions(args.references), use_java
    )
    return _finish(args, report, caption_markdown(report))


def _pairs(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    if args.pairs:
        from blipkit.data.files import read_captions

        examples = read_captions(args.pairs, args.image_root)
    elif args.dataset == "easy-vqa":
        from blipkit.data import easy_vqa

        examples = easy_vqa.caption_examples(args.split)
    else:
        raise UsageError("give --pairs FILE or --dataset easy-vqa")
    examples = examples[: args.limit] if args.limit else examples
    return [e.image for e in examples], [e.caption for e in examples]


def _image_features(model, images: list[str], progress: bool):
    """``recall.image_features`` of ``images``, a batch at a time under a tqdm bar on stderr."""
    import torch
    from tqdm import tqdm

    from blipkit.eval.recall import image_features

    queries, vision = [], []
    with tqdm(total=len(images), unit="img", desc="retrieval", file=sys.stderr, disable=not progress) as bar:
        for i in range(0, len(images), model.batch_size):
            q, v = image_features(model, images[i : i + model.batch_size])
            queries.append(q)
            vision.append(v)
            bar.update(len(q))
    return torch.cat(queries), torch.cat(vision)


def cmd_retrieval(args: argparse.Namespace) -> int:
    from blipkit.eval.markdown import retrieval_markdown
    from blipkit.eval.recall import group_pairs, retrieval_eval

    if args.pairs is None and args.dataset == "easy-vqa" and args.relevance == "attribute":
        import torch

        from blipkit.data import easy_vqa

        images, texts, relevant, _ = easy_vqa.retrieval_set(args.split, args.limit or None)
        relevant = torch.tensor(relevant)
    else:
        images, texts, relevant = group_pairs(*_pairs(args))
    if not images:
        raise UsageError("no image-caption pairs to evaluate")
    model = load_model(args)
    features = _image_features(model, images, _show_progress(args))
    report = retrieval_eval(model, images, texts, relevant, rerank=args.rerank, features=features)
    dataset = args.pairs or f"{args.dataset}:{args.split}"
    relevance = "caption" if args.pairs else args.relevance
    report = {"model": args.model, "dataset": dataset, "relevance": relevance} | report
    return _finish(args, report, retrieval_markdown(report))
