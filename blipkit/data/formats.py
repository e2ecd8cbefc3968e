"""Where images come from, behind one reader: every input yields ``Sample``s (a key, the image as a path,
bytes or a loader, and metadata).

Inputs, told apart by what they are (``kind_of``):

- an image file, or a folder of them (``--recursive``: its sub-folders too);
- a ``.jsonl`` / ``.csv`` list of images: rows with ``image`` (or ``path``, ``file_name``), relative to the
  list's folder; the other fields are the metadata;
- webdataset ``.tar`` shards in img2dataset's layout: ``KEY.jpg`` (or .png, .webp, ...) next to ``KEY.txt``
  (the caption) and ``KEY.json``; the key is the member name up to the first dot of its last part
  (webdataset's rule). Read with ``tarfile``, headers first: a member's bytes are read only when its image
  is decoded, so a resumed run reads the headers of done samples, not their images, and a shard cut short
  still gives the samples before the cut and an error naming where it stops (the ``webdataset`` package
  streams every member's bytes, and its error handlers either stop the run or drop samples unreported);
- ``.parquet`` files with image bytes: the first of the columns ``jpg jpeg png webp image img`` that holds
  bytes (or Hugging Face's ``{bytes, path}`` struct), ``key`` (default: the row number) and text columns
  such as ``caption`` / ``text`` (img2dataset's parquet layout);
- a Hugging Face ``imagefolder`` dir (a folder with ``metadata.jsonl`` / ``.csv`` with a ``file_name`` field
  at its top or in its split sub-folders), read with the ``datasets`` library, every split.

A sample of an image file is named by its resolved path (``Sample.source`` is None); a sample held in a
shard or parquet file by ``SampleId(source, key)``. A shard or parquet file that cannot be read (in full)
gives one sample with key ``""`` whose image is ``Unreadable``, after the samples read before the fault.
"""

from __future__ import annotations

import csv
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from blipkit.batch.files import IMAGE_EXTENSIONS, iter_images, key_of
from blipkit.batch.writers import SampleId
from blipkit.errors import DataError, ImageError, UsageError
from blipkit.extras import require

KINDS = ("image", "folder", "list", "webdataset", "parquet", "imagefolder")
CONTAINERS = ("webdataset", "parquet")  # kinds whose samples are named (source, key)
LIST_SUFFIXES = (".jsonl", ".csv")
LIST_FIELDS = ("image", "path", "file_name")  # the field of a list row that names its image
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # of a Hugging Face imagefolder, with a file_name field
IMAGE_MEMBERS = tuple(ext.lstrip(".") for ext in sorted(IMAGE_EXTENSIONS))
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img")
KEY_COLUMN = "key"
TEXT_FIELDS = ("caption", "text", "question", "answer")  # metadata columns read from parquet files
NO_IMAGE = "no image in the sample"
PARQUET_ROWS = 64  # rows per record batch read from a parquet file


@dataclass(frozen=True)
class TarMember:
    """Reads one member's bytes of a shard (by offset, no tar parsing): the image of a sample, on demand."""

    shard: str
    name: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise ImageError(self.name, f"truncated shard: {len(data)} of {self.size} bytes")
        return data


@dataclass(frozen=True)
class Unreadable:
    """The image of a sample that has none, or of a container that cannot be read: ``read()`` says why."""

    reason: str

    def read(self) -> bytes:
        raise ImageError("<sample>", self.reason)


ImageData = str | bytes | TarMember | Unreadable  # a path, the encoded bytes, or a loader with ``read()``


@dataclass
class Sample:
    """One image to read and what is known about it."""

    key: str  # an image file's resolved path, or the sample's key in its shard / parquet file
    image: ImageData | None  # None: not read (``images=False``)
    source: str | None = None  # the shard or parquet file holding it (resolved); None for image files
    meta: dict = field(default_factory=dict)  # text fields (caption, text, ...) when read with ``meta``

    @property
    def id(self) -> str:
        """Its name in outputs: the resolved path, or ``SampleId(source, key)``."""
        return self.key if self.source is None else SampleId(self.source, self.key)


