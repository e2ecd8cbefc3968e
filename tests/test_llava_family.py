"""The LLaVA family against transformers' own ``LlavaForConditionalGeneration`` on tiny random models (every
parameter perturbed from its init): logits, greedy tokens, batching, the LM loss, both checkpoint layouts,
strict loading and the vision towers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_tiny_llava import (
    CHAT_TEMPLATE,
    VISION_LAYERS,
    hf_llava_inputs,
    make_llava,
    make_llava_original,
    num_image_features,
)
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration
from transformers.utils import logging as hf_logging

from blipkit.convert import hf_llava, llava_original
from blipkit.errors import CheckpointError, ConfigError, UsageError
from blipkit.models.blip2 import Visual
from blipkit.models.decoding import Decoder, Sampling
from blipkit.models.llava import LlavaConfig
from blipkit.models.towers import build_tower

hf_logging.disable_progress_bar()

IMAGE_SIZE = 28
# the image token at different places; right padding gives every row a different length
TEXTS = [
    "a photo of <image> what is this ?",
    "<image> describe",
    "the cat on the table <image> shows what color ?",
]
# (llm, tower, feature_layer, select, chat_template)
CASES = {
    "llama-clip-l2-default": ("llama", "clip", -2, "default", None),
    "qwen2-siglip-l1-full": ("qwen2", "siglip", -1, "full", CHAT_TEMPLATE),
    "mistral-clip-list-default": ("mistral", "clip", [1, -1], "default", None),
    "llama-clip-l1-full": ("llama", "clip", -1, "full", None),
}


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


class Pair:
    """One tiny checkpoint: transformers' model and blipkit's, loaded from the same dir."""

    def __init__(self, path, name):
        llm, tower, layer, select, template = CASES[name]
        make_llava(path, llm=llm, tower=tower, feature_layer=layer, select=select, chat_template=template)
        self.path = path
        self.hf = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").eval()
        self.model, self.tok, self.processor = hf_llava.load(path)
        self.image_id = self.hf.config.image_token_index
        self.P = num_image_features(self.hf)

    def encode(self, texts=TEXTS):
        self.tok.padding_side = "right"
        enc = self.tok(texts, padding=True, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def hf_logits(self, ids, mask, pixels):
        """transformers' logits (B, T, V) at blipkit's text columns."""
        hid, hmask, cols = hf_llava_inputs(ids, mask, self.image_id, self.P)
        logits = self.hf(input_ids=hid, attention_mask=hmask, pixel_values=pixels).logits
        return logits.gather(1, cols[..., None].expand(-1, -1, logits.shape[-1]))

    def inputs(self, ids, mask, pixels):
        return self.model.llm_inputs(self.model.visual_prompt(Visual(pixels)), ids, mask)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    return Pair(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    return Pair(tmp_path_factory.mktemp("llama"), "llama-clip-l2-default")


def _until(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


# --- parity ------------------------------------------------------------------------------------------------
@torch.inference_mode()
def test_logits_match_transformers(pair):
    ids, mask = pair.encode()
    pixels = _pixels(len(TEXTS))
    assert pair.model.num_visual_tokens == pair.P
    ours = pair.model(pixels, ids, mask).logits  # (B, T, V)
    theirs = pair.hf_logits(ids, mask, pixels)
    assert ours.shape == ids.shape + (pair.hf.config.text_config.vocab_size,)
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_greedy_matches_transformers(pair):
    ids, mask = pair.encode()
    pixels = _pixels(len(TEXTS), seed=1)
    eos, pad = pair.tok.eos_token_id, pair.tok.pad_token_id
    hid, hmask, _ = hf_llava_inputs(ids, mask, pair.image_id, pair.P, side="left")
    out = pair.hf.generate(
        input_ids=hid,
        attention_mask=hmask,
        pixel_values=pixels,
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    theirs = [_until(row, eos) for row in out[:, hid.shape[1] :].tolist()]
    decoder = Decoder(pair.model, eos, pad)
    inputs = pair.inputs(ids, mask, pixels)
    assert decoder.path(Sampling()) == "lean"
    assert decoder.generate(inputs, 8) == theirs
    # transformers' generate on blipkit's joined inputs (the path beams and sampling take)
    through_hf = Sampling(options={"repetition_penalty": 1.0})
    assert decoder.path(through_hf) == "transformers"
    assert decoder.generate(inputs, 8, through_hf) == theirs
    assert any(len(t) > 2 for t in theirs)


@torch.inference_mode()
def test_batched_equals_one_by_one(pair):
    ids, mask = pair.encode()
    pixels = _pixels(len(TEXTS), seed=2)
    batched = pair.model(pixels, ids, mask).logits
    decoder = Decoder(pair.model, pair.tok.eos_token_id, pair.tok.pad_token_id)
    tokens = decoder.generate(pair.inputs(ids, mask, pixels), 6)
    for i, text in enumerate(TEXTS):
        one_ids, one_mask = pair.encode([text])
        n = one_ids.shape[1]
        assert mask[i].sum() == n
        one = pair.model(pixels[i : i + 1], one_ids, one_mask).logits
        torch.testing.assert_close(batched[i, :n], one[0], atol=1e-4, rtol=1e-4)
        assert decoder.generate(pair.inputs(one_ids, one_mask, pixels[i : i + 1]), 6) == [tokens[i]]


@torch.inference_mode()
def test_lm_loss_matches_transformers(pair):
    ids, mask = pair.encode()
    pixels = _pixels(len(TEXTS), seed=3)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a prompt
    labels[ids == pair.image_id] = -100
    hid, hmask, cols = hf_llava_inputs(ids, mask, pair.image_id, pair.P)
    hf_labels = torch.full_like(hid, -100).scatter(1, cols, labels)  # -100 on every image position
    theirs = pair.hf(input_ids=hid, attention_mask=hmask, pixel_values=pixels, labels=hf_labels).loss
    inputs = pair.inputs(ids, mask, pixels)
    ours = pair.model.lm_loss(inputs, labels)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        pair.model(pixels, ids, mask, labels=labels).loss, theirs, atol=1e-5, rtol=1e-5
    )
    scored = int((hf_labels[:, 1:] != -100).sum())
    total = pair.model.lm_loss(inputs, labels, reduction="sum")
    torch.testing.assert_close(total / scored, theirs, atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_image_sits_at_its_token(llama_pair):
    """Text before the image does not see it; text after it does (a prefix layout would change both)."""
    ids, mask = llama_pair.encode(["the cat on the table <image> shows what color ?"])
    k = int((ids[0] == llama_pair.image_id).nonzero())
    a = llama_pair.model(_pixels(1, seed=4), ids, mask).logits
    b = llama_pair.model(_pixels(1, seed=5), ids, mask).logits
    torch.testing.assert_close(a[:, :k], b[:, :k])
    assert (a[:, k:] - b[:, k:]).abs().amax() > 1e-3


@torch.inference_mode()
def test_left_packed_keeps_text_columns(llama_pair):
    ids, mask = llama_pair.encode()
    inputs = llama_pair.inputs(ids, mask, _pixels(len(TEXTS)))
    packed = inputs.left_packed()
    rows = torch.arange(len(TEXTS))[:, None]
    real = mask.bool()
    torch.testing.assert_close(
        packed.embeds[rows, packed.text_columns][real], inputs.embeds[rows, inputs.text_columns][real]
    )
    assert bool(packed.mask[:, -1].all())
    L = inputs.embeds.shape[1]
    assert L == ids.shape[1] + llama_pair.P - 1 and inputs.prefix_len == 0


def test_rows_need_exactly_one_image_token(llama_pair):
    model = llama_pair.model
    ids, mask = llama_pair.encode(["a photo of <image>", "the cat <image> <image>", "a dog"])
    prefix = model.visual_prompt(Visual(_pixels(3)))
    with pytest.raises(UsageError, match="row 1 of input_ids holds 2 image tokens"):
        model.llm_inputs(prefix, ids, mask)
    with pytest.raises(UsageError, match="row 0 of input_ids holds 0 image tokens"):
        model.llm_inputs(prefix[2:], ids[2:], mask[2:])


# --- the original repo's layout ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def original_dir(llama_pair, tmp_path_factory):
    return make_llava_original(tmp_path_factory.mktemp("original"), llama_pair.path)


@torch.inference_mode()
def test_original_layout_matches_transformers(llama_pair, original_dir):
    model, tok, processor = llava_original.load(original_dir)
    assert model.config.image_token_index == -200 and model.config.template == "llava_v1"
    assert processor.pad_to_square and processor.crop_size == IMAGE_SIZE
    assert "<image>" not in tok.get_vocab()
    ids, mask = llama_pair.encode()
    pixels = _pixels(len(TEXTS), seed=6)
    original_ids = ids.masked_fill(ids == llama_pair.image_id, -200)  # tokenizer_image_token's layout
    ours = model(pixels, original_ids, mask).logits
    theirs = llama_pair.hf_logits(ids, mask, pixels)
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_original_tower_from_checkpoint(llama_pair, tmp_path):
    """With unfreeze_mm_vision_tower the checkpoint's tower copy is the one used (the tower dir is noise)."""
    path = make_llava_original(tmp_path / "orig", llama_pair.path, tower_in_checkpoint=True)
    tower_file = path / "tower" / "model.safetensors"
    noisy = {k: v + torch.randn_like(v) for k, v in load_file(str(tower_file)).items()}
    save_file(noisy, str(tower_file))
    model, _, _ = llava_original.load(path)
    ids, mask = llama_pair.encode()
    pixels = _pixels(len(TEXTS), seed=7)
    ours = model(pixels, ids.masked_fill(ids == llama_pair.image_id, -200), mask).logits
    theirs = llama_pair.hf_logits(ids, mask, pixels)
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=1e-4)
    # without the flag the copies are skipped and the (noisy) tower dir is read
    config = json.loads((path / "config.json").read_text())
    del config["unfreeze_mm_vision_tower"]
    (path / "config.json").write_text(json.dumps(config))
    other, _, _ = llava_original.load(path)
    assert (
        other(pixels, ids.masked_fill(ids == llama_pair.image_id, -200), mask).logits - ours
    ).abs().amax() > 1e-3


