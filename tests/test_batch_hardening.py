"""``blipkit caption`` loses nothing: symbolic link loops, two runs on one output, images sharing a sidecar,
file names that break text formats, and a disk that fills up mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from batch_images import ARGS, ODD_NAMES, caption, make_named, make_plain, python_env, read_rows

import blipkit
from blipkit import cli
from blipkit.batch.files import key_of
from blipkit.batch.lock import OutputLock
from blipkit.batch.writers import FORMATS, as_text, sidecar
from blipkit.errors import EXIT_CRASH, OutputLocked
from blipkit.retrieval import build_index

HOLD_LOCKS = """
import sys
from blipkit.batch.lock import OutputLock
locks = [OutputLock(out).acquire() for out in sys.argv[1:]]
print("locked", flush=True)
sys.stdin.read()
"""

FORKED_WORKER = """
import os, sys, time
from blipkit.batch.lock import OutputLock
lock = OutputLock(sys.argv[1]).acquire()
if os.fork() == 0:
    time.sleep(120)
    os._exit(0)
print("locked", flush=True)
time.sleep(120)
"""

FULL_DISK = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
from blipkit.cli import main
sys.exit(main(sys.argv[2:]))
"""


def summary_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_symlink_loops_are_walked_once_and_broken_links_fail(opt_dir, tmp_path, capsys):
    root = tmp_path / "images"
    make_plain(root, 1)
    make_plain(root / "sub", 1)
    (root / "sub" / "up").symlink_to("..")  # a loop back to the top
    (root / "sub" / "here").symlink_to(".")  # a loop onto itself
    (root / "alias").symlink_to("sub")  # a second way into sub/
    (root / "gone.png").symlink_to("missing.png")
    (root / "self.png").symlink_to("self.png")
    out = tmp_path / "caps.jsonl"
    assert caption(root, opt_dir, "--recursive", "--out", out) == 3
    assert summary_line(capsys) == "captioned 2, skipped 0, failed 2"
    rows = {r["path"]: r for r in read_rows(out)}
    assert len(rows) == 4
    for image in (root / "img0000.png", root / "sub" / "img0000.png"):
        assert "caption" in rows[key_of(image)]
    for link in (root / "gone.png", root / "self.png"):
        assert rows[key_of(link)]["error"].startswith("broken symbolic link to"), rows[key_of(link)]
    assert key_of(root / "gone.png") == str(root.resolve() / "gone.png")  # the link, not where it points
    assert caption(root, opt_dir, "--recursive", "--out", out) == 0  # the resume
    assert summary_line(capsys) == "captioned 0, skipped 4, failed 0"


@contextmanager
def held(*outputs: Path) -> Iterator[subprocess.Popen]:
    """Another python process that holds the locks of ``outputs`` until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCKS, *map(str, outputs)],
        env=python_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout.readline() == "locked\n"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def run_command(argv: list[str]) -> int:
    """A command's own function, so that its errors reach the test."""
    args = cli.build_parser().parse_args(argv)
    return args.func(args)


def test_one_writer_per_output(opt_dir, retrieval_dir, tmp_path):
    pytest.importorskip("pyarrow")
    folder = tmp_path / "images"
    make_plain(folder, 2)
    outs = {fmt: tmp_path / f"caps.{fmt}" for fmt in ("jsonl", "csv", "parquet")}
    outs["txt"] = tmp_path / "errors.jsonl"  # where the txt format writes its error rows
    outs["jsonl"].write_text('{"path": "/earlier.png", "caption": "from an earlier run"}\n')
    before = {out: out.read_bytes() if out.exists() else None for out in outs.values()}
    index = tmp_path / "index"
    model = blipkit.load(retrieval_dir)
    argv = ["caption", str(folder), "--model", str(opt_dir), *ARGS]
    with held(*outs.values(), index) as holder:
        named = f"is being written by another blipkit run \\(pid {holder.pid} on "
        for fmt, out in outs.items():
            with pytest.raises(OutputLocked, match=named) as e:
                run_command([*argv, "--format", fmt, "--out", str(out)])
            assert e.value.exit_code == EXIT_CRASH
        with pytest.raises(OutputLocked, match=named):  # before loading the model: this one does not exist
            run_command(["index", str(folder), "--out", str(index), "--model", str(tmp_path / "no-model")])
        with pytest.raises(OutputLocked, match=named):
            build_index(model, list(folder.iterdir()), index)
        assert {out: out.read_bytes() if out.exists() else None for out in outs.values()} == before
        assert not index.exists()
    assert (tmp_path / "caps.jsonl.lock").exists()  # its holder ended without removing it ...
    assert caption(folder, opt_dir, "--out", outs["jsonl"]) == 0  # ... and it blocks no one
    assert len(read_rows(outs["jsonl"])) == 3
    assert not (tmp_path / "caps.jsonl.lock").exists()  # released and removed at the end of the run


