"""Every architecture in blipkit/configs/, shrunk to a tiny width, builds and runs forward + generate."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import (
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

import blipkit
from blipkit.config import WEIGHTS_DIR, Blip2Config, get_config, list_configs, list_models
from blipkit.errors import ConfigError
from blipkit.models.blip2 import Blip2
from blipkit.models.vision import Dinov2Encoder, EvaViT

WIDTH, VOCAB = 32, 40


def _tiny_vision(cfg: Blip2Config) -> torch.nn.Module:
    v = dataclasses.replace(
        cfg.vision, image_size=28, hidden_size=WIDTH, num_layers=1, num_heads=4, intermediate_size=48
    )
    cfg.vision = v
    if v.kind == "dinov2":
        hf = Dinov2Config(
            hidden_size=WIDTH,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=48,
            patch_size=14,
            image_size=28,
        )
        return Dinov2Encoder(v, Dinov2Model(hf))
    return EvaViT(v)


def _tiny_llm(cfg: Blip2Config) -> torch.nn.Module:
    if cfg.llm.kind == "seq2seq":
        return T5ForConditionalGeneration(
            T5Config(
                d_model=WIDTH,
                d_kv=8,
                d_ff=48,
                num_layers=1,
                num_heads=4,
                vocab_size=VOCAB,
                decoder_start_token_id=0,
            )
        )
    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=WIDTH,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
        )
    )


def shrink(name: str) -> Blip2:
    cfg = get_config(name)
    vision = _tiny_vision(cfg)
    cfg.qformer = dataclasses.replace(
        cfg.qformer,
        hidden_size=WIDTH,
        num_layers=2,
        num_heads=4,
        intermediate_size=48,
        encoder_hidden_size=WIDTH,
        vocab_size=VOCAB,
        bos_token_id=1,
        embed_dim=16,
    )
    cfg.bridge = dataclasses.replace(cfg.bridge, llm_hidden_size=WIDTH)
    return Blip2(cfg, vision, _tiny_llm(cfg)).eval()


def test_there_are_configs_and_every_listed_model_has_its_weights():
    assert {"default", "blip2-opt-2.7b", "blip2-flan-t5-xl"} <= set(list_configs())
    assert {"default", "default-photo"} <= set(list_models())  # only what loads by name alone
    for name in list_models():  # trained weights, or a bridge that trains nothing
        raw = json.loads((WEIGHTS_DIR / name / "config.json").read_text())
        assert raw.get("family") == "caption" or any((WEIGHTS_DIR / name).glob("*.safetensors"))


def test_names_that_do_not_load_say_what_would():
    with pytest.raises(FileNotFoundError, match=r"architecture config for training.*\['default'"):
        blipkit.load("blip2-opt-2.7b")
    with pytest.raises(FileNotFoundError, match="did you mean 'default'"):
        blipkit.load("defualt")
    with pytest.raises(FileNotFoundError, match="did you mean 'default'"):
        blipkit.load("Default")


@pytest.mark.parametrize("name", list_configs())
def test_config_builds_and_runs(name):
    torch.manual_seed(0)
    model = shrink(name)
    pixels = torch.randn(2, 3, 28, 28)
    ids = torch.randint(2, VOCAB, (2, 5))
    q_ids = torch.randint(2, VOCAB, (2, 4)) if model.config.bridge.text_input else None
    kwargs = {"qformer_input_ids": q_ids} if q_ids is not None else {}
    labels = ids.clone()
    labels[:, :2] = -100
    out = model(pixels, ids, labels=labels, **kwargs)  # seq2seq: ids = prefix, labels = suffix
    assert out.logits.shape == (2, 5, VOCAB)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.qformer.query_tokens.grad is not None
    tokens = model.generate(pixels, ids[:, :2], max_new_tokens=3, min_new_tokens=3, do_sample=False, **kwargs)
    assert tokens.shape == (2, 3)


def test_unknown_key_in_a_block_is_named():
    d = get_config("default").to_dict()
    d["bridge"]["width"] = 3
    with pytest.raises(ValueError, match=r"\['width'\].*'bridge' block"):
        Blip2Config.from_dict(d)


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="unknown model config"):
        get_config("blip3")
    with pytest.raises(FileNotFoundError):
        blipkit.load("no-such-model-or-dir")


def test_tower_widths_are_checked_against_the_config():
    cfg = shrink("default").config
    wide = dataclasses.replace(cfg.qformer, encoder_hidden_size=WIDTH + 8)
    with pytest.raises(ConfigError, match=r"vision encoder is 32 wide.*qformer.encoder_hidden_size is 40"):
        Blip2(dataclasses.replace(cfg, qformer=wide), _tiny_vision(cfg), _tiny_llm(cfg))
    bridge = dataclasses.replace(cfg.bridge, llm_hidden_size=WIDTH * 2)
    with pytest.raises(ConfigError, match=r"language model is 32 wide.*bridge.llm_hidden_size is 64"):
        Blip2(dataclasses.replace(cfg, bridge=bridge), _tiny_vision(cfg), _tiny_llm(cfg))
