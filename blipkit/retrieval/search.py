"""Top-K search of an image index: exact (torch) or FAISS, then optional ITM re-ranking as in BLIP-2.

A text is scored against an image by the max over the image's query embeddings (the ITC score). FAISS holds
every query vector (N*Q rows, inner product); the best ``k*Q`` rows always cover at least ``k`` distinct
images, and the first row of each image is its max, so both backends return the same ranking.
An example image is compared by pooled vectors (one per image).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from torch import Tensor

from blipkit.errors import CapabilityError, UsageError
from blipkit.extras import require
from blipkit.retrieval.index import ImageIndex

__all__ = [
    "FAISS_MIN_VECTORS",
    "Hit",
    "Searcher",
    "faiss_available",
    "itm_logits",
    "itm_pair_logits",
    "rerank",
]

FAISS_MIN_VECTORS = 200_000  # below this many query vectors exact search in torch is as fast


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


@dataclass
class Hit:
    index: int  # row in the index
    path: str
    score: float  # the final ranking score
    itc: float
    itm: float | None = None  # ITM "match" logit, when re-ranked
    itm_prob: float | None = None  # ITM match probability (softmax of the two ITM logits), when re-ranked

    def to_dict(self, rank: int) -> dict:
        row = {"rank": rank, "path": self.path, "score": round(self.score, 6), "itc": round(self.itc, 6)}
        return row if self.itm_prob is None else row | {"itm_prob": round(self.itm_prob, 6)}


class Searcher:
    """Nearest images of an index for text or image embeddings; ``backend`` is auto, exact or faiss."""

    def __init__(self, index: ImageIndex, backend: str = "auto"):
        if backend not in ("auto", "exact", "faiss"):
            raise UsageError(f"backend must be auto, exact or faiss, got {backend!r}")
        n_vectors = len(index) * index.embeddings.shape[1]
        if backend == "auto":
            backend = "faiss" if faiss_available() and n_vectors >= FAISS_MIN_VECTORS else "exact"
        if backend == "faiss" and not faiss_available():
            require("faiss", "the faiss search backend", "faiss", "faiss-cpu")
        self.index = index
        self.backend = backend
        self._faiss: dict[str, object] = {}

    def _faiss_index(self, kind: str):
        if kind not in self._faiss:
            import faiss

            vectors = self.index.embeddings.flatten(0, 1) if kind == "queries" else self.index.pooled
            flat = faiss.IndexFlatIP(vectors.shape[-1])
            flat.add(vectors.float().contiguous().numpy())
            self._faiss[kind] = flat
        return self._faiss[kind]

    def text_scores(self, text_embeds: Tensor) -> Tensor:
        """Exact ITC scores (M, N) of text embeddings (M, E) against every image."""
        return torch.einsum("nqe,me->mnq", self.index.embeddings, text_embeds.float()).amax(dim=-1)

    def search_texts(self, text_embeds: Tensor, k: int) -> list[list[Hit]]:
        """The ``k`` best images for each text embedding (M, E), best first."""
        k = min(k, len(self.index))
        if k <= 0:
            return [[] for _ in range(len(text_embeds))]
        if self.backend == "exact":
            values, rows = self.text_scores(text_embeds).topk(k, dim=1)
            return [self._hits(r.tolist(), v.tolist()) for v, r in zip(values, rows, strict=True)]
        Q = self.index.embeddings.shape[1]
        values, rows = self._faiss_index("queries").search(text_embeds.float().contiguous().numpy(), k * Q)
        out = []
        for vals, vecs in zip(values, rows, strict=True):
            best: dict[int, float] = {}
            for value, vec in zip(vals.tolist(), vecs.tolist(), strict=True):
                if vec >= 0:
                    best.setdefault(vec // Q, value)  # first row of an image is its max over queries
            picked = list(best.items())[:k]
            out.append(self._hits([i for i, _ in picked], [v for _, v in picked]))
        return out

    def search_images(self, image_embeds: Tensor, k: int) -> list[list[Hit]]:
        """The ``k`` nearest images for each pooled image embedding (M, E), by cosine similarity."""
        k = min(k, len(self.index))
        if k <= 0:
            return [[] for _ in range(len(image_embeds))]
        if self.backend == "exact":
            values, rows = (image_embeds.float() @ self.index.pooled.T).topk(k, dim=1)
            values, rows = values.tolist(), rows.tolist()
        else:
            values, rows = self._faiss_index("pooled").search(image_embeds.float().contiguous().numpy(), k)
            values, rows = values.tolist(), rows.tolist()
        return [self._hits(r, v) for v, r in zip(values, rows, strict=True)]

    def _hits(self, rows: list[int], values: list[float]) -> list[Hit]:
        return [Hit(r, self.index.paths[r], v, v) for r, v in zip(rows, values, strict=True)]


@torch.inference_mode()
def itm_logits(model, image_feats: Tensor, texts: list[str], batch_size: int = 64) -> Tensor:
    """ITM "match" logits (B,) of image i with text i; ``image_feats`` (B, P, Dv) from ``encode_image``."""
    return itm_pair_logits(model, image_feats, texts, batch_size)[:, 1]


@torch.inference_mode()
def itm_pair_logits(model, image_feats: Tensor, texts: list[str], batch_size: int = 64) -> Tensor:
    """Both ITM logits (B, 2), (no match, match), of image i with text i (BLIP-2's ITM head)."""
    if model.family != "blip2":
        raise CapabilityError(f"re-ranking needs BLIP-2's ITM head; {model.family} models rank by similarity")
    model.require("match")
    if len(texts) != len(image_feats):
        raise ValueError(f"{len(image_feats)} images but {len(texts)} texts")
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = (t.to(model.device) for t in model.text.qformer_batch(texts[i : i + batch_size]))
        feats = image_feats[i : i + batch_size].to(model.device)
        out.append(model.model.qformer.itm_logits(feats, ids, mask).float().cpu())  # (b, 2)
    return torch.cat(out) if out else torch.zeros(0, 2)


@torch.inference_mode()
def rerank(model, hits: list[Hit], text: str, top: int) -> list[Hit]:
    """Re-rank the first ``top`` hits by ITM logit + ITC score (BLIP-2 / LAVIS), the rest keep ITC order.

    Each re-ranked hit also gets ``itm_prob``, the match probability ``Model.match`` gives."""
    head, tail = hits[:top], hits[top:]
    if not head:
        return hits
    feats = model.image_features([h.path for h in head])  # (K, P, Dv)
    logits = itm_pair_logits(model, feats, [text] * len(head))  # (K, 2)
    probs = logits.softmax(dim=-1)[:, 1]
    for hit, logit, prob in zip(head, logits[:, 1].tolist(), probs.tolist(), strict=True):
        hit.itm, hit.itm_prob, hit.score = logit, prob, logit + hit.itc
    return sorted(head, key=lambda h: -h.score) + tail
