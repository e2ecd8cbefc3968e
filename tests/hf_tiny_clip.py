"""Tiny random transformers CLIP / SigLIP dual encoders, built offline, for parity tests.

``make_clip(path, kind)`` builds, perturbs and saves a ``CLIPModel`` or ``SiglipModel`` checkpoint dir
(weights, word-level tokenizer, PIL image processor); ``make_dual_tokenizer(kind)`` the tokenizers it uses.

Tensors saved (transformers 5.24; hidden 32, 2 layers, FFN 37, image 30, patch 6 -> 25 patches):

- both: ``{vision_model,text_model}.encoder.layers.{0,1}.{layer_norm1,layer_norm2}.{weight,bias}``,
  ``....self_attn.{q,k,v,out}_proj.{weight,bias}``, ``....mlp.fc{1,2}.{weight,bias}``,
  ``vision_model.embeddings.{patch_embedding,position_embedding}.weight``, ``vision_model.post_layernorm.*``,
  ``text_model.embeddings.{token_embedding,position_embedding}.weight`` (V, 32) (16, 32),
  ``text_model.final_layer_norm.*``, ``logit_scale``;
- clip: ``vision_model.embeddings.class_embedding`` (32,), ``vision_model.pre_layrnorm.*`` (sic),
  ``visual_projection.weight`` / ``text_projection.weight`` (16, 32), no bias; ``logit_scale`` ();
- siglip: ``vision_model.embeddings.patch_embedding.bias``, ``vision_model.head.{probe,
  attention.in_proj_weight, attention.in_proj_bias, attention.out_proj.*, layernorm.*, mlp.fc{1,2}.*}``,
  ``text_model.head.{weight,bias}`` (32, 32); ``logit_scale`` (1,), ``logit_bias`` (1,).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import transformers
from hf_tiny import WORDS
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, SiglipConfig, SiglipModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

_LOGIT_CENTRES = {"logit_scale": math.log(10), "logit_bias": -1.0}  # see make_clip
MAX_TOKENS = 16  # text max positions of the tiny models
IMAGE_SIZE = 30
PATCH_SIZE = 6

# kind -> (special tokens appended after WORDS, template, named special tokens, model input names)
_SPECIALS: dict[str, tuple[list[str], str, dict[str, str], list[str]]] = {
    # CLIP (BPE vocab ends with <|startoftext|>, <|endoftext|>); pads with <|endoftext|> (= eos, as openai's);
    # the text tower pools at the first eos
    "clip": (
        ["<|startoftext|>", "<|endoftext|>"],
        "<|startoftext|> $A <|endoftext|>",
        {
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
        },
        ["input_ids", "attention_mask"],
    ),
    # SigLIP (SentencePiece, "$A </s>", padded with </s> to max length, no attention mask)
    "siglip": (
        ["</s>", "<unk>"],
        "$A </s>",
        {"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"},
        ["input_ids"],
    ),
}


def make_dual_tokenizer(kind: str) -> transformers.PreTrainedTokenizerFast:
    """A word-level fast tokenizer over ``WORDS`` (ids 0..len-1) with ``kind``'s specials appended after them.

    ``model_max_length`` is ``MAX_TOKENS``; padding side right. The SigLIP one returns no attention mask.
    """
    if kind not in _SPECIALS:
        raise ValueError(f"unknown kind {kind!r}; expected 'clip' or 'siglip'")
    specials, template, named, input_names = _SPECIALS[kind]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(WORDS))}
    for t in specials:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=named["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    used = [t for t in specials if t in template.split()]
    tok.post_processor = processors.TemplateProcessing(
        single=template, pair=f"{template} $B:1", special_tokens=[(t, vocab[t]) for t in used]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        clean_up_tokenization_spaces=False,
        model_input_names=input_names,
        model_max_length=MAX_TOKENS,
        **named,
    )


def _configs(kind: str, tok: transformers.PreTrainedTokenizerFast, overrides: dict[str, Any]):
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    vision = {
        **tower,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        **overrides.pop("vision_config", {}),
    }
    text = {
        **tower,
        "vocab_size": len(tok),
        "max_position_embeddings": MAX_TOKENS,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        **overrides.pop("text_config", {}),
    }
    if kind == "clip":
        text["bos_token_id"] = tok.bos_token_id
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, **overrides)
    if kind == "siglip":
        text.setdefault("bos_token_id", None)  # SiglipTextConfig defaults to 49406, outside the tiny vocab
        return SiglipConfig(text_config=text, vision_config=vision, **overrides)
    raise ValueError(f"unknown kind {kind!r}; expected 'clip' or 'siglip'")


def make_image_processor(kind: str, image_size: int = IMAGE_SIZE):
    """transformers' PIL-backend image processor of ``kind`` for ``image_size`` inputs."""
    if kind == "clip":  # shortest edge to S, centre crop S x S
        return CLIPImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            resample=PILImageResampling.BICUBIC,
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
        )
    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})  # mean = std = 0.5


def make_clip(
    path: str | os.PathLike, kind: str = "clip", seed: int = 0, noise: float = 0.2, **overrides: Any
) -> torch.nn.Module:
    """Build, perturb, save and return a tiny random ``CLIPModel`` / ``SiglipModel`` (eval mode).

    Both towers: hidden 32, 2 layers, 4 heads, FFN 37; vision image 30, patch 6; text max positions 16,
    vocab ``len(make_dual_tokenizer(kind))``. CLIP projects both to 16 (no bias); SigLIP's heads sit inside
    the towers (vision: attention pooling, text: Linear on the last position) and give 32.
    ``overrides``: ``vision_config`` / ``text_config`` dicts merged into the tower configs, anything else goes
    to ``CLIPConfig`` / ``SiglipConfig``.

    Every parameter gets ``randn * noise`` added (seeded; layer norms, class embedding and the SigLIP probe
    included), so that no weight sits at its init value and a wrong mapping cannot go unnoticed.
    ``logit_scale`` is then set to log(10) + noise and SigLIP's ``logit_bias`` to -1 + noise: logits of a
    size whose softmax / sigmoid are not saturated. The global torch RNG state is left untouched.
    Saved into ``path``: ``config.json``, ``model.safetensors``, the tokenizer, ``preprocessor_config.json``.
    """
    tok = make_dual_tokenizer(kind)
    config = _configs(kind, tok, dict(overrides))
    cls = CLIPModel if kind == "clip" else SiglipModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                delta = torch.randn(p.shape, generator=g, dtype=p.dtype) * noise
                if name in _LOGIT_CENTRES:
                    p.copy_(_LOGIT_CENTRES[name] + delta)
                else:
                    p.add_(delta)
    model.eval()

    path = os.fspath(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    make_image_processor(kind, config.vision_config.image_size).save_pretrained(path)
    return model
