"""Q-Former initialisation from a BERT checkpoint: the text-only bidirectional pass equals BertModel."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from blipkit.config import QFormerConfig
from blipkit.models.qformer import QFormer
from blipkit.train.init import init_qformer_from_bert


def _bert(tmp_path, layers: int = 2) -> tuple[BertModel, str]:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    bert = BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # make the token-type row matter, so folding it in is checked
        bert.embeddings.token_type_embeddings.weight.normal_(0, 0.5)
    bert.save_pretrained(tmp_path)
    return bert, str(tmp_path)


def _qformer(layers: int = 2) -> QFormer:
    cfg = QFormerConfig(
        hidden_size=32,
        num_layers=layers,
        num_heads=4,
        intermediate_size=48,
        num_query_tokens=3,
        cross_attention_frequency=2,
        encoder_hidden_size=24,
        vocab_size=40,
        max_position_embeddings=16,
        embed_dim=16,
        bos_token_id=39,
    )
    return QFormer(cfg).eval()


def test_text_pass_equals_bert(tmp_path):
    bert, path = _bert(tmp_path)
    qformer = _qformer()
    filled = init_qformer_from_bert(qformer, path)
    assert "layers.1.query_ffn.fc1.weight" in filled and "layers.0.cross_attn.q.weight" not in filled
    ids = torch.tensor([[2, 5, 9, 11, 3, 0], [2, 7, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        ours = qformer(None, ids, mask, mask_kind="bidirectional", use_queries=False)
        theirs = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)


def test_query_ffn_starts_as_text_ffn(tmp_path):
    _, path = _bert(tmp_path)
    qformer = _qformer()
    init_qformer_from_bert(qformer, path)
    for layer in qformer.layers:
        torch.testing.assert_close(layer.query_ffn.fc1.weight, layer.text_ffn.fc1.weight)


def test_too_few_bert_layers(tmp_path):
    _, path = _bert(tmp_path, layers=1)
    with pytest.raises(ValueError, match="2 layers but the BERT only 1"):
        init_qformer_from_bert(_qformer(layers=2), path)
