"""Retrieval goals on easy-VQA test images (never seen in training).

1. Zero-shot shape classification (circle / rectangle / triangle), for several prompt templates; goal >= 0.9.
2. Text->image R@1 on the test captions, ITC alone vs ITM re-ranking; goal: re-ranking improves it.
   The test images whose colour and shape are both known (888), the 35 captions the grammar makes ("a red
   circle", "a red shape", "a circle"), relevant by attribute (``easy_vqa.retrieval_set``).

    python bench/retrieval_goals.py --out reports/retrieval-goals.json [--model M] [--limit N] [--rerank 16]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

TEMPLATES = ("{}", "a {}", "a photo of {}", "a photo of a {}", "a {} shape")


def shape_accuracy(model, image_queries: torch.Tensor, shapes: list[str], template: str) -> float:
    """Zero-shot accuracy: the label with the highest ITC score (what ``Model.classify`` ranks first)."""
    labels = ["circle", "rectangle", "triangle"]
    text = model.embed_texts([template.format(label) for label in labels])  # (3, E)
    best = torch.einsum("nqe,me->nqm", image_queries, text).amax(dim=1).argmax(dim=1)
    return sum(labels[b] == s for b, s in zip(best.tolist(), shapes, strict=True)) / len(shapes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--limit", type=int, default=None, help="first N test images (default: all)")
    parser.add_argument("--rerank", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import blipkit
    from blipkit.data import easy_vqa
    from blipkit.eval.recall import image_features, retrieval_eval

    torch.manual_seed(0)
    model = blipkit.load(args.model, batch_size=64)
    images, texts, relevant, attributes = easy_vqa.retrieval_set("test", args.limit)
    relevant = torch.tensor(relevant)  # (N_img, N_txt)
    start = time.perf_counter()
    features = image_features(model, images)
    print(f"embedded {len(images)} images in {time.perf_counter() - start:.0f} s", flush=True)
    shapes = [a["shape"] for a in attributes]
    classify = {t: shape_accuracy(model, features[0], shapes, t) for t in TEMPLATES}
    print(json.dumps(classify), flush=True)
    recall = retrieval_eval(model, images, texts, relevant, rerank=args.rerank, features=features)
    report = {
        "model": args.model,
        "images": len(images),
        "zero_shot_shape_accuracy": classify,
        "retrieval": recall,
        "goals": {
            "shape_accuracy>=0.9": max(classify.values()) >= 0.9,
            "itm_improves_t2i_R@1": recall["itc+itm"]["text_to_image"]["R@1"]
            > recall["itc"]["text_to_image"]["R@1"],
        },
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
