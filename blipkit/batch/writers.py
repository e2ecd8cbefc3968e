"""Output sinks that survive ``kill -9`` and resume: JSONL, CSV, Parquet and sidecar ``.txt`` files.

Every sink answers ``is_done(path)`` (already in the output) and ``conflict(path)`` (why it cannot hold that
image), takes rows ``{"path", "caption"}`` (or another result, e.g. ``"tags"``) or ``{"path", "error"}`` and
is closed at the end. Samples of webdataset shards and parquet files are rows ``{"key", "source", "caption"}``
(``sample_columns``): ``key`` is the sample's key, as in img2dataset's parquet files, to join on; ``source``
the shard or parquet file; a sample is named by both (``SampleId``). A sink holds an exclusive lock on its
output file from start to close (see ``lock.py``).
JSONL is appended in whole lines (a torn last line is cut off on resume); CSV and Parquet are rewritten to a
temporary file and renamed over the output, so a kill leaves the previous file or the new one, never a mix. A
write that fails (a full disk) is undone before the error is raised, so the output is always as it was after
the last good batch.

File names are data: JSONL escapes newlines and every non-ASCII character, so U+2028 and the surrogates that
stand for bytes that are not UTF-8 round-trip exactly; CSV and Parquet hold UTF-8 text, where such bytes are
written ``\\xNN`` (as ``ls -b`` does). A result that is not text (``blipkit tag``'s list of tags) is a JSON
string in CSV and Parquet cells.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Protocol

from blipkit.batch.files import scan_folder
from blipkit.batch.lock import OutputLock
from blipkit.errors import OutputWriteError, UsageError
from blipkit.extras import require

FORMATS = ("jsonl", "csv", "parquet", "txt")
COLUMNS = ("path", "caption", "error")
ID_COLUMNS = ("key", "source")  # name a sample held in a shard or parquet file, in place of "path"
SidecarText = Callable[[dict], str]  # a result row -> the text of its sidecar file


class SampleId(str):
    """The output name of a sample held in a shard or parquet file: the text ``"<source>#<key>"``, with both
    parts kept (``source``, ``key``); equal to any ``str`` of the same text."""

    source: str
    key: str

    def __new__(cls, source: str, key: str) -> SampleId:
        self = super().__new__(cls, f"{source}#{key}")
        self.source, self.key = source, key
        return self

    def __reduce__(self):
        return SampleId, (self.source, self.key)

    def fields(self) -> dict[str, str]:
        """The columns of an output row: ``{"key", "source"}``."""
        return {"key": self.key, "source": self.source}


def row_id(row: dict) -> str:
    """The name of the image an output row is about: its ``path``, or ``SampleId(source, key)``."""
    if "path" in row:
        return row["path"]
    return SampleId(row["source"], row["key"] or "")


class Sink(Protocol):
    def is_done(self, path: str) -> bool: ...
    def conflict(self, path: str) -> str | None: ...
    def write(self, rows: list[dict]) -> None: ...
    def close(self) -> None: ...


def _replace(tmp: Path, out: Path) -> None:
    """Make ``tmp`` durable, then atomically put it in place of ``out``."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)


@contextmanager
def _undone_on_error(out: Path, undo: Callable[[], object]) -> Iterator[None]:
    """Turn an ``OSError`` inside into an ``OutputWriteError``, after ``undo()`` removed the partial write."""
    try:
        yield
    except OSError as e:
        with suppress(OSError):
            undo()
        raise OutputWriteError(
            f"cannot write {out}: {e.strerror or e}. Nothing was lost: the output holds every result written "
            "before; fix that (e.g. free some disk space) and run the same command again to resume"
        ) from e


@contextmanager
def _released_on_error(lock: OutputLock) -> Iterator[None]:
    try:
        yield
    except BaseException:
        lock.release()
        raise


def as_text(value: str | None) -> str | None:
    """``value`` as valid UTF-8 text: bytes of a file name that are not UTF-8 become ``\\xNN``."""
    if value is None:
        return None
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def as_cell(value: object) -> str | None:
    """A CSV/Parquet cell: text as ``as_text``, anything else (a list of tags) as JSON."""
    if value is None or isinstance(value, str):
        return as_text(value)
    return json.dumps(value, ensure_ascii=False)


