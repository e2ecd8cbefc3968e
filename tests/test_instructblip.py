"""Parity with transformers' InstructBLIP on tiny random models (every parameter perturbed away from its
init), saved with save_pretrained + InstructBlipProcessor and loaded with ``blipkit.load``."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny_instructblip import hf_inputs, make_instructblip
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

import blipkit
from blipkit.convert import hf_instructblip
from blipkit.errors import CapabilityError, CheckpointError
from blipkit.models.qformer import build_attention_mask
from blipkit.state_dicts import read_state_dict

TEXTS = ["a photo of a cat", "question : what color is the dog ? answer :"]
IMAGE_SIZE = 28

CASES = [("opt", 4, 2), ("llama", 6, 1), ("t5", 4, 2), ("t5", 8, 1)]


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-q{c[1]}-x{c[2]}")
def pair(request, tmp_path_factory):
    llm, Q, freq = request.param
    path = tmp_path_factory.mktemp(f"hf-instructblip-{llm}-{Q}-{freq}")
    make_instructblip(path, llm=llm, num_query_tokens=Q, cross_attention_frequency=freq, qformer_layers=3)
    # both sides on SDPA (as in test_against_hf)
    hf = InstructBlipForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").eval()
    processor = InstructBlipProcessor.from_pretrained(path)
    return hf, processor, blipkit.load(path), path


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-instructblip-opt")
    make_instructblip(path, llm="opt")
    return path


def _inputs(hf, processor, texts):
    Q = hf.config.num_query_tokens
    hi = hf_inputs(processor, texts, Q, hf.config.image_token_index)
    ours = {  # blipkit's text ids carry no image placeholders
        "input_ids": hi["input_ids"][:, Q:],
        "attention_mask": hi["attention_mask"][:, Q:],
        "qformer_input_ids": hi["qformer_input_ids"],
        "qformer_attention_mask": hi["qformer_attention_mask"],
    }
    return hi, ours


def test_loaded_as_question_aware(pair):
    _, _, ours, path = pair
    q = ours.config.qformer
    assert ours.config.name == "hf-instructblip" and ours.config.bridge.text_input
    assert q.text_path and not q.retrieval_heads and not q.lm_head
    assert ours.config.qformer_tokenizer == str((path / "qformer_tokenizer").resolve())
    for head in ("vision_proj", "text_proj", "itm_head", "temp", "lm_transform"):
        assert not hasattr(ours.model.qformer, head)
    assert ours.processor.image_size == IMAGE_SIZE


def test_tokenization_matches_the_processor(pair):
    hf, processor, ours, _ = pair
    _, mine = _inputs(hf, processor, TEXTS)
    ids, mask = ours.text.qformer_batch(TEXTS)
    assert ids.tolist() == mine["qformer_input_ids"].tolist()
    assert mask.tolist() == mine["qformer_attention_mask"].tolist()
    for text, row, row_mask in zip(TEXTS, mine["input_ids"], mine["attention_mask"], strict=True):
        assert ours.text.prompt(text, 5).llm_ids == row[row_mask.bool()].tolist()


@torch.inference_mode()
def test_qformer_embeddings_and_outputs_match(pair):
    """Text positions count from 0 after the queries; one LayerNorm over [queries; text]; the mask is ones
    over the queries, then the instruction's mask."""
    hf, processor, ours, _ = pair
    _, mine = _inputs(hf, processor, TEXTS)
    qids, qmask = mine["qformer_input_ids"], mine["qformer_attention_mask"]
    B, Q = qids.shape[0], hf.config.num_query_tokens
    query_tokens = hf.query_tokens.expand(B, -1, -1)
    theirs = hf.qformer.embeddings(input_ids=qids, query_embeds=query_tokens)  # (B, Q+T, D)
    torch.testing.assert_close(ours.model.qformer.embed(qids, Q, B), theirs, atol=1e-6, rtol=1e-5)

    mask = build_attention_mask("bidirectional", Q, qmask)  # (B, 1, Q+T, Q+T)
    hf_mask = torch.cat([torch.ones(B, Q, dtype=qmask.dtype), qmask], dim=1)
    assert (mask[:, 0] == hf_mask.bool()[:, None, :]).all()

    image = hf.vision_model(pixel_values=_pixels(B)).last_hidden_state  # (B, P, Dv)
    torch.testing.assert_close(ours.model.encode_image(_pixels(B)), image, atol=1e-5, rtol=1e-5)
    theirs = hf.qformer(
        input_ids=qids,
        attention_mask=hf_mask,
        query_embeds=query_tokens,
        encoder_hidden_states=image,
        encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long),
    ).last_hidden_state  # (B, Q+T, D)
    out = ours.model.qformer(image, qids, qmask, mask_kind="bidirectional")
    keep = hf_mask.bool()
    torch.testing.assert_close(out[keep], theirs[keep], atol=1e-5, rtol=1e-4)


