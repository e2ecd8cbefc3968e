"""int8 frozen towers (``blipkit.load(..., quantize="int8")``) against fp32, side by side in one run.

1. Speed: captions of JPEG files on the random BLIP-2 of realistic proportions (``caption_throughput.py``):
   transformers' batched fp32 ``generate``, blipkit fp32 (its fastest kernels) and blipkit int8, the same
   batch size, greedy; interleaved rounds, best and median; same captions as fp32.
2. Answers: the embedded default model, fp32 vs int8: identical captions on easy-VQA test images, and
   easy-VQA accuracy (a fixed subset, as ``blipkit eval vqa-model --limit N`` draws it).

    python bench/int8.py --report       # writes reports/int8.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def speed_rows(n_images: int, batch_size: int, max_new_tokens: int, repeats: int) -> tuple[dict, dict, dict]:
    """(rates per round, captions, layer counts) for transformers fp32, blipkit fp32 and blipkit int8."""
    from caption_throughput import blipkit_captions, build, hf_captions, make_images

    import blipkit

    tmp = Path(tempfile.mkdtemp(prefix="int8-bench-"))
    hf, processor = build(tmp / "model")
    files = make_images(tmp / "images", n_images)
    fp32 = blipkit.load(tmp / "model")
    int8 = blipkit.load(tmp / "model", quantize="int8")
    runs = {
        "transformers_fp32": partial(hf_captions, hf, processor, files, batch_size, max_new_tokens),
        "blipkit_fp32": partial(blipkit_captions, fp32, files, batch_size, max_new_tokens, 1),
        "blipkit_int8": partial(blipkit_captions, int8, files, batch_size, max_new_tokens, 1),
    }
    for fn in runs.values():  # warm-up
        fn()
    rates: dict[str, list[float]] = {k: [] for k in runs}
    captions = {}
    for r in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            captions[name] = fn()
            rates[name].append(n_images / (time.perf_counter() - start))
            print(f"round {r}: {name:<18} {rates[name][-1]:7.3f} img/s", file=sys.stderr, flush=True)
    quantized = sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in int8.model.modules())
    linears = quantized + sum(isinstance(m, torch.nn.Linear) for m in int8.model.modules())
    return rates, captions, {"quantized": quantized, "linear layers": linears}


def default_rows(n_captions: int, vqa_limit: int) -> dict:
    """fp32 vs int8 on the default model: identical captions, easy-VQA accuracy and its time."""
    import easy_vqa

    import blipkit
    from blipkit.data.sources import read_examples
    from blipkit.eval.vqa_model import evaluate_vqa_model

    paths = easy_vqa.get_test_image_paths()
    files = [paths[i] for i in sorted(paths)[:n_captions]]
    _, examples = read_examples("easy-vqa:test")
    out = {}
    for name, mode in (("fp32", None), ("int8", "int8")):
        model = blipkit.load("default", quantize=mode)
        start = time.perf_counter()
        out[f"{name}_captions"] = model.caption(files, max_new_tokens=10)
        out[f"{name}_caption_s"] = time.perf_counter() - start
        report, _ = evaluate_vqa_model(model, examples, vqa_limit)
        out[f"{name}_vqa"] = report
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--captions", type=int, default=64, help="default-model captions compared")
    ap.add_argument("--vqa-limit", type=int, default=1000, help="easy-VQA questions (0: all)")
    ap.add_argument("--report", action="store_true", help="write reports/int8.md")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    rates, captions, layers = speed_rows(args.images, args.batch_size, args.max_new_tokens, args.repeats)
    best = {k: max(v) for k, v in rates.items()}
    median = {k: statistics.median(v) for k, v in rates.items()}

    def same(a: str, b: str, caps: dict) -> str:
        return f"{statistics.mean(x == y for x, y in zip(caps[a], caps[b], strict=True)):.0%}"

    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, quantized engine "
        f"{torch.backends.quantized.engine}",
        f"- command: `python bench/int8.py {argv_text}`",
        "",
        f"## Speed: random BLIP-2 of realistic proportions, batch {args.batch_size}, "
        f"{args.max_new_tokens} new tokens, {args.images} JPEGs",
        "",
        "| path | images/s (best) | median | all rounds |",
        "|---|---|---|---|",
        *(
            f"| {k} | {best[k]:.3f} | {median[k]:.3f} | {', '.join(f'{x:.3f}' for x in v)} |"
            for k, v in rates.items()
        ),
        "",
        f"- int8 / transformers fp32 batched: **{best['blipkit_int8'] / best['transformers_fp32']:.2f}x** "
        f"(median {median['blipkit_int8'] / median['transformers_fp32']:.2f}x); int8 / blipkit fp32 "
        f"{best['blipkit_int8'] / best['blipkit_fp32']:.2f}x",
        f"- same captions as blipkit fp32: int8 {same('blipkit_int8', 'blipkit_fp32', captions)}; "
        f"blipkit fp32 vs transformers fp32 {same('blipkit_fp32', 'transformers_fp32', captions)}",
        f"- layers in int8: {layers['quantized']} of {layers['linear layers']} Linear layers (the rest: "
        "output head, layers whose calibration inputs carry outliers, the Q-Former and bridge)",
    ]
    d = default_rows(args.captions, args.vqa_limit)
    identical = statistics.mean(a == b for a, b in zip(d["fp32_captions"], d["int8_captions"], strict=True))
    f32, i8 = d["fp32_vqa"], d["int8_vqa"]
    lines += [
        "",
        "## Answers: the embedded default model",
        "",
        "| | fp32 | int8 |",
        "|---|---|---|",
        f"| easy-VQA accuracy ({f32['questions']} test questions) | {f32['accuracy']:.3f} "
        f"| {i8['accuracy']:.3f} |",
        *(
            f"| ... {kind} | {f32['by_answer_type'][kind]:.3f} | {i8['by_answer_type'][kind]:.3f} |"
            for kind in f32["by_answer_type"]
        ),
        f"| easy-VQA time (s) | {f32['seconds']:.1f} | {i8['seconds']:.1f} |",
        f"| {args.captions} captions (s) | {d['fp32_caption_s']:.2f} | {d['int8_caption_s']:.2f} |",
        "",
        f"- identical captions: **{identical:.0%}** of {args.captions}; easy-VQA accuracy "
        f"{100 * (i8['accuracy'] - f32['accuracy']):+.1f} points",
    ]
    text = "\n".join(lines)
    print(text)
    if args.report:
        (ROOT / "reports" / "int8.md").write_text("# int8 frozen towers vs fp32\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
