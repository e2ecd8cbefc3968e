"""Inputs beyond folders: JSONL/CSV lists, webdataset shards (img2dataset's layout), parquet files with image
bytes and Hugging Face imagefolder dirs and datasets, through ``blipkit caption``, ``blipkit index`` and the
training data specs, on tiny random models."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from batch_images import ARGS, read_rows
from PIL import Image

import blipkit
from blipkit import cli
from blipkit.batch.files import key_of
from blipkit.data import formats
from blipkit.data.records import CaptionExample, VqaExample
from blipkit.data.sources import read_examples, stage1_set, stage2_set
from blipkit.errors import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, DataError
from blipkit.retrieval import ImageIndex
from blipkit.train.config import load_config

wds = pytest.importorskip("webdataset")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def encoded(seed: int, fmt: str = "JPEG", size: int = 28) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict]) -> Path:
    """A shard written as img2dataset writes them: webdataset's TarWriter, KEY.jpg + KEY.txt + KEY.json."""
    with wds.TarWriter(str(path)) as tar:
        for sample in samples:
            tar.write(sample)
    return path


def shard_sample(number: int, image: bytes | None = None, ext: str = "jpg") -> dict:
    key = f"{number:09d}"
    sample = {
        "__key__": key,
        "txt": f"caption {number}",
        "json": {"key": key, "caption": f"caption {number}"},
    }
    if image is not None:
        sample[ext] = image
    return sample


