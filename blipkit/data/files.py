"""Your own data: captions as JSONL or CSV (``image``, ``caption``) and VQA as JSONL (``image``, ``question``,
``answer``, optional ``caption``). Image paths may be relative to ``image_root`` (default: the file's folder).

A bad row raises :class:`DataError` naming the file and line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from blipkit.data.records import CaptionExample, VqaExample
from blipkit.errors import DataError


def _rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row dict) for every non-empty row of a .jsonl or .csv file."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    rows = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                if any((v or "").strip() for v in row.values()):
                    rows.append((reader.line_num, row))
        return rows
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise DataError(f"{path}: expected a .jsonl or .csv file")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    return rows


def _text(row: dict, key: str, where: str, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _image(row: dict, root: Path, where: str) -> str:
    name = _text(row, "image", where)
    path = Path(name).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise DataError(f"{where}: image {name!r} not found (looked for {path})")
    return str(path)


def _read(path: str | Path, image_root: str | Path | None, make) -> list:
    """Examples from the rows of ``path``; ``make(row, root, where)`` builds one and names bad rows."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    examples = [make(row, root, f"{path}:{number}") for number, row in _rows(path)]
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


def read_captions(path: str | Path, image_root: str | Path | None = None) -> list[CaptionExample]:
    """Caption examples from JSONL (``{"image": ..., "caption": ...}``) or CSV with those columns."""

    def make(row: dict, root: Path, where: str) -> CaptionExample:
        return CaptionExample(_image(row, root, where), _text(row, "caption", where))

    return _read(path, image_root, make)


def read_vqa(path: str | Path, image_root: str | Path | None = None) -> list[VqaExample]:
    """VQA examples from JSONL: ``{"image": ..., "question": ..., "answer": ...[, "caption": ...]}``."""

    def make(row: dict, root: Path, where: str) -> VqaExample:
        return VqaExample(
            _image(row, root, where),
            _text(row, "question", where),
            _text(row, "answer", where),
            _text(row, "caption", where, required=False),
        )

    return _read(path, image_root, make)


def is_vqa_file(path: str | Path) -> bool:
    """True when the first row of a JSONL file has a ``question`` field."""
    rows = _rows(Path(path))
    return bool(rows) and "question" in rows[0][1]
