"""Continuous vs static batching on workloads with mixed output lengths, same outputs required.

Two workloads, each decoded both ways with the same batch size (slots), greedy:

* **mixed questions** (the server's mix): the trained ``default-llava`` asked short questions (one-word
  answers) and "Describe the image." (a sentence) about easy-VQA test images, interleaved, through
  ``Model.complete`` (static: one call per batch, which waits for its longest row);
* **caption job** (``--max-new-tokens 30``): the folder engine (``Captioner`` over decoded batches, as
  ``blipkit caption`` runs it) on the random BLIP-2 of ``caption_throughput.py``. Random weights never emit
  their EOS, so the stop token is the one whose first appearance in the model's own 30-token greedy captions
  varies most between images: the model's real tokens, ending where that token comes.

    python bench/continuous_batching.py --report     # writes reports/continuous-batching.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHORT = ["What shape is in the image?", "What color is the shape?", "Is there a circle?", "Is it blue?"]
LONG = "Describe the image."


def stop_token(tokens: list[list[int]], skip: set[int]) -> int:
    """The token whose first position in each row (the row's end if absent) varies most across rows."""

    def spread(t: int) -> float:
        return statistics.pstdev(row.index(t) + 1 if t in row else len(row) for row in tokens)

    candidates = {t for row in tokens for t in row} - skip
    return max(sorted(candidates), key=spread)


def caption_job(tmp: Path, n_images: int, batch_size: int, max_new_tokens: int) -> tuple[dict, dict]:
    """(runs {name: fn -> list of captions}, facts) for the caption job on the random BLIP-2."""
    from caption_throughput import PROMPT, build, make_images

    import blipkit
    from blipkit.batch.decode import batches
    from blipkit.batch.generate import Captioner
    from blipkit.processing import load_image

    files = make_images(tmp / "images", n_images)
    build(tmp / "probe")
    probe = blipkit.load(tmp / "probe", batch_size=batch_size)
    pixels = torch.stack([probe.processor.preprocess(load_image(f)) for f in files])
    probe_tokens = Captioner(probe, PROMPT, max_new_tokens).tokens(pixels)
    eos = stop_token(probe_tokens, skip={probe.text.llm_pad_id})
    build(tmp / "model", eos_token_id=eos)  # the same weights (same seed), ``eos`` ends a caption
    model = blipkit.load(tmp / "model", batch_size=batch_size)
    captioner = Captioner(model, PROMPT, max_new_tokens)
    items = [(str(f), str(f)) for f in files]

    def static() -> list[str]:
        out = []
        for batch in batches(model.processor, iter(items), batch_size, 0):
            out.extend(captioner(batch.pixels))
        return out

    def continuous() -> list[str]:
        out = []
        for _, caps in captioner.stream(batches(model.processor, iter(items), batch_size, 0)):
            out.extend(caps)
        return out

    lengths = [row.index(eos) + 1 if eos in row else len(row) for row in probe_tokens]
    facts = {"images": n_images, "stop token": eos, "lengths": lengths}
    return {"caption_static": static, "caption_continuous": continuous}, facts


def mixed_questions(n_images: int, batch_size: int, max_new_tokens: int) -> tuple[dict, dict]:
    """(runs, facts) for the question/description mix on ``default-llava``."""
    from caption_throughput import easy_vqa_images

    import blipkit
    from blipkit.processing import load_image

    model = blipkit.load("default-llava", batch_size=batch_size)
    files = easy_vqa_images(n_images)
    pixels = torch.stack([model.processor.preprocess(load_image(f)) for f in files])
    texts = [LONG if i % 2 else SHORT[(i // 2) % len(SHORT)] for i in range(n_images)]
    prompts = [model.text.prompt(model.text.question(t), max_new_tokens) for t in texts]

    def run(continuous: bool) -> list[str]:
        if continuous:
            tokens = model.complete(pixels, prompts, max_new_tokens)
        else:  # one call per batch: nothing joins it
            parts = [slice(i, i + batch_size) for i in range(0, n_images, batch_size)]
            tokens = [t for p in parts for t in model.complete(pixels[p], prompts[p], max_new_tokens)]
        return [model.text.decode(t) for t in tokens]

    lengths = [len(t) + 1 for t in model.complete(pixels, prompts, max_new_tokens)]
    facts = {"images": n_images, "lengths": lengths, "example": run(False)[:2]}
    return {"mixed_static": lambda: run(False), "mixed_continuous": lambda: run(True)}, facts


class PassTimer:
    """Counts and times the LLM passes of every ``ContinuousBatch`` (joins and decode steps) while on: where
    the time goes, and so how much fewer decode steps can save."""

    def __init__(self):
        from blipkit.models.continuous import ContinuousBatch

        self.cls, self.seconds, self.count = ContinuousBatch, {"add": 0.0, "step": 0.0}, {"add": 0, "step": 0}
        self.originals = {name: getattr(ContinuousBatch, name) for name in self.seconds}

    def __enter__(self) -> PassTimer:
        for name, original in self.originals.items():

            def timed(batch, *args, _name=name, _original=original):
                start = time.perf_counter()
                try:
                    return _original(batch, *args)
                finally:
                    self.seconds[_name] += time.perf_counter() - start
                    self.count[_name] += 1

            setattr(self.cls, name, timed)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self.originals.items():
            setattr(self.cls, name, original)


def measure(runs: dict, repeats: int, n: dict[str, int]) -> tuple[dict, dict, dict]:
    """Interleaved rounds: items/s of every run per round, each run's outputs, and one more run of each with
    its LLM passes timed (seconds, passes, joins and steps)."""
    rates: dict[str, list[float]] = {k: [] for k in runs}
    outputs: dict[str, list] = {}
    for fn in runs.values():
        fn()  # warm-up
    for r in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            outputs[name] = fn()
            rates[name].append(n[name] / (time.perf_counter() - start))
            print(f"round {r}: {name:<20} {rates[name][-1]:7.3f} items/s", file=sys.stderr, flush=True)
    passes = {}
    for name, fn in runs.items():
        with PassTimer() as timer:
            start = time.perf_counter()
            fn()
            passes[name] = (time.perf_counter() - start, timer.seconds, timer.count)
    return rates, outputs, passes


def report_lines(
    rates: dict, outputs: dict, passes: dict, facts: dict[str, dict], argv: list[str]
) -> list[str]:
    lines = [
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads",
        f"- command: `python bench/continuous_batching.py {' '.join(argv)}`",
        "",
        "| path | items/s (best) | median | all rounds |",
        "|---|---|---|---|",
    ]
    for k, v in rates.items():
        lines.append(
            f"| {k} | {max(v):.3f} | {statistics.median(v):.3f} | {', '.join(f'{x:.3f}' for x in v)} |"
        )
    lines.append("")
    for work, f in facts.items():
        static, cont = f"{work}_static", f"{work}_continuous"
        same = statistics.mean(a == b for a, b in zip(outputs[static], outputs[cont], strict=True))
        lengths = f["lengths"]
        lines.append(
            f"- {work}: continuous / static **{max(rates[cont]) / max(rates[static]):.2f}x** (best), "
            f"{statistics.median(rates[cont]) / statistics.median(rates[static]):.2f}x (median); same "
            f"outputs {same:.0%}; {f['images']} items, tokens per row (EOS included) min {min(lengths)}, "
            f"mean {statistics.mean(lengths):.1f}, max {max(lengths)}"
            + (f", stop token {f['stop token']}" if "stop token" in f else "")
            + (f"; e.g. {f['example']}" if "example" in f else "")
        )
    lines += [
        "",
        "Where the time goes (one more run of each, LLM passes timed):",
        "",
        "| path | wall (s) | joins: passes, s | decode steps: passes, s, ms per step | rest (s) |",
        "|---|---|---|---|---|",
    ]
    for name, (wall, seconds, count) in passes.items():
        per_step = 1e3 * seconds["step"] / max(1, count["step"])
        rest = wall - seconds["add"] - seconds["step"]
        lines.append(
            f"| {name} | {wall:.2f} | {count['add']}, {seconds['add']:.2f} | {count['step']}, "
            f"{seconds['step']:.2f}, {per_step:.1f} | {rest:.2f} |"
        )
    lines += [
        "",
        "Joins are the prefill of the rows that enter (static batches prefill once per batch); rest is image "
        "decoding, the vision encoder, the Q-Former or projector, and detokenising. Continuous batching "
        "saves decode steps only: the gain is bounded by the share of the wall time the static run spends "
        "in them, and a step over a full batch costs more than one over the few rows a static batch keeps "
        "at its end (decoding here is not purely bound by reading the weights).",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32, help="images of each workload")
    ap.add_argument("--batch-size", type=int, default=8, help="rows decoding at once, both ways")
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--no-default", action="store_true", help="skip the default-llava workload")
    ap.add_argument("--report", action="store_true", help="write reports/continuous-batching.md")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="continuous-bench-"))
    runs, facts = caption_job(tmp, args.images, args.batch_size, args.max_new_tokens)
    facts = {"caption": facts}
    if not args.no_default:
        more, facts["mixed"] = mixed_questions(args.images, args.batch_size, args.max_new_tokens)
        runs |= more
    rates, outputs, passes = measure(runs, args.repeats, {k: args.images for k in runs})
    lines = report_lines(rates, outputs, passes, facts, sys.argv[1:] if argv is None else argv)
    text = "\n".join(lines)
    print(text)
    if args.report:
        out = ROOT / "reports" / "continuous-batching.md"
        out.write_text("# Continuous vs static batching, mixed output lengths\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
