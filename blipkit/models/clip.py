"""The dual-encoder family: CLIP and SigLIP (vision -> embedding, text -> embedding, scaled cosine).

References: CLIP (Radford et al. 2021, https://arxiv.org/abs/2103.00020), SigLIP (Zhai et al. 2023,
https://arxiv.org/abs/2303.15343), and transformers' ``modeling_clip.py`` / ``modeling_siglip.py``, whose
towers (``CLIPVisionModel``/``CLIPTextModel``, ``SiglipVisionModel``/``SiglipTextModel``) are used as is:

    CLIP:    image -> ViT -> post-LN [CLS] -> visual_projection (no bias) ─┐
             text  -> causal transformer -> final-LN at the first EOS -> text_projection (no bias) ─┤
             label probabilities: softmax over labels of exp(logit_scale) * cos ◄─────────────────────┘
    SigLIP:  image -> ViT -> attention-pooling head ─┐        (the heads live inside the towers)
             text  -> bidirectional transformer -> final-LN at the LAST position -> head ─┤
             probabilities: sigmoid(exp(logit_scale) * cos + logit_bias), each pair on its own ◄─┘

SigLIP was trained on texts padded to ``text_max_tokens`` with no attention mask (its pooled position is the
last one, a pad for short texts): ``DualEncoderConfig.text_padding`` says how to pad, and ``text_embeddings``
passes no mask to it. Shapes: B batch, T text tokens, E embedding width, N images, M texts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blipkit.config import PromptConfig
from blipkit.errors import CheckpointError, ConfigError
from blipkit.models.family import require
from blipkit.state_dicts import load_strict

KINDS = ("clip", "siglip")
_NAMES = {"clip": "CLIP", "siglip": "SigLIP"}  # in messages
_CAPABILITIES = {"clip": frozenset({"embed"}), "siglip": frozenset({"embed", "match"})}


@dataclass
class DualEncoderConfig:
    name: str
    kind: str  # "clip" or "siglip"
    hf_config: dict[str, Any]  # the transformers CLIPConfig / SiglipConfig dict, as in config.json
    processor: dict[str, Any] = field(default_factory=dict)  # ImageProcessor fields
    prompts: PromptConfig = field(default_factory=PromptConfig)  # classify: "a photo of {}"
    text_max_tokens: int = 77  # the text tower's max positions (CLIP 77, SigLIP 64); texts are cut to it
    text_padding: str = "longest"  # "longest" (CLIP) or "max_length" (SigLIP: trained padded to max length)
    family: str = "clip"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.text_padding not in ("longest", "max_length"):
            raise ConfigError(f"text_padding must be 'longest' or 'max_length', got {self.text_padding!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def hf_config_class(kind: str) -> type:
    """transformers' ``CLIPConfig`` or ``SiglipConfig``."""
    from transformers import CLIPConfig, SiglipConfig

    return CLIPConfig if kind == "clip" else SiglipConfig