def kind_of(path: str | os.PathLike) -> str:
    """What an input is: one of ``KINDS``, from its suffix (files) or its metadata files (folders)."""
    p = Path(path)
    if p.is_dir():
        tops = [p, *_subfolders(p)]
        return "imagefolder" if any(_is_metadata(d / m) for d in tops for m in METADATA_FILES) else "folder"
    name = p.name.lower()
    if name.endswith((".tar.gz", ".tgz")):
        raise UsageError(
            f"{path}: compressed shards are not read (their members cannot be seeked): gunzip it"
        )
    suffix = p.suffix.lower()
    if suffix == ".tar":
        return "webdataset"
    if suffix == ".parquet":
        return "parquet"
    return "list" if suffix in LIST_SUFFIXES else "image"


def _subfolders(p: Path) -> list[Path]:
    try:
        with os.scandir(p) as it:
            return [Path(e.path) for e in it if e.is_dir()]  # the listing's file types: no stat per entry
    except OSError:
        return []


def _is_metadata(file: Path) -> bool:
    """True for an imagefolder's metadata file: its first row (or CSV header) has a ``file_name`` field."""
    try:
        with open(file, encoding="utf-8") as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError):
        return False
    if file.suffix == ".csv":
        return "file_name" in next(csv.reader([first]), [])
    try:
        return "file_name" in json.loads(first)
    except (ValueError, TypeError):
        return False


@dataclass(frozen=True)
class Inputs:
    """The inputs named on the command line; each ``samples()`` call reads them again, lazily."""

    paths: tuple[str, ...]
    recursive: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", tuple(os.fspath(p) for p in self.paths))

    @cached_property
    def kind(self) -> dict[str, str]:
        """{path: its ``kind_of``} of the inputs that exist."""
        return {p: kind_of(p) for p in self.paths if os.path.exists(p)}

    def kinds(self) -> set[str]:
        return set(self.kind.values())

    def keyed(self) -> bool:
        """True when the samples are named by (source, key): every input is a shard or parquet file.

        Image files and containers in one run is a ``UsageError``: output rows are of one layout."""
        kinds = self.kinds()
        held = kinds & set(CONTAINERS)
        if held and held != kinds:
            raise UsageError(
                "give either image files, folders and lists, or webdataset shards and parquet files, "
                "not both in one run: their rows are {path, ...} and {key, source, ...}"
            )
        return bool(held)

    def samples(self, images: bool = True, meta: bool = False) -> Iterator[Sample]:
        """Every sample, in input order; ``images=False`` leaves out what costs reading the images."""
        seen: set[tuple[int, int]] = set()  # folders listed, shared by every folder input
        for path in self.paths:
            kind = self.kind.get(path, "image")  # a missing one: FileNotFoundError from iter_images
            if kind in ("image", "folder"):
                yield from _file_samples(path, self.recursive, seen)
            else:
                yield from READERS[kind](path, images=images, meta=meta)


def _file_samples(path: str, recursive: bool, seen: set[tuple[int, int]]) -> Iterator[Sample]:
    for file in iter_images([path], recursive, seen):
        yield Sample(key_of(file), str(file))


def list_samples(path: str, images: bool = True, meta: bool = False) -> Iterator[Sample]:
    """The images a JSONL / CSV list names (``LIST_FIELDS``), relative to the list's folder."""
    from blipkit.data.files import iter_rows

    root = Path(path).parent
    for number, row in iter_rows(Path(path)):
        name = next((row[f] for f in LIST_FIELDS if isinstance(row.get(f), str) and row[f].strip()), None)
        if name is None:
            raise DataError(f"{path}:{number}: no image: expected a field {' or '.join(LIST_FIELDS)}")
        file = Path(name).expanduser()
        file = file if file.is_absolute() else root / file
        fields = {k: v for k, v in row.items() if k not in LIST_FIELDS} if meta else {}
        yield Sample(key_of(file), str(file), meta=fields)