@torch.inference_mode()
def test_against_hf_logits(pair):
    hf, processor, ours, _ = pair
    pixels = _pixels(2)
    hi, mine = _inputs(hf, processor, TEXTS)
    if ours.model.is_encoder_decoder:
        dec = torch.tensor([[0, 5, 7, 9], [0, 11, 3, 4]])
        theirs = hf(pixel_values=pixels, decoder_input_ids=dec, **hi).logits
        got = ours.model(pixels, decoder_input_ids=dec, **mine).logits
        torch.testing.assert_close(got, theirs, atol=1e-4, rtol=1e-4)
        return
    Q = hf.config.num_query_tokens
    theirs = hf(pixel_values=pixels, **hi).logits[:, Q:]  # (B, T, V)
    got = ours.model(pixels, **mine).logits
    assert got.shape == theirs.shape
    keep = mine["attention_mask"].bool()
    torch.testing.assert_close(got[keep], theirs[keep], atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_the_instruction_reaches_the_queries(pair):
    hf, processor, ours, _ = pair
    pixels = _pixels(1)
    a = ours.model.visual_prompt(ours.visual(pixels, ["a photo of a cat"]))
    b = ours.model.visual_prompt(ours.visual(pixels, ["what color is the dog ?"]))
    assert not torch.allclose(a, b)


def _hf_new_tokens(hf, hi, ours, **kwargs) -> list[int]:
    out = hf.generate(**hi, **kwargs)[0].tolist()
    out = out[1:] if ours.model.is_encoder_decoder else out[hi["input_ids"].shape[1] :]
    eos = ours.tokenizer.eos_token_id
    return out[: out.index(eos)] if eos in out else out


@torch.inference_mode()
def test_against_hf_greedy_tokens(pair):
    hf, processor, ours, _ = pair
    for i, text in enumerate(TEXTS):
        pixels = _pixels(1, seed=i)
        hi, _ = _inputs(hf, processor, [text])
        for extra in ({}, {"min_new_tokens": 6}):  # blipkit's lean loop, then transformers' generate
            theirs = _hf_new_tokens(
                hf,
                {"pixel_values": pixels, **hi},
                ours,
                max_new_tokens=6,
                do_sample=False,
                num_beams=1,
                **extra,
            )
            assert ours.generate(pixels, [text], max_new_tokens=6, **extra) == [
                ours.tokenizer.decode(theirs, skip_special_tokens=True).strip()
            ]
            if not extra:
                assert ours.complete(pixels, [ours.text.prompt(text, 6)], 6) == [theirs]


def _image(color: str) -> Image.Image:
    image = Image.new("RGB", (40, 32), "white")
    ImageDraw.Draw(image).ellipse((4, 4, 28, 26), fill=color)
    return image


@torch.inference_mode()
def test_ask_equals_hf_generate(pair):
    hf, processor, ours, _ = pair
    for color in ("red", "blue"):
        image = _image(color)
        question = "what color is the dog ?"
        hi, _ = _inputs(hf, processor, [ours.text.question(question)])
        pixels = ours.processor([image])
        n = ours.config.prompts.vqa_max_new_tokens
        theirs = _hf_new_tokens(hf, {"pixel_values": pixels, **hi}, ours, max_new_tokens=n, do_sample=False)
        assert ours.ask(image, question) == ours.tokenizer.decode(theirs, skip_special_tokens=True).strip()


@torch.inference_mode()
def test_batched_generation_equals_one_by_one(pair):
    _, _, ours, _ = pair
    images = [_pixels(1, seed=s)[0] for s in range(3)]
    prompts = ["a photo of", "question : what is it ? answer :", ""]
    batch = torch.stack(images)
    for kwargs in ({}, {"num_beams": 3}):
        batched = ours.generate(batch, prompts, max_new_tokens=5, **kwargs)
        single = [
            ours.generate(img[None], [p], max_new_tokens=5, **kwargs)[0]
            for img, p in zip(images, prompts, strict=True)
        ]
        assert batched == single


def test_retrieval_calls_raise_capability_error(pair):
    _, _, ours, _ = pair
    can = r"it can:? caption, ask,? (and )?chat"  # names what an InstructBLIP checkpoint can do
    with pytest.raises(CapabilityError, match=can):
        ours.similarity(_pixels(1), ["a cat"])
    with pytest.raises(CapabilityError, match=can):
        ours.match(_pixels(1), ["a cat"])
    with pytest.raises(CapabilityError, match=can):
        ours.embed_texts(["a cat"])
    with pytest.raises(CapabilityError, match=can):
        ours.classify(_pixels(1), ["cat", "dog"])
    with pytest.raises(CapabilityError, match="retrieval heads"):  # the Q-Former's own check
        ours.model.qformer.image_features(ours.model.encode_image(_pixels(1)))


# --- checkpoints ------------------------------------------------------------------------------------------
def _copy_dir(src, dst):
    dst.mkdir()
    for f in src.rglob("*"):
        target = dst / f.relative_to(src)
        if f.is_dir():
            target.mkdir(exist_ok=True)
        else:
            target.write_bytes(f.read_bytes())
    return dst


def _edit_weights(src, dst, edit) -> None:
    bad = _copy_dir(src, dst)
    f = bad / "model.safetensors"
    sd = load_file(str(f))
    edit(sd)
    save_file(sd, str(f))


def test_missing_key_is_named(opt_dir, tmp_path):
    _edit_weights(opt_dir, tmp_path / "bad", lambda sd: sd.pop("qformer.embeddings.word_embeddings.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \['qformer\.word_embeddings\.weight'\]"):
        blipkit.load(tmp_path / "bad")


def test_unexpected_key_is_named(opt_dir, tmp_path):
    def add(sd):
        sd["qformer.embeddings.surprise.weight"] = torch.zeros(2)

    _edit_weights(opt_dir, tmp_path / "bad", add)
    with pytest.raises(CheckpointError, match=r"qformer\.embeddings\.surprise\.weight"):
        blipkit.load(tmp_path / "bad")


def test_blip2_only_key_is_unexpected(opt_dir, tmp_path):
    def add(sd):
        sd["itm_head.weight"] = torch.zeros(2, 32)  # a BLIP-2 retrieval head: not part of InstructBLIP

    _edit_weights(opt_dir, tmp_path / "bad", add)
    with pytest.raises(CheckpointError, match=r"'itm_head\.weight'"):
        blipkit.load(tmp_path / "bad")


def test_wrong_shape_is_named(opt_dir, tmp_path):
    def reshape(sd):
        sd["qformer.embeddings.position_embeddings.weight"] = torch.zeros(3, 3)

    _edit_weights(opt_dir, tmp_path / "bad", reshape)
    with pytest.raises(CheckpointError, match=r"qformer\.position_embeddings\.weight: checkpoint \(3, 3\)"):
        blipkit.load(tmp_path / "bad")


def test_missing_qformer_tokenizer_is_named(opt_dir, tmp_path):
    bad = _copy_dir(opt_dir, tmp_path / "bad")
    for f in (bad / "qformer_tokenizer").iterdir():
        f.unlink()
    (bad / "qformer_tokenizer").rmdir()
    with pytest.raises(CheckpointError, match="qformer_tokenizer/"):
        blipkit.load(bad)


def test_old_position_ids_buffer_is_skipped(opt_dir, tmp_path):
    def add(sd):
        sd["qformer.embeddings.position_ids"] = torch.arange(64)[None]

    _edit_weights(opt_dir, tmp_path / "old", add)
    blipkit.load(tmp_path / "old")


def test_key_maps_invert(opt_dir):
    sd = read_state_dict(opt_dir)
    assert hf_instructblip.is_instructblip(json.loads((opt_dir / "config.json").read_text()))
    back = hf_instructblip.to_hf(hf_instructblip.filter_hf(sd))
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k])


@torch.inference_mode()
def test_blipkit_round_trip(opt_dir, tmp_path):
    model = blipkit.load(opt_dir)
    out = blipkit.save_checkpoint(model.model, tmp_path / "ck", model.processor)
    again = blipkit.load(out)
    assert again.config.bridge.text_input and not again.config.qformer.retrieval_heads
    pixels = _pixels(2)
    prompts = ["a photo of", "what is it ?"]
    assert again.generate(pixels, prompts, max_new_tokens=4) == model.generate(
        pixels, prompts, max_new_tokens=4
    )
