"""Soak run of ``blipkit serve``: many concurrent clients for a bounded time, on this machine only.

Starts ``blipkit serve`` on a free port of 127.0.0.1 in a subprocess, then runs ``--clients`` threads for
``--seconds`` mixing chat (data-URI images from examples/), streaming chat, /v1/embeddings and bad requests
(malformed JSON, an oversized body, a file that is no image, too many pixels). Reports requests and
statuses per kind (bad requests are expected to get their 4xx), p50/p95 latency per kind, the server's
memory at start and end (VmRSS, RssAnon, RssFile of its /proc/<pid>/status) and any tracebacks it printed.

    python bench/soak.py --seconds 120 --out reports/soak.md
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import httpx
from local_server import start_server
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "what shape is in the image?",
    "what color is the shape?",
    "is there a circle?",
    "what is in the picture?",
    "how many shapes are there?",
]
CAPTIONS = ["a red circle", "a blue triangle", "a green rectangle", "a yellow circle on white"]
MAX_IMAGE_MB = 1  # a small body limit (about 2.3 MB) keeps the oversized requests cheap to send
# kind -> (share of requests, expected status)
KINDS = {
    "chat": (0.35, 200),
    "stream": (0.2, 200),
    "embeddings": (0.15, 200),
    "bad_json": (0.075, 400),
    "oversized_body": (0.075, 413),
    "not_an_image": (0.075, 400),
    "too_many_pixels": (0.075, 400),
}


@dataclass
class Outcome:
    kind: str
    status: int | str  # HTTP status, or the exception's name when no response came
    seconds: float

    @property
    def expected(self) -> bool:
        return self.status == KINDS[self.kind][1]


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS of a process and its anonymous (heap) and file-backed (mapped weights) parts, in MB."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                found[key] = int(value.split()[0]) / 1024
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def example_images() -> list[str]:
    paths = sorted([*ROOT.glob("examples/*.png"), *ROOT.glob("examples/*.jpg")])
    if not paths:
        raise SystemExit("no images in examples/")
    return [data_uri(p.read_bytes(), "image/jpeg" if p.suffix == ".jpg" else "image/png") for p in paths]


def too_many_pixels() -> str:
    """A 6000 x 5000 one-bit PNG: 30 megapixels (over the default 25) in a few kilobytes."""
    buf = io.BytesIO()
    Image.new("1", (6000, 5000)).save(buf, "PNG")
    return data_uri(buf.getvalue())


def messages(url: str, question: str) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


class Requests:
    """Builds and sends one request of each kind."""

    def __init__(self, images: list[str]):
        self.images = images
        self.pixel_bomb = too_many_pixels()
        self.oversized = b'{"messages": "' + b" " * (MAX_IMAGE_MB * 3 * 1024 * 1024) + b'"}'
        self.not_an_image = data_uri(b"GIF89a but not really an image" * 20)

    def send(self, client: httpx.Client, kind: str, rng: random.Random) -> int | str:
        """The response's status; a string when a 200 did not carry a whole answer."""
        chat = "/v1/chat/completions"
        question = rng.choice(QUESTIONS)
        if kind in ("chat", "stream"):
            payload = {
                "messages": messages(rng.choice(self.images), question),
                "max_tokens": rng.randint(4, 16),
            }
            if kind == "chat":
                r = client.post(chat, json=payload)
                if r.status_code == 200 and not isinstance(r.json()["choices"][0]["message"]["content"], str):
                    return "no_answer"
                return r.status_code
            with client.stream("POST", chat, json={**payload, "stream": True}) as r:
                last = ""
                for line in r.iter_lines():
                    last = line or last
                if r.status_code == 200 and last != "data: [DONE]":
                    return "stream_unfinished"
                return r.status_code
        if kind == "embeddings":
            texts = rng.sample(CAPTIONS, rng.randint(1, len(CAPTIONS)))
            return client.post("/v1/embeddings", json={"input": texts}).status_code
        if kind == "bad_json":
            return client.post(chat, content=b'{"messages": [{"role": "user", "content": ').status_code
        if kind == "oversized_body":
            return client.post(
                chat, content=self.oversized, headers={"Content-Type": "application/json"}
            ).status_code
        if kind == "not_an_image":
            return client.post(chat, json={"messages": messages(self.not_an_image, question)}).status_code
        if kind == "too_many_pixels":
            return client.post(chat, json={"messages": messages(self.pixel_bomb, question)}).status_code
        raise ValueError(kind)


