"""Reading evaluation inputs (JSONL rows, or the JSON of the VQA and COCO tools) and writing reports."""

from __future__ import annotations

import json
from pathlib import Path

from blipkit.errors import DataError

__all__ = ["read_answers", "read_captions", "read_rows", "write_report"]

ID_KEYS = ("image_id", "image", "path", "id")


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a .jsonl file, or of a .json file holding a list (or a dict with "annotations")."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        rows = data.get("annotations", data) if isinstance(data, dict) else data
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path}: expected rows of JSON objects")
    return rows


def _field(row: dict, keys: tuple[str, ...], path: Path) -> str:
    for key in keys:
        if row.get(key) is not None:
            return str(row[key])
    raise DataError(f"{path}: a row has none of the fields {', '.join(keys)}: {json.dumps(row)[:200]}")


def read_answers(path: str | Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({question_id: [answers]}, {question_id: answer_type}) from predictions or annotations rows.

    A row has "answer" (a string) or "answers" (strings, or VQAv2 dicts with "answer"); rows with the same
    question id add up.
    """
    path = Path(path)
    answers: dict[str, list[str]] = {}
    types: dict[str, str] = {}
    for row in read_rows(path):
        qid = _field(row, ("question_id",), path)
        got = row.get("answers", [row.get("answer")])
        if not isinstance(got, list):
            got = [got]
        got = [a.get("answer") if isinstance(a, dict) else a for a in got]
        if not got or not all(isinstance(a, str) for a in got):
            raise DataError(f"{path}: question {qid}: 'answer' must be a string or 'answers' a list of them")
        answers.setdefault(qid, []).extend(got)
        if row.get("answer_type"):
            types[qid] = str(row["answer_type"])
    return answers, types


def read_captions(path: str | Path) -> dict[str, list[str]]:
    """{image id: [captions]} from rows with an id field (image_id, image, path or id) and "caption" or
    "captions"."""
    path = Path(path)
    out: dict[str, list[str]] = {}
    for row in read_rows(path):
        if "error" in row and "caption" not in row:
            continue  # a failed item of `blipkit caption`
        key = _field(row, ID_KEYS, path)
        caps = row.get("captions", [row.get("caption")])
        if isinstance(caps, str):
            caps = [caps]
        if not caps or not all(isinstance(c, str) for c in caps):
            raise DataError(f"{path}: image {key}: 'caption' must be a string or 'captions' a list of them")
        out.setdefault(key, []).extend(caps)
    return out


def write_report(out: str | Path, report: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``out`` (JSON) and the Markdown report beside it (same name, .md)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md = out.with_suffix(".md")
    md.write_text(markdown, encoding="utf-8")
    return out, md


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; floats get 4 decimals."""
    cells = [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells]) + "\n"
