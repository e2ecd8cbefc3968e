"""``Blip2.lm_loss`` and ``forward(...).loss`` against cross-entropies computed by hand, for both conventions
of which token is predicted from where, for a decoder-only and an encoder-decoder LLM."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from blipkit.config import Blip2Config, BridgeConfig, LLMConfig, QFormerConfig
from blipkit.models.blip2 import Blip2, next_token_targets

Q, D, V = 3, 16, 20


def tiny_blip2(llm: nn.Module, kind: str) -> Blip2:
    qformer = QFormerConfig(
        hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, num_query_tokens=Q,
        encoder_hidden_size=8, vocab_size=30, text_path=False, lm_head=False,
    )  # fmt: skip
    cfg = Blip2Config(qformer=qformer, bridge=BridgeConfig(llm_hidden_size=D), llm=LLMConfig(kind=kind))
    return Blip2(cfg, nn.Identity(), llm).eval()


@pytest.fixture(scope="module")
def decoder_only() -> Blip2:
    torch.manual_seed(0)
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=V,
            hidden_size=D,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
        )  # fmt: skip
    )
    return tiny_blip2(llm.eval(), "causal")


@pytest.fixture(scope="module")
def encoder_decoder() -> Blip2:
    torch.manual_seed(0)
    llm = T5ForConditionalGeneration(
        T5Config(
            vocab_size=V,
            d_model=D,
            d_kv=8,
            d_ff=24,
            num_layers=1,
            num_heads=2,
            decoder_start_token_id=0,
            pad_token_id=0,
        )  # fmt: skip
    )
    return tiny_blip2(llm.eval(), "seq2seq")


# row 0: an empty prompt, so the first text token is a target (plain captioning); row 1: a prompt token first
IDS = torch.tensor([[5, 6, 7, 2, 0], [4, 8, 9, 2, 0]])
MASK = (IDS != 0).long()
LABELS = torch.tensor([[5, 6, 7, 2, -100], [-100, 8, 9, 2, -100]])


def by_hand(logits: torch.Tensor, labels: torch.Tensor, skip_first: bool) -> torch.Tensor:
    """Mean of -log p(label) over scored text tokens; text token t is read from sequence position Q+t-1."""
    logp = logits.float().log_softmax(-1)
    terms = [
        -logp[b, Q + t - 1, int(labels[b, t])]
        for b in range(labels.shape[0])
        for t in range(labels.shape[1])
        if labels[b, t] != -100 and not (skip_first and t == 0)
    ]
    return torch.stack(terms).mean()


@torch.inference_mode()
@pytest.mark.parametrize("convention", ["generation", "transformers"])
def test_decoder_only_loss_by_hand(decoder_only, convention):
    blip = decoder_only
    prefix = torch.randn(2, Q, D)
    inputs = blip.llm_inputs(prefix, IDS, MASK)
    embeds = torch.cat([prefix, blip.llm.get_input_embeddings()(IDS)], dim=1)
    full_mask = torch.cat([torch.ones(2, Q, dtype=torch.long), MASK], dim=1)
    logits = blip.llm(inputs_embeds=embeds, attention_mask=full_mask).logits  # (B, Q+T, V)
    expected = by_hand(logits, LABELS, skip_first=convention == "transformers")
    mean = blip.lm_loss(inputs, LABELS, convention=convention)
    torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-5)
    scored = int((next_token_targets(LABELS, Q, convention) != -100).sum())
    assert scored == (7 if convention == "generation" else 6)  # the first-target case counts only once
    total = blip.lm_loss(inputs, LABELS, reduction="sum", convention=convention)
    torch.testing.assert_close(total, expected * scored, rtol=1e-5, atol=1e-5)
    out = blip(None, IDS, MASK, labels=LABELS, prefix=prefix, loss_convention=convention)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    keep = MASK.bool()  # padding is masked: its logits are not defined
    torch.testing.assert_close(out.logits[keep], logits[:, Q:][keep], rtol=1e-5, atol=1e-5)


def test_conventions_differ_only_on_the_first_text_token():
    targets = next_token_targets(LABELS, Q, "generation")
    assert targets[0, Q - 1] == 5 and targets[1, Q - 1] == -100  # read from the last visual-prompt position
    plain = next_token_targets(LABELS, Q, "transformers")
    assert plain[0, Q - 1] == -100 and torch.equal(plain[:, Q:], targets[:, Q:])
    with pytest.raises(ValueError, match="convention"):
        next_token_targets(LABELS, Q, "lavis")


@torch.inference_mode()
def test_encoder_decoder_loss_by_hand(encoder_decoder):
    blip = encoder_decoder
    prefix = torch.randn(2, Q, D)
    labels = torch.tensor([[7, 8, 1], [9, 1, -100]])  # decoder targets
    inputs = blip.llm_inputs(prefix, IDS, MASK)
    embeds = torch.cat([prefix, blip.llm.get_input_embeddings()(IDS)], dim=1)
    full_mask = torch.cat([torch.ones(2, Q, dtype=torch.long), MASK], dim=1)
    start = torch.zeros(2, 1, dtype=torch.long)  # decoder start token, then the targets shifted right
    decoder_ids = torch.cat([start, labels[:, :-1].clamp(min=0)], dim=1)
    logits = blip.llm(inputs_embeds=embeds, attention_mask=full_mask, decoder_input_ids=decoder_ids).logits
    logp = logits.log_softmax(-1)
    terms = [-logp[b, s, int(labels[b, s])] for b in range(2) for s in range(3) if labels[b, s] != -100]
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(blip.lm_loss(inputs, labels), expected, rtol=1e-5, atol=1e-5)
    total = blip.lm_loss(inputs, labels, reduction="sum")
    torch.testing.assert_close(total, expected * len(terms), rtol=1e-5, atol=1e-5)
    out = blip(None, IDS, MASK, labels=labels, prefix=prefix)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
