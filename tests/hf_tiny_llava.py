"""Tiny random LLaVA reference checkpoints, built offline, for parity tests.

``make_llava`` builds, perturbs and saves a transformers ``LlavaForConditionalGeneration`` dir (llava-hf
layout); ``make_llava_original`` rewrites the same weights in the original LLaVA repo's layout (the Llama LM
with the projector in ``model.mm_projector.*`` names, the CLIP tower as a separate dir referenced by path);
``hf_llava_inputs`` turns blipkit's input (one image token per row) into transformers' (one per feature).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from hf_tiny import IMAGE_TOKEN, make_tokenizer, perturb
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

VISION_LAYERS = 3
PATCH = 14
# a ChatML-like template for the tokenizer-template case (its text is never rendered by these tests)
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def _text_config(llm: str, tok: transformers.PreTrainedTokenizerFast) -> transformers.PreTrainedConfig:
    common = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    if llm == "llama":
        return LlamaConfig(rms_norm_eps=1e-6, tie_word_embeddings=False, **common)
    if llm == "qwen2":  # tied input/output embeddings, as the small Qwen2 models have; q/k/v biases
        return Qwen2Config(rms_norm_eps=1e-6, tie_word_embeddings=True, **common)
    if llm == "mistral":
        return MistralConfig(rms_norm_eps=1e-6, tie_word_embeddings=False, sliding_window=None, **common)
    raise ValueError(f"unknown llm {llm!r}; expected 'llama', 'qwen2' or 'mistral'")


def _vision_config(tower: str, image_size: int) -> transformers.PreTrainedConfig:
    common = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": VISION_LAYERS,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": PATCH,
    }
    if tower == "clip":
        return CLIPVisionConfig(projection_dim=16, **common)
    if tower == "siglip":
        return SiglipVisionConfig(**common)
    raise ValueError(f"unknown tower {tower!r}; expected 'clip' or 'siglip'")


def _image_processor(tower: str, image_size: int):
    if tower == "clip":  # CLIP's own steps: shortest edge, then a centre crop
        return CLIPImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            do_center_crop=True,
            resample=PILImageResampling.BICUBIC,
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
        )
    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})


def make_llava(
    path: str | os.PathLike,
    llm: str = "llama",
    tower: str = "clip",
    feature_layer: int | list[int] = -2,
    select: str = "default",
    chat_template: str | None = None,
    image_size: int = 28,
    seed: int = 0,
    noise: float = 0.5,
) -> LlavaForConditionalGeneration:
    """Build, perturb, save and return a tiny random ``LlavaForConditionalGeneration`` (eval, eager).

    Vision: CLIP or SigLIP, hidden 32, ``VISION_LAYERS`` layers, 4 heads, patch 14 (``image_size`` 28 -> 4
    patches, + CLS for CLIP). Projector: Linear -> GELU -> Linear with biases. LLM: Llama (untied head),
    Qwen2 (head tied to the input embeddings, q/k/v biases) or Mistral; hidden 32, 2 layers, 4 heads, 2 key/
    value heads, FFN 37, vocab = ``len(tokenizer)``. The tokenizer is ``make_tokenizer("llama",
    image_token=True)`` ("<image>" is its last id, ``config.image_token_index``), with ``chat_template`` if
    given. Every parameter gets ``randn * noise`` added (seeded; the global RNG is untouched). Saved into
    ``path``: config.json, generation_config.json, model.safetensors, the tokenizer and
    preprocessor_config.json (CLIP: shortest edge + centre crop to ``image_size``; SigLIP: a square resize).
    """
    tok = make_tokenizer("llama", image_token=True)
    if chat_template is not None:
        tok.chat_template = chat_template
    config = LlavaConfig(
        vision_config=_vision_config(tower, image_size),
        text_config=_text_config(llm, tok),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=select,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        image_seq_length=(image_size // PATCH) ** 2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="eager")
        perturb(model, seed + 1, noise)
    model.eval()
    path = os.fspath(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    _image_processor(tower, image_size).save_pretrained(path)
    return model


def num_image_features(model: LlavaForConditionalGeneration) -> int:
    """P: the image features transformers' LLaVA gives per image (its image tokens per image)."""
    cfg = model.config
    vision = cfg.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    cls = vision.model_type == "clip_vision_model"
    return patches + int(cls and cfg.vision_feature_select_strategy == "full")