def _split_member(name: str) -> tuple[str, str] | None:
    """(key, extension) of a shard member: ``"dir/000012.seg.png"`` -> ``("dir/000012", "seg.png")``."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def tar_members(shard: str) -> tuple[dict[str, dict[str, TarMember]], str | None]:
    """{key: {extension: member}} in the order of the shard, and why reading stopped early (or None)."""
    groups: dict[str, dict[str, TarMember]] = {}
    last = None  # the name of the last member read
    try:
        with tarfile.open(shard, "r:") as tar:  # seekable: each header is read, the data skipped
            while (info := tar.next()) is not None:
                last = info.name
                split = _split_member(info.name) if info.isreg() else None
                if split is not None:
                    member = TarMember(shard, info.name, info.offset_data, info.size)
                    groups.setdefault(split[0], {})[split[1]] = member
    except (tarfile.TarError, OSError) as e:
        after = f" after member {last!r}" if last is not None else ""
        return groups, f"cannot read the shard{after}: {e}"
    return groups, None


def _shard_meta(members: dict[str, TarMember], where: str) -> dict:
    """The sample's ``.json`` fields, with ``caption`` from its ``.txt``."""
    try:
        meta = json.loads(members["json"].read()) if "json" in members else {}
        text = members["txt"].read().decode("utf-8", "replace").strip() if "txt" in members else None
    except (ValueError, ImageError) as e:
        raise DataError(f"{where}: its .json or .txt member cannot be read ({e})") from e
    if not isinstance(meta, dict):
        raise DataError(f"{where}: its .json member is not a JSON object")
    return meta if text is None else meta | {"caption": text}


def shard_samples(path: str, images: bool = True, meta: bool = False) -> Iterator[Sample]:
    """The samples of a webdataset shard; the image is a ``TarMember`` (read on demand)."""
    source = key_of(Path(path))
    groups, fault = tar_members(path)
    for key, members in groups.items():
        ext = next((e for e in IMAGE_MEMBERS if e in members), None)
        if ext is None:
            image: ImageData = Unreadable(f"{NO_IMAGE} (it has .{', .'.join(sorted(members))})")
        else:
            image = members[ext]
        fields = _shard_meta(members, f"{source}#{key}") if meta else {}
        yield Sample(key, image, source, fields)
    if fault is not None:
        yield Sample("", Unreadable(fault), source)


def image_column(schema) -> str | None:
    """The parquet column holding the images: binary, or a struct with a ``bytes`` field."""
    import pyarrow as pa

    def holds_bytes(t) -> bool:
        if pa.types.is_struct(t):
            return t.get_field_index("bytes") >= 0 and holds_bytes(t.field("bytes").type)
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)

    names = {name.lower(): name for name in schema.names}
    wanted = [names[c] for c in IMAGE_COLUMNS if c in names]
    return next((c for c in wanted if holds_bytes(schema.field(c).type)), None)


def _image_value(value) -> bytes | Unreadable:
    if isinstance(value, dict):  # Hugging Face's Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    return value if value else Unreadable(NO_IMAGE)


