"""Captioning throughput: blipkit's batch engine vs transformers' Blip2 ``generate`` (batched and one by one).

A BLIP-2 of realistic proportions is built from config with random weights (no downloads): a ViT at 224 px
with patch 14 (257 tokens), a Q-Former with 32 queries (cross-attention every 2nd layer) and an
OPT-125m-sized LLM (768 wide, 12 layers, vocab 50272). blipkit loads the same weights; greedy decoding, the
same prompt and ``max_new_tokens`` for all. Images are JPEG files on disk: every rate includes decoding.

    python bench/caption_throughput.py --images 16 --batch-size 8 --max-new-tokens 20 --report
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "a photo of"
WORDS = ["a", "photo", "of"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_tokenizer(vocab_size: int):
    """A word-level tokenizer with OPT's specials and ``vocab_size`` entries (synthetic words)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    names = specials + WORDS + [f"w{i}" for i in range(vocab_size - len(specials) - len(WORDS) - 1)]
    vocab = {t: i for i, t in enumerate(names)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.add_tokens(["<image>"], special_tokens=True)  # the last id: transformers' image placeholder
    return fast


def build(path: Path, seed: int = 0, eos_token_id: int = 2):
    """Save a random transformers BLIP-2 (realistic shape ratios) to ``path``; return it and its processor.
    ``eos_token_id`` names the token that ends a caption (``</s>`` by default); weights follow ``seed``."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessorPil,
        OPTConfig,
    )

    tok = make_tokenizer(50272)
    tok.eos_token = tok.convert_ids_to_tokens(eos_token_id)
    vision = Blip2VisionConfig(
        hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
        image_size=224, patch_size=14, qkv_bias=True,
    )  # fmt: skip
    qformer = Blip2QFormerConfig(
        hidden_size=384, num_hidden_layers=4, num_attention_heads=6, intermediate_size=1536,
        cross_attention_frequency=2, encoder_hidden_size=384,
    )  # fmt: skip
    text = OPTConfig(
        vocab_size=len(tok), hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
        word_embed_proj_dim=768, max_position_embeddings=2048,
        pad_token_id=0, bos_token_id=1, eos_token_id=eos_token_id,
    )  # fmt: skip
    config = Blip2Config(
        vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=32,
        image_token_index=len(tok) - 1,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move every weight off its init value (zero query tokens, unit LayerNorms, ...)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    processor = Blip2Processor(
        BlipImageProcessorPil(size={"height": 224, "width": 224}), tok, num_query_tokens=32
    )
    processor.save_pretrained(path)
    return model, processor


def easy_vqa_images(n: int) -> list[Path]:
    """The first ``n`` easy-VQA test images (shapes the default model was trained on)."""
    import easy_vqa

    paths = easy_vqa.get_test_image_paths()
    return [Path(paths[i]) for i in sorted(paths)[:n]]


def cpu_bf16() -> str:
    """Whether this CPU multiplies bf16 natively (otherwise bf16 is emulated and slow)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join(found) or "none (emulated)"


def make_images(folder: Path, n: int) -> list[Path]:
    """``n`` 640x480 JPEGs: smooth colour fields with noise, like photos in size and decode cost."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    paths = []
    for i in range(n):
        base = np.stack([(xx * (i + 1) % 256), (yy * 2 % 256), ((xx + yy) // 4 % 256)], -1)
        img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        p = folder / f"photo{i:04d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        paths.append(p)
    return paths


def hf_captions(model, processor, files: list[Path], batch_size: int, max_new_tokens: int) -> list[str]:
    """transformers' own path: decode with PIL, Blip2Processor, ``Blip2ForConditionalGeneration.generate``."""
    out = []
    for i in range(0, len(files), batch_size):
        images = [Image.open(f).convert("RGB") for f in files[i : i + batch_size]]
        inputs = processor(images=images, text=[PROMPT] * len(images), return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        out.extend(t.strip() for t in processor.tokenizer.batch_decode(ids, skip_special_tokens=True))
    return [c[len(PROMPT) :].strip() if c.startswith(PROMPT) else c for c in out]


def blipkit_captions(
    model,
    files: list[Path],
    batch_size: int,
    max_new_tokens: int,
    workers: int,
    prompt: str | None = PROMPT,
    greedy_head: bool = True,
) -> list[str]:
    """blipkit's batch engine: lazy batches decoded in DataLoader workers, the lean greedy loop."""
    from blipkit.batch.decode import batches
    from blipkit.batch.generate import Captioner

    captioner = Captioner(model, prompt, max_new_tokens, greedy_head=greedy_head)
    items = ((str(f), str(f)) for f in files)
    out = []
    for batch in batches(model.processor, items, batch_size, workers):
        out.extend(captioner(batch.pixels))
    return out


def timed(fn, n_images: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    caps = fn()
    return n_images / (time.perf_counter() - start), caps


def default_model_runs(files: list[Path], batch_size: int, max_new_tokens: int, dtype: str) -> dict:
    """The embedded default model: blipkit's batch engine vs ``Model.caption``, whose decoding is
    transformers' ``generate`` over the same LLM (transformers has no class for this model). The plain row
    runs torch's own kernels; ``_onednn`` is the same loop over the packed layers the engine uses."""
    import blipkit

    plain = blipkit.load("default", dtype=dtype, kernels="default")
    fast = blipkit.load("default", dtype=dtype)

    def generic(model):
        out = []
        for i in range(0, len(files), batch_size):
            chunk = [str(f) for f in files[i : i + batch_size]]
            # any generate option sends decoding through transformers' loop; use_cache=True changes nothing
            out.extend(model.caption(chunk, max_new_tokens=max_new_tokens, use_cache=True))
        return out

    def engine():
        return blipkit_captions(fast, files, batch_size, max_new_tokens, 1, prompt=None)

    return {
        f"default_generate_{dtype}": partial(generic, plain),
        f"default_generate_{dtype}_onednn": partial(generic, fast),
        f"default_engine_{dtype}": engine,
    }


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of the best ``sum`` over a ``gib``-GiB fp32 tensor: what a decoding step can read at most."""
    x = torch.ones(int(gib * 2**30 / 4))
    x.sum()
    best = min(_seconds(x.sum) for _ in range(repeats))
    return x.numel() * 4 / best


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.inference_mode()
def decode_step_seconds(llm, batch_size: int, context: int = 60, steps: int = 10) -> float:
    """Median seconds of one greedy decoding step of ``llm`` for ``batch_size`` rows after ``context``
    cached positions (the full vocabulary projected, as transformers does)."""
    ids = torch.randint(4, 1000, (batch_size, context))
    out = llm(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, times = out.past_key_values, []
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        start = time.perf_counter()
        out = llm(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s weights, each shared tensor once (what one decoding step reads)."""
    seen: dict[int, int] = {}
    for m in module.modules():
        for p in m.parameters(recurse=False):
            seen[id(p)] = p.numel() * p.element_size()
        if getattr(m, "packed", None) is not None and m._dense is None:  # held only in packed form
            seen[id(m)] = m.in_features * m.out_features * 4
    return sum(seen.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16, help="images for the batched rates")
    ap.add_argument("--single-images", type=int, default=4, help="images for the one-at-a-time rate")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--large-batch", type=int, default=32, help="fp32 rows at this batch size too, both sides (0: none)"
    )
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1, help="decoding processes for blipkit")
    ap.add_argument("--dtypes", default="fp32,bf16", help="weight dtypes of the frozen parts, both sides")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best round counts")
    ap.add_argument("--no-default", action="store_true", help="skip the embedded default model rows")
    ap.add_argument("--report", action="store_true", help="write reports/caption-throughput.md")
    ap.add_argument(
        "--continuous", action="store_true", help="continuous vs static rows, mixed caption lengths"
    )
    args = ap.parse_args(argv)

    import blipkit

    tmp = Path(tempfile.mkdtemp(prefix="caption-bench-"))
    hf32, processor = build(tmp / "model")
    files = make_images(tmp / "images", max(args.images, args.single_images))
    B, N = args.batch_size, args.max_new_tokens
    dtypes = [d for d in args.dtypes.split(",") if d]
    runs: dict[str, tuple] = {}
    steps: dict[str, tuple[float, torch.nn.Module]] = {}  # one decoding step: (seconds, the LLM)
    for d in dtypes:
        hf = hf32 if d == "fp32" else copy.deepcopy(hf32).to(DTYPES[d])
        ours = blipkit.load(tmp / "model", dtype=d)
        torch_kernels = blipkit.load(tmp / "model", dtype=d, kernels="default")
        runs[f"hf_batched_{d}"] = (
            partial(hf_captions, hf, processor, files[: args.images], B, N),
            args.images,
        )
        runs[f"hf_single_{d}"] = (
            partial(hf_captions, hf, processor, files[: args.single_images], 1, N),
            args.single_images,
        )
        runs[f"blipkit_{d}"] = (
            partial(blipkit_captions, ours, files[: args.images], B, N, args.workers),
            args.images,
        )
        runs[f"blipkit_{d}_torch_kernels"] = (  # the same loop through torch's own CPU kernels
            partial(blipkit_captions, torch_kernels, files[: args.images], B, N, args.workers),
            args.images,
        )
        if d == "fp32":  # int8 frozen towers (blipkit.models.quantize), against the fp32 rows
            int8 = blipkit.load(tmp / "model", quantize="int8")
            runs["blipkit_int8"] = (
                partial(blipkit_captions, int8, files[: args.images], B, N, args.workers),
                args.images,
            )
        if d == "fp32" and args.large_batch:  # bandwidth-bound decoding: more rows per read of the weights
            L = args.large_batch
            runs[f"hf_batched_fp32_b{L}"] = (
                partial(hf_captions, hf, processor, files[: args.images], L, N),
                args.images,
            )
            runs[f"blipkit_fp32_b{L}"] = (
                partial(blipkit_captions, ours, files[: args.images], L, N, args.workers),
                args.images,
            )
        hf_captions(hf, processor, files[:2], 2, 2)  # warm-up: first-call allocations, lazy imports
        blipkit_captions(ours, files[:2], 2, 2, 0)
        blipkit_captions(torch_kernels, files[:2], 2, 2, 0)
        if d == "fp32":
            steps[f"transformers {d}"] = (decode_step_seconds(hf.language_model, B), hf.language_model)
            steps[f"blipkit {d}"] = (decode_step_seconds(ours.model.llm, B), ours.model.llm)
    if args.continuous:  # mixed caption lengths: continuous vs static batches (bench/continuous_batching.py)
        from continuous_batching import caption_job

        job, facts = caption_job(tmp / "continuous", args.images, B, 30)
        for name, fn in job.items():
            fn()  # warm-up
            runs[name] = (fn, args.images)
    if not args.no_default:
        shapes = easy_vqa_images(args.images)
        for d in dtypes:
            for name, fn in default_model_runs(shapes, B, N, d).items():
                fn()  # warm-up (and the one-time extraction of the frozen parts)
                runs[name] = (fn, len(shapes))
    rates: dict[str, list[float]] = {k: [] for k in runs}
    captions: dict[str, list[str]] = {}
    for r in range(args.repeats):
        for name, (fn, n) in runs.items():
            rate, caps = timed(fn, n)
            rates[name].append(rate)
            captions[name] = caps
            print(f"round {r}: {name:<22} {rate:7.3f} img/s", file=sys.stderr, flush=True)

    best = {k: max(v) for k, v in rates.items()}

    def agree(a: str, b: str) -> float:
        return statistics.mean(x == y for x, y in zip(captions[a], captions[b], strict=True))

    lines = [
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 matmul support: "
        f"{cpu_bf16()}",
        f"- command: `python bench/caption_throughput.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
        f"- batch size {B}, max_new_tokens {N}, greedy, prompt {PROMPT!r}, {args.images} images "
        f"(one-at-a-time: {args.single_images}), best of {args.repeats} interleaved rounds; dtype = the "
        "frozen ViT and LLM (Q-Former and projection stay fp32 in blipkit, follow the dtype in transformers)",
        "",
        "| path | images/s (best) | all rounds |",
        "|---|---|---|",
    ]
    for k, v in rates.items():
        lines.append(f"| {k} | {best[k]:.3f} | {', '.join(f'{x:.3f}' for x in v)} |")
    lines.append("")

    def ratio(a: str, b: str) -> str:
        return f"**{best[a] / best[b]:.2f}x**"

    for d in dtypes:
        ours, batched, single = f"blipkit_{d}", f"hf_batched_{d}", f"hf_single_{d}"
        lines.append(
            f"- {d}: blipkit / transformers batched {ratio(ours, batched)}, / one at a time "
            f"{ratio(ours, single)}; same caption as transformers batched: {agree(ours, batched):.0%}"
        )
    if "fp32" in dtypes and args.large_batch:
        L = args.large_batch
        ours, theirs = f"blipkit_fp32_b{L}", f"hf_batched_fp32_b{L}"
        lines.append(
            f"- fp32 at batch size {L}: blipkit / transformers batched at {L} {ratio(ours, theirs)}, "
            f"/ transformers one at a time {ratio(ours, 'hf_single_fp32')}; "
            f"same caption as transformers batched: {agree(ours, theirs):.0%}"
        )
    for d in dtypes:
        if d != "fp32" and "fp32" in dtypes:
            ours = f"blipkit_{d}"
            lines.append(
                f"- blipkit {d} / transformers fp32 batched {ratio(ours, 'hf_batched_fp32')}, "
                f"/ one at a time "
                f"{ratio(ours, 'hf_single_fp32')}; same caption as transformers fp32: "
                f"{agree(ours, 'hf_batched_fp32'):.0%}"
            )
    if "blipkit_int8" in best:
        lines.append(
            f"- int8: blipkit int8 / transformers fp32 batched {ratio('blipkit_int8', 'hf_batched_fp32')}, / "
            f"blipkit fp32 {ratio('blipkit_int8', 'blipkit_fp32')}; same caption as blipkit fp32: "
            f"{agree('blipkit_int8', 'blipkit_fp32'):.0%} (random weights: near-tied logits flip)"
        )
    if args.continuous:
        lines.append(
            f"- mixed caption lengths (max 30 tokens): continuous / static batches "
            f"{ratio('caption_continuous', 'caption_static')}; same captions "
            f"{agree('caption_continuous', 'caption_static'):.0%}"
        )
    for d in dtypes:
        ours, theirs = f"blipkit_{d}", f"blipkit_{d}_torch_kernels"
        lines.append(
            f"- {d}: blipkit's kernels / torch's own kernels {ratio(ours, theirs)}; same caption "
            f"{agree(ours, theirs):.0%}"
        )
    if not args.no_default:
        for d in dtypes:
            g, o, e = f"default_generate_{d}", f"default_generate_{d}_onednn", f"default_engine_{d}"
            lines.append(
                f"- default model {d}: engine / plain generate {ratio(e, g)}, / generate over the same "
                f"kernels {ratio(e, o)}; same caption {agree(e, g):.0%}"
            )
    if steps:
        bandwidth = read_bandwidth()
        lines.append(f"- read bandwidth (best `sum` over 1 GiB): {bandwidth / 1e9:.1f} GB/s")
        for name, (seconds, llm) in steps.items():
            moved = weight_bytes(llm) / seconds
            lines.append(
                f"- one decoding step, batch {B}, {name}: {seconds * 1e3:.1f} ms, weights read at "
                f"{moved / 1e9:.1f} GB/s = {moved / bandwidth:.0%} of the bound"
            )
    text = "\n".join(lines)
    print(text)
    if args.report:
        out = ROOT / "reports" / "caption-throughput.md"
        out.write_text(
            "# Caption throughput: blipkit batch engine vs transformers' Blip2 generate\n\n" + text + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
