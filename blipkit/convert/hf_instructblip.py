"""transformers InstructBLIP checkpoints -> blipkit: key map, config translation and the Q-Former tokenizer.

Covers ``InstructBlipForConditionalGeneration`` ``save_pretrained`` dirs (transformers 5 key names), with a
decoder-only (OPT, Vicuna/LLaMA) or encoder-decoder (Flan-T5) LLM. InstructBLIP is BLIP-2 with a
question-aware Q-Former (``bridge.text_input``): the instruction, tokenised by the Q-Former's own BERT
tokenizer (``InstructBlipProcessor`` saves it in ``qformer_tokenizer/``), joins the queries' self-attention,
and the LLM reads it as its prompt after the visual prompt.

What differs from BLIP-2's layout (``hf_blip2``), key by key:

- the Q-Former's embeddings live in ``qformer.embeddings``: ``word_embeddings``, ``position_embeddings`` and
  ``layernorm``, the LayerNorm over [queries; word + position embeddings] (BLIP-2: ``qformer.layernorm`` on
  the queries alone). Text positions count from 0 at the first text token; the queries have none;
- every layer has the text FFN (``intermediate`` / ``output``);
- there are no ITC/ITM heads (``vision_projection``, ``text_projection``, ``itm_head``) and no temperature:
  ``QFormerConfig.retrieval_heads`` is False, and similarity / match / embeddings raise ``CapabilityError``;
- vision tower, cross-attention, query FFN, ``query_tokens`` and ``language_projection`` are as in BLIP-2.

The LLM's ``input_ids`` in transformers start with ``num_query_tokens`` ``image_token_index`` placeholders
that the projected queries replace; blipkit puts the visual prompt before the text itself, so its text ids
carry no placeholders. The Q-Former's attention mask is ones over the queries, then the instruction's mask.

Every source key is mapped or listed in ``SKIPPED`` with its reason; anything else is a ``CheckpointError``
naming the key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import Tensor

from blipkit.config import Blip2Config
from blipkit.convert import hf_blip2
from blipkit.errors import CheckpointError
from blipkit.state_dicts import read_state_dict

QFORMER_TOKENIZER_DIR = "qformer_tokenizer"  # where InstructBlipProcessor.save_pretrained puts it

# BLIP-2 keys InstructBLIP does not have: its query-only LayerNorm, the retrieval model's embeddings and heads
_BLIP2_ONLY = ("qformer.layernorm.", "embeddings.", "vision_projection.", "text_projection.", "itm_head.")
_EMBEDDINGS = {
    "qformer.embeddings.word_embeddings.weight": "qformer.word_embeddings.weight",
    "qformer.embeddings.position_embeddings.weight": "qformer.position_embeddings.weight",
    "qformer.embeddings.layernorm.weight": "qformer.embed_norm.weight",  # over [queries; text]
    "qformer.embeddings.layernorm.bias": "qformer.embed_norm.bias",
}
HF_TO_BLIPKIT: dict[str, str] = {
    **{k: v for k, v in hf_blip2.HF_TO_BLIPKIT.items() if not k.startswith(_BLIP2_ONLY)},
    **_EMBEDDINGS,
}
BLIPKIT_TO_HF: dict[str, str] = {v: k for k, v in HF_TO_BLIPKIT.items()}
SKIPPED = {
    "qformer.embeddings.position_ids": "constant buffer (arange), rebuilt by the model (older saves hold it)",
}
PREFIXES = hf_blip2.PREFIXES  # language_model.* -> llm.*, in transformers' own names


def is_instructblip(raw: dict[str, Any]) -> bool:
    """Whether a transformers config.json dict describes an InstructBLIP model."""
    archs = raw.get("architectures")
    archs = archs if isinstance(archs, list) else []
    return raw.get("model_type") == "instructblip" or any(
        isinstance(a, str) and a.startswith("InstructBlip") for a in archs
    )


def filter_hf(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers InstructBLIP state dict -> blipkit names; an unknown key is a ``CheckpointError``."""
    try:
        return hf_blip2.map_keys(state_dict, HF_TO_BLIPKIT, PREFIXES, SKIPPED)
    except KeyError as e:
        raise CheckpointError(f"InstructBLIP checkpoint: {e.args[0]}") from None


def to_hf(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """blipkit state dict -> transformers InstructBLIP names (inverse of ``filter_hf``)."""
    return hf_blip2.map_keys(state_dict, BLIPKIT_TO_HF, {v: k for k, v in PREFIXES.items()}, {})


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> Blip2Config:
    """Translate a transformers ``InstructBlipConfig`` dict: BLIP-2's translation, plus the question-aware
    Q-Former (text path on, no retrieval or ITG heads) and the instruction fed to it (``bridge.text_input``).
    """
    cfg = hf_blip2.config_from_hf(hf, source)
    return dataclasses.replace(
        cfg,
        name="hf-instructblip",
        qformer=dataclasses.replace(cfg.qformer, text_path=True, retrieval_heads=False, lm_head=False),
        bridge=dataclasses.replace(cfg.bridge, text_input=True),
    )


def qformer_tokenizer_dir(path: Path) -> Path:
    """The Q-Former tokenizer of an InstructBLIP dir (``qformer_tokenizer/``); its absence is an error."""
    folder = path / QFORMER_TOKENIZER_DIR
    if not folder.is_dir():
        raise CheckpointError(
            f"{path} has no {QFORMER_TOKENIZER_DIR}/ folder: InstructBLIP's Q-Former reads the prompt with "
            "its own tokenizer, which InstructBlipProcessor.save_pretrained writes there"
        )
    return folder.resolve()


def read_checkpoint(path: Path, raw: dict[str, Any]) -> tuple[Blip2Config, dict[str, Tensor]]:
    """The blipkit config and blipkit-named state dict of an InstructBLIP ``save_pretrained`` dir."""
    cfg = config_from_hf(raw, source=str(path / "config.json"))
    cfg.qformer_tokenizer = str(qformer_tokenizer_dir(path))
    state_dict = read_state_dict(path)
    try:
        fmt = hf_blip2.detect_format(state_dict)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if fmt != "transformers":
        raise CheckpointError(f"{path}: a {fmt} state dict in a transformers InstructBLIP config dir")
    return cfg, filter_hf(state_dict)
