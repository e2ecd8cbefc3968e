"""``blipkit caption`` on a tiny random model: bad files, output formats, resume, exit codes, progress."""

from __future__ import annotations

import json

import pytest
from batch_images import ARGS, BAD, GOOD, caption, make_collection, read_rows

import blipkit
from blipkit import cli
from blipkit.batch.files import key_of


@pytest.fixture(scope="module")
def model(opt_dir):
    return blipkit.load(opt_dir)


@pytest.fixture()
def folder(tmp_path):
    return make_collection(tmp_path / "images")


def test_every_bad_kind_reported_good_ones_captioned(folder, opt_dir, model, tmp_path, capsys):
    out = tmp_path / "caps.jsonl"
    assert caption(folder, opt_dir, "--out", str(out), "--workers", "2") == 3  # decoding in 2 processes
    rows = {r["path"]: r for r in read_rows(out)}
    assert len(rows) == len(GOOD) + len(BAD)  # notes.txt, table.csv and the sub-folder are left alone
    for name in GOOD:
        assert "caption" in rows[key_of(folder / name)], name
    for name, reason in BAD.items():
        assert reason in rows[key_of(folder / name)]["error"], name
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"captioned {len(GOOD)}, skipped 0, failed {len(BAD)}"
    # the same captions as the Python API (the lean greedy loop, preprocessing in workers)
    paths = [folder / n for n in GOOD]
    assert [rows[key_of(p)]["caption"] for p in paths] == model.caption(paths, max_new_tokens=4)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_formats_resume_and_overwrite(folder, opt_dir, tmp_path, fmt, capsys):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / f"caps.{fmt}"
    first = folder / "rgb.png"
    assert caption(first, opt_dir, "--out", str(out), "--format", fmt) == 0
    assert [r["path"] for r in read_rows(out)] == [key_of(first)]
    assert caption(folder, opt_dir, "--recursive", "--out", str(out), "--format", fmt) == 3
    rows = read_rows(out)
    keys = [r["path"] for r in rows]
    assert len(keys) == len(set(keys)) == len(GOOD) + len(BAD) + 1  # + sub/deep.png
    assert capsys.readouterr().err.strip().endswith(f"captioned {len(GOOD)}, skipped 1, failed {len(BAD)}")
    assert caption(folder, opt_dir, "--recursive", "--out", str(out), "--format", fmt) == 0  # nothing to do
    assert read_rows(out) == rows
    assert not list(tmp_path.glob("*.tmp"))
    if fmt == "jsonl":
        assert caption(first, opt_dir, "--out", str(out), "--format", fmt, "--overwrite") == 0
        assert [r["path"] for r in read_rows(out)] == [key_of(first)]


def test_txt_sidecars_and_error_log(folder, opt_dir, tmp_path, capsys):
    errors = tmp_path / "errors.jsonl"
    assert caption(folder, opt_dir, "--format", "txt", "--out", str(errors)) == 3
    for name in GOOD:
        text = (folder / name).with_suffix(".txt").read_text()
        assert text.endswith("\n") and text.strip()
    assert {r["path"] for r in read_rows(errors)} == {key_of(folder / n) for n in BAD}
    assert not (folder / "empty.txt").exists()
    capsys.readouterr()
    assert caption(folder, opt_dir, "--format", "txt", "--out", str(errors)) == 0
    assert f"skipped {len(GOOD) + len(BAD)}" in capsys.readouterr().err


def test_stdout_exit_codes_and_progress(folder, opt_dir, capsys):
    both = [str(folder / "rgb.png"), str(folder / "pixel.png")]
    assert cli.main(["caption", *both, "--model", str(opt_dir), *ARGS]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["path"] for line in captured.out.splitlines()] == [
        key_of(folder / "rgb.png"),
        key_of(folder / "pixel.png"),
    ]
    assert captured.err.strip() == "captioned 2, skipped 0, failed 0"  # not a terminal: no bar
    assert caption(folder / "text.jpg", opt_dir, "--progress") == 3
    err = capsys.readouterr().err
    assert "img/s" in err and err.strip().endswith("captioned 0, skipped 0, failed 1")
    assert caption(folder / "missing", opt_dir) == 2
    assert caption(folder, opt_dir, "--format", "csv") == 2  # csv needs --out
    assert "needs --out" in capsys.readouterr().err


def test_torn_jsonl_line_is_repaired(folder, opt_dir, tmp_path):
    out = tmp_path / "caps.jsonl"
    assert caption(folder / "rgb.png", opt_dir, "--out", str(out)) == 0
    with open(out, "a") as f:
        f.write('{"path": "/x/half-writ')  # a writer killed mid-line
    assert caption(folder / "pixel.png", opt_dir, "--out", str(out)) == 0
    assert [r["path"] for r in read_rows(out)] == [key_of(folder / "rgb.png"), key_of(folder / "pixel.png")]


def test_beam_search_takes_the_generic_path(folder, opt_dir, model, tmp_path):
    out = tmp_path / "beams.jsonl"
    assert caption(folder / "rgb.png", opt_dir, "--out", str(out), "--num-beams", "2") == 0
    assert read_rows(out)[0]["caption"] == model.caption(folder / "rgb.png", max_new_tokens=4, num_beams=2)[0]