def parquet_samples(path: str, images: bool = True, meta: bool = False) -> Iterator[Sample]:
    """The rows of a parquet file, read ``PARQUET_ROWS`` at a time; the image is the bytes of its cell."""
    pq = require("pyarrow.parquet", "reading parquet files", "parquet", "pyarrow")
    source = key_of(Path(path))
    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow.ArrowInvalid and friends: not a parquet file
        yield Sample("", Unreadable(f"cannot read the parquet file: {e}"), source)
        return
    schema = file.schema_arrow
    image = image_column(schema)
    if image is None:
        reason = f"no image column: expected one of {', '.join(IMAGE_COLUMNS)} holding bytes"
        yield Sample("", Unreadable(f"{reason}; it has {', '.join(schema.names)}"), source)
        return
    key = KEY_COLUMN if KEY_COLUMN in schema.names else None
    texts = [c for c in TEXT_FIELDS if c in schema.names] if meta else []
    columns = [c for c in (key, image if images else None, *texts) if c]
    if not columns:  # keys from row numbers, nothing else wanted: the metadata holds the count
        for number in range(file.metadata.num_rows):
            yield Sample(str(number), None, source)
        return
    number = 0
    for batch in file.iter_batches(batch_size=PARQUET_ROWS, columns=columns):
        for row in batch.to_pylist():
            name = row.get(key) if key else None
            data = _image_value(row.get(image)) if images else None
            yield Sample(str(name) if name is not None else str(number), data, source, _texts(row, texts))
            number += 1


def _texts(row: dict, names: Iterable[str]) -> dict:
    return {n: row[n] for n in names if row.get(n) is not None}


def image_feature(features) -> str:
    """The column of a ``datasets`` dataset holding images (an ``Image`` feature)."""
    import datasets

    for name, feature in (features or {}).items():
        if isinstance(feature, datasets.Image):
            return name
    found = ", ".join(features or {}) or "none known"
    raise DataError(f"the dataset has no Image column (its columns: {found})")


def dataset_samples(dataset, source: str) -> Iterator[Sample]:
    """The rows of a ``datasets`` dataset (``Dataset`` or ``IterableDataset``): each image as its file's path
    where it has one, else its bytes (key: the row number); the other columns are the metadata."""
    import datasets

    column = image_feature(dataset.features)
    dataset = dataset.cast_column(column, datasets.Image(decode=False))
    for number, row in enumerate(dataset):
        value = row.pop(column) or {}
        fields = {k: v for k, v in row.items() if v is not None}
        if value.get("bytes"):
            yield Sample(str(number), value["bytes"], source, fields)
        elif value.get("path"):
            yield Sample(key_of(Path(value["path"])), value["path"], meta=fields)
        else:
            yield Sample(str(number), Unreadable(NO_IMAGE), source, fields)


def imagefolder_samples(path: str, images: bool = True, meta: bool = False) -> Iterator[Sample]:
    """Every split of a Hugging Face ``imagefolder`` dir, streamed by the ``datasets`` library."""
    datasets = require("datasets", f"reading the Hugging Face imagefolder {path}", "data")
    splits = datasets.load_dataset("imagefolder", data_dir=str(path), streaming=True)
    for split in splits.values():
        for sample in dataset_samples(split, key_of(Path(path))):
            yield sample if meta else Sample(sample.key, sample.image, sample.source)


READERS = {
    "list": list_samples,
    "webdataset": shard_samples,
    "parquet": parquet_samples,
    "imagefolder": imagefolder_samples,
}


def hf_samples(name: str, split: str = "train") -> Iterator[Sample]:
    """The ``split`` of a Hugging Face dataset, read with ``datasets``: a dir written by ``save_to_disk``
    (``load_from_disk``), or anything ``load_dataset`` takes: a hub id (its cache; ``HF_HUB_OFFLINE``), an
    imagefolder dir, a dir of data files."""
    datasets = require("datasets", f"reading the Hugging Face dataset {name}", "data")
    path = Path(name).expanduser()
    try:
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            dataset = datasets.load_from_disk(str(path))
            dataset = dataset[split] if isinstance(dataset, datasets.DatasetDict) else dataset
        else:
            dataset = datasets.load_dataset(str(path) if path.is_dir() else name, split=split)
    except (FileNotFoundError, ValueError, KeyError, ConnectionError) as e:
        raise DataError(f"cannot load the Hugging Face dataset {name!r} (split {split!r}): {e}") from e
    yield from dataset_samples(dataset, str(path) if path.is_dir() else name)
