"""Stage 1: teach the Q-Former's queries to read the image, against text, with three losses (BLIP-2 §3.2).

- ITC: image-text contrastive; an image's similarity to a text is the max over its queries, divided by a
  learnable temperature; label smoothing 0.1; texts and images are all-gathered across processes.
- ITM: image-text matching on the bidirectional pass; one hard negative text per image and one hard
  negative image per text, sampled from the similarity softmax with positives masked.
- ITG: image-grounded text generation under the multimodal-causal mask; the decoder BOS token replaces [CLS].

Run: ``blipkit train stage1 --config configs/default_stage1.json --out runs/stage1`` or, with N processes,
``torchrun --nproc_per_node N -m blipkit.train stage1 --config configs/default_stage1.json --out runs/s1``.

Every loss returns ``(sum over this process's rows, count)``; ``stage1_losses`` replaces the count with the
global batch's count, so the trainer's ``sum / count`` is the global mean whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from blipkit.models.qformer import QFormer
from blipkit.train.distributed import DistEnv, all_gather_with_grad


@dataclass
class TextBatch:
    """The global batch's texts (every process holds all of them) and this process's row range."""

    input_ids: Tensor  # (G, T) Q-Former tokens, [CLS] first
    attention_mask: Tensor  # (G, T)
    group: Tensor  # (G,) equal ids mark texts that describe the same thing (counted as positives)
    rows: slice  # this process's rows of the global batch


def max_query_similarity(image_feats: Tensor, text_feats: Tensor) -> Tensor:
    """(B, Q, E) x (N, E) -> (B, N): for each image and text, the best-matching query's cosine."""
    return torch.einsum("bqe,ne->bnq", image_feats, text_feats).amax(dim=-1)


def itc_loss(
    image_feats: Tensor,  # (b, Q, E) this process's images, L2-normalised
    text_feats: Tensor,  # (b, E) this process's texts, L2-normalised
    all_image_feats: Tensor,  # (G, Q, E) every process's images
    all_text_feats: Tensor,  # (G, E)
    positives: Tensor,  # (b, G) bool: pairs that match (the diagonal at least)
    temp: Tensor,  # () learnable temperature
    label_smoothing: float = 0.1,
) -> tuple[Tensor, int]:
    """Symmetric contrastive loss (sum over this process's rows, count = b)."""
    sim_i2t = max_query_similarity(image_feats, all_text_feats) / temp  # (b, G)
    sim_t2i = max_query_similarity(all_image_feats, text_feats).t() / temp  # (b, G)
    target = positives.float() / positives.sum(dim=1, keepdim=True)  # (b, G), rows sum to 1
    target = target * (1 - label_smoothing) + label_smoothing / target.shape[1]
    i2t = -(target * F.log_softmax(sim_i2t.float(), dim=1)).sum()
    t2i = -(target * F.log_softmax(sim_t2i.float(), dim=1)).sum()
    return (i2t + t2i) / 2, image_feats.shape[0]


