"""Frozen image encoders: BLIP-2's EVA ViT (as in transformers' ``Blip2VisionModel``) and DINOv2.

Both return patch features with a final LayerNorm applied: (B, P, Dv), P = patches + 1 ([CLS] first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blipkit.config import VisionConfig


class Attention(nn.Module):
    """ViT self-attention with a fused qkv projection (EVA's q/v biases live in the fused bias)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, P, D = x.shape
        H = self.num_heads
        q, k, v = self.qkv(x).view(B, P, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, P, Dh)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, P, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, P, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EvaViT(nn.Module):
    """The BLIP-2 image encoder (EVA ViT-g/14 at full size)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        D, S = cfg.hidden_size, cfg.patch_size
        num_positions = (cfg.image_size // S) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.patch_embed = nn.Conv2d(3, D, kernel_size=S, stride=S)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, D))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def forward(self, pixel_values: Tensor) -> Tensor:
        B = pixel_values.shape[0]
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))  # (B, D, S', S')
        x = x.flatten(2).transpose(1, 2)  # (B, P-1, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed  # (B, P, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (B, P, D)


class Dinov2Encoder(nn.Module):
    """A frozen transformers ``Dinov2Model``; its ``last_hidden_state`` carries the final LayerNorm."""

    def __init__(self, cfg: VisionConfig, model: nn.Module):
        super().__init__()
        self.config = cfg
        self.model = model

    @classmethod
    def from_pretrained(cls, cfg: VisionConfig, path: str, dtype: torch.dtype | None = None) -> Dinov2Encoder:
        from transformers import Dinov2Model

        model = Dinov2Model.from_pretrained(path, dtype=dtype or torch.float32, trust_remote_code=False)
        return cls(cfg, model)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def forward(self, pixel_values: Tensor) -> Tensor:
        dtype = self.model.embeddings.patch_embeddings.projection.weight.dtype
        return self.model(pixel_values=pixel_values.to(dtype)).last_hidden_state  # (B, P, Dv)
