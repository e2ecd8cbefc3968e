"""Greedy exact-match VQA accuracy of a checkpoint on easy-VQA, from cached image features (fast).

``python -m blipkit.train.vqa_eval CHECKPOINT [--split test] [--limit N] [--variant V]`` prints overall,
yes/no, shape and colour accuracy; answers are compared after ``strip().lower()``. Variants (held out from
training, run through the image processor and encoder): ``bigger`` (200x200 images), ``moved`` (shape
resized and moved on a larger canvas), ``paraphrased`` (questions in wordings easy-VQA never uses).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import replace

import numpy as np
import torch

from blipkit import assets, loading
from blipkit.data import easy_vqa
from blipkit.processing import ImageProcessor, tokenize
from blipkit.train.features import cached_features


def answer_kind(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in easy_vqa.SHAPES else "color"


def _variant_features(model, processor, examples, variant: str) -> dict[str, np.ndarray]:
    """Encoder features of each example's image after the variant's change: {image path: (P, Dv)}."""
    from blipkit.processing import load_image
    from blipkit.train import generalisation

    out = {}
    for path in sorted({e.image for e in examples}):
        image = load_image(path)
        if variant == "bigger":
            image = generalisation.bigger(image)
        elif variant == "moved":
            image = generalisation.moved(image, path)
        pixels = processor.preprocess(image)[None]
        out[path] = model.encode_image(pixels)[0].float().numpy()
    return out


@torch.inference_mode()
def evaluate(
    checkpoint: str, split: str = "test", limit: int = 0, batch_size: int = 64, variant: str = "none"
) -> dict:
    loaded = loading.load_checkpoint(checkpoint)
    model, tok, q_tok = loaded.model, loaded.tokenizer, loaded.qformer_tokenizer
    cfg = model.config
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    images = sorted(set(easy_vqa.image_paths(split).values()))
    position = {p: i for i, p in enumerate(images)}

    def make_encoder():
        return model.vision

    processor = ImageProcessor.from_dict(cfg.processor)
    root = assets.cache_dir() / "features"
    features = cached_features(
        make_encoder, images, processor, root, cfg.vision.pretrained or cfg.vision.kind
    )
    examples = easy_vqa.vqa_examples(split)
    if variant == "paraphrased":
        from blipkit.train.generalisation import paraphrase

        examples = [replace(e, question=paraphrase(e.question)) for e in examples if paraphrase(e.question)]
    if limit:
        examples = [examples[i] for i in np.random.default_rng(0).permutation(len(examples))[:limit]]
    changed = None
    if variant in ("bigger", "moved", "paraphrased"):  # through the encoder, as at inference
        changed = _variant_features(model, processor, examples, variant)
    hits, totals = defaultdict(int), defaultdict(int)
    start = time.perf_counter()
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        prompts = [cfg.prompts.vqa.format(e.question) for e in chunk]
        rows = [changed[e.image] if changed else features[position[e.image], 0] for e in chunk]
        embeds = torch.from_numpy(np.stack(rows)).float()
        ids, mask = tokenize(tok, prompts, padding_side="left")
        q = q_tok(prompts, padding=True, return_tensors="pt")
        out = model.generate(
            None,
            ids,
            mask,
            image_embeds=embeds,
            qformer_input_ids=q["input_ids"],
            qformer_attention_mask=q["attention_mask"],
            max_new_tokens=cfg.prompts.vqa_max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        for e, text in zip(chunk, tok.batch_decode(out, skip_special_tokens=True), strict=True):
            ok = text.strip().lower() == e.answer.strip().lower()
            for key in ("overall", answer_kind(e.answer)):
                hits[key] += ok
                totals[key] += 1
    result = {k: hits[k] / totals[k] for k in totals} | {"questions": totals["overall"]}
    return result | {"seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blipkit.train.vqa_eval")
    parser.add_argument("checkpoint")
    parser.add_argument("--split", default="test", choices=easy_vqa.SPLITS)
    parser.add_argument("--limit", type=int, default=0, help="evaluate a fixed random subset of this size")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--variant", default="none", choices=["none", "bigger", "moved", "paraphrased"])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = evaluate(args.checkpoint, args.split, args.limit, variant=args.variant)
    print(json.dumps({"variant": args.variant} | result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
