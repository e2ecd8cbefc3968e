"""Memory of ``blipkit caption`` over a small and a large folder (is streaming flat?) and of the server.

Draws ``--small`` and ``--large`` easy-VQA-like scenes (one coloured shape on a plain background, 64..256 px a
side, a third of them JPEG, the rest PNG; seeded) into a temporary folder, then runs ``blipkit caption DIR
--out captions.jsonl`` once per folder, each in a fresh process. The peak RSS is the one ``wait4`` reports for
that process (the largest of it and its decoding workers, what GNU ``time -f %M`` prints). While it runs, its
memory and the rows written so far are sampled, so the report also shows memory against images captioned.
Streaming is flat when the large run's peak is within ``--tolerance`` (5%) of the small one's.

``--server`` measures ``blipkit serve`` instead (the report keeps the other section): RSS at idle, during a
burst of ``--burst`` concurrent chat requests with 2000x1500 JPEGs (data URLs) and ``--settle-s`` later.

    OMP_NUM_THREADS=1 python bench/caption_memory.py --threads 1 --out reports/caption-memory.md
    OMP_NUM_THREADS=1 python bench/caption_memory.py --server --out reports/caption-memory.md
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 220, 40),
    "teal": (20, 150, 150), "brown": (130, 80, 30), "gray": (128, 128, 128), "black": (15, 15, 15),
}  # fmt: skip
SHAPES = ("circle", "rectangle", "triangle")
QUESTION = "what shape is in the image?"
CAPTION_TITLE = "## Folder captioning"
SERVER_TITLE = "## Server burst"


# --- images ----------------------------------------------------------------------------------------------


def draw_scene(rng: random.Random, width: int, height: int) -> Image.Image:
    """One shape of one of eight colours on a light, plain background, at a random size and place."""
    background = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", (width, height), background)
    side = rng.randint(min(width, height) // 3, min(width, height) * 4 // 5)
    x0, y0 = rng.randint(0, width - side), rng.randint(0, height - side)
    box = (x0, y0, x0 + side, y0 + side)
    colour = COLOURS[rng.choice(list(COLOURS))]
    d = ImageDraw.Draw(img)
    shape = rng.choice(SHAPES)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "rectangle":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([(x0 + side // 2, y0), (x0 + side, y0 + side), (x0, y0 + side)], fill=colour)
    return img


def make_folder(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` scenes of 64..256 px a side: every third a JPEG, the others PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        img = draw_scene(rng, rng.randint(64, 256), rng.randint(64, 256))
        path = folder / (f"scene{i:05d}.jpg" if i % 3 == 0 else f"scene{i:05d}.png")
        img.save(path, quality=90)
        paths.append(path)
    return paths


def large_jpeg(seed: int, width: int = 2000, height: int = 1500) -> bytes:
    """A drawn scene with photo-like noise (so the file is about as large as a photo's), as JPEG bytes."""
    img = np.asarray(draw_scene(random.Random(seed), width, height), dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0, 12, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# --- process memory --------------------------------------------------------------------------------------


def status_mb(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM (peak VmRSS so far), RssAnon and RssFile of ``pid``, in MB; {} once it is gone."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    found[key] = int(value.split()[0]) / 1024
    except (OSError, ValueError):
        return {}
    return found


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


@dataclass
class Sample:
    seconds: float
    rows: int  # output rows written so far
    main: dict[str, float]  # status_mb of the captioning process
    worker_rss: float  # largest VmRSS among its decoding workers


@dataclass
class Run:
    images: int
    command: list[str]
    code: str = ""  # code_version() when the run started
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0  # wait4's ru_maxrss: the largest of the process and its workers
    main_hwm_mb: float = 0.0  # VmHWM of the captioning process, last sampled
    returncode: int = 0
    rows: int = 0
    captions: int = 0
    samples: list[Sample] = field(default_factory=list)
    stderr_tail: str = ""

    @property
    def rate(self) -> float:
        return self.images / self.wall_s

    def captioning_rate(self) -> float | None:
        """Images/s from the first row written to the end: the model's load left out."""
        first = next((s for s in self.samples if s.rows > 0), None)
        if first is None or first.rows >= self.images or self.wall_s <= first.seconds:
            return None
        return (self.images - first.rows) / (self.wall_s - first.seconds)


class RowCounter:
    """Counts the lines of a growing file, reading only what was appended since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset, self.lines = path, 0, 0

    def __call__(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return self.lines
        self.offset += len(data)
        self.lines += data.count(b"\n")
        return self.lines


def code_version() -> str:
    """The commit checked out, and a digest of the ``blipkit/`` sources as they are on disk now."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    digest = hashlib.sha256()
    for path in sorted((ROOT / "blipkit").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return f"commit {commit}, blipkit/*.py digest {digest.hexdigest()[:12]}"


def caption_command(args: argparse.Namespace, folder: Path, out: Path) -> list[str]:
    command = [sys.executable, "-m", "blipkit", "caption", str(folder), "--out", str(out)]
    command += [
        "--model",
        args.model,
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--batch-size",
        str(args.batch_size),
    ]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    return command


def run_caption(args: argparse.Namespace, folder: Path, files: list[Path], out: Path) -> Run:
    """``blipkit caption folder`` in a fresh process, sampled every ``--sample-s``; checks its rows."""
    run = Run(len(files), caption_command(args, folder, out), code=code_version())
    count = RowCounter(out)
    stderr = out.with_suffix(".stderr")
    with open(stderr, "w") as err:
        start = time.monotonic()
        proc = subprocess.Popen(run.command, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(args.sample_s):
            main = status_mb(proc.pid)
            if not main:
                continue
            workers = children(proc.pid)
            run.samples.append(
                Sample(
                    seconds=time.monotonic() - start,
                    rows=count(),
                    main=main,
                    worker_rss=max((status_mb(w).get("VmRSS", 0.0) for w in workers), default=0.0),
                )
            )

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this process tree alone
    run.wall_s = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    run.returncode = proc.returncode
    run.peak_rss_mb = usage.ru_maxrss / 1024  # KB on Linux
    run.main_hwm_mb = max((s.main.get("VmHWM", 0.0) for s in run.samples), default=0.0)
    run.stderr_tail = stderr.read_text()[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    run.rows = len(rows)
    run.captions = sum(isinstance(r.get("caption"), str) and bool(r["caption"]) for r in rows)
    expected = {str(p.resolve()) for p in files}
    paths = [r.get("path") for r in rows]
    if run.returncode != 0 or len(paths) != len(expected) or set(paths) != expected:
        raise SystemExit(
            f"{shlex.join(run.command)} exited {run.returncode} with {len(rows)} rows for {len(files)} "
            f"images ({len(set(paths) & expected)} of them right):\n{run.stderr_tail}"
        )
    return run


def bookkeeping_bytes(folder: Path) -> int:
    """Peak traced Python memory of listing ``folder`` into pending items, with the model left out: the part
    of a run that can grow with the number of images (the folder's sorted listing, the set of names seen)."""
    from blipkit.batch.job import Job, Summary, pending
    from blipkit.batch.writers import open_sink

    with tempfile.TemporaryDirectory() as tmp:
        sink = open_sink("jsonl", Path(tmp) / "out.jsonl")
        try:
            job = Job(paths=[str(folder)])
            tracemalloc.start()
            n = sum(1 for _ in pending(job, sink, Summary()))
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        finally:
            sink.close()
    assert n == len(list(folder.iterdir()))
    return peak


def slope_mb_per_1000(run: Run, key: str) -> float | None:
    """Least-squares slope of the process's ``key`` memory (MB) against rows written, past the first 10%."""
    points = [(s.rows, s.main[key]) for s in run.samples if run.images * 0.1 <= s.rows < run.images]
    if len({x for x, _ in points}) < 3:
        return None
    xs, ys = zip(*points, strict=True)
    return statistics.linear_regression(xs, ys).slope * 1000


# --- server ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chat_body(data: bytes, max_tokens: int) -> dict:
    url = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}


def run_server(args: argparse.Namespace) -> dict:
    """The server's memory at idle, then at each burst's peak and ``--settle-s`` after it; the answers."""
    import httpx
    from local_server import start_server  # needs httpx too

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    result: dict = {"code": code_version(), "bursts": [], "jpeg_kb": []}
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        print(f"starting blipkit serve --model {args.model} on {base} ...", file=sys.stderr)
        server = start_server(["--model", args.model], port, log, args.startup_s)
        try:
            with httpx.Client(base_url=base, timeout=600, limits=httpx.Limits(max_connections=64)) as client:

                def ask(data: bytes) -> tuple[int, str]:
                    r = client.post("/v1/chat/completions", json=chat_body(data, args.max_new_tokens))
                    ok = r.status_code == 200
                    return r.status_code, r.json()["choices"][0]["message"]["content"] if ok else r.text[:200]

                def cache() -> dict:
                    return client.get("/health").json().get("cache", {})

                result["loaded"] = status_mb(server.pid)
                result["warmup"] = ask(large_jpeg(10**6))
                time.sleep(args.idle_s)
                result["baseline"] = status_mb(server.pid)
                result["baseline_cache"] = cache()
                for b in range(args.bursts):
                    images = [large_jpeg(b * args.burst + i) for i in range(args.burst)]  # new ones each time
                    result["jpeg_kb"] += [len(d) / 1024 for d in images]
                    result["bursts"].append(
                        burst(server.pid, ask, images, args.settle_s) | {"cache": cache()}
                    )
                    del images
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        result["tracebacks"] = log.read_text().count("Traceback (most recent call last)")
    return result


def burst(pid: int, ask: Callable[[bytes], tuple[int, str]], images: list[bytes], settle_s: float) -> dict:
    """Sends one request per image at once; ``pid``'s memory at the peak (sampled every 10 ms) and after."""
    peak = status_mb(pid)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = status_mb(pid)
            if now.get("VmRSS", 0.0) > peak["VmRSS"]:
                peak.update(now)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.monotonic()
    with ThreadPoolExecutor(len(images)) as pool:
        answers = list(pool.map(ask, images))
    seconds = time.monotonic() - start
    just_after = status_mb(pid)
    time.sleep(1.0)
    one_s = status_mb(pid)
    time.sleep(max(0.0, settle_s - 1.0))
    done.set()
    sampler.join()
    memory = {
        "peak": peak,
        "just after": just_after,
        "1 s after": one_s,
        f"{settle_s:g} s after": status_mb(pid),
    }
    return {"seconds": seconds, "answers": answers, "memory": memory}


# --- report ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def header() -> list[str]:
    from blipkit.batch.job import usable_cpus

    env = ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in ("OMP_NUM_THREADS", "BLIPKIT_KERNELS"))
    return [
        "# Memory of folder captioning and of the server",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores ({usable_cpus()} usable), {platform.machine()}, "
        f"Python {platform.python_version()}, torch {version('torch')}; {env}. A shared machine: times are "
        "indicative.",
        "",
    ]


def caption_section(
    args: argparse.Namespace, small: Run, large: Run, bookkeeping: dict[int, int]
) -> list[str]:
    from blipkit.batch.job import default_workers, usable_cpus

    threads = args.threads if args.threads is not None else f"{usable_cpus()} (blipkit's default: every CPU)"
    workers = args.workers if args.workers is not None else f"{default_workers()} (blipkit's default)"
    ratio = large.peak_rss_mb / small.peak_rss_mb
    flat = abs(ratio - 1) <= args.tolerance
    lines = [
        CAPTION_TITLE,
        "",
        f"`{shlex.join(['python', *sys.argv])}` drew {args.small} and {args.large} scenes (one coloured "
        "shape on a plain background, 64..256 px a side, a third JPEG, the rest PNG, seed 0) and ran, each "
        "in a fresh process:",
        "",
        f"    {shlex.join(['blipkit', *caption_command(args, Path('DIR'), Path('captions.jsonl'))[3:]])}",
        "",
        f"Code: {small.code}"
        + ("" if small.code == large.code else f" for the small run, {large.code} for the large one")
        + f"; torch threads {threads}, decoding workers {workers}"
        + ". Peak RSS is `wait4`'s `ru_maxrss` for that process (the largest of it and its decoding workers, "
        "as GNU `time -f %M`); wall time includes loading the model; every run wrote one caption row per "
        "image.",
        "",
        "| images | peak RSS MB | main process VmHWM MB | wall s | img/s | img/s after load |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for run in (small, large):
        after = run.captioning_rate()
        lines.append(
            f"| {run.images} | {run.peak_rss_mb:.1f} | {run.main_hwm_mb:.1f} | {run.wall_s:.1f} | "
            f"{run.rate:.1f} | {'' if after is None else f'{after:.1f}'} |"
        )
    lines += [
        "",
        f"Peak RSS, {args.large} / {args.small} images: **{ratio:.4f}** ({(ratio - 1) * 100:+.2f}%): "
        + (
            f"within {args.tolerance:.0%}, streaming is flat."
            if flat
            else f"**not** within {args.tolerance:.0%}."
        ),
        "",
    ]
    lines += timeline(large, args)
    grow = (bookkeeping[args.large] - bookkeeping[args.small]) / (args.large - args.small)
    lines += [
        "",
        f"What grows with the number of images by design: listing the folder (sorted names) and the set of "
        f"names already seen (each image is captioned once) take {bookkeeping[args.small] / 1e6:.2f} MB "
        f"for {args.small} images and {bookkeeping[args.large] / 1e6:.2f} MB for {args.large} (Python "
        f"allocations traced by `tracemalloc` over `blipkit.batch.job.pending`, model left out): "
        f"{grow:.0f} bytes per image, {grow * 1e6 / 2**20:.0f} MB per million images.",
        "",
    ]
    return lines


def timeline(run: Run, args: argparse.Namespace, points: int = 10) -> list[str]:
    """The large run's memory against images captioned, at about ``points`` evenly spaced row counts."""
    working = [s for s in run.samples if 0 < s.rows < run.images]  # the last batch's exit left out
    if not working:
        return []
    picked: list[Sample] = []
    for k in range(points + 1):
        target = run.images * k / points
        best = min(working, key=lambda s: abs(s.rows - target))
        if not picked or best is not picked[-1]:
            picked.append(best)
    anon = slope_mb_per_1000(run, "RssAnon")
    rss = slope_mb_per_1000(run, "VmRSS")
    lines = [
        f"Memory of the {run.images}-image run against rows written (sampled every {args.sample_s:g} s; the "
        "captioning process's VmRSS = RssAnon, its heap, + RssFile, mapped files such as weights; the "
        "decoding worker's VmRSS counts again the pages it shares with that process since the fork):",
        "",
        "| s | rows | VmRSS MB | RssAnon MB | RssFile MB | worker VmRSS MB |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in picked:
        m = s.main
        lines.append(
            f"| {s.seconds:.0f} | {s.rows} | {m['VmRSS']:.1f} | {m['RssAnon']:.1f} | {m['RssFile']:.1f} | "
            f"{s.worker_rss:.1f} |"
        )
    if anon is not None and rss is not None:
        lines += [
            "",
            f"Least-squares slope past the first 10% of rows: VmRSS {rss:+.3f} MB and RssAnon {anon:+.3f} MB "
            "per 1,000 images.",
        ]
    return lines


def server_section(args: argparse.Namespace, result: dict) -> list[str]:
    base, bursts = result["baseline"], result["bursts"]
    settled = f"{args.settle_s:g} s after"
    answers = [a for b in bursts for a in b["answers"]]
    ok = sum(status == 200 for status, _ in answers)
    lines = [
        SERVER_TITLE,
        "",
        f"`{shlex.join(['python', *sys.argv])}` started `blipkit serve --model {args.model}` (its defaults: "
        "`--max-batch-size 8`, `--cache-size 64`) in a fresh process, sent one warm-up request and waited "
        f"{args.idle_s:g} s (the baseline), then {len(bursts)} times sent {args.burst} chat requests at "
        f"once, each with its own 2000x1500 JPEG (drawn scene with noise, "
        f"{statistics.mean(result['jpeg_kb']):.0f} KB on average; new images in every burst) as a base64 "
        f"data URL and `max_tokens` {args.max_new_tokens}, waiting {args.settle_s:g} s after each. Memory of "
        "the server process (VmRSS = RssAnon + RssFile), sampled every 10 ms during each burst; the image "
        f"cache's entries from `/health`. Code: {result['code']}.",
        "",
        "| when | VmRSS MB | RssAnon MB | RssFile MB | cached images |",
        "|---|---:|---:|---:|---:|",
    ]

    def row(label: str, m: dict, cached: object = "") -> None:
        lines.append(f"| {label} | {m['VmRSS']:.1f} | {m['RssAnon']:.1f} | {m['RssFile']:.1f} | {cached} |")

    row("model loaded, no request yet", result["loaded"])
    row("idle after one warm-up request (baseline)", base, result["baseline_cache"].get("size"))
    for i, b in enumerate(bursts, 1):
        for key, m in b["memory"].items():
            if i == 1 or key in ("peak", settled):
                cached = b["cache"].get("size") if key == settled else ""
                row(f"burst {i}: {key}", m, cached)
    first, last = bursts[0]["memory"], bursts[-1]["memory"]
    anon = [b["memory"][settled]["RssAnon"] for b in bursts]
    added = [after - before for before, after in zip(anon, anon[1:], strict=False)]
    times = ", ".join(f"{b['seconds']:.1f}" for b in bursts)
    lines += [
        "",
        f"Answers: {ok} of {len(answers)} were 200 (bursts took {times} s; for example "
        f"{answers[0][1]!r}); tracebacks in the server's output: {result['tracebacks']}.",
        "",
        f"Burst 1: VmRSS peak / baseline **{first['peak']['VmRSS'] / base['VmRSS']:.3f}**; {settled} / "
        f"baseline **{first[settled]['VmRSS'] / base['VmRSS']:.3f}** (RssAnon "
        f"{first[settled]['RssAnon'] - base['RssAnon']:+.1f} MB).",
    ]
    if added:
        lines.append(
            f"After burst {len(bursts)}: VmRSS / baseline **{last[settled]['VmRSS'] / base['VmRSS']:.3f}**; "
            "RssAnon added by each later burst, MB: " + ", ".join(f"{a:+.1f}" for a in added) + "."
        )
    lines += [
        f"The image cache's tensors take {(bursts[-1]['cache'].get('bytes') or 0) / 2**20:.1f} MB at the end "
        "(kept on purpose, up to `--cache-size` images).",
        "",
    ]
    return lines


def write_report(path: Path, args: argparse.Namespace, section: list[str], title: str) -> str:
    """The header, then this run's section in place of the file's old one; the other section is kept."""
    kept: dict[str, list[str]] = {}
    if path.exists():
        current = None
        for line in path.read_text().splitlines():
            if line in (CAPTION_TITLE, SERVER_TITLE):
                current = line
                kept[current] = []
            if current is not None:
                kept[current].append(line)
    kept[title] = section
    lines = header()
    for name in (CAPTION_TITLE, SERVER_TITLE):
        if name in kept:
            body = kept[name]
            while body and not body[-1].strip():
                body = body[:-1]
            lines += [*body, ""]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "caption-memory.md")
    parser.add_argument("--small", type=int, default=50, help="images in the small folder (default 50)")
    parser.add_argument("--large", type=int, default=5000, help="images in the large folder (default 5000)")
    parser.add_argument("--model", default="default", help="'default' or a model dir (default: default)")
    parser.add_argument("--threads", type=int, default=None, help="caption --threads (default: its own)")
    parser.add_argument("--workers", type=int, default=None, help="caption --workers (default: its own)")
    parser.add_argument("--batch-size", type=int, default=8, help="blipkit caption --batch-size (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="caption / answer length (default 8)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="allowed peak RSS change (0.05)")
    parser.add_argument("--sample-s", type=float, default=0.5, help="memory sampling period (default 0.5)")
    parser.add_argument("--server", action="store_true", help="measure blipkit serve instead of captioning")
    parser.add_argument("--burst", type=int, default=32, help="concurrent requests of a burst (default 32)")
    parser.add_argument("--bursts", type=int, default=5, help="bursts, each with new images (default 5)")
    parser.add_argument("--idle-s", type=float, default=3.0, help="idle wait before the baseline (default 3)")
    parser.add_argument("--settle-s", type=float, default=5.0, help="wait after the burst (default 5)")
    parser.add_argument("--startup-s", type=float, default=600.0, help="wait this long for the server")
    args = parser.parse_args()
    if not 0 < args.small < args.large:
        parser.error("need 0 < --small < --large")
    if args.burst < 1 or args.bursts < 1 or args.settle_s < 1:
        parser.error("--burst, --bursts and --settle-s must be at least 1")

    if args.server:
        result = run_server(args)
        text = write_report(args.out, args, server_section(args, result), SERVER_TITLE)
        statuses = [status for b in result["bursts"] for status, _ in b["answers"]]
        failed = any(status != 200 for status in statuses) or result["tracebacks"]
    else:
        with tempfile.TemporaryDirectory(prefix="caption-memory-") as tmp:
            runs, bookkeeping = {}, {}
            for n in (args.small, args.large):
                folder = Path(tmp) / f"images{n}"
                print(f"drawing {n} images ...", file=sys.stderr)
                files = make_folder(folder, n)
                bookkeeping[n] = bookkeeping_bytes(folder)
                print(f"captioning {n} images ...", file=sys.stderr)
                runs[n] = run_caption(args, folder, files, Path(tmp) / f"captions{n}.jsonl")
                print(f"  peak RSS {runs[n].peak_rss_mb:.1f} MB, {runs[n].wall_s:.1f} s", file=sys.stderr)
            small, large = runs[args.small], runs[args.large]
            section = caption_section(args, small, large, bookkeeping)
        text = write_report(args.out, args, section, CAPTION_TITLE)
        failed = abs(large.peak_rss_mb / small.peak_rss_mb - 1) > args.tolerance
    print(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