def client_loop(base: str, requests: Requests, seed: int, until: float, out: list[Outcome]) -> None:
    rng = random.Random(seed)
    names, weights = list(KINDS), [share for share, _ in KINDS.values()]
    with httpx.Client(base_url=base, timeout=120) as client:
        while time.monotonic() < until:
            kind = rng.choices(names, weights)[0]
            start = time.monotonic()
            try:
                status: int | str = requests.send(client, kind, rng)
            except httpx.HTTPError as e:
                status = type(e).__name__
            out.append(Outcome(kind, status, time.monotonic() - start))


def percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def report(args: argparse.Namespace, outcomes: list[Outcome], rss: dict[str, dict], log_text: str) -> str:
    by_kind: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        by_kind[o.kind].append(o)
    lines = [
        "# Soak run of `blipkit serve`",
        "",
        f"`python bench/soak.py --model {args.model} --seconds {args.seconds:g} --clients {args.clients}`: "
        f"{args.clients} concurrent clients (threads, httpx) for {args.seconds:g} s against a server on "
        f"127.0.0.1 started with `--max-image-mb {MAX_IMAGE_MB}`, mixing chat about the example images "
        "(data URIs, 4-16 new tokens), streaming chat, text embeddings and bad requests.",
        "",
        f"Measured on a shared {os.cpu_count()}-core machine ({platform.machine()}, Python "
        f"{platform.python_version()}) while other people's jobs ran on it: latencies are indicative only.",
        "",
        "| kind | requests | expected status | as expected | other outcomes | p50 s | p95 s | max s |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for kind, (_, expected) in KINDS.items():
        rows = by_kind.get(kind, [])
        if not rows:
            lines.append(f"| {kind} | 0 | {expected} | 0 | | | | |")
            continue
        seconds = [o.seconds for o in rows]
        other = Counter(str(o.status) for o in rows if not o.expected)
        other_text = ", ".join(f"{status}: {n}" for status, n in sorted(other.items())) or "none"
        lines.append(
            f"| {kind} | {len(rows)} | {expected} | {sum(o.expected for o in rows)} | {other_text} | "
            f"{percentile(seconds, 50):.3f} | {percentile(seconds, 95):.3f} | {max(seconds):.3f} |"
        )
    total = len(outcomes)
    unexpected = sum(not o.expected for o in outcomes)
    tracebacks = log_text.count("Traceback (most recent call last)")
    lines += [
        "",
        f"Requests: {total} in {args.seconds:g} s ({total / args.seconds:.1f}/s); unexpected outcomes: "
        f"{unexpected}; tracebacks in the server's output: {tracebacks}.",
        "",
        "Server memory (VmRSS, of which RssAnon is heap and RssFile mapped files such as weights), MB:",
        "",
        "| when | VmRSS | RssAnon | RssFile |",
        "|---|---:|---:|---:|",
    ]
    labels = {
        "loaded": "model loaded, no request yet",
        "start": "after one warm-up request of each kind (the start of the run)",
        "peak": "highest VmRSS sampled during the run (every second)",
        "end": "end of the run",
    }
    for key, label in labels.items():
        m = rss[key]
        lines.append(f"| {label} | {m['VmRSS']:.0f} | {m['RssAnon']:.0f} | {m['RssFile']:.0f} |")
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="'default' or a model dir (default: default)")
    parser.add_argument("--seconds", type=float, default=120.0, help="how long the clients run (default 120)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--startup-s", type=float, default=600.0, help="wait this long for the server")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "soak.md")
    args = parser.parse_args()
    if not 0 < args.seconds <= 3600 or not 0 < args.clients <= 256:
        parser.error("--seconds must be in (0, 3600] and --clients in [1, 256]")

    requests = Requests(example_images())
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        print(f"starting blipkit serve --model {args.model} on 127.0.0.1:{port} ...", file=sys.stderr)
        options = ["--model", args.model, "--host", "127.0.0.1", "--max-image-mb", str(MAX_IMAGE_MB)]
        server = start_server(options, port, log, args.startup_s)
        try:
            base = f"http://127.0.0.1:{port}"
            rss = {"loaded": memory_mb(server.pid)}
            with httpx.Client(base_url=base, timeout=120) as client:
                for kind in KINDS:
                    requests.send(client, kind, random.Random(0))
            rss["start"] = rss["peak"] = memory_mb(server.pid)
            outcomes: list[Outcome] = []
            until = time.monotonic() + args.seconds
            threads = [
                threading.Thread(target=client_loop, args=(base, requests, i, until, outcomes))
                for i in range(args.clients)
            ]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                now = memory_mb(server.pid)
                rss["peak"] = max(rss["peak"], now, key=lambda m: m["VmRSS"])
                time.sleep(1)
            rss["end"] = memory_mb(server.pid)
            rss["peak"] = max(rss["peak"], rss["end"], key=lambda m: m["VmRSS"])
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        text = report(args, outcomes, rss, log.read_text())
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if all(o.expected for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
