"""The Q-Former: a BERT-style transformer whose learned queries read image features.

References: BLIP-2 (Li et al., 2023, arXiv:2301.12597); LAVIS ``lavis/models/blip2_models/Qformer.py`` and
``blip2_qformer.py``; transformers ``models/blip_2/modeling_blip_2.py``.

One network, three attention masks (see ``build_attention_mask``): queries and text share the self-attention
of every layer; queries also cross-attend to the image in layers 0, k, 2k, ...; query and text positions have
separate feed-forward networks. Post-LN throughout, as BERT.

No dropout: BLIP-2 trains its Q-Former with BERT's 0.1, but blipkit's trained parts sit on frozen towers,
read cached features and are trained for about an epoch on CPU (the embedded default), where there is
little to regularise and every step counts; at inference dropout is off anyway, so loading public
checkpoints gives the same numbers either way.

Shape letters: B batch, Q queries, T text, P image tokens (patches + 1), D width, Dv vision width,
H heads, Dh head dim, E ITC embedding dim, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blipkit.config import QFormerConfig
from blipkit.errors import CapabilityError

MASK_KINDS = ("unimodal", "bidirectional", "multimodal_causal")


def build_attention_mask(
    kind: str, num_queries: int, text_mask: Tensor | None, batch_size: int = 1
) -> Tensor:
    """Boolean self-attention mask (B, 1, Q+T, Q+T); ``True`` means "row may attend to column".

    ==================  ===========  ===========  ==================
    kind                row          queries      text
    ==================  ===========  ===========  ==================
    unimodal (ITC)      query        yes          no
                        text         no           yes
    bidirectional (ITM) query        yes          yes
                        text         yes          yes
    multimodal_causal   query        yes          no
    (ITG)               text         yes          earlier and itself
    ==================  ===========  ===========  ==================

    Padding text columns (``text_mask == 0``) are never attended to.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown attention mask kind {kind!r}; expected one of {MASK_KINDS}")
    Q = num_queries
    if text_mask is None:
        return torch.ones(batch_size, 1, Q, Q, dtype=torch.bool)
    B, T = text_mask.shape
    device = text_mask.device
    is_query = torch.arange(Q + T, device=device) < Q  # (Q+T,)
    rows_q, cols_q = is_query[:, None], is_query[None, :]  # (Q+T, 1), (1, Q+T)
    if kind == "bidirectional":
        allowed = torch.ones(Q + T, Q + T, dtype=torch.bool, device=device)
    elif kind == "unimodal":
        allowed = rows_q == cols_q
    else:  # multimodal_causal: queries see queries; text sees queries and earlier text
        causal = torch.ones(Q + T, Q + T, dtype=torch.bool, device=device).tril()
        allowed = torch.where(rows_q, cols_q, cols_q | causal)
    columns = torch.cat([torch.ones(B, Q, dtype=torch.bool, device=device), text_mask.bool()], dim=1)
    return allowed[None, None] & columns[:, None, None, :]  # (B, 1, Q+T, Q+T)