class JsonlSink:
    """Appends one JSON line per row; ``out=None`` writes to ``stream`` (stdout) and resumes nothing."""

    def __init__(self, out: Path | None, overwrite: bool = False, stream: IO[str] | None = None):
        self.out = out
        self.stream = stream or sys.stdout
        self.done: set[str] = set()
        self._fd: int | None = None
        self._lock: OutputLock | None = None
        if out is not None:
            self._lock = OutputLock(out).acquire()
            with _released_on_error(self._lock):
                if not overwrite:
                    self.done = self._repair_and_read(out)
                flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_APPEND)
                self._fd = os.open(out, flags, 0o644)

    @staticmethod
    def _repair_and_read(out: Path) -> set[str]:
        if not out.exists():
            return set()
        done = set()
        good = 0  # byte offset just after the last complete line
        with open(out, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a line torn by a killed writer: cut off below, its image is redone
                good += len(line)
                try:
                    done.add(row_id(json.loads(line)))
                except (ValueError, KeyError, TypeError):
                    pass  # not one of our rows: left as it is
        if good != out.stat().st_size:
            os.truncate(out, good)
        return done

    def is_done(self, path: str) -> bool:
        return path in self.done

    def conflict(self, path: str) -> str | None:
        return None

    def write(self, rows: list[dict]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows)
        if self._fd is None:
            self.stream.write(text)
            self.stream.flush()
            return
        data = text.encode("ascii")
        fd = self._fd
        size = os.fstat(fd).st_size
        with _undone_on_error(self.out, lambda: os.ftruncate(fd, size)):
            while data:  # one write syscall in practice; a kill mid-way leaves a torn line, cut off on resume
                data = data[os.write(fd, data) :]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock is not None:
            self._lock.release()


class _SnapshotSink:
    """Buffers rows; every ``flush_seconds`` writes old file + new rows to a temp file and renames it."""

    def __init__(
        self,
        out: Path,
        overwrite: bool = False,
        flush_seconds: float = 5.0,
        flush_rows: int = 4096,
        columns: tuple[str, ...] = COLUMNS,
    ):
        self.out = out
        self.columns = columns
        self.tmp = out.with_name(out.name + ".tmp")
        self._lock = OutputLock(out).acquire()
        with _released_on_error(self._lock):
            self.tmp.unlink(missing_ok=True)  # left by a killed run: never the real output
            self.flush_seconds = flush_seconds
            self.flush_rows = flush_rows
            self.fresh = overwrite or not out.exists()  # the next snapshot does not copy the old file
            self.done: set[str] = set() if self.fresh else self._read_paths()
        self.pending: list[dict] = []
        self._last = time.monotonic()

    def is_done(self, path: str) -> bool:
        return as_text(path) in self.done

    def conflict(self, path: str) -> str | None:
        return None

    def write(self, rows: list[dict]) -> None:
        self.pending.extend(rows)
        if len(self.pending) >= self.flush_rows or time.monotonic() - self._last >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if not self.pending and not self.fresh:
            return
        with _undone_on_error(self.out, lambda: self.tmp.unlink(missing_ok=True)):
            self._snapshot([{c: as_cell(r.get(c)) for c in self.columns} for r in self.pending])
            _replace(self.tmp, self.out)
        self.pending = []
        self.fresh = False
        self._last = time.monotonic()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._lock.release()

    def _read_paths(self) -> set[str]:
        raise NotImplementedError

    def _check_columns(self, found: list[str] | None) -> None:
        """An existing output with other columns (another command's) is a ``UsageError``, never mixed."""
        if found is not None and list(found) != list(self.columns):
            raise UsageError(
                f"{self.out} has columns {', '.join(found)}, not {', '.join(self.columns)}: it was "
                "written by another command; give another --out, or --overwrite to replace it"
            )

    def _snapshot(self, rows: list[dict]) -> None:
        raise NotImplementedError


class CsvSink(_SnapshotSink):
    """CSV with a ``path,caption,error`` header (or the sink's other ``columns``)."""

    def _read_paths(self) -> set[str]:
        with open(self.out, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            self._check_columns(reader.fieldnames)
            return {row_id(row) for row in reader}

    def _snapshot(self, rows: list[dict]) -> None:
        with open(self.tmp, "w", newline="", encoding="utf-8") as f:
            if self.fresh:
                csv.writer(f).writerow(self.columns)
            else:
                with open(self.out, newline="", encoding="utf-8") as old:
                    while chunk := old.read(1 << 20):
                        f.write(chunk)
            buf = io.StringIO()
            csv.DictWriter(buf, self.columns).writerows(rows)
            f.write(buf.getvalue())


class ParquetSink(_SnapshotSink):
    """Parquet (string columns path, caption, error, or the sink's other ``columns``); each snapshot adds one
    row group to the previous ones."""

    def __init__(self, out: Path, overwrite: bool = False, columns: tuple[str, ...] = COLUMNS, **kwargs):
        pa = require("pyarrow", "Parquet output", "parquet")

        self.schema = pa.schema([(c, pa.string()) for c in columns])
        super().__init__(out, overwrite, columns=columns, **kwargs)

    def _read_paths(self) -> set[str]:
        import pyarrow.parquet as pq

        self._check_columns(pq.read_schema(self.out).names)
        ids = [c for c in self.columns if c == "path" or c in ID_COLUMNS]
        return {row_id(row) for row in pq.read_table(self.out, columns=ids).to_pylist()}

    def _snapshot(self, rows: list[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with pq.ParquetWriter(self.tmp, self.schema) as writer:
            if not self.fresh:
                old = pq.ParquetFile(self.out)
                for i in range(old.num_row_groups):  # one row group in memory at a time
                    writer.write_table(old.read_row_group(i))
            if rows:
                table = pa.Table.from_pylist(rows, self.schema)
                writer.write_table(table)


def sample_columns(columns: tuple[str, ...]) -> tuple[str, ...]:
    """The columns of an output of samples held in shards or parquet files: ``ID_COLUMNS`` for ``"path"``."""
    return tuple(c for column in columns for c in (ID_COLUMNS if column == "path" else (column,)))


def sidecar(path: str) -> Path:
    """``photo.jpg`` -> ``photo.txt`` in the same folder."""
    return Path(path).with_suffix(".txt")


def caption_text(row: dict) -> str:
    return row["caption"]


class SidecarSink:
    """One ``<image-stem>.txt`` per captioned image, holding ``text(row)``; failures go to ``errors`` (JSONL).

    Of the images of a folder that share a stem (``a.jpg``, ``a.png``), the sidecar is for the first by name;
    the others get an error row.
    """

    def __init__(self, errors: JsonlSink, overwrite: bool = False, text: SidecarText = caption_text):
        self.errors = errors
        self.overwrite = overwrite
        self.text = text
        self._shared: dict[str, dict[str, str]] = {}  # folder -> {sidecar name shared by images: its image}

    def _owners(self, folder: str) -> dict[str, str]:
        if folder not in self._shared:
            groups: dict[str, list[str]] = {}
            with suppress(OSError):
                for entry in scan_folder(folder)[0]:  # in name order
                    groups.setdefault(sidecar(entry.name).name, []).append(entry.name)
            self._shared[folder] = {txt: names[0] for txt, names in groups.items() if len(names) > 1}
        return self._shared[folder]

    def conflict(self, path: str) -> str | None:
        folder, name = os.path.split(path)
        txt = sidecar(name).name
        owner = self._owners(folder).get(txt, name)
        if owner == name:
            return None
        return f"sidecar {txt} is for {owner}, the first image by name with that stem: rename this image"

    def is_done(self, path: str) -> bool:
        if self.errors.is_done(path):
            return True
        return not self.overwrite and self.conflict(path) is None and sidecar(path).exists()

    def write(self, rows: list[dict]) -> None:
        failed = [r for r in rows if "error" in r]
        for r in rows:
            if "error" not in r:
                target = sidecar(r["path"])
                tmp = target.with_name(target.name + ".tmp")
                with _undone_on_error(target, lambda tmp=tmp: tmp.unlink(missing_ok=True)):
                    tmp.write_text(self.text(r) + "\n", encoding="utf-8")
                    os.replace(tmp, target)
        if failed:
            self.errors.write(failed)

    def close(self) -> None:
        self.errors.close()


def open_sink(
    fmt: str,
    out: str | os.PathLike | None,
    overwrite: bool = False,
    columns: tuple[str, ...] = COLUMNS,
    text: SidecarText = caption_text,
) -> Sink:
    """The sink for ``fmt``; an existing ``out`` is resumed unless ``overwrite``.

    ``columns`` are those of CSV and Parquet outputs; ``text`` makes a sidecar's text from a result row.
    """
    path = Path(out) if out is not None else None
    if fmt == "jsonl":
        return JsonlSink(path, overwrite)
    if fmt == "txt":
        return SidecarSink(JsonlSink(path, overwrite), overwrite, text)
    if path is None:
        raise UsageError(f"--format {fmt} needs --out FILE")
    if fmt == "csv":
        return CsvSink(path, overwrite, columns=columns)
    if fmt == "parquet":
        return ParquetSink(path, overwrite, columns=columns)
    raise UsageError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