def sample_hard_negatives(
    sim_i2t: Tensor,  # (G, G) image -> text similarity of the global batch
    positives: Tensor,  # (G, G) bool: pairs that must not be drawn as negatives
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """One negative text per image and one negative image per text, drawn from softmax(similarity).

    Returns (text index per image (G,), image index per text (G,)). All processes draw the same global
    sample from the same generator, so the result does not depend on how many processes there are.
    """
    sim_i2t = sim_i2t.float()
    w_i2t = F.softmax(sim_i2t, dim=1).masked_fill(positives, 0)  # (G, G)
    w_t2i = F.softmax(sim_i2t.t(), dim=1).masked_fill(positives.t(), 0)  # (G, G)
    fallback = (~positives).float()  # rows whose weights vanished: any non-positive (or anything at all)
    fallback = torch.where(fallback.sum(1, keepdim=True) > 0, fallback, torch.ones_like(fallback))
    w_i2t = torch.where(w_i2t.sum(1, keepdim=True) > 0, w_i2t, fallback)
    w_t2i = torch.where(w_t2i.sum(1, keepdim=True) > 0, w_t2i, fallback.t())
    # drawn on the CPU, where the generator lives, so every device gives the same sample
    neg_text = torch.multinomial(w_i2t.cpu(), 1, generator=generator).squeeze(1)  # (G,)
    neg_image = torch.multinomial(w_t2i.cpu(), 1, generator=generator).squeeze(1)  # (G,)
    return neg_text.to(sim_i2t.device), neg_image.to(sim_i2t.device)


def itm_loss(itm_logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Cross-entropy of match (1) / no match (0): logits (N, 2), labels (N,)."""
    return F.cross_entropy(itm_logits.float(), labels, reduction="sum"), labels.shape[0]


def itg_loss(lm_logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, int]:
    """Next-token loss of the text given the queries: logits (b, T, V) for ids (b, T); padding ignored."""
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)  # (b, T-1)
    loss = F.cross_entropy(lm_logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="sum")
    return loss, int((labels != -100).sum())


def decoder_ids(input_ids: Tensor, bos_token_id: int) -> Tensor:
    """ITG input: the text with its first token ([CLS]) replaced by the decoder BOS token: (B, T)."""
    ids = input_ids.clone()
    ids[:, 0] = bos_token_id
    return ids


@dataclass
class Stage1Losses:
    itc: tuple[Tensor, int]  # (sum over this process's rows, global count)
    itm: tuple[Tensor, int]
    itg: tuple[Tensor, int]


def stage1_losses(
    qformer: QFormer,
    image_embeds: Tensor,  # (G, P, Dv) frozen features of the global batch
    text: TextBatch,
    env: DistEnv,
    generator: torch.Generator,
    label_smoothing: float = 0.1,
) -> Stage1Losses:
    """ITC, ITM and ITG on this process's rows; ITC and the negatives see the whole global batch."""
    rows = text.rows
    cfg = qformer.config
    ids, mask = text.input_ids[rows], text.attention_mask[rows]  # (b, T)
    images = image_embeds[rows]  # (b, P, Dv)
    positives = text.group[:, None] == text.group[None, :]  # (G, G)

    # ITC: queries and text each on their own (unimodal); the text feature is the [CLS] output
    image_feats = qformer.image_features(images)  # (b, Q, E)
    text_feats = qformer.text_features(ids, mask)  # (b, E)
    # one collective for both (two would have to run backward in the same order on every process)
    both = all_gather_with_grad(torch.cat([image_feats.flatten(1), text_feats], dim=1), env)  # (G, (Q+1)E)
    all_image_feats = both[:, : -text_feats.shape[1]].view(-1, *image_feats.shape[1:])  # (G, Q, E)
    all_text_feats = both[:, -text_feats.shape[1] :]  # (G, E)
    with torch.no_grad():
        qformer.temp.clamp_(0.001, 0.5)
    itc_sum, _ = itc_loss(
        image_feats,
        text_feats,
        all_image_feats,
        all_text_feats,
        positives[rows],
        qformer.temp,
        label_smoothing,
    )

    # ITM: positives, then (image, hard negative text), then (hard negative image, text)
    with torch.no_grad():
        sim = max_query_similarity(all_image_feats, all_text_feats) / qformer.temp  # (G, G)
        neg_text, neg_image = sample_hard_negatives(sim, positives, generator)
    local = torch.arange(text.input_ids.shape[0], device=ids.device)[rows]  # (b,) this process's rows
    pair_images = torch.cat([images, images, image_embeds[neg_image[local]]])  # (3b, P, Dv)
    pair_ids = torch.cat([ids, text.input_ids[neg_text[local]], ids])  # (3b, T)
    pair_mask = torch.cat([mask, text.attention_mask[neg_text[local]], mask])  # (3b, T)
    b = ids.shape[0]
    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(ids.device)  # (3b,)
    itm_sum, _ = itm_loss(qformer.itm_logits(pair_images, pair_ids, pair_mask), labels)

    # ITG: the text generated from the queries; queries see only queries, text sees queries + its past
    dec_ids = decoder_ids(ids, cfg.bos_token_id)
    hidden = qformer(images, dec_ids, mask, mask_kind="multimodal_causal")  # (b, Q+T, D)
    itg_sum, _ = itg_loss(qformer.lm_logits(hidden[:, cfg.num_query_tokens :]), dec_ids, mask)
    G = text.input_ids.shape[0]
    itg_tokens = int(text.attention_mask[:, 1:].sum())
    return Stage1Losses((itc_sum, G), (itm_sum, 3 * G), (itg_sum, itg_tokens))
