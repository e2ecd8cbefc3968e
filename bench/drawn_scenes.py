"""Colour and shape of freshly drawn scenes: ``tests/test_examples.py``'s generator over several seeds, and
the example images' shapes redrawn in everyday colours (three reds, blues, greens and yellows) on six grounds.

    python bench/drawn_scenes.py [--model default] [--model OTHER_DIR ...] [--seeds 20261203,7,11] [--n 48]
                                 [--out reports/drawn-scenes.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples")]

from make_examples import SCENES, draw  # noqa: E402
from test_examples import COLOUR_Q, fresh_accuracy, fresh_scenes  # noqa: E402

import blipkit  # noqa: E402

EVERYDAY = {
    "red": [(220, 30, 30), (200, 0, 0), (235, 60, 50)],
    "blue": [(30, 60, 220), (0, 0, 200), (50, 80, 240)],
    "green": [(20, 180, 20), (0, 200, 60), (60, 210, 60)],
    "yellow": [(235, 220, 40), (250, 240, 0), (220, 200, 20)],
}
GROUNDS = [(250, 250, 250), (225, 225, 240), (200, 200, 200), (150, 150, 170), (90, 90, 110), (40, 40, 40)]


def everyday(model: blipkit.Model) -> dict[str, float]:
    """Share of right colour answers per colour name, over the 4 example shapes x 3 shades x 6 grounds."""
    rows = [
        (label, draw(size, ground, shape, colour, box))
        for size, _, shape, _, box in SCENES.values()
        for label, shades in EVERYDAY.items()
        for colour in shades
        for ground in GROUNDS
    ]
    answers = model.generate([r[1] for r in rows], [model.text.question(COLOUR_Q)] * len(rows), 10)
    right: dict[str, list[bool]] = {}
    for (label, _), answer in zip(rows, answers, strict=True):
        right.setdefault(label, []).append(answer == label)
    out = {k: float(np.mean(v)) for k, v in right.items()}
    out["all"] = float(np.mean([a for v in right.values() for a in v]))
    return out


def measure(name: str, seeds: list[int], n: int) -> dict:
    model = blipkit.load(name)
    fresh = [fresh_accuracy(model, fresh_scenes(n, seed)) for seed in seeds]
    return {
        "model": name,
        "fresh colour": float(np.mean([c for c, _ in fresh])),
        "fresh shape": float(np.mean([s for _, s in fresh])),
        "everyday colours": everyday(model),
    }


def render(rows: list[dict], seeds: list[int], n: int, command: str) -> str:
    lines = [
        "# Drawn scenes: colour and shape",
        "",
        f"`{command}`",
        "",
        f"Fresh scenes: {n} per seed, seeds {', '.join(map(str, seeds))} (`tests/test_examples.py`'s"
        " generator: a palette colour moved up to 35 per channel, 15 CIELAB nearer its name than any other;"
        " 100-500 px canvases, light, mid and dark grounds, every other one JPEG). Everyday colours: the"
        " four example shapes of `examples/make_examples.py` in three shades of each colour on six grounds"
        " (72 per colour).",
        "",
        "| model | fresh colour | fresh shape | everyday: all | red | blue | green | yellow |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e = r["everyday colours"]
        lines.append(
            f"| {r['model']} | {r['fresh colour']:.3f} | {r['fresh shape']:.3f} | {e['all']:.3f} | "
            f"{e['red']:.2f} | {e['blue']:.2f} | {e['green']:.2f} | {e['yellow']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="a model name or checkpoint dir (repeatable)")
    p.add_argument("--seeds", default="20261203,7,11")
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    rows = [measure(name, seeds, args.n) for name in args.model or ["default"]]
    command = "python bench/drawn_scenes.py " + " ".join(sys.argv[1:])
    text = render(rows, seeds, args.n, command.strip())
    print(text)
    print(f"{time.perf_counter() - start:.0f} s")
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
