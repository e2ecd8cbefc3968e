"""Vision encoder -> Q-Former -> bridge -> frozen LLM (decoder-only or encoder-decoder) via ``inputs_embeds``.

The bridge turns the Q query outputs into Q "soft visual prompt" tokens in the LLM's embedding space. Every
caller goes through the same three public stages:

    visual_prompt(Visual)               -> (B, Q, Dl)   the soft visual prompt, in the LLM's dtype
    llm_inputs(prefix, input_ids, mask) -> LLMInputs    [visual prompt; text], mask, position ids
    lm_loss(inputs, labels)             -> ()           training and scoring

A decoder-only LLM reads [visual prompt; text]; an encoder-decoder LLM reads them as its encoder input and
generates (or is trained on) the decoder side. Decoding lives in ``blipkit.models.decoding``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blipkit.config import Blip2Config, BridgeConfig
from blipkit.errors import ConfigError
from blipkit.models.family import require
from blipkit.models.llm_io import LLMInputs, attach, generate_decoder_only, positions_from_mask
from blipkit.models.qformer import QFormer

LOSS_CONVENTIONS = ("generation", "transformers")


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
    raise ConfigError(f"unknown bridge kind {cfg.kind!r}; expected 'linear' or 'mlp'")


@dataclass
class Visual:
    """The image side of a call, at whichever stage the caller has it: the latest stage given is used.

    ``qformer_input_ids`` / ``qformer_attention_mask`` carry the prompt for question-aware queries
    (``bridge.text_input``); other models ignore them.
    """

    pixel_values: Tensor | None = None  # (B, 3, S, S)
    image_embeds: Tensor | None = None  # (B, P, Dv) frozen vision features
    prefix: Tensor | None = None  # (B, Q, Dl) a visual prompt computed earlier
    qformer_input_ids: Tensor | None = None  # (B, Tq)
    qformer_attention_mask: Tensor | None = None  # (B, Tq)

    @property
    def batch_size(self) -> int:
        for f in ("prefix", "image_embeds", "pixel_values"):
            value = getattr(self, f)
            if value is not None:
                return value.shape[0]
        raise ValueError("Visual holds no image input")

    def rows(self, sl: slice) -> Visual:
        """The rows ``sl`` of every tensor held."""
        return Visual(**{f.name: _rows(getattr(self, f.name), sl) for f in fields(self)})


def _rows(t: Tensor | None, sl: slice) -> Tensor | None:
    return None if t is None else t[sl]


VISUAL_INPUTS = tuple(f.name for f in fields(Visual) if f.name != "pixel_values")


def next_token_targets(labels: Tensor, prefix_len: int, convention: str = "generation") -> Tensor:
    """The token each position 0..L-2 of [visual prompt; text] must predict: (B, L-1), -100 where unscored.

    ``labels`` (B, T) align with the text tokens, -100 on prompt and padding. Two conventions:

    - ``"generation"`` (LAVIS, and how blipkit trains): position i predicts token i+1 of the whole sequence,
      so the first text token is scored from the last visual-prompt position. Generation starts there, so an
      empty prompt (plain captioning) needs it.
    - ``"transformers"`` (``Blip2ForConditionalGeneration``): the shift stays inside the text and
      ``labels[:, 0]`` is never scored; use it to compare loss values with transformers.
    """
    if convention not in LOSS_CONVENTIONS:
        raise ValueError(f"unknown loss convention {convention!r}; expected one of {LOSS_CONVENTIONS}")
    if convention == "transformers":
        labels = labels.clone()
        labels[:, 0] = -100
    unscored = labels.new_full((labels.shape[0], prefix_len), -100)
    return torch.cat([unscored, labels], dim=1)[:, 1:]


@dataclass
class Blip2Output:
    logits: Tensor  # (B, T, V): text positions (decoder-only) or decoder positions (encoder-decoder)
    loss: Tensor | None = None


def _check_width(what: str, got: int | None, expected: int, field: str) -> None:
    if got is not None and got != expected:
        raise ConfigError(f"{what} is {got} wide but the config's {field} is {expected}")


class Blip2(nn.Module):
    def __init__(self, config: Blip2Config, vision: nn.Module, llm: nn.Module | None):
        super().__init__()
        self.config = config
        self.vision = vision  # nn.Identity when features come from a cache (training)
        _check_width(
            "the vision encoder",
            getattr(vision, "hidden_size", None),
            config.qformer.encoder_hidden_size,
            "qformer.encoder_hidden_size",
        )
        self.qformer = QFormer(config.qformer)
        self.llm = llm  # None for retrieval-only checkpoints
        if llm is not None:
            width = llm.get_input_embeddings().embedding_dim
            _check_width("the language model", width, config.bridge.llm_hidden_size, "bridge.llm_hidden_size")
            self.bridge = make_bridge(config.bridge, config.qformer.hidden_size)
            self._llm_takes_positions = attach(llm)

    @property
    def has_llm(self) -> bool:
        return self.llm is not None

    @property
    def capabilities(self) -> frozenset[str]:
        """What this checkpoint can do (see ``blipkit.models.family``)."""
        can = {"caption", "ask", "chat"} if self.has_llm else set()
        if self.qformer.has_retrieval_heads:
            can |= {"embed", "match"}
        return frozenset(can)

    def why_not(self, capability: str) -> str | None:
        """Why this checkpoint lacks ``capability``."""
        if capability in ("caption", "ask", "chat"):
            return "it has no language model: an image-text retrieval checkpoint"
        return (
            "it has no Q-Former text path with ITC/ITM heads, a generation-only checkpoint: similarity, "
            "match, classify and text embeddings need a retrieval or stage-1 checkpoint"
        )

    @property
    def num_visual_tokens(self) -> int:
        """LLM positions the image takes: the queries."""
        return self.config.qformer.num_query_tokens

    def require_llm(self) -> None:
        """Raise CapabilityError when there is no language model (a retrieval checkpoint)."""
        if self.llm is None:
            require(self, "caption", self.config.name)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.config.llm.kind == "seq2seq"

    @property
    def question_aware(self) -> bool:
        """Whether the prompt joins the Q-Former's queries, so the visual prompt depends on the text."""
        return bool(self.config.bridge.text_input)

    # --- stage 1: the visual prompt ------------------------------------------------------------------------
    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """Frozen vision features (B, P, Dv) in the Q-Former's dtype."""
        with torch.no_grad():
            feats = self.vision(pixel_values)
        return feats.to(self.qformer.query_tokens.dtype)

    def visual_prompt(self, visual: Visual) -> Tensor:
        """Soft visual prompt tokens (B, Q, Dl) in the LLM's dtype, from whichever stage ``visual`` holds."""
        self.require_llm()
        prefix = visual.prefix
        if prefix is None:
            embeds = visual.image_embeds
            if embeds is None:
                embeds = self.encode_image(visual.pixel_values)
            ids = visual.qformer_input_ids if self.question_aware else None
            mask = visual.qformer_attention_mask if ids is not None else None
            hidden = self.qformer(embeds, ids, mask, mask_kind="bidirectional")  # (B, Q+Tq, Dq)
            prefix = self.bridge(hidden[:, : self.config.qformer.num_query_tokens])  # (B, Q, Dl)
        return prefix.to(self.llm.get_input_embeddings().weight.dtype)

    # --- one embedding space (the Q-Former's text path) ---------------------------------------------------
    def image_embeddings(self, image_embeds: Tensor) -> Tensor:
        """ITC image embeddings (B, Q, E), one per query, L2-normalised, from vision features (B, P, Dv)."""
        return self.qformer.image_features(image_embeds)

    def text_embeddings(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """ITC text embeddings (B, E), L2-normalised."""
        return self.qformer.text_features(input_ids, attention_mask)

    def label_probs(self, similarity: Tensor) -> Tensor:
        """Zero-shot probabilities (N, M) from ITC similarities: softmax over labels of sim / temperature."""
        return (similarity / self.qformer.temp.detach().float().clamp(min=1e-3)).softmax(dim=-1)

    def match_probs(
        self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> Tensor:
        """ITM probability (B,) that text i matches image i."""
        return self.qformer.itm_logits(image_embeds, input_ids, attention_mask).softmax(dim=-1)[:, 1]

    # --- stage 2: the LLM's inputs ----------------------------------------------------------------------
    def llm_inputs(
        self, prefix: Tensor, input_ids: Tensor | None, attention_mask: Tensor | None = None
    ) -> LLMInputs:
        """[visual prompt; text] embeddings (B, Q+T, Dl), mask and position ids.

        Text may be padded on either side; generation left-packs decoder-only rows (``left_packed``).
        """
        B, Q = prefix.shape[:2]
        if input_ids is None:
            input_ids = torch.zeros(B, 0, dtype=torch.long, device=prefix.device)
        text = self.llm.get_input_embeddings()(input_ids)  # (B, T, Dl)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ones = attention_mask.new_ones(B, Q)
        mask = torch.cat([ones, attention_mask], dim=1)  # (B, Q+T)
        embeds = torch.cat([prefix.to(text.dtype), text], dim=1)
        return LLMInputs(embeds, mask, positions_from_mask(mask), Q)

    def _llm_kwargs(self, inputs: LLMInputs) -> dict:
        kwargs = {"inputs_embeds": inputs.embeds, "attention_mask": inputs.mask}
        if self._llm_takes_positions and not self.is_encoder_decoder:
            kwargs["position_ids"] = inputs.position_ids
        return kwargs

    # --- stage 3: loss and logits ------------------------------------------------------------------------
    def lm_loss(
        self,
        inputs: LLMInputs,
        labels: Tensor,
        reduction: str = "mean",
        convention: str = "generation",
    ) -> Tensor:
        """Cross-entropy of the LLM on ``labels``; ``reduction`` "mean" (over scored tokens) or "sum".

        Decoder-only: ``labels`` (B, T) align with the text of ``inputs`` (right-padded, not left-packed); see
        ``next_token_targets`` for which token is predicted from where. The vocabulary projection runs only
        at scored positions. Encoder-decoder (prefix-LM): the encoder reads ``inputs``, ``labels`` (B, S) are
        the decoder's targets.
        """
        if self.is_encoder_decoder:
            logits = self._decoder_logits(inputs, labels=labels)  # (B, S, V)
            return _cross_entropy(logits, labels, reduction)
        if inputs.packed:
            raise ValueError("lm_loss needs unpacked inputs: labels align with the text columns")
        targets = next_token_targets(labels.to(inputs.mask.device), inputs.prefix_len, convention)
        scored = targets != -100  # (B, L-1)
        hidden = self.llm.base_model(**self._llm_kwargs(inputs))[0]  # (B, L, Dl)
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][scored])  # (N, V) only where it counts
        return F.cross_entropy(logits.float(), targets[scored], reduction=reduction)

    def _decoder_logits(
        self, inputs: LLMInputs, labels: Tensor | None = None, decoder_input_ids: Tensor | None = None, **kw
    ) -> Tensor:
        """Encoder-decoder logits (B, S, V); the decoder reads ``decoder_input_ids`` or the shifted labels."""
        if decoder_input_ids is None and labels is not None:
            decoder_input_ids = self.llm.prepare_decoder_input_ids_from_labels(labels=labels)
        return self.llm(**self._llm_kwargs(inputs), decoder_input_ids=decoder_input_ids, **kw).logits

    def forward(
        self,
        pixel_values: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        loss_convention: str = "generation",
        **visual: Tensor | None,
    ) -> Blip2Output:
        """Logits for the text (decoder-only) or the decoder (encoder-decoder), and the LM loss given labels.

        The image side is ``pixel_values``, or precomputed ``image_embeds`` / ``prefix`` (and
        ``qformer_input_ids`` / ``qformer_attention_mask``) as keywords. Decoder-only: ``labels`` (B, T)
        align with ``input_ids``, -100 on prompt and padding; the loss is the mean cross-entropy under
        ``loss_convention`` (see ``next_token_targets``). Encoder-decoder (prefix-LM): ``input_ids`` is the
        prefix read by the encoder, ``labels`` the suffix the decoder must produce.
        """
        unknown = sorted(set(visual) - set(VISUAL_INPUTS))
        if unknown:
            raise TypeError(f"forward() got unexpected keyword arguments {unknown}")
        prefix = self.visual_prompt(Visual(pixel_values, **visual))
        inputs = self.llm_inputs(prefix, input_ids, attention_mask)  # (B, Q+T, Dl)
        if self.is_encoder_decoder:
            logits = self._decoder_logits(
                inputs, labels, decoder_input_ids, decoder_attention_mask=decoder_attention_mask
            )
            loss = None if labels is None else _cross_entropy(logits, labels, "mean")
            return Blip2Output(logits=logits, loss=loss)
        logits = self.llm(**self._llm_kwargs(inputs)).logits  # (B, Q+T, V)
        loss = None
        if labels is not None:
            targets = next_token_targets(labels.to(logits.device), inputs.prefix_len, loss_convention)
            loss = _cross_entropy(logits[:, :-1], targets, "mean")
        return Blip2Output(logits=logits[:, inputs.prefix_len :], loss=loss)

    # --- transformers' generate ----------------------------------------------------------------------------
    @torch.no_grad()
    def hf_generate(self, inputs: LLMInputs, **kwargs) -> Tensor:
        """New tokens (B, N) from transformers' ``generate`` after ``inputs`` (greedy, beams or sampling).

        Decoder-only rows are left-packed first; the encoder-decoder's decoder start token is dropped.
        ``blipkit.models.decoding`` decides when this path is the one to take.
        """
        if self.is_encoder_decoder:
            return self.llm.generate(inputs_embeds=inputs.embeds, attention_mask=inputs.mask, **kwargs)[:, 1:]
        return generate_decoder_only(self.llm, inputs, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: Tensor | None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        """transformers' ``generate`` on an image batch: new tokens (B, N), the reference decoding path.

        The image side is given as in ``forward``; other ``kwargs`` go to ``generate`` (``max_new_tokens``,
        ``num_beams``, ``do_sample``, ``min_new_tokens``, ``eos_token_id``, ...).
        """
        visual = Visual(pixel_values, **{k: kwargs.pop(k) for k in VISUAL_INPUTS if k in kwargs})
        return self.hf_generate(
            self.llm_inputs(self.visual_prompt(visual), input_ids, attention_mask), **kwargs
        )


def _cross_entropy(logits: Tensor, targets: Tensor, reduction: str) -> Tensor:
    """Cross-entropy of (B, S, V) logits against (B, S) targets, -100 ignored, in fp32."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(),
        targets.flatten().to(logits.device),
        ignore_index=-100,
        reduction=reduction,
    )
