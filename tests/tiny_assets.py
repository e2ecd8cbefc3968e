"""A tiny question-aware blipkit setup: DINOv2, LLaMA and BERT tokenizer dirs, a model config using them
(Q-Former text window 32, LLM context 64) and a VQA JSONL of drawn images."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hf_tiny import make_tokenizer
from PIL import Image, ImageDraw
from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

COLORS = ["red", "blue", "green", "black"]


def tiny_assets(root: Path) -> Path:
    """A tiny DINOv2, LLaMA and BERT tokenizer, a model config using them, and a VQA JSONL of drawn images."""
    torch.manual_seed(0)
    vision = Dinov2Model(
        Dinov2Config(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=24,
            patch_size=14,
            image_size=28,
        )
    )
    vision.save_pretrained(root / "vision")
    llm_tok = make_tokenizer("llama")
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(llm_tok),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=llm_tok.pad_token_id,
            bos_token_id=llm_tok.bos_token_id,
            eos_token_id=llm_tok.eos_token_id,
        )
    )
    llm.save_pretrained(root / "llm")
    llm_tok.save_pretrained(root / "llm")
    bert_tok = make_tokenizer("bert")
    bert_tok.save_pretrained(root / "bert")
    model = {
        "name": "tiny",
        "vision": {
            "kind": "dinov2",
            "pretrained": str(root / "vision"),
            "image_size": 28,
            "patch_size": 14,
            "hidden_size": 16,
            "num_layers": 1,
            "num_heads": 2,
            "intermediate_size": 24,
        },
        "qformer": {
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 4,
            "intermediate_size": 48,
            "num_query_tokens": 4,
            "cross_attention_frequency": 1,
            "encoder_hidden_size": 16,
            "vocab_size": len(bert_tok),
            "max_position_embeddings": 32,
            "embed_dim": 16,
            "pad_token_id": 0,
            "bos_token_id": 4,
            "cls_token_id": 2,
        },
        "bridge": {"kind": "linear", "llm_hidden_size": 32, "text_input": True},
        "llm": {"kind": "causal", "pretrained": str(root / "llm")},
        "prompts": {"caption": "", "vqa": "question : {} answer :"},
        "processor": {"image_size": 28},
        "qformer_tokenizer": str(root / "bert"),
    }
    (root / "model.json").write_text(json.dumps(model))
    rows = []
    for i, color in enumerate(COLORS * 2):
        image = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(image).ellipse((4 + i, 4, 24 + i, 24), fill=color)
        image.save(root / f"{i}.png")
        caption = f"a {color} car"
        rows.append(
            {"image": f"{i}.png", "question": "what color is this ?", "answer": color, "caption": caption}
        )
        rows.append(
            {"image": f"{i}.png", "question": f"is this {color} ?", "answer": "yes", "caption": caption}
        )
    (root / "vqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def run_overrides(tiny: Path, **extra) -> list[str]:
    """``--key=value`` overrides for a 4-step training run on ``tiny_assets(tiny)``, one thread."""
    values = {
        "model": tiny / "model.json",
        "data": tiny / "vqa.jsonl",
        "feature_cache": tiny / "features",
        "qformer_init": "none",
        "batch_size": 4,
        "max_steps": 4,
        "lr": 1e-3,
        "warmup_steps": 1,
        "checkpoint_every": 2,
        "threads": 1,
    } | extra
    return [f"--{k}={v}" for k, v in values.items()]
