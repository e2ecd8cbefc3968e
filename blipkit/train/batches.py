"""Tokenised batches: Q-Former text, LLM prompt + target with labels, caption tokens for the warm start."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def pad_right(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Ragged token lists -> (B, T) ids and (B, T) mask, padded on the right."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def qformer_text(tokenizer: Any, texts: list[str], max_tokens: int) -> tuple[Tensor, Tensor]:
    """Q-Former tokens ([CLS] ... [SEP]) of each text: (B, T) ids and mask, right-padded."""
    rows = tokenizer(texts, truncation=True, max_length=max_tokens)["input_ids"]
    return pad_right(rows, _pad_id(tokenizer))


def llm_text(
    tokenizer: Any, prompts: list[str], targets: list[str], max_tokens: int, encoder_decoder: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """LLM inputs and labels.

    Decoder-only: ids = prompt tokens + " target" tokens + eos, labels = -100 except on the target (B, T).
    Encoder-decoder: ids = prompt tokens (encoder), labels = target tokens (decoder, -100 padding).
    The prompt is tokenised on its own, exactly as at inference; over-long prompts lose their start.
    """
    prompt_rows = tokenizer(prompts)["input_ids"]
    if encoder_decoder:
        target_rows = tokenizer(targets)["input_ids"]
        ids, mask = pad_right([p[-max_tokens:] for p in prompt_rows], _pad_id(tokenizer))
        labels, label_mask = pad_right([t[:max_tokens] for t in target_rows], -100)
        return ids, mask, labels.masked_fill(label_mask == 0, -100)
    target_rows = tokenizer([" " + t for t in targets], add_special_tokens=False)["input_ids"]
    rows, label_rows = [], []
    for p, t in zip(prompt_rows, target_rows, strict=True):
        t = (t + [tokenizer.eos_token_id])[:max_tokens]
        p = p[max(0, len(p) + len(t) - max_tokens) :]
        rows.append(p + t)
        label_rows.append([-100] * len(p) + t)
    ids, mask = pad_right(rows, _pad_id(tokenizer))
    labels, _ = pad_right(label_rows, -100)
    return ids, mask, labels


def caption_tokens(tokenizer: Any, captions: list[str]) -> tuple[Tensor, Tensor]:
    """LLM tokens of " caption" (no special tokens): (B, Tc) ids and mask."""
    rows = tokenizer([" " + c for c in captions], add_special_tokens=False)["input_ids"]
    return pad_right(rows, _pad_id(tokenizer))


def trim(mask: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Drop the columns no row uses (after slicing a process's rows out of a global batch)."""
    width = int(mask.sum(dim=1).max()) if mask.numel() else 0
    return tuple(t[:, :width] for t in (mask, *tensors))
