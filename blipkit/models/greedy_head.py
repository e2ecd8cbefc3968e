"""Exact greedy token choice from a cheap bf16 pass over the vocabulary.

Greedy decoding needs only ``argmax_v (h . w_v + b_v)``, yet the full fp32 product reads the whole (V, D)
output matrix at every step: for a small LLM that is a third to a half of a decoding step. A bf16 copy of the
matrix is half the bytes and runs on native bf16 units where the CPU has them. Every bf16 score lies within a
bound of the fp32 one (Cauchy-Schwarz on the rounding residuals, plus the rounding of the sum and of the
output), so only tokens whose interval reaches the best lower bound can win; their scores are recomputed in
fp32 and the winner is exactly the token the full product would pick (ties go to the lower id, as in
``torch.argmax``). When too many tokens remain in doubt, the full product is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS_BF16 = 2.0**-8  # bf16 unit roundoff (8 significant bits), doubled for safety
_EPS_FP32 = 2.0**-24


class GreedyHead:
    """``argmax(h @ weight.T + bias)`` per row of ``h`` (B, D), computed mostly in bf16, exactly."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, max_candidates: int = 2048):
        if weight.dtype != torch.float32:
            raise ValueError(f"GreedyHead checks fp32 scores; the weight is {weight.dtype}")
        self.weight = weight  # (V, D) the model's own matrix, not copied
        self.bias = bias  # (V,) or None
        self.low = weight.detach().to(torch.bfloat16)  # (V, D)
        low32 = self.low.float()
        # (2, V): |w - w'| and |w'| per token
        self.norms = torch.stack([(weight.detach() - low32).norm(dim=1), low32.norm(dim=1)])
        self.max_candidates = max_candidates
        self.fallbacks = 0  # steps that needed the full product

    def __call__(self, h: Tensor) -> Tensor:
        """Token ids (B,) for hidden states ``h`` (B, D) in fp32."""
        h = h.float()
        h_low = h.to(torch.bfloat16)
        approx = F.linear(h_low, self.low).float()  # (B, V)
        h_low32 = h_low.float()
        D = h.shape[-1]
        # |h.w - h'.w'| <= |h| |w - w'| + |h - h'| |w'|; the fp32 sum of D exact bf16 products adds at most
        # D eps32 |h'| |w'|, and rounding the output to bf16 at most eps_bf16 |approx|: one (B, 2) @ (2, V)
        scale = torch.stack(
            [h.norm(dim=1), (h - h_low32).norm(dim=1) + 2 * D * _EPS_FP32 * h_low32.norm(dim=1)], dim=1
        )  # (B, 2)
        bound = torch.addmm(approx.abs(), scale, self.norms, alpha=1.0, beta=_EPS_BF16)  # (B, V)
        if self.bias is not None:
            approx = approx + self.bias.float()
        floor = (approx - bound).amax(dim=1, keepdim=True)  # (B, 1) the best guaranteed score
        doubt = approx + bound >= floor  # (B, V) tokens that may still be the argmax
        columns = doubt.any(dim=0).nonzero().squeeze(1)  # (C,) ascending ids
        if columns.numel() > self.max_candidates:
            self.fallbacks += 1
            return F.linear(h, self.weight, self.bias).argmax(dim=-1)
        exact = F.linear(h, self.weight[columns], None if self.bias is None else self.bias[columns])  # (B, C)
        exact = exact.masked_fill(~doubt[:, columns], float("-inf"))
        return columns[exact.argmax(dim=1)]  # (B,)


@torch.inference_mode()
def greedy_head_for(llm: torch.nn.Module) -> GreedyHead | None:
    """A ``GreedyHead`` for ``llm`` when it pays and is exact, else None.

    It pays on CPUs with native bf16 matmuls and an fp32 output matrix. It is exact only when the logits are
    the output projection of the base model's last hidden state, nothing more (no soft-capping or scaling):
    checked here on a short random input.
    """
    head = llm.get_output_embeddings()
    base = getattr(llm, "base_model", None)
    weight = getattr(head, "weight", None)
    if base is None or base is llm or not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32:
        return None  # (a quantized head's ``weight`` is a method)
    if weight.device.type != "cpu" or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    bias = getattr(head, "bias", None)
    embeds = torch.randn(
        1, 3, llm.get_input_embeddings().weight.shape[1], generator=torch.Generator().manual_seed(0)
    )
    want = llm(inputs_embeds=embeds).logits[:, -1].float()  # (1, V)
    got = F.linear(base(inputs_embeds=embeds)[0][:, -1].float(), weight, bias)
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-5, atol=1e-5):
        return None
    return GreedyHead(weight, bias)