# --- layouts, strictness and configs -----------------------------------------------------------------------
def _renamed(state_dict, table):
    out = {}
    for key, value in state_dict.items():
        for src, dst in table:
            if key.startswith(src):
                key = dst + key[len(src) :]
                break
        out[key] = value
    return out


def test_key_layouts_map_alike(llama_pair, tmp_path):
    saved = load_file(str(llama_pair.path / "model.safetensors"))  # transformers 5.x save_pretrained
    four = _renamed(saved, [("vision_tower.", "vision_tower.vision_model.")])  # llava-1.5-7b-hf on disk
    memory = llama_pair.hf.state_dict()  # model.vision_tower.*, model.language_model.*, lm_head.weight
    assert any(k.startswith("model.language_model.") for k in memory)
    reference = hf_llava.filter_hf(saved)
    for layout in (four, memory):
        got = hf_llava.filter_hf(layout)
        assert sorted(got) == sorted(reference)
        assert all(torch.equal(got[k], reference[k]) for k in reference)
    # a 4.x dir loads to the same model
    shutil.copytree(llama_pair.path, tmp_path / "four")
    save_file(four, str(tmp_path / "four" / "model.safetensors"))
    model, _, _ = hf_llava.load(tmp_path / "four")
    ids, mask = llama_pair.encode()
    with torch.inference_mode():
        torch.testing.assert_close(
            model(_pixels(3), ids, mask).logits, llama_pair.model(_pixels(3), ids, mask).logits
        )


