"""Image-cache and batching benchmark for ``blipkit serve``.

1. Eight questions about one image: blipkit's serving engine (visual prompt and the LLM's keys/values over
   it cached by image hash) against transformers' ``Blip2ForConditionalGeneration.generate``, which
   re-encodes the image for every question.
2. Throughput of a real uvicorn server: 16 concurrent clients against one client at a time.

The model has BLIP-2's proportions with random weights built from a config (no downloads): EVA ViT-g
(224 px -> 257 tokens x 1408, 39 layers), Q-Former (bert-base, 32 queries), OPT-125m-sized LLM.

    nice -n 19 python bench/serve_cache.py --out reports/serve-bench.md
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    OPTConfig,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import blipkit  # noqa: E402
from blipkit.serve.engine import Engine  # noqa: E402

QUESTIONS = [
    "what is in the picture?",
    "what color is the sky?",
    "how many people are there?",
    "is it day or night?",
    "what is the man holding?",
    "where was this taken?",
    "what is on the table?",
    "is there a dog?",
]
VOCAB = 50272  # OPT
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


def opt_like_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer with OPT's vocabulary size and special ids; the last id is ``<image>``."""
    words = sorted(
        {w for q in QUESTIONS for w in q.replace("?", " ").split()} | {"Question", "Answer", ":", "?"}
    )
    names = SPECIALS + words + [f"w{i}" for i in range(VOCAB - 1 - len(SPECIALS) - len(words))]
    vocab = {t: i for i, t in enumerate(names)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    out = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    out.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    return out


def build_model(
    path: Path, vision_layers: int, vision_width: int, smoke: bool = False
) -> Blip2ForConditionalGeneration:
    """Random BLIP-2 saved to ``path``; ``smoke`` shrinks the Q-Former and LLM to check the script quickly."""
    tok = opt_like_tokenizer()
    qformer = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    llm = {
        "hidden_size": 64,
        "word_embed_proj_dim": 64,
        "ffn_dim": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    heads = 16 if vision_width % 16 == 0 else 12
    opt = {  # OPT-125m
        "vocab_size": len(tok),
        "hidden_size": 768,
        "ffn_dim": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 2048,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        **(llm if smoke else {}),
    }
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=vision_width,
            intermediate_size=int(vision_width * 4.3636) // 64 * 64,  # ViT-g: 1408 -> 6144
            num_hidden_layers=vision_layers,
            num_attention_heads=heads,
            image_size=224,
            patch_size=14,
        ),
        # bert-base, cross-attention every 2nd layer
        qformer_config=Blip2QFormerConfig(encoder_hidden_size=vision_width, **(qformer if smoke else {})),
        text_config=OPTConfig(**opt),
        num_query_tokens=32,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.query_tokens.normal_(0, 0.02)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    proc = transformers.BlipImageProcessor(size={"height": 224, "width": 224})
    proc.save_pretrained(path)
    return model


def photo(shift: int = 0) -> bytes:
    """A 640x480 JPEG with some structure (``shift`` gives another image)."""
    yy, xx = np.mgrid[0:480, 0:640]
    arr = np.stack([(xx + shift) % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def bench_transformers(
    hf, bk: blipkit.Model, image: bytes, tokens: int, questions: tuple[str, ...] = QUESTIONS
) -> tuple[list[float], list[str]]:
    """transformers: every question re-decodes and re-encodes the image."""
    tok, image_id, q = bk.tokenizer, hf.config.image_token_id, hf.config.num_query_tokens
    times, answers = [], []
    for question in questions:
        start = time.perf_counter()
        pixels = bk.processor(image)  # decode + resize + normalise
        ids = [image_id] * q + tok(f"Question: {question} Answer:")["input_ids"]
        with torch.inference_mode():
            out = hf.generate(
                pixel_values=pixels,
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=tokens,
                do_sample=False,
                num_beams=1,
            )
        times.append(time.perf_counter() - start)
        answers.append(
            tok.decode(out[0, len(ids) :] if out.shape[1] > tokens else out[0], skip_special_tokens=True)
        )
    return times, answers


def bench_blipkit(
    engine: Engine, image: bytes, tokens: int, questions: tuple[str, ...] = QUESTIONS
) -> tuple[list[float], list[str]]:
    """blipkit: the first question encodes the image, the others reuse its cached visual prompt and KV."""
    key = f"bench-{len(image)}-{hash(image)}"
    times, answers = [], []
    for question in questions:
        start = time.perf_counter()
        answers.append(engine.run(image, key, engine.prompt([], question, tokens), max_tokens=tokens).text)
        times.append(time.perf_counter() - start)
    return times, answers


def bench_clients(engine: Engine, image: bytes, clients: int, rounds: int, tokens: int) -> dict[str, float]:
    """Requests/s through a real uvicorn server: one client at a time vs ``clients`` at once."""
    import base64

    import httpx
    import uvicorn

    from blipkit.serve import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions"
    server = uvicorn.Server(uvicorn.Config(create_app(engine.model, engine=engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    uri = "data:image/jpeg;base64," + base64.b64encode(image).decode()

    def request(client: httpx.Client, i: int) -> float:
        content = [
            {"type": "image_url", "image_url": {"url": uri}},
            {"type": "text", "text": QUESTIONS[i % 8]},
        ]
        start = time.perf_counter()
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": tokens}
        r = client.post(url, json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - start

    total = clients * rounds
    with httpx.Client() as client:
        request(client, 0)  # warm: the image is cached from here on
        start = time.perf_counter()
        serial = [request(client, i) for i in range(total)]
        serial_s = time.perf_counter() - start

    latencies: list[float] = []
    barrier = threading.Barrier(clients)

    def client_loop(c: int) -> None:
        with httpx.Client() as client:
            barrier.wait()
            for r in range(rounds):
                latencies.append(request(client, c * rounds + r))

    batches_before = engine.batches
    workers = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    concurrent_s = time.perf_counter() - start
    server.should_exit = True
    thread.join(10)
    return {
        "requests": total,
        "serial_s": serial_s,
        "serial_rps": total / serial_s,
        "serial_latency": statistics.mean(serial),
        "concurrent_s": concurrent_s,
        "concurrent_rps": total / concurrent_s,
        "concurrent_latency": statistics.mean(latencies),
        "batches": engine.batches - batches_before,
        "largest_batch": engine.largest_batch,
    }


def bench_mixed(
    model: blipkit.Model,
    image: bytes,
    clients: int,
    requests: list[tuple[str, int]],
    slots: int = 8,
    rounds: int = 2,
) -> dict[str, object]:
    """``clients`` concurrent requests (question, max_tokens) about one cached image, on engines of ``slots``
    rows (the server's default batch) that batch continuously or wait for their longest request; the best of
    ``rounds`` interleaved rounds each, and whether every answer is the same."""
    engines = {"static": Engine(model, slots, continuous=False), "continuous": Engine(model, slots)}
    key = f"mixed-{hash(image)}"
    walls: dict[str, list[float]] = {name: [] for name in engines}
    texts: dict[str, list[str]] = {}
    lengths: list[int] = []

    def one(engine: Engine, i: int) -> tuple[str, int]:
        question, budget = requests[i % len(requests)]
        result = engine.run(image, key, engine.prompt([], question, budget), max_tokens=budget)
        return result.text, result.completion_tokens

    for engine in engines.values():
        one(engine, 0)  # warm: the image is cached from here on
    for _ in range(rounds):
        for name, engine in engines.items():
            out: list = [None] * clients
            barrier = threading.Barrier(clients)

            def client(i: int, engine: Engine = engine, out: list = out, barrier=barrier) -> None:
                barrier.wait()
                out[i] = one(engine, i)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            walls[name].append(time.perf_counter() - start)
            texts[name] = [text for text, _ in out]
            lengths = [n for _, n in out]
    for engine in engines.values():
        engine.stop()
    best = {name: min(v) for name, v in walls.items()}
    return {
        "walls": walls,
        "rps": {name: clients / b for name, b in best.items()},
        "gain": best["static"] / best["continuous"],
        "same": sum(a == b for a, b in zip(texts["static"], texts["continuous"], strict=True)),
        "lengths": lengths,
    }


def mixed_lines(title: str, stats: dict, clients: int, slots: int) -> list[str]:
    lengths = stats["lengths"]
    return [
        f"### {title}",
        "",
        f"{clients} concurrent requests, server batch {slots}, new tokens per answer: min {min(lengths)}, "
        f"mean {statistics.mean(lengths):.1f}, max {max(lengths)}.",
        "",
        "| batching | wall (s), best | all rounds | requests/s |",
        "|---|---|---|---|",
        *(
            f"| {name} | {min(w):.2f} | {', '.join(f'{x:.2f}' for x in w)} | {stats['rps'][name]:.2f} |"
            for name, w in stats["walls"].items()
        ),
        "",
        f"Continuous / static: **{stats['gain']:.2f}x**; same answers {stats['same']}/{clients}.",
    ]


MIXED_LLAVA = [
    ("What shape is in the image?", 30),
    ("Describe the image.", 30),
    ("What color is the shape?", 30),
    ("Describe the image.", 30),
]


def bench_default(tokens: int, image: bytes) -> str:
    try:
        model = blipkit.load("default")
    except Exception as e:  # the embedded default needs its assets
        return f'`blipkit.load("default")` is not available here ({type(e).__name__}: {e}); not measured.'
    cached = Engine(model)
    uncached = Engine(model, cache_size=0)
    t_cached, _ = bench_blipkit(cached, image, tokens)
    t_uncached, _ = bench_blipkit(uncached, image, tokens)
    cached.stop()
    uncached.stop()
    return (
        f"Default model, 8 questions: cache off {sum(t_uncached):.2f} s, cache on {sum(t_cached):.2f} s "
        f"({sum(t_uncached) / sum(t_cached):.1f}x)."
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=None, help="write a markdown report here")
    parser.add_argument("--max-new-tokens", type=int, default=10, help="BLIP-2's VQA default")
    parser.add_argument("--vision-layers", type=int, default=39)
    parser.add_argument("--vision-width", type=int, default=1408)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1, help="requests per client in the throughput test")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default; 1 is fastest on a busy machine)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny Q-Former and LLM: checks the script only")
    parser.add_argument("--skip-default", action="store_true", help="do not try blipkit.load('default')")
    parser.add_argument("--mixed-only", action="store_true", help="only the mixed-length batching rows")
    parser.add_argument("--long-tokens", type=int, default=30, help="the long requests' max_tokens")
    parser.add_argument("--mixed-rounds", type=int, default=2, help="interleaved rounds of the mixed rows")
    parser.add_argument("--mixed-batch", type=int, default=8, help="server batch size of the mixed rows")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    image, n = photo(), args.max_new_tokens
    lines = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    with tempfile.TemporaryDirectory(prefix="blipkit-bench-") as tmp:
        t0 = time.perf_counter()
        hf = build_model(Path(tmp), args.vision_layers, args.vision_width, args.smoke)
        bk = blipkit.load(tmp)
        print(f"built and loaded in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if args.mixed_only:
        mixed_section(bk, image, args, say)
        return write_report(args, lines)
    engine = Engine(bk, max_batch_size=args.clients, batch_window_ms=10)
    # warm-up on another image, not timed: first-call allocations and lazy initialisation on both sides
    bench_transformers(hf, bk, photo(shift=1), 2, QUESTIONS[:1])
    bench_blipkit(engine, photo(shift=1), 2, QUESTIONS[:1])
    hf_times, hf_answers = bench_transformers(hf, bk, image, n)
    bk_times, bk_answers = bench_blipkit(engine, image, n)
    del hf
    same = sum(a == b for a, b in zip(hf_answers, bk_answers, strict=True))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    say("## Image cache: 8 questions about one image")
    say()
    say(
        f"Model: BLIP-2 proportions, random weights: ViT {args.vision_layers} layers x {args.vision_width} "
        f"(257 tokens), Q-Former bert-base with 32 queries, OPT-125m-sized LLM (vocab {VOCAB}); greedy, "
        f"max_new_tokens={n}. CPU: {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {load:.1f} at the start; both sides warmed up on "
        "another image first."
    )
    say()
    say("| question | transformers (s) | blipkit engine (s) |")
    say("|---|---|---|")
    for i, (a, b) in enumerate(zip(hf_times, bk_times, strict=True)):
        say(f"| {i + 1} | {a:.2f} | {b:.2f}{' (encodes the image)' if i == 0 else ''} |")
    speedup = sum(hf_times) / sum(bk_times)
    say(f"| **total** | **{sum(hf_times):.2f}** | **{sum(bk_times):.2f}** |")
    say()
    say(
        f"Speed-up over the 8 questions: **{speedup:.1f}x** (goal >= 4x). Follow-up questions alone: "
        f"{statistics.mean(hf_times[1:]) / statistics.mean(bk_times[1:]):.1f}x. "
        f"Same answers as transformers: {same}/8."
    )
    say()
    stats = bench_clients(engine, image, args.clients, args.rounds, n)
    engine.stop()
    say(f"## Throughput: {args.clients} concurrent clients vs one at a time")
    say()
    say(
        f"{stats['requests']} chat requests (HTTP, real uvicorn on 127.0.0.1) about the cached image, "
        f"max_tokens={n}; server max batch {args.clients}, window 10 ms."
    )
    say()
    say("| mode | wall (s) | requests/s | mean latency (s) |")
    say("|---|---|---|---|")
    say(
        f"| one at a time | {stats['serial_s']:.2f} | {stats['serial_rps']:.2f} "
        f"| {stats['serial_latency']:.2f} |"
    )
    say(
        f"| {args.clients} concurrent | {stats['concurrent_s']:.2f} | {stats['concurrent_rps']:.2f} "
        f"| {stats['concurrent_latency']:.2f} |"
    )
    say()
    say(
        f"Throughput gain: **{stats['concurrent_rps'] / stats['serial_rps']:.1f}x**; the concurrent run took "
        f"{stats['batches']} generate calls (largest batch {stats['largest_batch']})."
    )
    if not args.skip_default:
        say()
        say("## Default model")
        say()
        say(bench_default(n, image))
    say()
    mixed_section(bk, image, args, say)
    return write_report(args, lines)


def mixed_section(bk: blipkit.Model, image: bytes, args: argparse.Namespace, say) -> None:
    """Continuous vs static batching on mixed output lengths: short and long budgets on the random model
    (which never stops early), one-word answers and descriptions on the trained ``default-llava``."""
    say("## Mixed output lengths: continuous vs static batching")
    say()
    short = [(q, 2 if i % 2 == 0 else args.long_tokens) for i, q in enumerate(QUESTIONS)]
    stats = bench_mixed(bk, image, args.clients, short, args.mixed_batch, args.mixed_rounds)
    title = f"Random BLIP-2 above, max_tokens 2 and {args.long_tokens} alternating"
    for line in mixed_lines(title, stats, args.clients, args.mixed_batch):
        say(line)
    if args.skip_default:
        return
    try:
        llava = blipkit.load("default-llava")
    except Exception as e:  # the embedded default needs its assets
        say(f"\n`default-llava` is not available here ({type(e).__name__}: {e}); not measured.")
        return
    shape = (Path(__file__).resolve().parents[1] / "examples" / "blue_triangle.png").read_bytes()
    stats = bench_mixed(llava, shape, args.clients, MIXED_LLAVA, args.mixed_batch, args.mixed_rounds)
    say()
    title = "default-llava: short questions and 'Describe the image.'"
    for line in mixed_lines(title, stats, args.clients, args.mixed_batch):
        say(line)


def write_report(args: argparse.Namespace, lines: list[str]) -> int:
    if args.out:
        header = [
            "# blipkit serve: image cache and batching benchmark",
            "",
            f"`{' '.join(['python', *sys.argv])}`, {platform.machine()} CPU, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "",
        ]
        Path(args.out).write_text("\n".join(header + lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
