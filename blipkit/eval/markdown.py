"""Markdown renderings of the evaluation reports."""

from __future__ import annotations

from blipkit.eval.files import table

__all__ = ["caption_markdown", "retrieval_markdown", "vqa_markdown"]


def _facts(report: dict, keys: tuple[str, ...]) -> str:
    """A bullet list of the ``keys`` the report has, followed by a blank line (nothing when none)."""
    lines = "".join(f"- {k}: `{report[k]}`\n" for k in keys if k in report)
    return lines + "\n" if lines else ""


def vqa_markdown(report: dict, title: str = "VQA accuracy") -> str:
    md = f"# {title}\n\n" + _facts(report, ("model", "dataset", "split", "limit", "seconds"))
    rows = [["overall", report["questions"], report["accuracy"]]]
    counts = report.get("answer_type_counts", {})
    rows += [[k, counts.get(k, ""), v] for k, v in report.get("by_answer_type", {}).items()]
    md += table(["answers", "questions", "accuracy"], rows)
    if "exact_match" in report:
        md += f"\nExact match (stripped, lower-cased): {report['exact_match']:.4f}\n"
    if report.get("missing_predictions"):
        md += f"\n{len(report['missing_predictions'])} questions had no prediction (scored 0).\n"
    md += "\nVQA accuracy: answers normalised as in the official VQA evaluation; with ten human answers, the"
    md += " mean over the ten leave-one-out subsets of min(#matches / 3, 1); with one answer, exact match.\n"
    return md


def caption_metrics_markdown(report: dict) -> str:
    return table(list(report["metrics"]), [list(report["metrics"].values())])


def caption_markdown(report: dict) -> str:
    md = f"# Caption metrics\n\n{report['images']} images, tokenizer: {report['tokenizer']}.\n\n"
    md += caption_metrics_markdown(report)
    if report["skipped"]:
        md += f"\nSkipped (no Java): {', '.join(report['skipped'])}.\n"
    return md


def retrieval_markdown(report: dict) -> str:
    md = "# Image-text retrieval\n\n" + _facts(report, ("model", "dataset", "relevance", "images", "texts"))
    ks = list(report["itc"]["text_to_image"])
    rows = []
    for method in ("itc", "itc+itm"):
        if method in report:
            for direction in ("text_to_image", "image_to_text"):
                rows.append([method, direction.replace("_", " "), *report[method][direction].values()])
    md += table(["scores", "direction", *ks], rows)
    if "rerank_top" in report:
        md += f"\nITM re-ranks the {report['rerank_top']} best ITC candidates (ITM match logit + ITC).\n"
    return md
