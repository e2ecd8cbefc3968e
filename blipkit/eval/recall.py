"""Recall@K for image-text retrieval in both directions, with ITC scores alone and with ITM re-ranking.

Texts that are the same string are merged into one query; a text is relevant to every image it was paired
with, so duplicate captions ("a red circle" on forty images) do not make the task ill-posed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["group_pairs", "image_features", "recall_at_k", "rerank_scores", "retrieval_eval"]


def group_pairs(images: Sequence[str], texts: Sequence[str]) -> tuple[list[str], list[str], Tensor]:
    """Unique images, unique texts and the (N_img, N_txt) boolean relevance of (image, text) pairs."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    uniq_images = list(dict.fromkeys(images))
    uniq_texts = list(dict.fromkeys(texts))
    row = {x: i for i, x in enumerate(uniq_images)}
    col = {x: j for j, x in enumerate(uniq_texts)}
    relevant = torch.zeros(len(uniq_images), len(uniq_texts), dtype=torch.bool)
    for image, text in zip(images, texts, strict=True):
        relevant[row[image], col[text]] = True
    return uniq_images, uniq_texts, relevant


def recall_at_k(scores: Tensor, relevant: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Share of queries (rows) with a relevant candidate among their ``k`` best-scored columns."""
    order = scores.argsort(dim=1, descending=True, stable=True)  # (Nq, Nc)
    hit = relevant.gather(1, order)  # relevance in ranked order
    found, first = hit.any(dim=1), hit.float().argmax(dim=1)  # rank of the first relevant candidate
    return {f"R@{k}": float((found & (first < k)).float().mean()) for k in ks}


def rerank_scores(scores: Tensor, top: int, score_fn) -> Tensor:
    """Scores where each row's ``top`` best are re-ordered by ``score_fn(row, columns) -> (top,)`` and kept
    above the rest (whose ITC order is unchanged)."""
    out = scores.clone()
    top = min(top, scores.shape[1])
    for r in range(scores.shape[0]):
        cols = scores[r].topk(top).indices
        new = score_fn(r, cols.tolist()).float()
        out[r, cols] = new - new.min() + scores.max() + 1.0  # above every score left in ITC order
    return out


@torch.inference_mode()
def image_features(model, images: Sequence) -> tuple[Tensor, Tensor]:
    """(per-query ITC embeddings (N, Q, E), frozen vision features (N, P, Dv)), both on the CPU."""
    from blipkit.retrieval.search import encode_images

    queries, feats = [], []
    for i in range(0, len(images), model.batch_size):
        f = encode_images(model, list(images[i : i + model.batch_size]))  # (b, P, Dv)
        queries.append(model.model.qformer.image_features(f).float().cpu())  # (b, Q, E)
        feats.append(f.cpu())
    return torch.cat(queries), torch.cat(feats)


@torch.inference_mode()
def retrieval_eval(
    model,
    images: Sequence,
    texts: Sequence[str],
    relevant: Tensor,
    ks=(1, 5, 10),
    rerank: int = 0,
    features: tuple[Tensor, Tensor] | None = None,
) -> dict:
    """R@K text->image and image->text from ITC (max over queries), and with ITM re-ranking of the
    ``rerank`` best when ``rerank`` > 0 (score = ITM match logit + ITC, as BLIP-2 does).
    ``features``: the output of ``image_features(model, images)``, when already computed."""
    from blipkit.retrieval.search import itm_logits

    image_q, vision = features if features is not None else image_features(model, images)
    text_e = model.embed_texts(list(texts)).cpu()
    sims = torch.einsum("nqe,me->nqm", image_q, text_e).amax(dim=1)  # (N_img, N_txt)
    report = {
        "images": len(images),
        "texts": len(texts),
        "itc": {
            "text_to_image": recall_at_k(sims.T, relevant.T, ks),
            "image_to_text": recall_at_k(sims, relevant, ks),
        },
    }
    if rerank:

        def t2i(j: int, cols: list[int]) -> Tensor:
            return itm_logits(model, vision[cols], [texts[j]] * len(cols)) + sims[cols, j]

        def i2t(i: int, cols: list[int]) -> Tensor:
            pair = vision[i : i + 1].expand(len(cols), -1, -1)
            return itm_logits(model, pair, [texts[j] for j in cols]) + sims[i, cols]

        report["itc+itm"] = {
            "text_to_image": recall_at_k(rerank_scores(sims.T, rerank, t2i), relevant.T, ks),
            "image_to_text": recall_at_k(rerank_scores(sims, rerank, i2t), relevant, ks),
        }
        report["rerank_top"] = rerank
    return report