def hf_llava_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int, P: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' LLaVA ``input_ids``/``attention_mask`` from blipkit's right-padded ones (one image token
    per row): the image token repeated ``P`` times, rows padded on ``side`` with id 0. Also returns the
    columns (B, T) of each blipkit text column in transformers' rows (the image token's: its last copy)."""
    rows, masks, columns = [], [], []
    pad = 0
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
        n = sum(mask)
        real = [t for t, m in zip(ids, mask, strict=True) if m]  # right-padded blipkit rows
        k = real.index(image_token_id)
        rows.append(real[:k] + [image_token_id] * P + real[k + 1 :])
        columns.append([t if t < k else t + P - 1 for t in range(len(ids))])
        masks.append(n + P - 1)
    L = max(len(r) for r in rows)
    out_ids, out_mask, out_cols = [], [], []
    for r, n, cols in zip(rows, masks, columns, strict=True):
        padding = [pad] * (L - len(r))
        shift = len(padding) if side == "left" else 0
        out_ids.append(padding + r if side == "left" else r + padding)
        out_mask.append([0] * len(padding) + [1] * n if side == "left" else [1] * n + [0] * len(padding))
        out_cols.append([c + shift for c in cols])
    return torch.tensor(out_ids), torch.tensor(out_mask), torch.tensor(out_cols)


def make_llava_original(
    path: str | os.PathLike,
    from_hf_dir: str | os.PathLike,
    tower_in_checkpoint: bool = False,
    image_aspect_ratio: str = "pad",
) -> Path:
    """The original LLaVA repo's layout for the same weights as the llava-hf dir ``from_hf_dir`` (a Llama or
    Mistral LM with a CLIP tower, one feature layer).

    ``path/config.json``: the LM's config at top level with ``architectures: ["LlavaLlamaForCausalLM"]`` (or
    Mistral), ``model_type: "llava"`` (as llava-v1.5-7b has), ``mm_vision_tower`` = ``path/tower`` (absolute),
    ``mm_projector_type: "mlp2x_gelu"``, ``mm_vision_select_layer``, ``mm_vision_select_feature``
    ("patch"/"cls_patch"), ``mm_hidden_size``, ``image_aspect_ratio``, ``mm_use_im_start_end: false``.
    ``path/model.safetensors``: ``model.embed_tokens.weight``, ``model.layers.*``, ``model.norm.weight``,
    ``lm_head.weight``, ``model.mm_projector.{0,2}.*`` and, with ``tower_in_checkpoint``,
    ``model.vision_tower.vision_tower.vision_model.*`` (4.x CLIPVisionModel names) plus
    ``unfreeze_mm_vision_tower: true``. The tokenizer has no "<image>" token. ``path/tower``: a
    ``CLIPVisionModel`` dir with ``preprocessor_config.json``. Returns ``path``.
    """
    src, out = Path(from_hf_dir), Path(path)
    out.mkdir(parents=True, exist_ok=True)
    hf = json.loads((src / "config.json").read_text())
    weights = load_file(str(src / "model.safetensors"))
    vision = {k.removeprefix("vision_tower."): v for k, v in weights.items() if k.startswith("vision_tower.")}

    tower_dir = out / "tower"
    tower = CLIPVisionModel(CLIPVisionConfig(**hf["vision_config"]))
    tower.load_state_dict(vision, strict=True)
    tower.save_pretrained(tower_dir)
    image_processor = CLIPImageProcessorPil.from_pretrained(src)
    image_processor.save_pretrained(tower_dir)

    lm = {}
    for key, value in weights.items():
        if key.startswith("language_model.model."):
            lm["model." + key.removeprefix("language_model.model.")] = value
        elif key == "language_model.lm_head.weight":
            lm["lm_head.weight"] = value
        elif key.startswith("multi_modal_projector.linear_1."):
            lm["model.mm_projector.0." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("multi_modal_projector.linear_2."):
            lm["model.mm_projector.2." + key.rsplit(".", 1)[1]] = value
        elif tower_in_checkpoint and key.startswith("vision_tower."):
            lm["model.vision_tower.vision_tower.vision_model." + key.removeprefix("vision_tower.")] = value
    save_file({k: v.contiguous() for k, v in lm.items()}, str(out / "model.safetensors"))

    text = dict(hf["text_config"])
    arch = {"llama": "LlavaLlamaForCausalLM", "mistral": "LlavaMistralForCausalLM"}[text["model_type"]]
    layer = hf["vision_feature_layer"]
    if not isinstance(layer, int):
        raise ValueError("the original layout reads one vision layer")
    config = {
        **text,
        "architectures": [arch],
        "model_type": "llava" if arch == "LlavaLlamaForCausalLM" else "llava_mistral",
        "mm_vision_tower": str(tower_dir.resolve()),
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": layer,
        "mm_vision_select_feature": {"default": "patch", "full": "cls_patch"}[
            hf["vision_feature_select_strategy"]
        ],
        "mm_hidden_size": hf["vision_config"]["hidden_size"],
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_patch_merge_type": "flat",
        "image_aspect_ratio": image_aspect_ratio,
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }
    if tower_in_checkpoint:
        config["unfreeze_mm_vision_tower"] = True
    (out / "config.json").write_text(json.dumps(config, indent=2))
    make_tokenizer("llama").save_pretrained(out)
    return out
