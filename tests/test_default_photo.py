"""``default-photo`` answers questions about real photos from what is in them: the packaged tagger's caption
reaches SmolLM2, on packaged labelled photos that no decision was tuned on (the tagger's held-out split)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import blipkit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
photo_tagger = pytest.importorskip("photo_tagger")
photo_answers = pytest.importorskip("photo_answers")

HELD_OUT = {"guitar.jpg", "puppy.jpg", "tent.jpg", "imagenet_15_99.jpg", "imagenet_17_22.jpg"}


def test_default_photo_names_what_is_in_held_out_photos():
    photos = [p for p in photo_tagger.labelled_photos() if p.file.name in HELD_OUT]
    assert len(photos) == len(HELD_OUT) and all(p.split == "held-out" for p in photos)
    m = blipkit.load("default-photo")
    assert m.family == "caption" and m.capabilities == ("caption", "ask", "chat")
    answers = {p.file.name: m.ask(p.file, "what is in this photo?") for p in photos}
    named = [photo_answers.names_the_class(answers[p.file.name], p.classes) for p in photos]
    assert sum(named) >= 4, answers
    caption = m.caption(next(p.file for p in photos if p.file.name == "puppy.jpg"))[0]
    assert caption.startswith("a photo of a") and photo_answers.names_the_class(
        caption, list(photo_tagger.DOGS)
    )