class QFormerAttention(nn.Module):
    """Multi-head attention with separate Q/K/V projections (K/V may come from a wider input)."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        B, L, D = x.shape
        H, S = self.num_heads, context.shape[1]
        q = self.q(x).view(B, L, H, D // H).transpose(1, 2)  # (B, H, L, Dh)
        k = self.k(context).view(B, S, H, D // H).transpose(1, 2)  # (B, H, S, Dh)
        v = self.v(context).view(B, S, H, D // H).transpose(1, 2)  # (B, H, S, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, Dh)
        return self.o(y.transpose(1, 2).reshape(B, L, D))


class FeedForward(nn.Module):
    """BERT feed-forward block with its post-LN residual: norm(x + fc2(gelu(fc1(x))))."""

    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, has_cross_attention: bool):
        super().__init__()
        D = cfg.hidden_size
        self.self_attn = QFormerAttention(D, D, cfg.num_heads)
        self.self_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        if has_cross_attention:
            self.cross_attn = QFormerAttention(D, cfg.encoder_hidden_size, cfg.num_heads)
            self.cross_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.query_ffn = FeedForward(D, cfg.intermediate_size, cfg.layer_norm_eps)
        if cfg.text_path:
            self.text_ffn = FeedForward(D, cfg.intermediate_size, cfg.layer_norm_eps)

    def forward(self, x: Tensor, num_queries: int, image: Tensor | None, mask: Tensor | None) -> Tensor:
        x = self.self_norm(x + self.self_attn(x, mask=mask))  # (B, Q+T, D)
        queries, text = x[:, :num_queries], x[:, num_queries:]  # (B, Q, D), (B, T, D)
        if num_queries and hasattr(self, "cross_attn"):
            if image is None:
                raise ValueError("the queries need image features (cross-attention layer)")
            queries = self.cross_norm(
                queries + self.cross_attn(queries, image)
            )  # (B, Q, D) attends (B, P, Dv)
        parts = []
        if num_queries:
            parts.append(self.query_ffn(queries))
        if text.shape[1]:
            parts.append(self.text_ffn(text))
        return torch.cat(parts, dim=1)


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.config = cfg
        D, V = cfg.hidden_size, cfg.vocab_size
        self.query_tokens = nn.Parameter(
            torch.randn(1, cfg.num_query_tokens, D) * 0.02
        )  # no position embedding
        if cfg.text_path:
            self.word_embeddings = nn.Embedding(V, D, padding_idx=cfg.pad_token_id)
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, D)
        self.embed_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, i % cfg.cross_attention_frequency == 0) for i in range(cfg.num_layers)
        )
        if self.has_retrieval_heads:  # ITC / ITM (BLIP-2 stage 1); InstructBLIP's Q-Former has none
            self.vision_proj = nn.Linear(D, cfg.embed_dim)
            self.text_proj = nn.Linear(D, cfg.embed_dim)
            self.itm_head = nn.Linear(D, 2)
            self.temp = nn.Parameter(torch.tensor(cfg.temperature))
        if cfg.lm_head:  # BERT LM head: transform, then the tied word embeddings
            self.lm_transform = nn.Linear(D, D)
            self.lm_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
            self.lm_bias = nn.Parameter(torch.zeros(V))

    @property
    def has_text_path(self) -> bool:
        return self.config.text_path

    @property
    def has_retrieval_heads(self) -> bool:
        return self.config.text_path and self.config.retrieval_heads

    def _require_retrieval_heads(self) -> None:
        self._require_text_path()
        if not self.has_retrieval_heads:
            raise CapabilityError(
                "this checkpoint's Q-Former reads the prompt (instruction-aware, as InstructBLIP) but has no "
                "retrieval heads (vision_proj, text_proj, itm_head): it can caption, ask and chat; text and "
                "image embeddings, similarity, match and classify need a retrieval or stage-1 checkpoint"
            )

    def _require_text_path(self) -> None:
        if not self.config.text_path:
            raise CapabilityError(
                "this checkpoint has no Q-Former text path (a generation-only model): text embeddings, "
                "similarity, match and classify need a retrieval or stage-1 checkpoint"
            )

    def embed(self, input_ids: Tensor | None, num_queries: int, batch_size: int) -> Tensor:
        """[queries; word + position embeddings] through the embedding LayerNorm: (B, Q+T, D)."""
        parts = []
        if num_queries:
            parts.append(self.query_tokens.expand(batch_size, -1, -1))  # (B, Q, D)
        if input_ids is not None and input_ids.shape[1]:
            self._require_text_path()
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(positions))  # (B, T, D)
        return self.embed_norm(torch.cat(parts, dim=1))

    def forward(
        self,
        image_embeds: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        mask_kind: str = "bidirectional",
        use_queries: bool = True,
    ) -> Tensor:
        """Run the queries (reading ``image_embeds`` (B, P, Dv)) and/or text; returns (B, Q+T, D)."""
        B = (image_embeds if image_embeds is not None else input_ids).shape[0]
        Q = self.config.num_query_tokens if use_queries else 0
        x = self.embed(input_ids, Q, B)  # (B, Q+T, D)
        if input_ids is not None and attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = build_attention_mask(mask_kind, Q, attention_mask, B).to(x.device)
        for layer in self.layers:
            x = layer(x, Q, image_embeds, mask)
        return x

    # --- heads -------------------------------------------------------------------------------------------
    def image_features(self, image_embeds: Tensor) -> Tensor:
        """ITC image embeddings, one per query: (B, Q, E), L2-normalised."""
        self._require_retrieval_heads()
        return F.normalize(self.vision_proj(self(image_embeds)), dim=-1)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """ITC text embedding from the [CLS] position: (B, E), L2-normalised."""
        self._require_retrieval_heads()
        hidden = self(None, input_ids, attention_mask, mask_kind="unimodal", use_queries=False)  # (B, T, D)
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def itm_logits(
        self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> Tensor:
        """ITM logits (B, 2): the head averaged over the query outputs of a bidirectional pass."""
        self._require_retrieval_heads()
        hidden = self(image_embeds, input_ids, attention_mask, mask_kind="bidirectional")  # (B, Q+T, D)
        return self.itm_head(hidden[:, : self.config.num_query_tokens]).mean(dim=1)

    def lm_logits(self, hidden: Tensor) -> Tensor:
        """ITG logits (B, T, V) from text hidden states (B, T, D); the decoder is the tied word embedding."""
        if not self.config.lm_head:
            raise CapabilityError("this Q-Former has no LM head")
        h = self.lm_norm(F.gelu(self.lm_transform(hidden)))
        return h @ self.word_embeddings.weight.t() + self.lm_bias
