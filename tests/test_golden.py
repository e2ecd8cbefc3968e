"""A tiny fixed BLIP-2 (EVA ViT, Q-Former, LLaMA) and fixed inputs, with logits, loss and greedy tokens stored
once under ``tests/data/``: a numerical drift that keeps every argmax still fails here.

Regenerate (only after a deliberate change of the numbers): ``python tests/test_golden.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from blipkit.config import Blip2Config
from blipkit.loading import build_model

DATA = Path(__file__).parent / "data"
WEIGHTS, TENSORS, CONFIG = (
    DATA / "golden_weights.safetensors",
    DATA / "golden_io.safetensors",
    DATA / "golden.json",
)
LLAMA = {
    "model_type": "llama", "vocab_size": 24, "hidden_size": 16, "intermediate_size": 24,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}  # fmt: skip
MODEL = {
    "name": "golden",
    "vision": {"kind": "eva", "image_size": 28, "patch_size": 14, "hidden_size": 16, "num_layers": 1,
               "num_heads": 2, "intermediate_size": 24},
    "qformer": {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 24,
                "num_query_tokens": 3, "cross_attention_frequency": 1, "encoder_hidden_size": 16,
                "vocab_size": 30, "text_path": False, "lm_head": False},
    "bridge": {"kind": "linear", "llm_hidden_size": 16},
    "llm": {"kind": "causal", "hf_config": LLAMA},
}  # fmt: skip


def run(model) -> dict[str, torch.Tensor]:
    """Logits, mean loss and greedy tokens of ``model`` on the stored inputs."""
    io = load_file(TENSORS)
    with torch.inference_mode():
        out = model(io["pixel_values"], io["input_ids"], io["attention_mask"], labels=io["labels"])
        tokens = model.generate(
            io["pixel_values"], io["input_ids"], io["attention_mask"], max_new_tokens=5, min_new_tokens=5,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
    return {"logits": out.logits, "loss": out.loss, "tokens": tokens}


def load_golden():
    return build_model(Blip2Config.from_dict(json.loads(CONFIG.read_text())), load_file(WEIGHTS))


def test_logits_loss_and_tokens_are_the_stored_ones():
    model = load_golden()
    got, want = run(model), load_file(TENSORS)
    mask = want["attention_mask"].bool()
    torch.testing.assert_close(got["logits"][mask], want["logits"][mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["loss"], want["loss"], rtol=0, atol=1e-6)
    assert torch.equal(got["tokens"], want["tokens"])


def make() -> None:
    """Build the tiny model with every weight drawn at random, fixed inputs, and store the outputs."""
    from transformers import AutoConfig, LlamaForCausalLM

    from blipkit.models.blip2 import Blip2
    from blipkit.models.vision import EvaViT

    torch.manual_seed(1234)
    cfg = Blip2Config.from_dict(MODEL)
    model = Blip2(cfg, EvaViT(cfg.vision), LlamaForCausalLM(AutoConfig.for_model(**LLAMA))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    DATA.mkdir(exist_ok=True)
    CONFIG.write_text(json.dumps(cfg.to_dict(), indent=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, WEIGHTS)
    ids = torch.tensor([[1, 5, 9, 13, 7], [1, 4, 8, 0, 0]])
    labels = torch.tensor([[-100, -100, 9, 13, 7], [-100, 4, 8, -100, -100]])
    io = {
        "pixel_values": torch.randn(2, 3, 28, 28),
        "input_ids": ids,
        "attention_mask": (ids != 0).long(),
        "labels": labels,
    }
    save_file(io, TENSORS)
    out = run(load_golden())
    save_file({**io, **{k: v.contiguous() for k, v in out.items()}}, TENSORS)


if __name__ == "__main__":
    make()