def test_a_killed_run_leaves_no_lock_behind_in_its_workers(tmp_path):
    out = tmp_path / "caps.jsonl"
    run = subprocess.Popen(
        [sys.executable, "-c", FORKED_WORKER, str(out)],
        env=python_env(), stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert run.stdout.readline() == "locked\n"
        with pytest.raises(OutputLocked):
            OutputLock(out).acquire()
        os.kill(run.pid, signal.SIGKILL)  # its forked worker lives on
        run.wait(timeout=30)
        OutputLock(out).acquire().release()
    finally:
        os.killpg(run.pid, signal.SIGKILL)


def test_images_sharing_a_stem_do_not_share_a_sidecar(opt_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    make_named(folder, ["a.png", "a.jpg", "b.png"])
    errors = tmp_path / "errors.jsonl"
    assert caption(folder, opt_dir, "--format", "txt", "--out", errors) == 3
    assert summary_line(capsys) == "captioned 2, skipped 0, failed 1"
    assert read_rows(errors) == [
        {
            "path": key_of(folder / "a.png"),
            "error": "sidecar a.txt is for a.jpg, the first image by name with that stem: rename this image",
        }
    ]
    assert caption(folder / "a.jpg", opt_dir) == 0  # JSONL on stdout
    assert (folder / "a.txt").read_text() == json.loads(capsys.readouterr().out)["caption"] + "\n"
    assert caption(folder, opt_dir, "--format", "txt", "--out", errors) == 0
    assert summary_line(capsys) == "captioned 0, skipped 3, failed 0"


@pytest.mark.parametrize("fmt", FORMATS)
def test_odd_file_names_in_every_writer(opt_dir, tmp_path, fmt, capsys):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    keys = {key_of(p) for p in make_named(tmp_path / "images", ODD_NAMES)}
    out = tmp_path / ("errors.jsonl" if fmt == "txt" else f"caps.{fmt}")
    assert caption(tmp_path / "images", opt_dir, "--format", fmt, "--out", out) == 0
    if fmt == "txt":
        assert all(sidecar(k).read_text(encoding="utf-8").strip() for k in keys)
    else:
        rows = read_rows(out)
        assert all(r["caption"] for r in rows)
        if fmt == "jsonl":
            assert len(out.read_text(encoding="ascii").splitlines()) == len(keys)  # no line splits a name
            assert {r["path"] for r in rows} == keys
        else:  # UTF-8 text: the byte that is not UTF-8 reads \xff
            assert {r["path"] for r in rows} == {as_text(k) for k in keys}
            assert as_text(key_of(tmp_path / "images" / ODD_NAMES[-1])).endswith("bad\\xff.png")
    written = out.read_bytes()
    capsys.readouterr()
    assert caption(tmp_path / "images", opt_dir, "--format", fmt, "--out", out) == 0  # resumed by those names
    assert summary_line(capsys) == f"captioned 0, skipped {len(keys)}, failed 0"
    assert out.read_bytes() == written


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_full_disk_loses_nothing(opt_dir, tmp_path, fmt, capsys):
    images = make_plain(tmp_path / "images", 6)
    out = tmp_path / f"caps.{fmt}"
    model_args = ["--model", str(opt_dir), *ARGS, "--out", str(out)]
    assert cli.main(["caption", str(images[0]), str(images[1]), *model_args]) == 0
    before = out.read_bytes()
    argv = ["caption", str(tmp_path / "images"), *model_args]
    # files may grow 40 bytes past the output: the next batch is written in part, then the write fails
    full = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(len(before) + 40), *argv],
        env=python_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert full.returncode == EXIT_CRASH, full.stderr[-2000:]
    message = full.stderr.strip().splitlines()[-1]
    assert "File too large. Nothing was lost" in message and "run the same command again to resume" in message
    assert out.read_bytes() == before
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.lock"))
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert summary_line(capsys) == "captioned 4, skipped 2, failed 0"
    keys = [r["path"] for r in read_rows(out)]
    assert sorted(keys) == sorted(key_of(p) for p in images)
