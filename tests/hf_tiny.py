# Tensors saved by make_blip2 in model.safetensors (transformers 5.24), shell-brace notation: {a,b} = a or b,
# {0,1} = layer index. Shapes for hidden 32, FFN 37, Q = num_query_tokens, V = len(tokenizer).
# tests/test_hf_tiny.py::test_documented_keys checks these lists against real saves.
#
# [opt] make_blip2(p, llm="opt", num_query_tokens=4, cross_attention_frequency=2, qformer_layers=2):
#   113 tensors
#   query_tokens                                                                    (1, Q, 32)
#   vision_model.embeddings.{class_embedding,position_embedding}                    (1, 1, 32) (1, 5, 32)
#   vision_model.embeddings.patch_embedding.{weight,bias}                           (32, 3, 14, 14) conv
#   vision_model.encoder.layers.{0,1}.layer_norm{1,2}.{weight,bias}
#   vision_model.encoder.layers.{0,1}.self_attn.qkv.{weight,bias}                   (96, 32) (96,) q|k|v
#   vision_model.encoder.layers.{0,1}.self_attn.projection.{weight,bias}
#   vision_model.encoder.layers.{0,1}.mlp.fc{1,2}.{weight,bias}
#   vision_model.post_layernorm.{weight,bias}
#   qformer.layernorm.{weight,bias}                                                 (on the query embeds)
#   qformer.encoder.layer.{0,1}.attention.attention.{query,key,value}.{weight,bias}
#   qformer.encoder.layer.{0,1}.attention.output.{dense,LayerNorm}.{weight,bias}
#   qformer.encoder.layer.{0}.crossattention.attention.{query,key,value}.{weight,bias}  (i % freq == 0)
#   qformer.encoder.layer.{0}.crossattention.output.{dense,LayerNorm}.{weight,bias}
#   qformer.encoder.layer.{0,1}.intermediate_query.dense.{weight,bias}
#   qformer.encoder.layer.{0,1}.output_query.{dense,LayerNorm}.{weight,bias}
#   language_projection.{weight,bias}                                               (32, 32)
#   language_model.model.decoder.{embed_tokens,embed_positions}.weight              (V, 32) (128 + 2, 32)
#   language_model.model.decoder.final_layer_norm.{weight,bias}
#   language_model.model.decoder.layers.{0,1}.self_attn.{q_proj,k_proj,v_proj,out_proj}.{weight,bias}
#   language_model.model.decoder.layers.{0,1}.{self_attn_layer_norm,final_layer_norm}.{weight,bias}
#   language_model.model.decoder.layers.{0,1}.fc{1,2}.{weight,bias}
#   (no language_model.lm_head.weight: OPT ties it to embed_tokens, so save_pretrained drops it)
#
# [retrieval] make_blip2(p, retrieval=True, num_query_tokens=4, cross_attention_frequency=2,
#   qformer_layers=2): 95 tensors, no language_*; the query_tokens / vision_model.* / qformer.* keys of
#   [opt] plus:
#   embeddings.{word_embeddings,position_embeddings}.weight                         (V, 32) (64, 32)
#   qformer.encoder.layer.{0,1}.intermediate.dense.{weight,bias}                    (text-token FFN)
#   qformer.encoder.layer.{0,1}.output.{dense,LayerNorm}.{weight,bias}
#   {vision_projection,text_projection}.{weight,bias}                               (16, 32)
#   itm_head.{weight,bias}                                                          (2, 32)
#
# [llama] language_model.* of make_blip2(p, llm="llama") (the rest as [opt]): 98 tensors
#   language_model.model.embed_tokens.weight  language_model.lm_head.weight  language_model.model.norm.weight
#   language_model.model.layers.{0,1}.self_attn.{q_proj,k_proj,v_proj,o_proj}.weight    (k/v (16, 32))
#   language_model.model.layers.{0,1}.mlp.{gate_proj,up_proj,down_proj}.weight
#   language_model.model.layers.{0,1}.{input_layernorm,post_attention_layernorm}.weight
#
# [t5] language_model.* of make_blip2(p, llm="t5") (the rest as [opt]): 129 tensors
#   language_model.shared.weight  language_model.lm_head.weight (untied, see _untie_t5_lm_head)
#   language_model.{encoder,decoder}.final_layer_norm.weight
#   language_model.{encoder,decoder}.block.{0}.layer.0.SelfAttention.relative_attention_bias.weight   (8, 4)
#   language_model.{encoder,decoder}.block.{0,1}.layer.0.SelfAttention.{q,k,v,o}.weight
#   language_model.{encoder,decoder}.block.{0,1}.layer.0.layer_norm.weight
#   language_model.encoder.block.{0,1}.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight
#   language_model.encoder.block.{0,1}.layer.1.layer_norm.weight
#   language_model.decoder.block.{0,1}.layer.1.EncDecAttention.{q,k,v,o}.weight
#   language_model.decoder.block.{0,1}.layer.1.layer_norm.weight
#   language_model.decoder.block.{0,1}.layer.2.DenseReluDense.{wi_0,wi_1,wo}.weight
#   language_model.decoder.block.{0,1}.layer.2.layer_norm.weight
#   (no {encoder,decoder}.embed_tokens.weight: tied to shared)
"""Tiny random transformers BLIP-2 reference models, built offline, for parity tests.

``make_blip2`` builds, perturbs and saves a transformers BLIP-2 checkpoint directory; ``make_tokenizer`` the
word-level tokenizers it uses; ``hf_inputs`` the ``input_ids``/``attention_mask`` transformers expects.
"""

