"""Start a Q-Former from a BERT checkpoint (e.g. all-MiniLM-L6-v2), read straight from its model.safetensors.

BERT (transformers 4.x names)                        Q-Former
embeddings.word_embeddings                           word_embeddings
embeddings.position_embeddings + token_type[0]       position_embeddings (token type 0 folded in)
embeddings.LayerNorm                                 embed_norm
encoder.layer.{i}.attention.self.{query,key,value}   layers.{i}.self_attn.{q,k,v}
encoder.layer.{i}.attention.output.dense             layers.{i}.self_attn.o
encoder.layer.{i}.attention.output.LayerNorm         layers.{i}.self_norm
encoder.layer.{i}.intermediate.dense                 layers.{i}.{text,query}_ffn.fc1
encoder.layer.{i}.output.dense                       layers.{i}.{text,query}_ffn.fc2
encoder.layer.{i}.output.LayerNorm                   layers.{i}.{text,query}_ffn.norm

Cross-attention, the queries and the heads keep their fresh initialisation (as in BLIP-2). A Q-Former with
fewer layers than the BERT takes its first layers; the pooler is not used.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from blipkit.errors import ConfigError
from blipkit.models.qformer import QFormer

_LAYER_MAP = {
    "attention.self.query": ["self_attn.q"],
    "attention.self.key": ["self_attn.k"],
    "attention.self.value": ["self_attn.v"],
    "attention.output.dense": ["self_attn.o"],
    "attention.output.LayerNorm": ["self_norm"],
    "intermediate.dense": ["text_ffn.fc1", "query_ffn.fc1"],
    "output.dense": ["text_ffn.fc2", "query_ffn.fc2"],
    "output.LayerNorm": ["text_ffn.norm", "query_ffn.norm"],
}


def read_bert(bert_dir: str | Path) -> dict[str, Tensor]:
    """The BERT tensors of ``bert_dir/model.safetensors`` with any ``bert.`` prefix removed."""
    file = Path(bert_dir) / "model.safetensors"
    if not file.exists():
        raise FileNotFoundError(f"no model.safetensors in {bert_dir}")
    with safe_open(str(file), framework="pt") as f:
        return {k.removeprefix("bert."): f.get_tensor(k) for k in f.keys()}


def bert_to_qformer(bert: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """Q-Former-named tensors from BERT-named ones (see the module docstring's table)."""
    position = (
        bert["embeddings.position_embeddings.weight"] + bert["embeddings.token_type_embeddings.weight"][0]
    )
    out = {
        "word_embeddings.weight": bert["embeddings.word_embeddings.weight"],
        "position_embeddings.weight": position,
        "embed_norm.weight": bert["embeddings.LayerNorm.weight"],
        "embed_norm.bias": bert["embeddings.LayerNorm.bias"],
    }
    bert_layers = len({k.split(".")[2] for k in bert if k.startswith("encoder.layer.")})
    if num_layers > bert_layers:
        raise ConfigError(f"the Q-Former has {num_layers} layers but the BERT only {bert_layers}")
    for i in range(num_layers):
        for source, targets in _LAYER_MAP.items():
            for param in ("weight", "bias"):
                tensor = bert[f"encoder.layer.{i}.{source}.{param}"]
                for target in targets:
                    out[f"layers.{i}.{target}.{param}"] = tensor
    return out


@torch.no_grad()
def init_qformer_from_bert(qformer: QFormer, bert_dir: str | Path) -> list[str]:
    """Copy BERT weights into ``qformer`` in place (shapes checked first); returns the names filled."""
    if not qformer.config.text_path:
        raise ConfigError("a Q-Former without a text path cannot start from a BERT")
    weights = bert_to_qformer(read_bert(bert_dir), qformer.config.num_layers)
    params = dict(qformer.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ConfigError(f"BERT weights with no Q-Former parameter: {unknown}")
    wrong = [
        f"{k}: {tuple(v.shape)} vs {tuple(params[k].shape)}"
        for k, v in weights.items()
        if v.shape != params[k].shape
    ]
    if wrong:
        raise ConfigError(f"BERT and Q-Former shapes differ: {wrong}")
    for name, tensor in weights.items():
        params[name].copy_(tensor)
    return sorted(weights)
