"""The CLIP / SigLIP dual-encoder family against transformers on tiny random models with perturbed weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from hf_tiny_clip import IMAGE_SIZE, MAX_TOKENS, make_clip
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessorPil, CLIPModel, SiglipModel
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from blipkit.convert import hf_clip
from blipkit.errors import CapabilityError, CheckpointError, ConfigError
from blipkit.models import family
from blipkit.models.clip import DualEncoder

KINDS = ["clip", "siglip"]
# in-vocabulary texts of different lengths (an unknown word is CLIP's unk = EOS, where its text tower pools)
TEXTS = ["a photo of a cat", "a dog", "two red cars", "a big black dog sitting on the grass near a tree"]
TOL = {"rtol": 0, "atol": 1e-4}


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(47, 23), (13, 61), (30, 30)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _tokenize(model: DualEncoder, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokenized as the config says: CLIP padded to the longest (+ mask), SigLIP to max length (no mask)."""
    cfg = model.config
    enc = tokenizer(
        texts, padding=cfg.text_padding, max_length=cfg.text_max_tokens, truncation=True, return_tensors="pt"
    )
    return enc["input_ids"], enc.get("attention_mask")


def _hf_text(ids: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(p=2, dim=-1, keepdim=True)


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    """(kind, transformers model, (ours, tokenizer, processor), checkpoint dir)."""
    kind = request.param
    path = tmp_path_factory.mktemp(f"hf-{kind}")
    make_clip(path, kind)
    hf = (CLIPModel if kind == "clip" else SiglipModel).from_pretrained(path).eval()
    return kind, hf, hf_clip.load(path, torch.float32), path


# --- parity ------------------------------------------------------------------------------------------------
@torch.inference_mode()
def test_image_embeddings_match_get_image_features(pair):
    _, hf, (ours, _, _), _ = pair
    pixels = _pixels(3)
    features = ours.encode_image(pixels)
    expected = hf.get_image_features(pixel_values=pixels).pooler_output  # (B, E), not normalised
    assert features.shape == (3, 1, expected.shape[-1])
    torch.testing.assert_close(features[:, 0], expected, **TOL)
    got = ours.image_embeddings(features)
    assert got.shape == (3, 1, expected.shape[-1])
    torch.testing.assert_close(got[:, 0], _unit(expected), **TOL)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3, 1))


@torch.inference_mode()
def test_text_embeddings_match_get_text_features(pair):
    kind, hf, (ours, tok, _), _ = pair
    ids, mask = _tokenize(ours, tok, TEXTS)
    if kind == "siglip":
        assert mask is None and ids.shape == (len(TEXTS), MAX_TOKENS)  # padded to max length, no mask
    else:
        assert mask is not None and ids.shape[1] < MAX_TOKENS  # padded to the longest
    expected = _unit(hf.get_text_features(**_hf_text(ids, mask)).pooler_output)
    got = ours.text_embeddings(ids, mask)
    assert got.shape == expected.shape == (len(TEXTS), expected.shape[-1])
    torch.testing.assert_close(got, expected, **TOL)


@torch.inference_mode()
def test_logits_and_probabilities_match_forward(pair):
    kind, hf, (ours, tok, _), _ = pair
    pixels = _pixels(2, seed=1)
    ids, mask = _tokenize(ours, tok, TEXTS)
    out = hf(pixel_values=pixels, **_hf_text(ids, mask))
    similarity = ours.image_embeddings(ours.encode_image(pixels))[:, 0] @ ours.text_embeddings(ids, mask).T
    torch.testing.assert_close(ours.logits(similarity), out.logits_per_image, **TOL)
    probs = ours.label_probs(similarity)
    if kind == "clip":  # CLIP: softmax over the labels
        expected = out.logits_per_image.softmax(dim=1)
        torch.testing.assert_close(probs.sum(dim=-1), torch.ones(2))
    else:  # SigLIP: an independent sigmoid per pair
        expected = torch.sigmoid(out.logits_per_image)
    torch.testing.assert_close(probs, expected, **TOL)
    assert probs.std() > 0.01  # not saturated: the check sees a wrong scale or bias


@torch.inference_mode()
def test_siglip_match_probs_are_the_pairwise_sigmoid(pair):
    kind, hf, (ours, tok, _), _ = pair
    if kind != "siglip":
        pytest.skip("SigLIP only")
    pixels = _pixels(len(TEXTS), seed=2)
    ids, mask = _tokenize(ours, tok, TEXTS)
    got = ours.match_probs(ours.encode_image(pixels), ids, mask)
    expected = torch.sigmoid(hf(pixel_values=pixels, input_ids=ids).logits_per_image.diagonal())
    assert got.shape == (len(TEXTS),)
    torch.testing.assert_close(got, expected, **TOL)