from __future__ import annotations

import os

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    LlamaConfig,
    OPTConfig,
    T5Config,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

WORDS: list[str] = (
    "a an the this that it is are there two some photo picture image of with and on in at near "
    "cat cats dog dogs bird man woman person car bus tree table blanket grass street beach "
    "red blue green white black pink small big sitting laying standing running "
    "what where how many color question answer yes no describe shows ? : , ."
).split()

IMAGE_TOKEN = "<image>"

# kind -> (special tokens in id order, single template, pair template, named special tokens)
_SPECIALS: dict[str, tuple[list[str], str, str, dict[str, str]]] = {
    # OPT (GPT-2 BPE vocab order <s>=0 <pad>=1 </s>=2 <unk>=3); the tokenizer prepends </s> as BOS
    "opt": (
        ["<s>", "<pad>", "</s>", "<unk>"],
        "</s> $A",
        "</s> $A </s> $B:1",
        {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
    ),
    # LLaMA (<unk>=0 <s>=1 </s>=2): <s> prepended, no EOS appended; pad = </s> as in most LLaMA fine-tunes
    "llama": (
        ["<unk>", "<s>", "</s>"],
        "<s> $A",
        "<s> $A <s> $B:1",
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"},
    ),
    # T5 (<pad>=0 </s>=1 <unk>=2): </s> appended as EOS, no BOS
    "t5": (
        ["<pad>", "</s>", "<unk>"],
        "$A </s>",
        "$A </s> $B:1 </s>:1",
        {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
    ),
    # BERT (the Q-Former's text tokenizer): [CLS] $A [SEP]
    "bert": (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        "[CLS] $A [SEP]",
        "[CLS] $A [SEP] $B:1 [SEP]:1",
        {
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "mask_token": "[MASK]",
        },
    ),
}


def perturb(model: torch.nn.Module, seed: int, noise: float) -> None:
    """Add seeded ``randn * noise`` to every parameter, so that none sits at its init value and a wrong key
    mapping cannot go unnoticed (the global RNG is untouched)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * noise)


def make_tokenizer(kind: str, image_token: bool = False) -> transformers.PreTrainedTokenizerFast:
    """A word-level fast tokenizer over ``WORDS`` with the special tokens of ``kind`` (opt/llama/t5/bert).

    Ids: the specials of ``kind`` first (see ``_SPECIALS``), then ``WORDS`` in order; with ``image_token`` the
    special token ``"<image>"`` is appended last (id ``len(tok) - 1``), as the real BLIP-2 checkpoints do.
    Whitespace/punctuation pre-tokenizer, unknown words map to the unk token; decoding joins words with single
    spaces and no clean-up, so ``tok.decode(tok(s).input_ids, skip_special_tokens=True) == s`` for any ``s``
    made of ``WORDS`` separated by single spaces. Padding side is the default ("right").
    """
    if kind not in _SPECIALS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {sorted(_SPECIALS)}")
    specials, single, pair, named = _SPECIALS[kind]
    vocab = {t: i for i, t in enumerate(specials)}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=named["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    in_template = {p.split(":")[0] for p in pair.split()}
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in specials if t in in_template]
    )
    out = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
        **named,
    )
    if image_token:
        # a plain added special token, *not* extra_special_tokens={"image_token": ...}: a tokenizer with an
        # `image_token` attribute breaks Blip2Processor in transformers 5.24 (it calls `.content` on a str)
        out.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return out


def _text_config(llm: str, tok: transformers.PreTrainedTokenizerFast) -> transformers.PreTrainedConfig:
    common = {"vocab_size": len(tok), "max_position_embeddings": 128}
    if llm == "opt":
        return OPTConfig(
            hidden_size=32,
            word_embed_proj_dim=32,
            ffn_dim=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            **common,
        )
    if llm == "llama":
        return LlamaConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            **common,
        )
    if llm == "t5":  # Flan-T5 style (gated-gelu, untied lm_head) like the real BLIP-2 T5 checkpoints
        return T5Config(
            vocab_size=len(tok),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.pad_token_id,
        )
    raise ValueError(f"unknown llm {llm!r}; expected 'opt', 'llama' or 't5'")


def _untie_t5_lm_head(model: torch.nn.Module) -> None:
    """Give the T5 ``lm_head`` its own weight, as in the real (Flan-T5) BLIP-2 checkpoints.

    transformers 5.24's ``T5Config`` forces ``tie_word_embeddings=True`` (``tie_word_embeddings=False`` only
    sets ``scale_decoder_outputs=False``), so a freshly built T5 shares ``lm_head.weight`` with
    ``shared.weight`` and would save no ``lm_head`` at all. Real Flan-T5 checkpoints store a separate
    ``lm_head.weight``; ``from_pretrained`` sees both keys with different values and keeps them untied
    (logging a warning "The tied weights mapping and config for this model specifies to tie ...").
    """
    lm = model.language_model
    lm.lm_head.weight = torch.nn.Parameter(lm.shared.weight.detach().clone())
    for owner, prefix in ((model, "language_model."), (lm, "")):
        owner.all_tied_weights_keys.pop(prefix + "lm_head.weight", None)


def make_blip2(
    path: str | os.PathLike,
    llm: str = "opt",
    num_query_tokens: int = 4,
    cross_attention_frequency: int = 2,
    qformer_layers: int = 2,
    retrieval: bool = False,
    image_size: int = 28,
    seed: int = 0,
    noise: float = 0.5,
) -> torch.nn.Module:
    """Build, perturb, save and return a tiny random transformers BLIP-2 model (eval mode, eager attention).

    Vision: hidden 32, 2 layers, 4 heads, MLP 37, patch 14 (``image_size`` 28 -> 4 patches + CLS), qkv bias.
    Q-Former: hidden 32, ``qformer_layers`` layers, 4 heads, FFN 37, cross-attention in layers ``i`` with
    ``i % cross_attention_frequency == 0``, max positions 64; its text path (word/position embeddings and the
    text FFN ``intermediate``/``output``) exists only with ``retrieval``.

    * generation (``retrieval=False``): ``Blip2ForConditionalGeneration`` with a tiny OPT / LLaMA / T5
      (hidden 32, 2 layers, 4 heads, FFN 37, vocab = ``len(tokenizer)``). The LLM tokenizer
      (``make_tokenizer(llm, image_token=True)``) holds ``"<image>"`` as its last id and
      ``config.image_token_id`` (alias of ``config.image_token_index``) is that id. transformers scatters the
      Q query outputs into the positions of the ``<image>`` ids, so HF ``input_ids`` must be
      ``[image_token_id] * Q + tokenizer(text).input_ids`` (placeholders *before* the BOS, attention mask 1 on
      them) -- exactly what ``Blip2Processor`` builds (its ``processor_config.json`` with ``num_query_tokens``
      is saved too) and what ``hf_inputs`` returns.
      For the decoder-only LLMs the logits have Q + T positions; ``logits[:, Q:]`` are the text ones.
      For T5 the ids go to the encoder; pass ``decoder_input_ids`` starting with 0 (``<pad>``).
    * retrieval: ``Blip2ForImageTextRetrieval`` (ITM head + ITC projections to ``image_text_hidden_size`` 16),
      ``image_token_index`` None, text_config left at transformers' default OPT (not instantiated); the saved
      tokenizer is ``make_tokenizer("bert")`` ([CLS] text [SEP]) whose size is the Q-Former vocab. Inputs are
      the plain tokenized text (no placeholders).

    Every parameter gets ``randn * noise`` added (seeded) so that no weight sits at its init value (query
    tokens are zero-init, LayerNorms one/zero-init), hence a wrong key mapping cannot go unnoticed. The global
    torch RNG state is left untouched. Saved into ``path``: ``config.json``, ``generation_config.json`` (not
    for retrieval), ``model.safetensors``, the tokenizer (``tokenizer.json``, ``tokenizer_config.json``),
    ``preprocessor_config.json`` (BlipImageProcessor: ``image_size`` square, bicubic, CLIP mean/std) and, for
    generation models, ``processor_config.json`` (Blip2Processor, ``num_query_tokens``).
    """
    tok = make_tokenizer("bert") if retrieval else make_tokenizer(llm, image_token=True)
    vision = Blip2VisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=14,
        qkv_bias=True,
    )
    qformer = Blip2QFormerConfig(
        vocab_size=len(tok) if retrieval else 64,
        hidden_size=32,
        num_hidden_layers=qformer_layers,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        cross_attention_frequency=cross_attention_frequency,
        encoder_hidden_size=32,
        use_qformer_text_input=retrieval,
    )
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=None if retrieval else _text_config(llm, tok),
        num_query_tokens=num_query_tokens,
        image_text_hidden_size=16,
        image_token_index=None if retrieval else tok.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    cls = Blip2ForImageTextRetrieval if retrieval else Blip2ForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, attn_implementation="eager")
        if llm == "t5" and not retrieval:
            _untie_t5_lm_head(model)
        perturb(model, seed + 1, noise)
    model.eval()

    path = os.fspath(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    image_processor = BlipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        do_resize=True,
        resample=PILImageResampling.BICUBIC,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    if not retrieval:
        Blip2Processor(image_processor, tok, num_query_tokens=num_query_tokens).save_pretrained(path)
    image_processor.save_pretrained(path)
    return model


def hf_inputs(
    tokenizer: transformers.PreTrainedTokenizerBase,
    texts: list[str],
    num_query_tokens: int,
    image_token_id: int | None,
    padding_side: str | None = None,
) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` (int64) for a transformers BLIP-2 model, the way Blip2Processor does.

    The texts are tokenized (with the tokenizer's special tokens) and padded on ``padding_side``; with an
    ``image_token_id`` (generation models) ``num_query_tokens`` placeholder ids, mask 1, are then prefixed to
    every row, *before* the padding: ``[image] * Q + [pad ...] + [bos] + text`` with left padding,
    ``[image] * Q + [bos] + text + [pad ...]`` with right padding. Retrieval models: pass ``None``.

    ``padding_side=None`` picks "left" for tokenizers with a BOS token (OPT, LLaMA: batched decoder-only
    ``generate`` needs it) and "right" for those without (T5: its relative position bias makes left padding
    change the encoder output; BERT/retrieval: ITC reads the text feature at position 0, the [CLS]).
    The tokenizer's own ``padding_side`` is left unchanged.
    """
    if padding_side is None:
        padding_side = "left" if tokenizer.bos_token is not None else "right"
    old = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        enc = tokenizer(texts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = old
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if image_token_id is not None:
        image = torch.full((ids.shape[0], num_query_tokens), image_token_id, dtype=ids.dtype)
        ids = torch.cat([image, ids], 1)
        mask = torch.cat([torch.ones_like(image), mask], 1)
    return {"input_ids": ids, "attention_mask": mask}
