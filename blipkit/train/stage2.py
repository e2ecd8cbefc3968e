"""Stage 2: connect the queries to a frozen LLM (BLIP-2 §3.3), after an optional cheap warm start.

- LM loss, decoder-only: the LLM reads [visual prompt; prompt; target] and is scored on the target tokens
  only; the vocabulary projection is computed only at those positions (most of a step's cost otherwise).
- prefix-LM, encoder-decoder: the encoder reads [visual prompt; prompt], the decoder produces the target.
- Warm start (no LLM forward): the visual prompt tokens regress onto the LLM word embeddings of the image's
  caption and/or the expected answer, plus a cross-entropy over those words, so the LLM sees familiar
  inputs from its first step.
- Keep (no LLM forward): the visual prompt stays near a teacher checkpoint's on the same inputs, so a run
  that teaches another skill (e.g. ITM through the stage-1 losses) leaves what the LLM reads, and so the
  answers, as they were.

Run: ``blipkit train stage2 --config configs/default_stage2.json --out runs/stage2`` or, with N processes,
``torchrun --nproc_per_node N -m blipkit.train stage2 --config configs/default_stage2.json --out runs/s2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def decoder_lm_loss(
    llm: nn.Module,
    prefix: Tensor,  # (b, Q, Dl) visual prompt
    input_ids: Tensor,  # (b, T) prompt + target tokens, right-padded
    attention_mask: Tensor,  # (b, T)
    labels: Tensor,  # (b, T) the target tokens, -100 on prompt and padding
) -> Tensor:
    """Summed next-token cross-entropy on the labelled tokens of a decoder-only LLM."""
    text = llm.get_input_embeddings()(input_ids)  # (b, T, Dl)
    embeds = torch.cat([prefix.to(text.dtype), text], dim=1)  # (b, Q+T, Dl)
    ones = torch.ones(prefix.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
    mask = torch.cat([ones, attention_mask], dim=1)  # (b, Q+T)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (b, Q+T)
    hidden = llm.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)[0]
    full_labels = torch.cat([torch.full_like(ones, -100, dtype=labels.dtype), labels], dim=1)  # (b, Q+T)
    targets = full_labels[:, 1:]  # position i predicts token i+1; the first target may follow the prefix
    scored = targets != -100  # (b, Q+T-1)
    logits = llm.get_output_embeddings()(hidden[:, :-1][scored])  # (N, V) only where it counts
    return F.cross_entropy(logits.float(), targets[scored], reduction="sum")


def prefix_lm_loss(
    llm: nn.Module, prefix: Tensor, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
) -> Tensor:
    """Summed decoder cross-entropy of an encoder-decoder LLM; ``labels`` (b, S) are the decoder targets."""
    text = llm.get_input_embeddings()(input_ids)  # (b, T, Dl)
    embeds = torch.cat([prefix.to(text.dtype), text], dim=1)
    ones = torch.ones(prefix.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
    mask = torch.cat([ones, attention_mask], dim=1)
    logits = llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).logits  # (b, S, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


def slot_targets(token_ids: Tensor, token_mask: Tensor, num_slots: int) -> Tensor:
    """The token each of ``num_slots`` prompt positions should express: slot j -> token j mod length."""
    lengths = token_mask.sum(dim=1).clamp(min=1)  # (b,)
    slots = torch.arange(num_slots, device=token_ids.device)[None, :] % lengths[:, None]  # (b, S)
    return token_ids.gather(1, slots)


def embedding_scale(word_embeddings: Tensor) -> Tensor:
    """The mean squared norm of a word embedding: distances to visual prompts are relative to it."""
    return word_embeddings.float().pow(2).sum(dim=1).mean()


def relative_distance(prefix: Tensor, target: Tensor, scale: Tensor) -> Tensor:
    """Summed over (b, Q): squared distance of each visual prompt token (b, Q, Dl) to its target, / ``scale``.

    The warm start's pull towards word embeddings, and the keep loss (``target``: a teacher's prompt)."""
    return ((prefix.float() - target.float()).pow(2).sum(dim=-1) / scale).sum()


def warm_start_loss(
    prefix: Tensor,  # (b, Q, Dl) visual prompt
    targets: Tensor,  # (b, Q) the LLM token each prompt position should express (see ``slot_targets``)
    word_embeddings: Tensor,  # (V, Dl) the LLM's input embedding matrix (frozen)
    vocabulary: Tensor,  # (K,) the token ids that can occur in ``targets``: the cross-entropy's candidates
    mse_weight: float = 1.0,
) -> Tensor:
    """Summed over (b, Q): relative squared distance to the target embedding + CE over the candidate words."""
    prefix = prefix.float()
    table = word_embeddings.float()
    mse = relative_distance(prefix, table[targets], embedding_scale(table))
    logits = prefix @ table[vocabulary].t()  # (b, Q, K)
    lookup = torch.full((table.shape[0],), -100, dtype=torch.long, device=table.device)
    lookup[vocabulary] = torch.arange(vocabulary.shape[0], device=table.device)
    ce = F.cross_entropy(logits.flatten(0, 1), lookup[targets].flatten(), reduction="sum")
    return mse_weight * mse + ce
