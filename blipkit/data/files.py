"""Your own data: captions as JSONL or CSV (``image``, ``caption``) and VQA as JSONL (``image``, ``question``,
``answer``, optional ``caption``). Image paths may be relative to ``image_root`` (default: the file's folder).
Samples of shards, parquet files and Hugging Face datasets (``blipkit.data.formats``) become examples through
``sample_examples``.

A bad row raises :class:`DataError` naming the file and line (or the sample).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from blipkit.data.formats import Sample, Unreadable
from blipkit.data.records import CaptionExample, VqaExample
from blipkit.errors import DataError, ImageError


def iter_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row dict) for every non-empty row of a .jsonl or .csv file, lazily."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                if any((v or "").strip() for v in row.values()):
                    yield reader.line_num, row
        return
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
            yield number, row


def _rows(path: Path) -> list[tuple[int, dict]]:
    return list(iter_rows(path))


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


IMAGE_SUFFIXES = {"JPEG": ".jpg", "TIFF": ".tif"}  # stored images' suffixes; others: the format, lower-cased


def stored_image(data: bytes, where: str, store: Path | None = None) -> str:
    """The path of a file holding ``data``, an encoded image, under ``store`` (default: ``<blipkit cache>/
    images``): named by its SHA-256, so an image has the same path (and cached features) on every run.
    Written once, atomically; bytes that are not an image are a ``DataError`` naming ``where``."""
    import hashlib
    import io
    import os

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:  # the header only: the pixels are decoded later
            suffix = IMAGE_SUFFIXES.get(image.format, f".{(image.format or 'img').lower()}")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{where}: not an image ({e})") from e
    if store is None:
        from blipkit.assets import cache_dir

        store = cache_dir() / "images"
    digest = hashlib.sha256(data).hexdigest()
    path = store / digest[:2] / f"{digest}{suffix}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(path)


def _image_file(sample: Sample, where: str, store: Path | None) -> str:
    """A file holding the sample's image: its own, or its bytes stored by ``stored_image``."""
    image = sample.image
    if isinstance(image, Unreadable):
        raise DataError(f"{where}: {image.reason}")
    if isinstance(image, str):
        if not Path(image).is_file():
            raise DataError(f"{where}: image file not found")
        return image
    try:
        data = image if isinstance(image, bytes) else image.read()
    except ImageError as e:
        raise DataError(f"{where}: {e.reason}") from e
    return stored_image(data, where, store)


def _captions(meta: dict) -> list[str]:
    """The sample's captions: ``caption`` or ``text``, a string or a list of strings."""
    value = next((meta[k] for k in ("caption", "text") if meta.get(k)), None)
    values = value if isinstance(value, list) else [value]
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def sample_examples(samples: Iterable[Sample], spec: str, store: Path | None = None) -> list:
    """Training examples of ``samples`` read with their metadata (``blipkit.data.formats``): a sample with
    ``question`` and ``answer`` is a VqaExample, one with captions (``caption`` / ``text``, a shard's
    ``.txt``) a CaptionExample per caption. Images held as bytes are stored as files (``stored_image``)."""
    examples: list = []
    for sample in samples:
        where = f"{spec}: sample {sample.id}"
        captions = _captions(sample.meta)
        question, answer = (sample.meta.get(k) for k in ("question", "answer"))
        if not captions and not (question and answer):
            raise DataError(f"{where}: no caption (caption, text, a .txt member) and no question/answer")
        image = _image_file(sample, where, store)
        if question and answer:
            caption = captions[0] if captions else None
            examples.append(VqaExample(image, str(question).strip(), str(answer).strip(), caption))
        else:
            examples += [CaptionExample(image, c) for c in captions]
    if not examples:
        raise DataError(f"{spec}: no samples")
    return examples
