"""Does ``default-photo`` answer from what is in a real photo? ``blipkit.load("default-photo").ask(photo, q)``
on the packaged labelled photos (``bench/photo_tagger.py``'s 26 scored ones), beside the synthetic-shapes
``default`` model asked the same.

    python bench/photo_answers.py [--out reports/default-photo]   # writes .json and .md

An answer "names the class" when it contains a name of one of the photo's ImageNet-1k classes (any of its
lemmas, or "dog" / "cat" for the dog breeds and domestic cats). The tuning / held-out split is the tagger's:
nothing here was tuned.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from photo_tagger import CATS, DOGS, labelled_photos

import blipkit
from blipkit.models.tagger import imagenet_classes

QUESTIONS = ("what is in this photo?", "what animal or object is this?")


def names(classes: list[int]) -> set[str]:
    """Every lemma of ``classes`` (lower case), plus the common word for dogs and cats."""
    lemmas = {lemma.strip().lower() for c in classes for lemma in imagenet_classes()[c].split(",")}
    if set(classes) & set(DOGS):
        lemmas |= {"dog", "puppy"}
    if set(classes) & set(CATS):
        lemmas.add("cat")
    return lemmas


def names_the_class(answer: str, classes: list[int]) -> bool:
    text = " " + re.sub(r"[^a-z ]+", " ", answer.lower()) + " "
    return any(f" {name} " in text for name in names(classes))


def run(out: Path) -> dict:
    photos = [p for p in labelled_photos() if p.classes]
    models = {"default-photo": blipkit.load("default-photo"), "default": blipkit.load("default")}
    rows, hits, seconds = [], {name: {} for name in models}, {}
    for name, model in models.items():
        start = time.perf_counter()
        for photo in photos:
            for q in QUESTIONS:
                answer = model.ask(photo.file, q)
                ok = names_the_class(answer, photo.classes)
                hits[name].setdefault(photo.split, []).append(ok)
                rows.append({"model": name, "photo": photo.file.name, "label": photo.label, "question": q,
                             "answer": answer, "names_the_class": ok, "split": photo.split})  # fmt: skip
        seconds[name] = round((time.perf_counter() - start) / (len(photos) * len(QUESTIONS)), 2)
    summary = {
        name: {split: sum(v) / len(v) for split, v in by_split.items()}
        | {"all": sum(sum(v) for v in by_split.values()) / sum(len(v) for v in by_split.values())}
        for name, by_split in hits.items()
    }
    report = {"questions": QUESTIONS, "photos": len(photos), "summary": summary, "seconds_per_ask": seconds}
    out.with_suffix(".json").write_text(json.dumps(report | {"rows": rows}, indent=2))
    out.with_suffix(".md").write_text(markdown(report, rows))
    return report


def markdown(report: dict, rows: list[dict]) -> str:
    lines = [
        "# Real photos: does the answer name what is in them?\n",
        f"`python bench/photo_answers.py`: {report['photos']} packaged labelled photos x "
        f"{len(report['questions'])} questions ({', '.join(report['questions'])}).\n",
        "| model | names the class: all | tuning split | held-out split | s / ask |",
        "|---|---|---|---|---|",
    ]
    for name, s in report["summary"].items():
        lines.append(
            f"| `{name}` | {s['all']:.2f} | {s.get('tuning', 0):.2f} | {s.get('held-out', 0):.2f} | "
            f"{report['seconds_per_ask'][name]} |"
        )
    lines += ["", "| model | photo | label | question | answer | names it |", "|---|---|---|---|---|---|"]
    for r in rows:
        answer = r["answer"].replace("|", "/").replace("\n", " ")
        lines.append(
            f"| {r['model']} | {r['photo']} | {r['label']} | {r['question']} | {answer} | "
            f"{'yes' if r['names_the_class'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "reports" / "default-photo"))
    args = p.parse_args()
    print(json.dumps(run(Path(args.out))["summary"], indent=2))


if __name__ == "__main__":
    main()
