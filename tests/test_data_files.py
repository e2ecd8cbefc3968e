"""Caption / VQA files (errors name the file and line) and easy-VQA caption derivation."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from blipkit.data import easy_vqa
from blipkit.data.files import DataError, read_captions, read_vqa
from blipkit.data.sources import stage1_set, stage2_set


@pytest.fixture()
def folder(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    return tmp_path


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_captions_jsonl_and_csv(folder):
    rows = [{"image": "a.png", "caption": "a red square"}, {"image": "b.png", "caption": "another"}]
    from_jsonl = read_captions(_jsonl(folder / "caps.jsonl", rows))
    (folder / "caps.csv").write_text("image,caption\na.png,a red square\nb.png,another\n")
    from_csv = read_captions(folder / "caps.csv")
    assert from_jsonl == from_csv
    assert from_jsonl[0].image == str(folder / "a.png") and from_jsonl[1].caption == "another"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"image": "a.png", "caption": ', r"caps.jsonl:2: not valid JSON"),
        ({"image": "missing.png", "caption": "x"}, r"caps.jsonl:2: image 'missing.png' not found"),
        ({"image": "a.png", "caption": ""}, r"caps.jsonl:2: field 'caption' must be a non-empty string"),
        ('["a.png", "x"]', r"caps.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_caption_rows_name_file_and_line(folder, row, message):
    path = _jsonl(folder / "caps.jsonl", [{"image": "a.png", "caption": "fine"}, row])
    with pytest.raises(DataError, match=message):
        read_captions(path)


def test_bad_csv_row_names_line(folder):
    (folder / "caps.csv").write_text("image,caption\na.png,ok\nb.png,\n")
    with pytest.raises(DataError, match=r"caps.csv:3: field 'caption'"):
        read_captions(folder / "caps.csv")


def test_vqa_jsonl_and_training_sets(folder):
    rows = [
        {"image": "a.png", "question": "what color?", "answer": "red", "caption": "a red square"},
        {"image": "a.png", "question": "is it blue?", "answer": "no", "caption": "a red square"},
        {"image": "b.png", "question": "what color?", "answer": "red"},
    ]
    path = _jsonl(folder / "vqa.jsonl", rows)
    assert read_vqa(path)[2].caption is None
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'answer'"):
        read_vqa(_jsonl(folder / "bad.jsonl", [{"image": "a.png", "question": "q?"}]))
    s2 = stage2_set(str(path), "Question: {} Answer:", "", with_captions=True)
    assert s2.prompts[:2] == ["Question: what color? Answer:", "Question: is it blue? Answer:"]
    assert s2.targets == ["red", "no", "red", "a red square"] and s2.prompts[3] == ""
    s1 = stage1_set(str(path))
    assert s1.prompts == ["a red square"] and s1.images[s1.image_index[0]].endswith("a.png")


def test_easy_vqa_captions_follow_the_answers():
    questions = [
        "what color is the shape?",
        "is there not a circle?",
        "is there a triangle?",
        "what is the red shape?",
    ]
    answers = ["red", "no", "no", "circle"]
    found = easy_vqa.derive_attributes(questions[:3], answers[:3], [0, 0, 0])
    assert found[0] == {"color": "red", "shape": "circle"}  # "not a circle" -> no: there is a circle
    found = easy_vqa.derive_attributes(["is there a triangle?", "is there a circle?"], ["no", "no"], [1, 1])
    assert found[1] == {"shape": "rectangle"}  # ruled out the other two
    assert easy_vqa.caption_for(found[1]) == "a rectangle"
    found = easy_vqa.derive_attributes(questions[3:], answers[3:], [2])
    assert easy_vqa.caption_for(found[2]) == "a red circle"


def test_easy_vqa_examples_carry_captions():
    examples = easy_vqa.vqa_examples("test")
    assert len(examples) == 9673
    with_caption = [e for e in examples if e.caption and len(e.caption.split()) == 3]
    assert len(with_caption) / len(examples) > 0.9
    for e in with_caption[:500]:  # the caption never contradicts the image's own shape/colour answers
        if e.question.startswith("what color"):
            assert e.caption.split()[1] == e.answer


def test_easy_vqa_retrieval_set_relevance_by_attribute():
    images, texts, relevant, attributes = easy_vqa.retrieval_set("test")
    assert len(images) == 888 and len(texts) == 8 * 3 + 8 + 3  # full, colour-only, shape-only captions
    captions = {e.image: e.caption for e in easy_vqa.caption_examples("test")}
    for image, row in zip(images, relevant, strict=True):
        full = captions[image]  # "a red circle": both attributes known
        color, shape = full.split()[1:]
        assert {t for t, r in zip(texts, row, strict=True) if r} == {full, f"a {color} shape", f"a {shape}"}
    assert [f"a {a['color']} {a['shape']}" for a in attributes] == [captions[i] for i in images]
    assert easy_vqa.retrieval_set("test", limit=5)[0] == images[:5]