HF_BREAKS = {
    "missing-vision": (
        "vision_tower.encoder.layers.0.mlp.fc1.weight",
        None,
        "encoder.layers.0.mlp.fc1.weight",
    ),
    "missing-llm": ("language_model.model.norm.weight", None, "model.norm.weight"),
    "unexpected": (
        "multi_modal_projector.linear_3.weight",
        (4, 4),
        "multi_modal_projector.*): unexpected keys ['linear_3.weight']",
    ),
    "unexpected-prefix": ("image_newline", (32,), "image_newline"),
    "misshaped-llm": (
        "language_model.model.layers.1.mlp.up_proj.weight",
        (36, 32),
        "model.layers.1.mlp.up_proj.weight",
    ),
    "misshaped-projector": (
        "multi_modal_projector.linear_1.weight",
        (32, 31),
        "mis-shaped keys ['linear_1.weight",
    ),
}
ORIGINAL_BREAKS = {
    "missing": ("model.mm_projector.2.bias", None, "model.mm_projector.*): missing keys ['linear_2.bias']"),
    "unexpected": ("model.image_newline", (32,), "model.image_newline"),
    "misshaped": (
        "model.layers.0.self_attn.q_proj.weight",
        (32, 30),
        "model.layers.0.self_attn.q_proj.weight",
    ),
}