@torch.inference_mode()
def test_siglip_ignores_an_attention_mask(pair):
    kind, hf, (ours, tok, _), _ = pair
    if kind != "siglip":
        pytest.skip("SigLIP only")
    enc = tok(TEXTS, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt")
    mask = (enc["input_ids"] != tok.pad_token_id).long()
    masked = _unit(hf.get_text_features(input_ids=enc["input_ids"], attention_mask=mask).pooler_output)
    got = ours.text_embeddings(enc["input_ids"], mask)
    torch.testing.assert_close(got, ours.text_embeddings(enc["input_ids"], None), rtol=0, atol=0)
    assert (got - masked).abs().max() > 1e-3  # a mask would have changed the embedding


@torch.inference_mode()
def test_batched_equals_one_by_one(pair):
    _, _, (ours, tok, _), _ = pair
    pixels = _pixels(3, seed=3)
    batched = ours.image_embeddings(ours.encode_image(pixels))
    single = torch.cat([ours.image_embeddings(ours.encode_image(pixels[i : i + 1])) for i in range(3)])
    torch.testing.assert_close(batched, single, **TOL)
    texts = ours.text_embeddings(*_tokenize(ours, tok, TEXTS))
    alone = torch.cat([ours.text_embeddings(*_tokenize(ours, tok, [t])) for t in TEXTS])
    torch.testing.assert_close(texts, alone, **TOL)


@torch.inference_mode()
def test_processor_pixels_match_transformers(pair):
    kind, hf, (ours, _, processor), path = pair
    hf_processor = (CLIPImageProcessorPil if kind == "clip" else SiglipImageProcessorPil).from_pretrained(
        path
    )
    if kind == "clip":
        assert (processor.resize, processor.crop_size) == ("shortest_edge", IMAGE_SIZE)
    else:
        assert (processor.resize, processor.mean) == ("square", (0.5, 0.5, 0.5))
    images = _images()
    expected = torch.cat([hf_processor(im, return_tensors="pt")["pixel_values"] for im in images])
    got = processor(images)
    assert got.shape == (len(images), 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        ours.image_embeddings(ours.encode_image(got))[:, 0],
        _unit(hf.get_image_features(pixel_values=expected).pooler_output),
        **TOL,
    )


# --- the family contract ------------------------------------------------------------------------------------
def test_config_and_capabilities(pair):
    kind, _, (ours, _, _), _ = pair
    cfg = ours.config
    assert (cfg.kind, cfg.family, cfg.text_max_tokens) == (kind, "clip", MAX_TOKENS)
    assert cfg.text_padding == {"clip": "longest", "siglip": "max_length"}[kind]
    assert cfg.prompts.classify == "a photo of {}"
    assert ours.capabilities == {"clip": {"embed"}, "siglip": {"embed", "match"}}[kind]
    assert family.capabilities(ours) == {"clip": ("embed",), "siglip": ("embed", "match")}[kind]
    assert (ours.has_llm, ours.llm, ours.question_aware) == (False, None, False)
    assert not any(p.requires_grad for p in ours.parameters())
    assert all(not t.is_meta for t in ours.state_dict().values())
    with pytest.raises(CapabilityError, match=r"cannot caption \(a dual encoder has no language model\)"):
        ours.require_llm()


def test_clip_has_no_match_head(pair):
    kind, _, (ours, tok, _), _ = pair
    if kind != "clip":
        pytest.skip("CLIP only")
    ids, mask = _tokenize(ours, tok, TEXTS[:2])
    with pytest.raises(
        CapabilityError, match=r"CLIP cannot match \(CLIP has no match head.*; it can: embed$"
    ):
        ours.match_probs(ours.encode_image(_pixels(2)), ids, mask)


def test_bfloat16_load(pair):
    kind, _, (ours, tok, _), path = pair
    low, _, _ = hf_clip.load(path, torch.bfloat16)
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    pixels = _pixels(2, seed=4)
    with torch.inference_mode():
        got = low.image_embeddings(low.encode_image(pixels))
        expected = ours.image_embeddings(ours.encode_image(pixels))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0.1)


# --- strict loading -----------------------------------------------------------------------------------------
def _edited_copy(path, tmp_path, edit) -> object:
    out = tmp_path / "edited"
    shutil.copytree(path, out)
    sd = load_file(str(out / "model.safetensors"))
    edit(sd)
    save_file(sd, str(out / "model.safetensors"))
    return out


def _key(kind: str) -> str:
    return {"clip": "visual_projection.weight", "siglip": "text_model.head.weight"}[kind]


def test_missing_key_is_named(pair, tmp_path):
    kind, _, _, path = pair
    bad = _edited_copy(path, tmp_path, lambda sd: sd.pop(_key(kind)))
    with pytest.raises(CheckpointError, match=r"missing keys \[" + f"'{_key(kind)}'"):
        hf_clip.load(bad, torch.float32)


