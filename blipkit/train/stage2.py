"""Stage 2: connect the queries to a frozen LLM (BLIP-2 §3.3), after an optional cheap warm start.

- LM loss (``Blip2.lm_loss``), decoder-only: the LLM reads [visual prompt; prompt; target] and is scored on
  the target tokens only, the first of them from the last visual-prompt position; the vocabulary projection
  runs only at those positions (most of a step's cost otherwise).
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
from torch import Tensor


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
