"""The user-facing API and CLI on tiny random checkpoints: captions, questions, chat memory, errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import blipkit
from blipkit import cli


@pytest.fixture(scope="module")
def model(opt_dir):
    return blipkit.load(opt_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40 + 10 * i, 50, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    (folder / "notes.txt").write_text("ignored")
    return folder, paths


def test_caption_inputs_of_every_kind(model, images):
    _, paths = images
    pil = Image.open(paths[0])
    arr = np.asarray(pil)
    raw = paths[0].read_bytes()
    caps = model.caption([paths[0], str(paths[0]), pil, arr, raw], max_new_tokens=4)
    assert len(caps) == 5 and all(isinstance(c, str) for c in caps)
    assert len(set(caps)) == 1  # the same image, however given
    assert model.caption(paths[0], max_new_tokens=4) == caps[:1]


def test_prompted_caption_and_beams(model, images):
    _, paths = images
    greedy = model.caption(paths, prompt="a photo of", max_new_tokens=4)
    beams = model.caption(paths, prompt="a photo of", max_new_tokens=4, num_beams=3)
    assert len(greedy) == len(beams) == 3
    sampled = model.caption(paths[:1], max_new_tokens=4, do_sample=True, top_k=5)
    assert isinstance(sampled[0], str)


def test_ask_uses_the_vqa_prompt(model, images):
    _, paths = images
    answer = model.ask(paths[0], "what color is the cat?")
    expected = model.generate([paths[0]], ["Question: what color is the cat? Answer:"], max_new_tokens=10)[0]
    assert answer == expected


def test_chat_keeps_history_and_survives_overflow(opt_dir, images):
    _, paths = images
    m = blipkit.load(opt_dir)
    m.config.llm.max_context = 40  # tiny window: 4 visual tokens + 6 new tokens leave 30 for text
    chat = m.chat(paths[0], max_new_tokens=6)
    first = chat.send("what is it ?")
    assert chat.history == [("what is it ?", first)]
    prompt = chat.prompt("what color is the dog ?").text
    assert prompt.startswith("Question: what is it ? Answer:")
    for i in range(6):
        chat.send(f"is the dog red ? {i}")
    assert len(chat.history) == 7
    fitted = chat.prompt("what color is the cat ?")
    prompt = fitted.text
    assert fitted.dropped_turns > 0 and "what is it ?" not in prompt  # oldest turns dropped
    assert prompt.endswith("Question: what color is the cat ? Answer:")
    assert len(m.tokenizer(prompt)["input_ids"]) <= 40 - 4 - 6
    assert fitted.llm_ids == m.tokenizer(prompt)["input_ids"]
    with_one_more = "Question: " + chat.history[-fitted.dropped_turns][0]  # the newest turn left out
    assert len(m.tokenizer(with_one_more + " " + prompt)["input_ids"]) > 40 - 4 - 6
    assert isinstance(chat.send("what color is the cat ?"), str)


def test_bad_image_is_named(model, images):
    folder, _ = images
    with pytest.raises(blipkit.ImageError, match="broken.jpg"):
        model.caption(folder / "broken.jpg")


def test_retrieval_api(retrieval_dir, images):
    _, paths = images
    m = blipkit.load(retrieval_dir)
    labels = ["a red cat", "a dog", "a photo"]
    probs = m.classify(paths, labels)
    assert len(probs) == 3
    for p in probs:
        assert list(p) == labels
        assert sum(p.values()) == pytest.approx(1.0, abs=1e-5)
    sims = m.similarity(paths, labels)
    assert sims.shape == (3, 3)
    best = [max(p, key=p.get) for p in probs]
    assert best == [labels[i] for i in sims.argmax(dim=1).tolist()]
    img = m.embed_images(paths)
    txt = m.embed_texts(labels)
    assert img.shape == (3, 16) and txt.shape == (3, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    match = m.match(paths, labels)
    assert match.shape == (3, 3) and bool(((match >= 0) & (match <= 1)).all())


def test_classify_template_defaults_to_the_models_own(retrieval_dir, images):
    _, paths = images
    m = blipkit.load(retrieval_dir)
    labels = ["red", "dog"]
    assert m.config.prompts.classify == "a photo of {}"  # the BLIP-2 default
    assert m.classify(paths, labels) == m.classify(paths, labels, template="a photo of {}")
    m.config.prompts.classify = "{}"
    assert m.classify(paths, labels) == m.classify(paths, labels, template="{}")
    assert m.classify(paths, labels) != m.classify(paths, labels, template="a photo of {}")


# --- CLI ------------------------------------------------------------------------------------------------
def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("caption", "ask", "chat", "classify", "similarity"):
        assert command in out


def test_cli_ask(opt_dir, images, capsys):
    _, paths = images
    assert cli.main(["ask", str(paths[0]), "what is it?", "--model", str(opt_dir)]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_cli_user_errors_are_one_line(opt_dir, images, capsys):
    folder, _ = images
    code = cli.main(["ask", str(folder / "broken.jpg"), "what?", "--model", str(opt_dir)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "broken.jpg" in err and "Traceback" not in err
    assert cli.main(["ask", str(folder / "img0.png"), "what?", "--model", str(folder / "nope")]) == 2


def test_cli_chat_from_a_pipe(opt_dir, images):
    _, paths = images
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "blipkit",
            "chat",
            str(paths[0]),
            "--model",
            str(opt_dir),
            "--max-new-tokens",
            "3",
        ],
        input="what is it?\n\nwhat color is it?\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 2