def _break(path, key, shape):
    file = path / "model.safetensors"
    weights = load_file(str(file))
    if shape is None:
        del weights[key]
    else:
        weights[key] = torch.randn(shape)
    save_file(weights, str(file))


@pytest.mark.parametrize("case", list(HF_BREAKS))
def test_hf_checkpoint_errors_name_the_key(llama_pair, tmp_path, case):
    key, shape, named = HF_BREAKS[case]
    path = tmp_path / "broken"
    shutil.copytree(llama_pair.path, path)
    _break(path, key, shape)
    with pytest.raises(CheckpointError) as error:
        hf_llava.load(path)
    assert named in str(error.value)


@pytest.mark.parametrize("case", list(ORIGINAL_BREAKS))
def test_original_checkpoint_errors_name_the_key(original_dir, tmp_path, case):
    key, shape, named = ORIGINAL_BREAKS[case]
    path = tmp_path / "broken"
    shutil.copytree(original_dir, path, ignore=shutil.ignore_patterns("tower"))  # the tower is referenced
    _break(path, key, shape)
    with pytest.raises(CheckpointError) as error:
        llava_original.load(path)
    assert named in str(error.value)


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


HF_CONFIG_BREAKS = {
    "vision_config": lambda c: _without(c, "vision_config"),
    "text_config.model_type": lambda c: {**c, "text_config": {**c["text_config"], "model_type": "vit"}},
    "vision_config.model_type": lambda c: {
        **c,
        "vision_config": {**c["vision_config"], "model_type": "vit"},
    },
    "image_token_index": lambda c: _without(c, "image_token_index"),
    "vision_feature_layer": lambda c: {**c, "vision_feature_layer": "last"},
    "vision_feature_select_strategy": lambda c: {**c, "vision_feature_select_strategy": "crop"},
    "projector_hidden_act": lambda c: {**c, "projector_hidden_act": "nope"},
    "multimodal_projector_bias": lambda c: {**c, "multimodal_projector_bias": "yes"},
}
ORIGINAL_CONFIG_BREAKS = {
    "mm_vision_tower": lambda c: _without(c, "mm_vision_tower"),
    "mm_projector_type": lambda c: {**c, "mm_projector_type": "mlp3x_gelu"},
    "mm_vision_select_feature": lambda c: {**c, "mm_vision_select_feature": "cls"},
    "mm_vision_select_layer": lambda c: {**c, "mm_vision_select_layer": [-2]},
    "mm_use_im_start_end": lambda c: {**c, "mm_use_im_start_end": True},
    "image_aspect_ratio": lambda c: {**c, "image_aspect_ratio": "anyres"},
    "LlavaMptForCausalLM": lambda c: {**c, "architectures": ["LlavaMptForCausalLM"]},
}


@pytest.mark.parametrize("name", list(HF_CONFIG_BREAKS))
def test_hf_config_errors_name_the_field(llama_pair, name):
    raw = json.loads((llama_pair.path / "config.json").read_text())
    assert isinstance(hf_llava.config_from_hf(raw), LlavaConfig)
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        hf_llava.config_from_hf(HF_CONFIG_BREAKS[name](raw))


@pytest.mark.parametrize("name", list(ORIGINAL_CONFIG_BREAKS))
def test_original_config_errors_name_the_field(original_dir, name):
    raw = json.loads((original_dir / "config.json").read_text())
    assert isinstance(llava_original.config_from_hf(raw), LlavaConfig)
    with pytest.raises(ConfigError, match=name):
        llava_original.config_from_hf(ORIGINAL_CONFIG_BREAKS[name](raw))


def test_siglip_default_select_is_refused(pair):
    raw = json.loads((pair.path / "config.json").read_text())
    raw["vision_feature_select_strategy"] = "default"
    if raw["vision_config"]["model_type"] == "siglip_vision_model":
        with pytest.raises(ConfigError, match="SigLIP"):
            hf_llava.config_from_hf(raw)
    else:
        assert hf_llava.config_from_hf(raw).select == "default"


