"""The Q-Former's three attention masks: the table cell by cell, and what each mask lets change."""

from __future__ import annotations

import pytest
import torch

from blipkit.config import QFormerConfig
from blipkit.models.qformer import QFormer, build_attention_mask

Q, T = 3, 4


def test_mask_table_cell_by_cell():
    text_mask = torch.tensor([[1, 1, 1, 0]])  # last text token is padding
    uni = build_attention_mask("unimodal", Q, text_mask)[0, 0]
    bi = build_attention_mask("bidirectional", Q, text_mask)[0, 0]
    causal = build_attention_mask("multimodal_causal", Q, text_mask)[0, 0]
    for r in range(Q + T):
        for c in range(Q + T):
            row_q, col_q = r < Q, c < Q
            pad = c == Q + T - 1
            assert bool(uni[r, c]) == ((row_q == col_q) and not pad), (r, c)
            assert bool(bi[r, c]) == (not pad), (r, c)
            assert bool(causal[r, c]) == ((col_q or (not row_q and c <= r)) and not pad), (r, c)


def test_unknown_mask_kind():
    with pytest.raises(ValueError, match="unknown attention mask kind"):
        build_attention_mask("causal", Q, None)


@pytest.fixture(scope="module")
def qformer():
    torch.manual_seed(0)
    cfg = QFormerConfig(
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        intermediate_size=48,
        num_query_tokens=Q,
        cross_attention_frequency=2,
        encoder_hidden_size=24,
        vocab_size=50,
        max_position_embeddings=16,
        embed_dim=16,
        bos_token_id=49,
    )
    return QFormer(cfg).eval()


def _run(qformer, ids, kind):
    image = torch.randn(1, 5, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return qformer(image, ids, torch.ones_like(ids), mask_kind=kind)


def test_unimodal_queries_ignore_text(qformer):
    a = _run(qformer, torch.tensor([[1, 2, 3, 4]]), "unimodal")
    b = _run(qformer, torch.tensor([[1, 9, 8, 7]]), "unimodal")
    torch.testing.assert_close(a[:, :Q], b[:, :Q], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, Q:], b[:, Q:])


def test_causal_text_ignores_later_tokens(qformer):
    a = _run(qformer, torch.tensor([[1, 2, 3, 4]]), "multimodal_causal")
    b = _run(qformer, torch.tensor([[1, 2, 3, 9]]), "multimodal_causal")
    torch.testing.assert_close(a[:, : Q + 3], b[:, : Q + 3], rtol=0, atol=1e-6)  # queries + first 3 tokens
    assert not torch.allclose(a[:, Q + 3], b[:, Q + 3])


def test_bidirectional_queries_see_text(qformer):
    a = _run(qformer, torch.tensor([[1, 2, 3, 4]]), "bidirectional")
    b = _run(qformer, torch.tensor([[1, 2, 3, 9]]), "bidirectional")
    assert not torch.allclose(a[:, :Q], b[:, :Q])
    assert not torch.allclose(a[:, Q], b[:, Q])  # an earlier text token sees the later one


def test_padding_is_invisible(qformer):
    image = torch.randn(1, 5, 24)
    ids = torch.tensor([[1, 2, 3, 0]])
    with torch.no_grad():
        padded = qformer(image, ids, torch.tensor([[1, 1, 1, 0]]))
        short = qformer(image, ids[:, :3], torch.ones(1, 3, dtype=torch.long))
    torch.testing.assert_close(padded[:, : Q + 3], short, rtol=0, atol=1e-5)


def test_heads_shapes(qformer):
    image = torch.randn(2, 5, 24)
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad():
        assert qformer.image_features(image).shape == (2, Q, 16)
        t = qformer.text_features(ids, mask)
        assert t.shape == (2, 16)
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(2))
        assert qformer.itm_logits(image, ids, mask).shape == (2, 2)
        hidden = qformer(image, ids, mask, mask_kind="multimodal_causal")[:, Q:]
        for param in (qformer.lm_bias, qformer.lm_norm.weight, qformer.lm_norm.bias):  # away from their init
            param.add_(torch.randn_like(param) * 0.1)
        torch.testing.assert_close(
            qformer.lm_logits(hidden), bert_lm_head(qformer)(hidden), rtol=1e-5, atol=1e-5
        )
    assert qformer.lm_bias.shape == (50,) and qformer.lm_bias.abs().sum() > 0
    assert float(qformer.temp.detach()) == pytest.approx(0.07)


def bert_lm_head(qformer) -> torch.nn.Module:
    """transformers' own BERT LM head (transform, LayerNorm, tied decoder) with the Q-Former's ITG weights."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLMPredictionHead

    cfg = qformer.config
    head = BertLMPredictionHead(
        BertConfig(hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, layer_norm_eps=cfg.layer_norm_eps)
    )
    head.transform.dense.load_state_dict(qformer.lm_transform.state_dict())
    head.transform.LayerNorm.load_state_dict(qformer.lm_norm.state_dict())
    head.decoder.weight = qformer.word_embeddings.weight  # tied, as in BERT and BLIP-2's ITG
    head.bias = qformer.lm_bias
    head.decoder.bias = qformer.lm_bias
    return head.eval()