def test_unexpected_key_is_named(pair, tmp_path):
    _, _, _, path = pair
    bad = _edited_copy(path, tmp_path, lambda sd: sd.update({"vision_model.extra.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['vision_model.extra.weight'\]"):
        hf_clip.load(bad, torch.float32)


def test_unknown_top_level_key_is_named():
    with pytest.raises(CheckpointError, match="'itm_head.weight'"):
        hf_clip.filter_hf({"logit_scale": torch.ones(()), "itm_head.weight": torch.ones(2, 2)})


def test_misshaped_key_is_named(pair, tmp_path):
    kind, _, _, path = pair
    bad = _edited_copy(path, tmp_path, lambda sd: sd.update({_key(kind): sd[_key(kind)][:-1]}))
    with pytest.raises(CheckpointError, match=f"mis-shaped keys .*{_key(kind)}: checkpoint"):
        hf_clip.load(bad, torch.float32)


def test_old_position_ids_buffers_are_skipped(pair, tmp_path):
    _, _, (ours, _, _), path = pair

    def add_buffers(sd):  # what transformers < 4.31 saved
        sd["text_model.embeddings.position_ids"] = torch.arange(MAX_TOKENS)[None]
        sd["vision_model.embeddings.position_ids"] = torch.arange(26)[None]

    loaded, _, _ = hf_clip.load(_edited_copy(path, tmp_path, add_buffers), torch.float32)
    with torch.inference_mode():
        pixels = _pixels(1)
        # equal up to BLAS rounding: two loads of one file may sit at other alignments
        torch.testing.assert_close(loaded.encode_image(pixels), ours.encode_image(pixels))


def test_key_map_round_trip(pair):
    _, hf, (ours, _, _), _ = pair
    hf_keys = set(hf.state_dict())
    assert set(hf_clip.filter_hf(hf.state_dict())) == set(ours.state_dict())
    assert set(hf_clip.to_hf(ours.state_dict())) == hf_keys


# --- configs ------------------------------------------------------------------------------------------------
@pytest.fixture(params=KINDS)
def raw_config(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"cfg-{request.param}")
    make_clip(path, request.param)
    return json.loads((path / "config.json").read_text())


def test_detect():
    assert hf_clip.detect({"model_type": "clip", "architectures": ["CLIPModel"]}) == "clip"
    assert hf_clip.detect({"model_type": "siglip", "architectures": ["SiglipModel"]}) == "siglip"
    assert hf_clip.detect({"model_type": "siglip"}) == "siglip"
    assert hf_clip.detect({"architectures": ["CLIPModel"]}) == "clip"
    for other in (
        {"model_type": "clip", "architectures": ["CLIPForImageClassification"]},  # no text tower
        {"model_type": "siglip2", "architectures": ["Siglip2Model"]},
        {"model_type": "blip-2", "qformer_config": {}},
        {"model_type": "llava", "vision_config": {"model_type": "clip_vision_model"}},
        {},
        [],
    ):
        assert hf_clip.detect(other) is None, other


def test_config_from_hf(raw_config):
    cfg = hf_clip.config_from_hf(raw_config, "x/config.json")
    assert cfg.kind == raw_config["model_type"] and cfg.hf_config == raw_config
    assert cfg.text_max_tokens == MAX_TOKENS and cfg.processor["image_size"] == IMAGE_SIZE


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.pop("vision_config"), "x/config.json: vision_config is missing"),
        (lambda c: c.pop("text_config"), "x/config.json: text_config is missing"),
        (lambda c: c["text_config"].update(hidden_size="32"), "text_config.hidden_size must be an int"),
        (lambda c: c["vision_config"].update(image_size=30.5), "vision_config.image_size must be an int"),
        (lambda c: c["vision_config"].update(patch_size=0), "vision_config.patch_size must be >= 1"),
        (lambda c: c["text_config"].update(num_attention_heads=5), "text_config.hidden_size 32 is not a"),
        (lambda c: c["vision_config"].update(hidden_act="swish2"), "vision_config.hidden_act 'swish2'"),
        (lambda c: c["vision_config"].update(num_channels=1), "vision_config.num_channels must be 3"),
        (lambda c: c.update(architectures="CLIPModel"), "architectures"),
        (lambda c: c.update(model_type="blip-2"), "model_type 'blip-2'"),
    ],
)
def test_config_errors_name_the_field(raw_config, edit, message):
    edit(raw_config)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        hf_clip.config_from_hf(raw_config, "x/config.json")


def test_clip_eos_must_be_in_the_vocabulary(tmp_path):
    make_clip(tmp_path, "clip")
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["text_config"]["eos_token_id"] = raw["text_config"]["vocab_size"]
    with pytest.raises(ConfigError, match="text_config.eos_token_id must be a token id below vocab_size 66"):
        hf_clip.config_from_hf(raw)


def test_siglip_config_errors(tmp_path):
    make_clip(tmp_path, "siglip")
    raw = json.loads((tmp_path / "config.json").read_text())
    no_head = {**raw, "vision_config": {**raw["vision_config"], "vision_use_head": False}}
    with pytest.raises(ConfigError, match="vision_config.vision_use_head=false"):
        hf_clip.config_from_hf(no_head)
    narrow = {**raw, "text_config": {**raw["text_config"], "projection_size": 16}}
    with pytest.raises(ConfigError, match="text_config.projection_size 16"):
        hf_clip.config_from_hf(narrow)
    # a preprocessor whose output the vision tower cannot take
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({**pre, "size": {"height": 24, "width": 24}})
    )
    with pytest.raises(ConfigError, match="preprocessor_config.json: gives 24x24 images.*image_size 30"):
        hf_clip.load(tmp_path, torch.float32)