def test_detect_and_template(llama_pair, original_dir, tmp_path_factory):
    hf_raw = json.loads((llama_pair.path / "config.json").read_text())
    original_raw = json.loads((original_dir / "config.json").read_text())
    assert original_raw["model_type"] == "llava"  # as llava-v1.5-7b's config says
    assert hf_llava.detect(hf_raw) and not llava_original.detect(hf_raw)
    assert llava_original.detect(original_raw) and not hf_llava.detect(original_raw)
    assert not hf_llava.detect({"qformer_config": {}, "model_type": "blip-2"})
    assert llama_pair.model.config.template == "llava_v1"
    config = llama_pair.model.config
    assert LlavaConfig.from_dict(config.to_dict()) == config


def test_tokenizer_chat_template_is_the_template(tmp_path):
    make_llava(
        tmp_path, llm="qwen2", tower="siglip", feature_layer=-1, select="full", chat_template=CHAT_TEMPLATE
    )
    model, tok, _ = hf_llava.load(tmp_path)
    assert model.config.template == "tokenizer" and tok.chat_template == CHAT_TEMPLATE


# --- vision towers -----------------------------------------------------------------------------------------
TOWER = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": VISION_LAYERS,
    "num_attention_heads": 4,
}


@torch.inference_mode()
def test_towers_read_transformers_hidden_states(tmp_path):
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    kw = {**TOWER, "image_size": IMAGE_SIZE, "patch_size": 14}
    text = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4}
    clip = CLIPModel(CLIPConfig(vision_config=kw, text_config=text)).eval()
    clip.save_pretrained(tmp_path / "clip")  # a full two-tower dir: the vision part is taken
    x = _pixels(2)
    hidden = clip.vision_model(x, output_hidden_states=True).hidden_states
    tower = build_tower("clip", source=tmp_path / "clip", feature_layer=-2, select="default")
    assert len(tower.model.encoder.layers) == VISION_LAYERS - 1  # the last block is never read
    torch.testing.assert_close(tower(x), hidden[-2][:, 1:])
    both = build_tower("clip", source=tmp_path / "clip", feature_layer=[0, -1], select="full")
    assert both.hidden_size == 64 and both.num_tokens == 5
    torch.testing.assert_close(both(x), torch.cat([hidden[0], hidden[-1]], dim=-1))
    embeddings = build_tower("clip", source=tmp_path / "clip", feature_layer=0)  # after pre_layrnorm
    torch.testing.assert_close(embeddings(x), hidden[0])

    dino = Dinov2Model(Dinov2Config(**kw)).eval()
    dino.save_pretrained(tmp_path / "dinov2")  # saved in transformers' legacy attention names
    out = dino(x, output_hidden_states=True)
    last = build_tower("dinov2", source=tmp_path / "dinov2")
    torch.testing.assert_close(last(x), out.last_hidden_state)  # with DINOv2's final LayerNorm
    assert (out.last_hidden_state - out.hidden_states[-1]).abs().amax() > 1e-3
    mid = build_tower(
        "dinov2", hf_config=dino.config.to_dict(), state_dict=dino.state_dict(), feature_layer=1
    )
    torch.testing.assert_close(mid(x), out.hidden_states[1])


def test_tower_loading_is_strict():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    model = SiglipVisionModel(SiglipVisionConfig(**TOWER, image_size=IMAGE_SIZE, patch_size=14))
    cfg, sd = model.config.to_dict(), model.state_dict()
    tower = build_tower("siglip", hf_config=cfg, state_dict=sd, select="default")
    assert tower.num_tokens == 4  # SigLIP has no CLS token to drop
    with pytest.raises(CheckpointError, match=r"missing keys \['post_layernorm\.bias'\]"):
        build_tower("siglip", hf_config=cfg, state_dict=_without(sd, "post_layernorm.bias"))
    with pytest.raises(CheckpointError, match="unexpected keys.*extra"):
        build_tower("siglip", hf_config=cfg, state_dict={**sd, "extra": torch.zeros(1)})
    bad = {**sd, "embeddings.patch_embedding.bias": torch.zeros(31)}
    with pytest.raises(CheckpointError, match=r"mis-shaped keys.*embeddings\.patch_embedding\.bias"):
        build_tower("siglip", hf_config=cfg, state_dict=bad)
    with pytest.raises(ConfigError, match="out of range"):
        build_tower("siglip", hf_config=cfg, state_dict=sd, feature_layer=VISION_LAYERS + 1)
