"""LLaVA: vision tower patches -> MLP projector -> spliced into the prompt at its image token -> frozen LLM.

References: the original repo (haotian-liu/LLaVA, ``llava/model/llava_arch.py``:
``prepare_inputs_labels_for_multimodal``) and transformers' ``models/llava/modeling_llava.py``
(``LlavaModel.get_image_features``, ``LlavaMultiModalProjector``). The three public stages are Blip2's:

    visual_prompt(Visual)               -> (B, P, Dl)   the projected patches, in the LLM's dtype
    llm_inputs(prefix, input_ids, mask) -> LLMInputs    the text with its image token replaced by the P rows
    lm_loss(inputs, labels)             -> ()           training and scoring

Each row's text holds exactly one ``image_token_index`` (an id of the tokenizer, or -200 in the original
repo's layout, which is never looked up in the embedding table). The joined row is

    text[:k] ; prefix (P rows) ; text[k+1:]        k = the image token's column, L = T + P - 1

so the image sits where the prompt put it, not in front. ``LLMInputs.text_columns`` (B, T) maps each text
column to its joined position (the image token's column to the last image position, whose logits predict the
token after the image), so logits and labels stay aligned with ``input_ids``.

With ``pool = k > 1`` the tower's square g x g patch grid is averaged over k x k blocks before the projector
(``pool_patches``, as the default-llava model reads DINOv2): P = (g / k)^2 rows.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blipkit.config import LLMConfig, PromptConfig, check_type
from blipkit.errors import ConfigError, UsageError
from blipkit.models.blip2 import LOSS_CONVENTIONS, VISUAL_INPUTS, Visual
from blipkit.models.llm_io import LLMInputs, attach, generate_decoder_only, positions_from_mask
from blipkit.models.towers import TowerConfig, VisionTower

PROJECTORS = ("linear", "mlp2x_gelu")
ORIGINAL_IMAGE_TOKEN_INDEX = -200  # the original repo's IMAGE_TOKEN_INDEX (llava/constants.py)


@dataclass
class ProjectorConfig:
    kind: str = "mlp2x_gelu"  # "linear" (LLaVA v1) or "mlp2x_gelu" (LLaVA-1.5: Linear -> act -> Linear)
    act: str = "gelu"  # transformers' projector_hidden_act (an ACT2FN name); mlp2x_gelu only
    bias: bool = True  # transformers' multimodal_projector_bias


def _llava_prompts() -> PromptConfig:
    # LLaVA-1.5's captioning request and short-answer VQA instruction (its eval scripts' prompts)
    return PromptConfig(
        caption="Describe the image briefly.",
        vqa="{}\nAnswer the question using a single word or phrase.",
        chat_separator="",
    )


@dataclass
class LlavaConfig:
    name: str = "llava"
    vision: TowerConfig = field(default_factory=TowerConfig)
    feature_layer: int | list[int] = -2  # hidden_states index of the tower (a list: concatenated layers)
    select: str = "default"  # "default": drop the tower's CLS token; "full": keep every token
    pool: int = 1  # average k x k blocks of the patch grid before the projector (1: every patch)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    image_token_index: int = ORIGINAL_IMAGE_TOKEN_INDEX  # the id that marks the image in input_ids
    llm: LLMConfig = field(default_factory=LLMConfig)
    prompts: PromptConfig = field(default_factory=_llava_prompts)
    template: str = "llava_v1"  # a blipkit.templates name; "tokenizer": the tokenizer's chat_template
    image_token: str = "<image>"  # the image's placeholder in prompt text
    processor: dict[str, Any] = field(default_factory=dict)  # ImageProcessor fields
    family: str = "llava"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, source: str | None = None) -> LlavaConfig:
        """From a JSON-like dict (``to_dict``'s output); a wrong key or type is a ConfigError naming it."""
        from blipkit.config import _build  # the one dataclass-from-dict checker of blipkit.config

        cfg = _build(cls, d, f"{source}: " if source else "", "")
        check_type(str, cfg.family, "family")
        if cfg.family != "llava":
            raise ConfigError(f"family must be 'llava', got {cfg.family!r}")
        return cfg


@dataclass
class LlavaOutput:
    logits: Tensor  # (B, T, V) at the text columns: logits[:, t] predicts text token t + 1
    loss: Tensor | None = None


def pool_patches(features: Tensor, k: int) -> Tensor:
    """(B, g*g, D) patch features of a square g x g grid -> (B, (g/k)^2, D) means of k x k blocks."""
    if k == 1:
        return features
    B, P, D = features.shape
    g = math.isqrt(P)
    if g * g != P or g % k:
        raise ConfigError(f"pool={k} needs a square patch grid divisible by {k}; got {P} feature rows")
    grid = features.transpose(1, 2).reshape(B, D, g, g)  # (B, D, g, g)
    return F.avg_pool2d(grid, k).flatten(2).transpose(1, 2)  # (B, (g/k)^2, D)


class Projector(nn.Module):
    """transformers' ``LlavaMultiModalProjector`` (``mlp2x_gelu``) or one linear layer (``linear``)."""

    def __init__(self, cfg: ProjectorConfig, in_features: int, out_features: int):
        super().__init__()
        if cfg.kind not in PROJECTORS:
            raise ConfigError(f"projector kind {cfg.kind!r} is not one of {list(PROJECTORS)}")
        self.linear_1 = nn.Linear(in_features, out_features, bias=cfg.bias)  # (Dv -> Dl)
        if cfg.kind == "mlp2x_gelu":
            from transformers.activations import ACT2FN

            if cfg.act not in ACT2FN:
                raise ConfigError(
                    f"projector activation {cfg.act!r} is not one of transformers' {sorted(ACT2FN)}"
                )
            self.act = ACT2FN[cfg.act]
            self.linear_2 = nn.Linear(out_features, out_features, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear_1(x)
        if hasattr(self, "linear_2"):
            x = self.linear_2(self.act(x))
        return x  # (B, P, Dl)


class Llava(nn.Module):
    capabilities = frozenset({"caption", "ask", "chat"})
    is_encoder_decoder = False
    question_aware = False  # the visual prompt does not depend on the text

    def __init__(self, config: LlavaConfig, vision: VisionTower, llm: nn.Module):
        super().__init__()
        self.config = config
        self.vision = vision
        self.llm = llm
        width = getattr(vision, "hidden_size", None)
        if width is None:
            raise ConfigError("the vision tower must say its feature width (hidden_size)")
        with_cls = config.select == "full" and getattr(vision, "has_cls", True)
        if config.pool < 1 or (config.pool > 1 and with_cls):
            raise ConfigError(f"pool={config.pool}: must be >= 1, and > 1 only on patches (select 'default')")
        self.projector = Projector(config.projector, width, llm.get_input_embeddings().embedding_dim)
        self._llm_takes_positions = attach(llm)

    @property
    def has_llm(self) -> bool:
        return True

    def require_llm(self) -> None:
        """Every LLaVA checkpoint has its language model: nothing to check."""

    @property
    def num_visual_tokens(self) -> int:
        """LLM positions the image takes: the tower's patches (+ CLS with ``select="full"``), / pool^2."""
        return self.vision.num_tokens // self.config.pool**2

    # --- stage 1: the visual prompt ------------------------------------------------------------------------
    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """Frozen tower features (B, P, Dv) in the projector's dtype."""
        with torch.no_grad():
            feats = self.vision(pixel_values)
        return feats.to(self.projector.linear_1.weight.dtype)

    def visual_prompt(self, visual: Visual) -> Tensor:
        """Projected patches (B, P, Dl) in the LLM's dtype, from whichever stage ``visual`` holds
        (``image_embeds`` are the tower's features, before ``pool``)."""
        prefix = visual.prefix
        if prefix is None:
            embeds = visual.image_embeds
            if embeds is None:
                embeds = self.encode_image(visual.pixel_values)
            embeds = pool_patches(embeds.to(self.projector.linear_1.weight.dtype), self.config.pool)
            prefix = self.projector(embeds)  # (B, P, Dl)
        return prefix.to(self.llm.get_input_embeddings().weight.dtype)

    # --- stage 2: the LLM's inputs ----------------------------------------------------------------------
    def image_columns(self, input_ids: Tensor) -> Tensor:
        """The column (B,) of each row's one image token; a row with none or several is a UsageError."""
        index = self.config.image_token_index
        is_image = input_ids == index  # (B, T)
        counts = is_image.sum(dim=1).tolist()
        for row, n in enumerate(counts):
            if n != 1:
                raise UsageError(
                    f"row {row} of input_ids holds {n} image tokens (id {index}); a LLaVA prompt needs "
                    f"exactly one, where the image goes (the text {self.config.image_token!r})"
                )
        return is_image.to(torch.int8).argmax(dim=1)

    def llm_inputs(
        self, prefix: Tensor, input_ids: Tensor | None, attention_mask: Tensor | None = None
    ) -> LLMInputs:
        """The text with its image token replaced by the P prefix rows: (B, T + P - 1, Dl), mask, positions
        and ``text_columns``. Rows may be padded (right padding keeps every row's image at its own place)."""
        if input_ids is None:
            raise UsageError(f"a LLaVA prompt needs text with the image token {self.config.image_token!r}")
        B, P = prefix.shape[:2]
        T = input_ids.shape[1]
        if P < 1:
            raise ValueError("the visual prompt has no rows")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        k = self.image_columns(input_ids)[:, None]  # (B, 1)
        is_image = input_ids == self.config.image_token_index
        text = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # (B, T, Dl), id 0 unused
        j = torch.arange(T, device=input_ids.device)[None]  # (1, T)
        text_columns = j + (j >= k) * (P - 1)  # (B, T)
        i = torch.arange(T + P - 1, device=input_ids.device)[None]  # (1, L) joined positions
        # where each joined position comes from in cat([text, prefix]): text before k, prefix, text after k
        source = torch.where(i < k, i, torch.where(i < k + P, T + i - k, i - P + 1))  # (B, L)
        embeds = torch.cat([text, prefix.to(text.dtype)], dim=1)  # (B, T + P, Dl)
        embeds = embeds.gather(1, source[..., None].expand(-1, -1, embeds.shape[-1]))  # (B, L, Dl)
        mask = torch.cat([attention_mask, attention_mask.new_ones(B, P)], dim=1).gather(1, source)  # (B, L)
        return LLMInputs(embeds, mask, positions_from_mask(mask), 0, text_columns=text_columns)

    def _llm_kwargs(self, inputs: LLMInputs) -> dict:
        kwargs = {"inputs_embeds": inputs.embeds, "attention_mask": inputs.mask}
        if self._llm_takes_positions:
            kwargs["position_ids"] = inputs.position_ids
        return kwargs

    # --- stage 3: loss and logits ------------------------------------------------------------------------
    def joined_targets(self, inputs: LLMInputs, labels: Tensor) -> Tensor:
        """The token each joined position 0..L-2 must predict: (B, L-1), -100 where unscored.

        ``labels`` (B, T) align with ``input_ids``, -100 on the image token, prompt and padding. They are
        placed at ``text_columns``, so the image positions hold -100 as in transformers' LLaVA labels (the
        image token's own label lands on the last image position: it must be -100 too).
        """
        if inputs.text_columns is None or inputs.packed:
            raise ValueError("LLaVA losses need the unpacked inputs of llm_inputs (with text_columns)")
        B, L = inputs.mask.shape
        labels = labels.to(inputs.mask.device)
        joined = labels.new_full((B, L), -100).scatter(1, inputs.text_columns, labels)  # (B, L)
        return joined[:, 1:]

    def lm_loss(
        self, inputs: LLMInputs, labels: Tensor, reduction: str = "mean", convention: str = "generation"
    ) -> Tensor:
        """Cross-entropy of the LLM on ``labels`` (B, T); ``reduction`` "mean" (over scored tokens) or "sum".

        Exactly transformers' ``LlavaForConditionalGeneration`` loss on the same tokens (its labels with -100
        on the image positions). Both of Blip2's ``convention``s give the same here: the token after the image
        is scored from the last image position, and the first text token has nothing before it.
        """
        if convention not in LOSS_CONVENTIONS:
            raise ValueError(f"unknown loss convention {convention!r}; expected one of {LOSS_CONVENTIONS}")
        hidden = self.llm.base_model(**self._llm_kwargs(inputs))[0]  # (B, L, Dl)
        return self._loss(hidden, self.joined_targets(inputs, labels), reduction)

    def _loss(self, hidden: Tensor, targets: Tensor, reduction: str) -> Tensor:
        """Cross-entropy of hidden states (B, L, Dl) against joined targets (B, L-1), in fp32."""
        scored = targets != -100
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][scored])  # (N, V) only where it counts
        return F.cross_entropy(logits.float(), targets[scored], reduction=reduction)

    def forward(
        self,
        pixel_values: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        **visual: Tensor | None,
    ) -> LlavaOutput:
        """Logits (B, T, V) at the text columns (``logits[:, t]`` predicts text token t + 1) and, given
        ``labels`` (B, T) aligned with ``input_ids``, the mean LM loss (``lm_loss``). The image side is
        ``pixel_values``, or precomputed ``image_embeds`` / ``prefix`` as keywords."""
        unknown = sorted(set(visual) - set(VISUAL_INPUTS))
        if unknown:
            raise TypeError(f"forward() got unexpected keyword arguments {unknown}")
        prefix = self.visual_prompt(Visual(pixel_values, **visual))
        inputs = self.llm_inputs(prefix, input_ids, attention_mask)  # (B, L, Dl)
        hidden = self.llm.base_model(**self._llm_kwargs(inputs))[0]  # (B, L, Dl)
        head = self.llm.get_output_embeddings()
        columns = inputs.text_columns[..., None].expand(-1, -1, hidden.shape[-1])
        logits = head(hidden.gather(1, columns))  # (B, T, V)
        loss = None if labels is None else self._loss(hidden, self.joined_targets(inputs, labels), "mean")
        return LlavaOutput(logits=logits, loss=loss)

    # --- transformers' generate ----------------------------------------------------------------------------
    @torch.no_grad()
    def hf_generate(self, inputs: LLMInputs, **kwargs) -> Tensor:
        """New tokens (B, N) from transformers' ``generate`` after ``inputs`` (left-packed first)."""
        return generate_decoder_only(self.llm, inputs, **kwargs)

    @torch.no_grad()
    def generate(
        self, pixel_values: Tensor | None, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs
    ) -> Tensor:
        """transformers' ``generate`` on an image batch: new tokens (B, N); images given as in ``forward``."""
        visual = Visual(pixel_values, **{k: kwargs.pop(k) for k in VISUAL_INPUTS if k in kwargs})
        return self.hf_generate(
            self.llm_inputs(self.visual_prompt(visual), input_ids, attention_mask), **kwargs
        )