@pytest.fixture()
def shards(tmp_path) -> list[Path]:
    """Two good shards (one sample of shard 0 is not an image, one has no image member) and one cut short."""
    folder = tmp_path / "shards"
    folder.mkdir()
    first = [shard_sample(i, encoded(i)) for i in range(3)]
    first += [shard_sample(3, b"not an image"), shard_sample(4)]
    second = [shard_sample(10, encoded(10, "PNG"), "png"), shard_sample(11, encoded(11, "WEBP"), "webp")]
    cut = write_shard(folder / "00002.tar", [shard_sample(20, encoded(20)), shard_sample(21, encoded(21))])
    with tarfile.open(cut) as tar:
        member = tar.getmember("000000021.jpg")
    with open(cut, "r+b") as f:  # a download killed mid-shard: in the middle of 000000021.jpg
        f.truncate(member.offset_data + member.size // 2)
    return [write_shard(folder / "00000.tar", first), write_shard(folder / "00001.tar", second), cut]


def write_parquet(path: Path) -> Path:
    """img2dataset's parquet layout: key, jpg bytes (null for a failed download), caption, status."""
    table = pa.table(
        {
            "key": ["000100000", "000100001", "000100002"],
            "jpg": [encoded(100), None, encoded(102)],
            "caption": ["first", "failed", "third"],
            "status": ["success", "failed_to_download", "success"],
        }
    )
    pq.write_table(table, path)
    return path


def make_imagefolder(root: Path) -> Path:
    """A Hugging Face imagefolder: train/ and test/ splits, each with metadata.jsonl (file_name, text)."""
    for split, count in (("train", 3), ("test", 2)):
        (root / split).mkdir(parents=True)
        rows = []
        for i in range(count):
            (root / split / f"{i}.png").write_bytes(encoded(200 + 10 * (split == "test") + i, "PNG"))
            rows.append({"file_name": f"{i}.png", "text": f"{split} picture {i}"})
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def caption(paths, model_dir, *extra) -> int:
    return cli.main(["caption", *map(str, paths), "--model", str(model_dir), *ARGS, *map(str, extra)])


@pytest.fixture(scope="module")
def model(opt_dir):
    return blipkit.load(opt_dir)


def test_shard_keys_follow_webdataset(shards):
    """The reader's samples and keys are those of the webdataset library (members grouped by key)."""
    good = shards[:2]
    ours = [(s.source, s.key) for path in good for s in formats.shard_samples(str(path))]
    theirs = [
        (key_of(Path(s["__url__"])), s["__key__"])
        for s in wds.WebDataset([str(p) for p in good], shardshuffle=False)
    ]
    assert ours == theirs
    meta = next(formats.shard_samples(str(good[0]), meta=True)).meta
    assert meta == {"key": "000000000", "caption": "caption 0"}  # .json fields, .txt as the caption


def test_caption_shards_rows_keyed_resume_and_error_rows(shards, opt_dir, model, tmp_path, capsys):
    out = tmp_path / "caps.jsonl"
    assert caption(shards[:1], opt_dir, "--out", out, "--workers", "1") == EXIT_SOME_FAILED  # a worker
    assert caption(shards, opt_dir, "--out", out) == EXIT_SOME_FAILED
    rows = read_rows(out)
    by_key = {(r["source"], r["key"]): r for r in rows}
    assert len(by_key) == len(rows) == 5 + 2 + 3  # shard 2: its whole sample, the cut one, the fault
    assert all(set(r) in ({"key", "source", "caption"}, {"key", "source", "error"}) for r in rows)
    first, second, cut = (key_of(p) for p in shards)
    images = [encoded(i) for i in range(3)]
    assert [by_key[first, f"{i:09d}"]["caption"] for i in range(3)] == model.caption(images, max_new_tokens=4)
    assert "not an image" in by_key[first, "000000003"]["error"]
    assert by_key[first, "000000004"]["error"] == "no image in the sample (it has .json, .txt)"
    assert "caption" in by_key[second, "000000010"] and "caption" in by_key[second, "000000011"]
    assert "caption" in by_key[cut, "000000020"]
    assert "truncated shard" in by_key[cut, "000000021"]["error"]
    assert by_key[cut, ""]["error"].startswith("cannot read the shard after member '000000021.jpg'")
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "captioned 3, skipped 5, failed 2"  # the first run did shard 0
    assert caption(shards, opt_dir, "--out", out) == EXIT_OK  # resumed: nothing left
    assert capsys.readouterr().err.strip().endswith("captioned 0, skipped 10, failed 0")
    assert read_rows(out) == rows


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_caption_parquet_input_into_parquet_and_csv(tmp_path, opt_dir, model, fmt, capsys):
    source = write_parquet(tmp_path / "part-00000.parquet")
    out = tmp_path / f"caps.{fmt}"
    assert caption([source], opt_dir, "--out", out) == EXIT_SOME_FAILED
    rows = sorted(read_rows(out), key=lambda r: r["key"])  # the error row comes first: it needs no model
    assert [r["key"] for r in rows] == ["000100000", "000100001", "000100002"]
    assert {r["source"] for r in rows} == {key_of(source)}
    assert rows[1]["error"] == "no image in the sample"
    assert [rows[0]["caption"], rows[2]["caption"]] == model.caption(
        [encoded(100), encoded(102)], max_new_tokens=4
    )
    if fmt == "parquet":  # joins with img2dataset's own parquet on "key"
        assert pq.read_schema(out).names == ["key", "source", "caption", "error"]
    capsys.readouterr()
    assert caption([source], opt_dir, "--out", out) == EXIT_OK
    assert capsys.readouterr().err.strip().endswith("captioned 0, skipped 3, failed 0")


def test_caption_lists_and_imagefolder_are_image_files(tmp_path, opt_dir, capsys):
    pytest.importorskip("datasets")
    folder = make_imagefolder(tmp_path / "hf")
    listed = tmp_path / "list.jsonl"
    listed.write_text('{"image": "hf/train/0.png"}\n{"path": "hf/test/1.png"}\n{"image": "missing.png"}\n')
    (tmp_path / "list.csv").write_text("image,note\nhf/train/1.png,x\n")
    out = tmp_path / "caps.jsonl"
    assert caption([listed, tmp_path / "list.csv"], opt_dir, "--out", out) == EXIT_SOME_FAILED
    rows = {r["path"]: r for r in read_rows(out)}
    assert rows[key_of(tmp_path / "missing.png")]["error"] == "file not found"
    assert {p for p, r in rows.items() if "caption" in r} == {
        key_of(folder / name) for name in ("train/0.png", "test/1.png", "train/1.png")
    }
    assert caption([folder], opt_dir, "--out", out) == EXIT_OK  # every split, no --recursive needed
    assert capsys.readouterr().err.strip().endswith("captioned 2, skipped 3, failed 0")
    assert {r["path"] for r in read_rows(out)} >= {key_of(p) for p in folder.glob("*/*.png")}


def test_usage_errors(shards, tmp_path, opt_dir, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    assert caption([shards[0], folder], opt_dir) == EXIT_USAGE
    assert "not both in one run" in capsys.readouterr().err
    assert caption([shards[0]], opt_dir, "--format", "txt") == EXIT_USAGE
    assert caption([shards[0].parent], opt_dir) == EXIT_USAGE  # a folder of shards: name them
    assert f"read when named: {shards[0].parent}/*.tar" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"caption": "no image field"}\n')
    assert caption([tmp_path / "bad.jsonl"], opt_dir) == EXIT_USAGE
    assert "bad.jsonl:1: no image" in capsys.readouterr().err


def test_index_shards_and_parquet_by_name(shards, tmp_path, retrieval_dir, capsys):
    source = write_parquet(tmp_path / "part.parquet")
    out = tmp_path / "index"
    argv = ["index", *map(str, shards[:2]), str(source), "--out", str(out), "--model", str(retrieval_dir)]
    assert cli.main([*argv, "--batch-size", "2"]) == EXIT_SOME_FAILED
    err = capsys.readouterr().err
    failed = [json.loads(line)["path"] for line in err.splitlines() if line.startswith("{")]
    first = key_of(shards[0])
    assert failed == [f"{first}#000000003", f"{first}#000000004", f"{key_of(source)}#000100001"]
    names = ImageIndex.load(out).paths
    assert names[:3] == [f"{first}#{i:09d}" for i in range(3)] and len(names) == 3 + 2 + 2
    assert cli.main(argv) == EXIT_SOME_FAILED  # failed ones are tried again; the others are there
    assert "added 0, already there 7, failed 3" in capsys.readouterr().err
    assert cli.main(["search", str(out), "a photo", "-k", "7"]) == EXIT_OK
    found = {json.loads(line)["path"] for line in capsys.readouterr().out.splitlines()}
    assert found == set(names)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """The ``datasets`` library's cache in the test's folder, not the user's."""
    config = pytest.importorskip("datasets.config")
    monkeypatch.setattr(config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture()
def image_store(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "images"


def test_training_data_from_shards_and_parquet(shards, tmp_path, image_store):
    good = write_shard(shards[0].parent / "00005.tar", [shard_sample(i, encoded(i)) for i in range(50, 53)])
    vqa = shard_sample(60, encoded(60))
    vqa["json"] = {"question": "what is it?", "answer": "noise"}
    write_shard(shards[0].parent / "00006.tar", [vqa])
    cfg = load_config(overrides=[f"--data={shards[0].parent}/0000[56].tar", "--stage=stage1"])
    images, examples = read_examples(cfg.data)
    assert [e.caption for e in examples] == ["caption 50", "caption 51", "caption 52", "caption 60"]
    assert examples[3] == VqaExample(examples[3].image, "what is it?", "noise", "caption 60")
    for number, example in zip([50, 51, 52, 60], examples, strict=True):
        stored = Path(example.image)  # the bytes, under the cache, named by their hash
        assert stored.parent.parent == image_store and stored.suffix == ".jpg"
        assert stored.read_bytes() == encoded(number)
    assert read_examples(cfg.data)[0] == images  # the same paths each time: cached features stay valid
    assert stage1_set(cfg.data).prompts == ["caption 50", "caption 51", "caption 52", "caption 60"]
    s2 = stage2_set(str(good), "Question: {} Answer:", "a photo of")
    assert s2.targets == ["caption 50", "caption 51", "caption 52"] and s2.prompts[0] == "a photo of"
    table = pa.table({"key": ["a", "b"], "image": [encoded(1), encoded(2, "PNG")], "text": ["one", "two"]})
    pq.write_table(table, tmp_path / "ok.parquet")
    parquet = stage1_set(str(tmp_path / "ok.parquet"))
    assert parquet.prompts == ["one", "two"]
    assert sorted(Path(p).suffix for p in parquet.images) == [".jpg", ".png"]


def test_training_data_errors_name_the_sample(shards, tmp_path, image_store):
    with pytest.raises(DataError, match=r"00000.tar#000000003: not an image"):
        read_examples(str(shards[0]))
    with pytest.raises(DataError, match=r"part.parquet#000100001: no image in the sample"):
        read_examples(str(write_parquet(tmp_path / "part.parquet")))
    with pytest.raises(DataError, match="no files match"):
        read_examples(str(tmp_path / "none-*.tar"))
    table = pa.table({"key": ["a"], "jpg": [encoded(1)]})
    pq.write_table(table, tmp_path / "bare.parquet")
    with pytest.raises(DataError, match=r"bare.parquet#a: no caption"):
        read_examples(str(tmp_path / "bare.parquet"))


def test_training_data_from_imagefolder_and_datasets(tmp_path, image_store):
    datasets = pytest.importorskip("datasets")
    folder = make_imagefolder(tmp_path / "hf")
    images, examples = read_examples(str(folder))  # the train split
    assert [e.caption for e in examples] == [f"train picture {i}" for i in range(3)]
    assert images == sorted(str(folder / "train" / f"{i}.png") for i in range(3))  # the files themselves
    _, test = read_examples(f"hf:{folder}:test")
    assert [e.caption for e in test] == ["test picture 0", "test picture 1"]
    saved = tmp_path / "saved"
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    data = {"image": [{"bytes": encoded(7), "path": None}], "caption": ["from bytes"]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(saved))
    images, examples = read_examples(f"hf:{saved}")
    assert examples == [CaptionExample(images[0], "from bytes")]
    assert Path(images[0]).read_bytes() == encoded(7) and Path(images[0]).parent.parent == image_store


def test_ray_engine_reads_shards_and_parquet(shards, tmp_path, opt_dir, capsys):
    pytest.importorskip("ray.data")
    source = write_parquet(tmp_path / "part.parquet")
    inputs = [*shards, source]
    local, ray_out = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert caption(inputs, opt_dir, "--out", local) == EXIT_SOME_FAILED
    done = read_rows(local)[:2]  # a run that stopped early: the Ray engine resumes it
    ray_out.write_text("".join(json.dumps(r) + "\n" for r in done))
    kept_errors = sum("error" in r for r in done)  # rows already written, captioned or failed, are skipped
    capsys.readouterr()
    try:
        assert caption(inputs, opt_dir, "--out", ray_out, "--engine", "ray") == EXIT_SOME_FAILED
    finally:
        import ray

        ray.shutdown()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"captioned {8 - (2 - kept_errors)}, skipped 2, failed {5 - kept_errors}"
    assert sorted(map(json.dumps, read_rows(ray_out))) == sorted(map(json.dumps, read_rows(local)))
