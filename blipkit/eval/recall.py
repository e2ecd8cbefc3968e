"""Recall@K for image-text retrieval in both directions, with ITC scores alone and with ITM re-ranking.

Texts that are the same string are merged into one query; a text is relevant to every image it was paired
with, so duplicate captions ("a red circle" on forty images) do not make the task ill-posed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from blipkit.errors import UsageError

__all__ = ["group_pairs", "image_features", "recall_at_k", "rerank_scores", "retrieval_eval"]


def group_pairs(images: Sequence[str], texts: Sequence[str]) -> tuple[list[str], list[str], Tensor]:
    """Unique images, unique texts and the (N_img, N_txt) boolean relevance of (image, text) pairs."""
    if len(images) != len(texts):
        raise UsageError(f"{len(images)} images but {len(texts)} texts")
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


def rerank_scores(scores: Tensor, top: int, score_pairs) -> Tensor:
    """Scores where each row's ``top`` best are re-ordered by new scores and kept above the rest (whose ITC
    order is unchanged). ``score_pairs(rows, cols) -> (len(rows),)`` scores all (row, column) pairs."""
    top = min(top, scores.shape[1])
    cols = scores.topk(top, dim=1).indices  # (R, top)
    rows = torch.arange(scores.shape[0]).repeat_interleave(top)
    new = score_pairs(rows.tolist(), cols.flatten().tolist()).float().view(-1, top)
    lifted = new - new.amin(dim=1, keepdim=True) + scores.max() + 1.0  # above every score left in ITC order
    return scores.clone().scatter_(1, cols, lifted)


def _pair_logits(model, vision: Tensor, image_rows: list[int], texts: list[str], chunk: int = 256) -> Tensor:
    """ITM match logits of (vision[image_rows[i]], texts[i]) pairs, a chunk at a time."""
    from blipkit.retrieval.search import itm_logits

    parts = [
        itm_logits(model, vision[image_rows[a : a + chunk]], texts[a : a + chunk])
        for a in range(0, len(texts), chunk)
    ]
    return torch.cat(parts)


@torch.inference_mode()
def image_features(model, images: Sequence) -> tuple[Tensor, Tensor]:
    """(per-query ITC embeddings (N, Q, E), frozen vision features (N, P, Dv)), both on the CPU."""
    queries, feats = [], []
    for i in range(0, len(images), model.batch_size):
        f = model.image_features(list(images[i : i + model.batch_size]))  # (b, P, Dv)
        queries.append(model.model.image_embeddings(f).float().cpu())  # (b, Q, E)
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

        def t2i(rows: list[int], cols: list[int]) -> Tensor:  # rows: texts, cols: images
            return _pair_logits(model, vision, cols, [texts[j] for j in rows]) + sims[cols, rows]

        def i2t(rows: list[int], cols: list[int]) -> Tensor:  # rows: images, cols: texts
            return _pair_logits(model, vision, rows, [texts[j] for j in cols]) + sims[rows, cols]

        report["itc+itm"] = {
            "text_to_image": recall_at_k(rerank_scores(sims.T, rerank, t2i), relevant.T, ks),
            "image_to_text": recall_at_k(rerank_scores(sims, rerank, i2t), relevant, ks),
        }
        report["rerank_top"] = rerank
    return report
