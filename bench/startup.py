"""Start-up of ``blipkit ask`` end to end, beside the imports it cannot avoid, each in a fresh process.

Every row is a new Python process, timed from its start to its exit (warm file cache, best and median of
``--repeats`` interleaved rounds). The floor rows import what answering needs whatever the code around it:
torch, transformers, and transformers' modeling code for the default model's two frozen parts (DINOv2 and
Llama); ``blipkit ask`` adds reading the weights, building the model, the tokenizer and the answer.

    python bench/startup.py --repeats 3 --out reports/startup.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASK = ["-m", "blipkit.cli", "ask", str(ROOT / "examples" / "red_circle.png"), "what shape is in the image?"]
ROWS = {
    "python (no imports)": ["-c", "pass"],
    "import torch": ["-c", "import torch"],
    "import torch, transformers": ["-c", "import torch, transformers"],
    "+ transformers' DINOv2 and Llama modeling code": [
        "-c",
        "import torch, transformers; from transformers import Dinov2Model, LlamaForCausalLM",
    ],
    "import blipkit.cli": ["-c", "import blipkit.cli"],
    "blipkit ask (end to end)": ASK,
}
STAGES = """
import time
t0 = time.perf_counter()
import blipkit
t1 = time.perf_counter()
m = blipkit.load("default")
t2 = time.perf_counter()
m.ask({image!r}, "what shape is in the image?")
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def run(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write the report here (markdown)")
    args = ap.parse_args(argv)
    run(ASK)  # the one-time extraction of the default model's frozen parts, and the kernel timings
    times: dict[str, list[float]] = {name: [] for name in ROWS}
    stages: list[list[float]] = []
    for r in range(args.repeats):
        for name, cmd in ROWS.items():
            times[name].append(run(cmd))
            print(f"round {r}: {name:<48} {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
        code = STAGES.format(image=str(ROOT / "examples" / "red_circle.png"))
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        stages.append([float(x) for x in out.stdout.split()])
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    import torch
    import transformers

    lines = [
        "# Start-up: `blipkit ask` end to end and the imports under it",
        "",
        f"`python bench/startup.py {' '.join(sys.argv[1:] if argv is None else argv)}`: {cpu}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; each row a fresh process, warm file cache, {args.repeats} interleaved "
        "rounds.",
        "",
        "| process | best (s) | median (s) |",
        "|---|---|---|",
    ]
    for name, v in times.items():
        lines.append(f"| {name} | {min(v):.2f} | {statistics.median(v):.2f} |")
    imports, load, answer = (statistics.median(s[i] for s in stages) for i in range(3))
    floor = min(times["+ transformers' DINOv2 and Llama modeling code"])
    ask = min(times["blipkit ask (end to end)"])
    lines += [
        "",
        f"Inside one `blipkit.load('default')` + `ask` process (medians): `import blipkit` {imports:.2f} s, "
        f"load {load:.2f} s (of which transformers' modeling imports on first use), answer {answer:.2f} s.",
        "",
        f"`blipkit ask` takes {ask:.2f} s; importing torch and the transformers modeling code the two frozen "
        f"parts are built from takes {floor:.2f} s in a process that does nothing else, so blipkit's own "
        f"share (reading weights, building, tokenizer, answer) is {ask - floor:.2f} s.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
