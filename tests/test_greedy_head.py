"""GreedyHead picks exactly the token the full fp32 output projection would, and is used only where exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hf_tiny import make_blip2

import blipkit
from blipkit.batch.generate import Captioner
from blipkit.models.greedy_head import GreedyHead, greedy_head_for

bf16_native = pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="the head is only used with native bf16 matmuls"
)


def full_argmax(h, weight, bias=None):
    return F.linear(h, weight, bias).argmax(dim=-1)


@pytest.mark.parametrize("with_bias", [False, True])
def test_same_tokens_as_the_full_product(with_bias):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5000, 64, generator=g) * 0.05
    bias = torch.randn(5000, generator=g) * 0.1 if with_bias else None
    head = GreedyHead(weight, bias)
    for scale in (0.1, 1.0, 10.0):
        h = torch.randn(16, 64, generator=g) * scale
        assert torch.equal(head(h), full_argmax(h, weight, bias))
    assert head.fallbacks == 0


def test_near_ties_are_settled_in_fp32():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(3000, 48, generator=g)
    h = torch.randn(4, 48, generator=g)
    best = full_argmax(h, weight)
    # rivals that bf16 cannot tell apart from each row's winner: a hair above, and a hair below
    for i, b in enumerate(best.tolist()):
        weight[100 + i] = weight[b] + 1e-6 * h[i] / h[i].norm()
        weight[200 + i] = weight[b] - 1e-6 * h[i] / h[i].norm()
    head = GreedyHead(weight)
    want = full_argmax(h, weight)
    assert torch.equal(want, torch.arange(100, 104))  # the rivals a hair above win
    assert torch.equal(head(h), want)


def test_exact_ties_go_to_the_lower_id_like_argmax():
    weight = torch.randn(100, 8, generator=torch.Generator().manual_seed(2))
    weight[70] = weight[10] = weight[40]
    h = weight[40:41] * 3
    assert GreedyHead(weight)(h).tolist() == full_argmax(h, weight).tolist() == [10]


def test_too_many_candidates_fall_back_to_the_full_product():
    weight = torch.randn(500, 16, generator=torch.Generator().manual_seed(3))
    head = GreedyHead(weight, max_candidates=0)
    h = torch.randn(3, 16)
    assert torch.equal(head(h), full_argmax(h, weight))
    assert head.fallbacks == 1


def test_rejects_a_non_fp32_weight():
    with pytest.raises(ValueError, match="bfloat16"):
        GreedyHead(torch.zeros(4, 4, dtype=torch.bfloat16))


@pytest.fixture(scope="module", params=["opt", "llama"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"hf-{request.param}-head")
    make_blip2(path, llm=request.param, num_query_tokens=4)
    return blipkit.load(path)


@bf16_native
def test_captioner_uses_the_head_and_gives_the_same_tokens(model):
    rng = np.random.default_rng(0)
    pixels = model.pixel_values([rng.integers(0, 255, (30, 40, 3), dtype=np.uint8) for _ in range(5)])
    fast = Captioner(model, "a photo of", max_new_tokens=8)
    assert fast.decoder.lean.head is not None
    plain = Captioner(model, "a photo of", max_new_tokens=8, greedy_head=False)
    assert plain.decoder.lean.head is None
    assert fast.tokens(pixels) == plain.tokens(pixels)


@bf16_native
def test_not_used_where_the_logits_are_more_than_the_projection(model):
    llm = model.model.llm
    assert greedy_head_for(llm) is not None
    handle = llm.register_forward_hook(
        lambda m, args, out: out.__setitem__("logits", out.logits * 0.5) or out
    )
    try:
        assert greedy_head_for(llm) is None  # e.g. soft-capped or scaled logits
    finally:
        handle.remove()
    assert greedy_head_for(llm.to(torch.bfloat16)) is None  # nothing to gain over a bf16 projection
    llm.float()
