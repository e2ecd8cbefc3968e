"""``blipkit index`` and ``search`` lose nothing: file names that break text files, indexes of older
versions, symbolic link loops."""

from __future__ import annotations

import json

import pytest
from batch_images import ODD_NAMES, make_named, make_plain

from blipkit import cli
from blipkit.batch.files import key_of
from blipkit.errors import EXIT_SOME_FAILED
from blipkit.retrieval import ImageIndex


@pytest.fixture(autouse=True)
def _no_lock_left(tmp_path):
    yield
    assert not list(tmp_path.glob("*.lock"))  # every build removed its lock file


def index(paths, out, model_dir, *extra) -> int:
    return cli.main(["index", *map(str, paths), "--out", str(out), "--model", str(model_dir), *extra])


def test_odd_file_names_round_trip_through_index_and_search(retrieval_dir, tmp_path, capsys):
    images = make_named(tmp_path / "images", ODD_NAMES)
    out = tmp_path / "index"
    assert index([tmp_path / "images"], out, retrieval_dir) == 0
    keys = sorted(key_of(p) for p in images)  # listed in name order
    assert ImageIndex.load(out).paths == keys
    assert len((out / "paths.jsonl").read_text(encoding="ascii").splitlines()) == len(keys)
    assert index([tmp_path / "images"], out, retrieval_dir) == 0
    assert "added 0, already there 6, failed 0" in capsys.readouterr().err
    assert cli.main(["search", str(out), "a red circle", "-k", "6"]) == 0
    assert sorted(json.loads(line)["path"] for line in capsys.readouterr().out.splitlines()) == keys
    for query in images:
        assert cli.main(["search", str(out), "--image", str(query), "-k", "1"]) == 0
        assert json.loads(capsys.readouterr().out)["path"] == key_of(query)  # its own nearest neighbour


def test_an_index_with_paths_txt_is_read_and_extended(retrieval_dir, tmp_path, capsys):
    images = make_plain(tmp_path / "images", 3)
    out = tmp_path / "index"
    assert index(images[:2], out, retrieval_dir) == 0
    old = ImageIndex.load(out)
    (out / "paths.txt").write_text("".join(p + "\n" for p in old.paths), encoding="utf-8")  # the older layout
    (out / "paths.jsonl").unlink()
    assert ImageIndex.load(out).paths == old.paths
    assert index(images, out, retrieval_dir) == 0
    assert "added 1, already there 2" in capsys.readouterr().err
    assert ImageIndex.load(out).paths == [key_of(p) for p in images]
    assert not (out / "paths.txt").exists()


def test_symlink_loops_and_broken_links(retrieval_dir, tmp_path, capsys):
    root = tmp_path / "images"
    make_plain(root / "sub", 1)
    (root / "sub" / "up").symlink_to("..")
    (root / "gone.png").symlink_to("missing.png")
    out = tmp_path / "index"
    assert index([root], out, retrieval_dir, "--recursive") == EXIT_SOME_FAILED
    err = capsys.readouterr().err
    failed = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [r["path"] for r in failed] == [key_of(root / "gone.png")]
    assert failed[0]["error"].startswith("broken symbolic link to 'missing.png'")
    assert "failed 1" in err
    assert ImageIndex.load(out).paths == [key_of(root / "sub" / "img0000.png")]
