"""Listing and output sinks without a model: extensions, laziness, torn lines, atomic snapshots."""

from __future__ import annotations

import csv
import json
import types

import pytest

from blipkit.batch.files import iter_images
from blipkit.batch.writers import CsvSink, JsonlSink, open_sink

ROWS = [
    {"path": "/a.png", "caption": 'a "quoted",\nmulti-line caption'},
    {"path": "/b.jpg", "error": "empty file"},
]


def test_listing_is_lazy_case_insensitive_and_optionally_recursive(tmp_path):
    for name in [
        "b.PNG",
        "a.jpeg",
        "c.Tiff",
        "d.webp",
        "e.bmp",
        "f.GIF",
        "g.jpg",
        "h.tif",
        "notes.txt",
        "x.csv",
    ]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.png").write_bytes(b"")
    listing = iter_images([str(tmp_path)])
    assert isinstance(listing, types.GeneratorType)
    names = [p.name for p in listing]
    assert names == ["a.jpeg", "b.PNG", "c.Tiff", "d.webp", "e.bmp", "f.GIF", "g.jpg", "h.tif"]
    assert [p.name for p in iter_images([str(tmp_path)], recursive=True)][-1] == "deep.png"
    assert [p.name for p in iter_images([str(tmp_path / "notes.txt")])] == ["notes.txt"]  # named: taken as is
    with pytest.raises(FileNotFoundError):
        list(iter_images([str(tmp_path / "missing")]))


def test_jsonl_cuts_a_torn_line_and_keeps_the_rest(tmp_path):
    out = tmp_path / "o.jsonl"
    sink = JsonlSink(out)
    sink.write(ROWS)
    sink.close()
    with open(out, "ab") as f:
        f.write(b'{"path": "/c.png", "capt')
    sink = JsonlSink(out)
    assert sink.done == {"/a.png", "/b.jpg"}
    sink.close()
    assert [json.loads(line) for line in out.read_text().splitlines()] == ROWS


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_snapshots_are_atomic(tmp_path, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / f"o.{fmt}"
    sink = open_sink(fmt, out)
    sink.write(ROWS[:1])
    sink.close()
    before = out.read_bytes()
    sink = open_sink(fmt, out)
    sink.write(ROWS[1:])
    assert out.read_bytes() == before  # buffered: a kill now leaves the previous file
    (tmp_path / f"o.{fmt}.tmp").write_bytes(b"half a snapshot")  # as if killed while writing one
    sink.flush()
    sink.close()
    again = open_sink(fmt, out)
    assert again.done == {"/a.png", "/b.jpg"}
    assert not (tmp_path / f"o.{fmt}.tmp").exists()


def test_csv_round_trips_awkward_captions(tmp_path):
    out = tmp_path / "o.csv"
    sink = CsvSink(out)
    sink.write(ROWS)
    sink.close()
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["caption"] == ROWS[0]["caption"] and rows[1]["error"] == "empty file"