class DualEncoder(nn.Module):
    """A CLIP or SigLIP model: two transformers towers, their projections and the logit scale (and bias)."""

    has_llm = False
    llm = None
    question_aware = False  # the image embedding does not depend on any text
    is_encoder_decoder = False

    def __init__(self, config: DualEncoderConfig):
        super().__init__()
        from transformers import CLIPTextModel, CLIPVisionModel, SiglipTextModel, SiglipVisionModel

        self.config = config
        self.kind = config.kind
        hf = hf_config_class(config.kind).from_dict(dict(config.hf_config))
        if config.kind == "clip":
            self.vision = CLIPVisionModel._from_config(hf.vision_config)
            self.text = CLIPTextModel._from_config(hf.text_config)
            self.visual_projection = nn.Linear(hf.vision_config.hidden_size, hf.projection_dim, bias=False)
            self.text_projection = nn.Linear(hf.text_config.hidden_size, hf.projection_dim, bias=False)
            self.logit_scale = nn.Parameter(torch.tensor(hf.logit_scale_init_value))  # ()
        else:  # SigLIP: vision attention-pooling head and text head are inside the towers
            self.vision = SiglipVisionModel._from_config(hf.vision_config)
            self.text = SiglipTextModel._from_config(hf.text_config)
            self.visual_projection = self.text_projection = None
            self.logit_scale = nn.Parameter(torch.zeros(1))  # (1,)
            self.logit_bias = nn.Parameter(torch.zeros(1))  # (1,)

    # --- the family contract --------------------------------------------------------------------------------
    @property
    def capabilities(self) -> frozenset[str]:
        return _CAPABILITIES[self.kind]

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        """The towers' dtype (what ``encode_image`` casts pixels to)."""
        return self.vision.get_input_embeddings().weight.dtype

    def require_llm(self) -> None:
        """CapabilityError: a dual encoder has no language model (it embeds; it cannot caption or answer)."""
        require(self, "caption", _NAMES[self.kind])

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, S, S) pixels -> (B, 1, E) projected pooled image embeddings (not normalised)."""
        out = self.vision(pixel_values=pixel_values.to(self.dtype))
        pooled = out.pooler_output  # (B, Dv): CLIP post-LN [CLS]; SigLIP attention-pooled head output
        if self.visual_projection is not None:
            pooled = self.visual_projection(pooled)  # (B, E)
        return pooled[:, None]  # (B, 1, E)

    def image_embeddings(self, features: Tensor) -> Tensor:
        """(B, 1, E) ``encode_image`` features -> (B, 1, E) L2-normalised, float32."""
        return F.normalize(features.float(), dim=-1)

    def text_embeddings(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T) token ids -> (B, E) L2-normalised text embeddings, float32.

        CLIP pools at the first EOS (right padding with the mask, as CLIPProcessor pads to the longest);
        SigLIP reads the last position of ids padded to max length and gets no mask, as in training.
        """
        if self.kind == "siglip":
            attention_mask = None
        out = self.text(input_ids=input_ids, attention_mask=attention_mask)
        pooled = out.pooler_output  # (B, Dt) (SigLIP: already through its head, (B, E))
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)  # (B, E)
        return F.normalize(pooled.float(), dim=-1)

    def logits(self, similarity: Tensor) -> Tensor:
        """Cosine similarity (N, M) -> logits (N, M): exp(logit_scale) * cos (+ logit_bias for SigLIP)."""
        logits = similarity.float() * self.logit_scale.float().exp()
        if self.kind == "siglip":
            logits = logits + self.logit_bias.float()
        return logits

    def label_probs(self, similarity: Tensor) -> Tensor:
        """Cosine similarity (N images, M labels) -> (N, M) probabilities.

        CLIP: softmax over the labels (each row sums to 1); SigLIP: an independent sigmoid per label.
        """
        logits = self.logits(similarity)
        return logits.softmax(dim=-1) if self.kind == "clip" else logits.sigmoid()

    def match_probs(
        self, features: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> Tensor:
        """(B, 1, E) image features, (B, T) texts -> (B,) probability that text i matches image i (SigLIP)."""
        require(self, "match", _NAMES[self.kind])  # CLIP: CapabilityError, with why_not's reason
        image = self.image_embeddings(features)[:, 0]  # (B, E)
        text = self.text_embeddings(input_ids, attention_mask)  # (B, E)
        return self.logits((image * text).sum(dim=-1)).sigmoid()  # (B,)

    def why_not(self, capability: str) -> str | None:
        """Why a capability is missing (``family.require`` puts it in the ``CapabilityError``)."""
        if capability == "match" and self.kind == "clip":
            return (
                "CLIP has no match head: its softmax only ranks labels against each other; "
                "use similarity or classify"
            )
        if capability in ("caption", "ask", "chat"):
            return "a dual encoder has no language model"
        return None


def empty(config: DualEncoderConfig) -> DualEncoder:
    """A ``DualEncoder`` on the meta device; its state dict: the names and shapes a checkpoint must have."""
    with torch.device("meta"):
        return DualEncoder(config)


def fill(model: DualEncoder, state_dict: dict[str, Tensor], where: str) -> DualEncoder:
    """Fill an ``empty`` model strictly from a blipkit-named ``state_dict`` (assigned, not copied).

    A missing, unexpected or mis-shaped key is a ``CheckpointError`` naming it. The non-persistent
    ``position_ids`` buffers (``arange``), which no state dict holds, are rebuilt on the CPU.
    """
    load_strict(model, state_dict, where)
    for module in model.modules():
        buf = module._buffers.get("position_ids")
        if buf is not None and buf.is_meta:
            module.position_ids = torch.arange(buf.shape[-1]).expand(buf.shape)  # (1, positions)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{where}: the model has tensors no checkpoint fills: {left}")
    return model.eval()


def build(config: DualEncoderConfig, state_dict: dict[str, Tensor], where: str) -> DualEncoder:
    """``fill(empty(config), state_dict, where)``."""
    return fill(empty(config), state_dict, where)
