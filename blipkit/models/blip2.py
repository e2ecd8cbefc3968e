"""Vision encoder -> Q-Former -> bridge -> frozen LLM (decoder-only or encoder-decoder) via ``inputs_embeds``.

The bridge turns the Q query outputs into Q "soft visual prompt" tokens in the LLM's embedding space. A
decoder-only LLM reads [visual prompt; text]; an encoder-decoder LLM reads them as its encoder input and
generates (or is trained on) the decoder side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blipkit.config import Blip2Config, BridgeConfig
from blipkit.errors import CapabilityError
from blipkit.models.llm_io import takes
from blipkit.models.qformer import QFormer


def make_bridge(cfg: BridgeConfig, qformer_width: int) -> nn.Module:
    """``linear`` (BLIP-2) or ``mlp`` (LLaVA-1.5: Linear -> GELU -> Linear)."""
    if cfg.kind == "linear":
        return nn.Linear(qformer_width, cfg.llm_hidden_size)
    if cfg.kind == "mlp":
        return nn.Sequential(
            nn.Linear(qformer_width, cfg.llm_hidden_size),
            nn.GELU(),
            nn.Linear(cfg.llm_hidden_size, cfg.llm_hidden_size),
        )
    raise ValueError(f"unknown bridge kind {cfg.kind!r}; expected 'linear' or 'mlp'")


@dataclass
class Blip2Output:
    logits: Tensor  # (B, T, V): text positions (decoder-only) or decoder positions (encoder-decoder)
    loss: Tensor | None = None


def left_pack(embeds: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move every row's padding to the front, keeping the order of real tokens: (B, L, D), (B, L)."""
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # zeros (padding) first
    return embeds.gather(1, order[..., None].expand_as(embeds)), mask.gather(1, order)


def _dense_inputs(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: tensor inputs made contiguous. Generation feeds the output projection a strided slice
    (the last position of each row); on CPU a bf16 matmul with such an input copies the whole weight matrix
    per call, about 100x slower than the same product on a dense input."""
    return tuple(a.contiguous() if isinstance(a, Tensor) else a for a in args)


VISUAL_INPUTS = ("image_embeds", "prefix", "qformer_input_ids", "qformer_attention_mask")


class Blip2(nn.Module):
    def __init__(self, config: Blip2Config, vision: nn.Module, llm: nn.Module | None):
        super().__init__()
        self.config = config
        self.vision = vision
        self.qformer = QFormer(config.qformer)
        self.llm = llm  # None for retrieval-only checkpoints
        if llm is not None:
            self.bridge = make_bridge(config.bridge, config.qformer.hidden_size)
            self._llm_takes_positions = takes(llm, "position_ids")
            head = llm.get_output_embeddings()
            if head is not None:
                head.register_forward_pre_hook(_dense_inputs)

    @property
    def has_llm(self) -> bool:
        return self.llm is not None

    def _require_llm(self) -> None:
        if self.llm is None:
            raise CapabilityError("this checkpoint has no language model (an image-text retrieval model)")

    @property
    def is_encoder_decoder(self) -> bool:
        return self.config.llm.kind == "seq2seq"

    # --- image side ---------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """Frozen vision features (B, P, Dv) in the Q-Former's dtype."""
        with torch.no_grad():
            feats = self.vision(pixel_values)
        return feats.to(self.qformer.query_tokens.dtype)

    def visual_prompt(
        self,
        image_embeds: Tensor,
        qformer_input_ids: Tensor | None = None,
        qformer_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Soft visual prompt tokens (B, Q, Dl). With ``bridge.text_input`` the prompt joins the queries."""
        Q = self.config.qformer.num_query_tokens
        ids = qformer_input_ids if self.config.bridge.text_input else None
        hidden = self.qformer(image_embeds, ids, qformer_attention_mask, mask_kind="bidirectional")
        return self.bridge(hidden[:, :Q])  # (B, Q, Dl)

    def _prefix(
        self,
        pixel_values: Tensor | None,
        image_embeds: Tensor | None = None,
        prefix: Tensor | None = None,
        qformer_input_ids: Tensor | None = None,
        qformer_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """The visual prompt (B, Q, Dl) in the LLM's dtype, from whichever stage the caller has."""
        self._require_llm()
        if prefix is None:
            if image_embeds is None:
                image_embeds = self.encode_image(pixel_values)
            prefix = self.visual_prompt(image_embeds, qformer_input_ids, qformer_attention_mask)
        return prefix.to(self.llm.get_input_embeddings().weight.dtype)

    def _inputs(
        self, prefix: Tensor, input_ids: Tensor, attention_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """[visual prompt; text] embeddings (B, Q+T, Dl) and their mask (B, Q+T)."""
        text = self.llm.get_input_embeddings()(input_ids)  # (B, T, Dl)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ones = torch.ones(prefix.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        return torch.cat([prefix, text], dim=1), torch.cat([ones, attention_mask], dim=1)

    # --- training / scoring ---------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        image_embeds: Tensor | None = None,
        prefix: Tensor | None = None,
        qformer_input_ids: Tensor | None = None,
        qformer_attention_mask: Tensor | None = None,
    ) -> Blip2Output:
        """Logits for the text (decoder-only) or the decoder (encoder-decoder), and the LM loss given labels.

        Decoder-only: ``labels`` (B, T) align with ``input_ids``; -100 marks prompt and padding; the loss is
        next-token cross-entropy over text positions only. Encoder-decoder (prefix-LM): ``input_ids`` is the
        prefix read by the encoder, ``labels`` the suffix the decoder must produce.
        """
        prefix = self._prefix(pixel_values, image_embeds, prefix, qformer_input_ids, qformer_attention_mask)
        embeds, mask = self._inputs(prefix, input_ids, attention_mask)  # (B, Q+T, Dl), (B, Q+T)
        Q = prefix.shape[1]
        if self.is_encoder_decoder:
            out = self.llm(
                inputs_embeds=embeds,
                attention_mask=mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                labels=labels,
            )
            return Blip2Output(logits=out.logits, loss=out.loss)
        kwargs = {}
        if self._llm_takes_positions:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask, **kwargs).logits[:, Q:]  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=-100,
            )
        return Blip2Output(logits=logits, loss=loss)

    # --- generation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        pixel_values: Tensor | None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        """New tokens (B, N) after the visual prompt and text prompt; greedy, beam search or sampling.

        The visual side is given as in ``forward``: ``pixel_values``, or precomputed ``image_embeds`` /
        ``prefix``, plus ``qformer_input_ids`` / ``qformer_attention_mask`` for question-aware queries.
        Other ``kwargs`` go to transformers' ``generate`` (``max_new_tokens``, ``num_beams``, ``do_sample``,
        ``min_new_tokens``, ``eos_token_id``, ...). Prompts may be padded on either side.
        """
        visual = {k: kwargs.pop(k, None) for k in VISUAL_INPUTS}
        prefix = self._prefix(pixel_values, **visual)
        if input_ids is None:
            input_ids = torch.zeros(prefix.shape[0], 0, dtype=torch.long, device=prefix.device)
        embeds, mask = self._inputs(prefix, input_ids, attention_mask)
        if self.is_encoder_decoder:
            out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
            return out[:, 1:]  # drop the decoder start token
        embeds, mask = left_pack(embeds, mask)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
