# Tensors saved by make_instructblip in model.safetensors (transformers 5.24), shell-brace notation as in
# hf_tiny.py. Hidden 32, FFN 37, Q = num_query_tokens, Vq = len(Q-Former tokenizer), 2 Q-Former layers, x2:
#   query_tokens                                                                    (1, Q, 32)
#   vision_model.*                                                                  (as BLIP-2, see hf_tiny)
#   qformer.embeddings.{word_embeddings,position_embeddings}.weight                 (Vq, 32) (64, 32)
#   qformer.embeddings.layernorm.{weight,bias}                                      (over [queries; text])
#   qformer.encoder.layer.{0,1}.attention.attention.{query,key,value}.{weight,bias}
#   qformer.encoder.layer.{0,1}.attention.output.{dense,LayerNorm}.{weight,bias}
#   qformer.encoder.layer.{0}.crossattention.attention.{query,key,value}.{weight,bias}  (i % freq == 0)
#   qformer.encoder.layer.{0}.crossattention.output.{dense,LayerNorm}.{weight,bias}
#   qformer.encoder.layer.{0,1}.{intermediate,intermediate_query}.dense.{weight,bias}   (text / query FFN)
#   qformer.encoder.layer.{0,1}.{output,output_query}.{dense,LayerNorm}.{weight,bias}
#   language_projection.{weight,bias}                                               (32, 32)
#   language_model.*                                                                (as BLIP-2, see hf_tiny)
#   (no qformer.embeddings.position_ids: a non-persistent buffer; no ITC/ITM heads, no qformer.layernorm)
# Also saved: config.json (model_type "instructblip", image_token_index, num_query_tokens,
# use_decoder_only_language_model), generation_config.json, the LLM tokenizer, processor_config.json
# (InstructBlipProcessor: image processor + num_query_tokens) and qformer_tokenizer/ (the BERT tokenizer).
"""Tiny random transformers InstructBLIP reference models, built offline, for parity tests."""

from __future__ import annotations

import os

import torch
import transformers
from hf_tiny import IMAGE_TOKEN, _text_config, _untie_t5_lm_head, make_tokenizer, perturb
from transformers import (
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil


def make_instructblip(
    path: str | os.PathLike,
    llm: str = "opt",
    num_query_tokens: int = 4,
    cross_attention_frequency: int = 2,
    qformer_layers: int = 2,
    image_size: int = 28,
    seed: int = 0,
    noise: float = 0.5,
) -> torch.nn.Module:
    """Build, perturb, save and return a tiny random ``InstructBlipForConditionalGeneration`` (eval mode).

    Vision and LLM as ``hf_tiny.make_blip2`` (hidden 32, 2 layers; OPT / LLaMA / T5 with the ``<image>`` token
    last in the LLM tokenizer). Q-Former: hidden 32, ``qformer_layers`` layers, 4 heads, FFN 37, max positions
    64, vocab = the BERT tokenizer ``make_tokenizer("bert")`` ([CLS] text [SEP]). Every parameter gets
    ``randn * noise`` added (seeded; the global RNG is untouched), so none sits at its init value.
    Saved with ``save_pretrained`` plus an ``InstructBlipProcessor`` (image processor: ``image_size`` square,
    bicubic, CLIP mean/std), which writes the LLM tokenizer at the top and the Q-Former's in
    ``qformer_tokenizer/``.
    """
    tok = make_tokenizer(llm, image_token=True)
    qformer_tok = make_tokenizer("bert")
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=14,
            qkv_bias=True,
        ),
        qformer_config=InstructBlipQFormerConfig(
            vocab_size=len(qformer_tok),
            hidden_size=32,
            num_hidden_layers=qformer_layers,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=64,
            cross_attention_frequency=cross_attention_frequency,
            encoder_hidden_size=32,
        ),
        text_config=_text_config(llm, tok),
        num_query_tokens=num_query_tokens,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = InstructBlipForConditionalGeneration._from_config(config, attn_implementation="eager")
        if llm == "t5":
            _untie_t5_lm_head(model)
        perturb(model, seed + 1, noise)
    model.eval()

    path = os.fspath(path)
    model.save_pretrained(path)
    image_processor = BlipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        do_resize=True,
        resample=PILImageResampling.BICUBIC,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    processor = InstructBlipProcessor(image_processor, tok, qformer_tok, num_query_tokens=num_query_tokens)
    processor.save_pretrained(path)
    return model


def hf_inputs(
    processor: transformers.ProcessorMixin, texts: list[str], num_query_tokens: int, image_token_id: int
) -> dict[str, torch.Tensor]:
    """What ``InstructBlipForConditionalGeneration`` reads for ``texts`` (right padding), as the processor
    builds it: ``qformer_input_ids`` / ``qformer_attention_mask`` from the Q-Former tokenizer, and
    ``input_ids`` / ``attention_mask`` = ``num_query_tokens`` image placeholders (mask 1) + the LLM tokens."""
    enc = processor(text=texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    image = torch.full((ids.shape[0], num_query_tokens), image_token_id, dtype=ids.dtype)
    return {
        "input_ids": torch.cat([image, ids], 1),
        "attention_mask": torch.cat([torch.ones_like(image), mask], 1),
        "qformer_input_ids": enc["qformer_input_ids"],
        "qformer_attention_mask": enc["qformer_attention_mask"],
    }
