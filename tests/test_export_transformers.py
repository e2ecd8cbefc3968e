"""``blipkit export --to transformers``: tiny random models, loaded with blipkit and perturbed there, are
written out and loaded back by transformers' own classes (and ``AutoProcessor``) with blipkit's logits and
greedy tokens, and by ``blipkit.load`` with the same logits; models transformers cannot represent are refused
by name."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from hf_tiny import make_blip2, make_tokenizer, perturb
from hf_tiny_instructblip import make_instructblip
from hf_tiny_llava import hf_llava_inputs, make_llava, make_llava_original
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoProcessor,
    Blip2ForConditionalGeneration,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

import blipkit
from blipkit import cli
from blipkit.config import LLMConfig
from blipkit.convert import blipkit_llava
from blipkit.convert.export_transformers import LLAVA, NotRepresentable, export
from blipkit.errors import EXIT_OK, EXIT_USAGE, UsageError
from blipkit.loading import save_checkpoint
from blipkit.models.blip2 import Blip2
from blipkit.models.llava import LlavaConfig, ProjectorConfig
from blipkit.models.towers import TowerConfig

hf_logging.disable_progress_bar()

IMAGE_SIZE = 28
GREEDY = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "num_beams": 1}
BLIP2_TEXT = "a photo of a cat"
LLAVA_TEXT = "a photo of <image> what is this ?"


def _pixels(n: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


def _photo() -> Image.Image:
    """A non-square RGB image, so that resizing, cropping and padding all matter."""
    return Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 33, 3), dtype=np.uint8))


def _exported(src, out, seed: int) -> tuple[blipkit.Model, object]:
    """blipkit's model of ``src``, perturbed in memory (so the export cannot be a copy of ``src``), and its
    export written to ``out``."""
    model = blipkit.load(src)
    perturb(model.model, seed, 0.1)
    return model, export(model, out)


# --- BLIP-2 ------------------------------------------------------------------------------------------------
def _with_text_path(root, src):
    """A blipkit checkpoint of ``src`` whose Q-Former also has a text path and ITC/ITM/ITG heads (as a stage-2
    model trained from stage 1 has), newly initialised; vision and LLM referenced in ``src``."""
    model = blipkit.load(src).model
    cfg = copy.deepcopy(model.config)
    cfg.qformer = dataclasses.replace(cfg.qformer, text_path=True, retrieval_heads=True, lm_head=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        full = Blip2(cfg, model.vision, model.llm)
    assert not full.load_state_dict(model.state_dict(), strict=False).unexpected_keys  # the rest is new
    return save_checkpoint(full, root / "text-path")


class Blip2Case:
    def __init__(self, root, name: str):
        llm = name.split("-")[0]
        src = root / "src"
        make_blip2(src, llm=llm, num_query_tokens=4, cross_attention_frequency=1, qformer_layers=2)
        if name.endswith("-text-path"):
            src = _with_text_path(root, src)
        self.out = root / "out"
        self.model, self.result = _exported(src, self.out, seed=7)
        self.hf = Blip2ForConditionalGeneration.from_pretrained(self.out, attn_implementation="sdpa").eval()
        self.Q = self.hf.config.num_query_tokens

    def ids(self, text: str = BLIP2_TEXT) -> torch.Tensor:
        return torch.tensor([self.model.text.llm_ids(text)[0]])

    def hf_ids(self, ids: torch.Tensor) -> torch.Tensor:
        image = torch.full((ids.shape[0], self.Q), self.hf.config.image_token_id)
        return torch.cat([image, ids], 1)

    def logits(self, model, ids, pixels, hf: bool = False) -> torch.Tensor:
        """Text logits (decoder-only) or decoder logits (T5) of either side."""
        dec = (
            {"decoder_input_ids": torch.tensor([[0, 5, 7, 9]])} if self.model.model.is_encoder_decoder else {}
        )
        if not hf:
            return model(pixels, ids, **dec).logits
        logits = model(pixel_values=pixels, input_ids=self.hf_ids(ids), **dec).logits
        return logits if dec else logits[:, self.Q :]


@pytest.fixture(scope="module", params=["opt", "t5", "opt-text-path"])
def blip2(request, tmp_path_factory):
    return Blip2Case(tmp_path_factory.mktemp(f"export-{request.param}"), request.param)


@torch.inference_mode()
def test_blip2_logits_and_greedy_match_transformers(blip2):
    assert blip2.result.architecture == "Blip2ForConditionalGeneration"
    ids, pixels = blip2.ids(), _pixels(seed=1)
    torch.testing.assert_close(
        blip2.logits(blip2.model.model, ids, pixels),
        blip2.logits(blip2.hf, ids, pixels, hf=True),
        atol=1e-4,
        rtol=1e-4,
    )
    theirs = blip2.hf.generate(pixel_values=pixels, input_ids=blip2.hf_ids(ids), **GREEDY)
    theirs = theirs[:, 1:] if blip2.model.model.is_encoder_decoder else theirs[:, -GREEDY["max_new_tokens"] :]
    assert blip2.model.model.generate(pixels, ids, **GREEDY).tolist() == theirs.tolist()


def test_blip2_leaves_out_what_generation_does_not_read(blip2):
    left_out = "left out the Q-Former text path, the ITC/ITM heads, the ITG head ("
    assert (left_out in blip2.result.summary()) == blip2.model.model.qformer.has_text_path


@torch.inference_mode()
def test_blip2_round_trip_through_blipkit(blip2):
    back = blipkit.load(blip2.out)
    ids, pixels = blip2.ids(), _pixels(seed=2)
    torch.testing.assert_close(
        blip2.logits(back.model, ids, pixels), blip2.logits(blip2.model.model, ids, pixels)
    )


@torch.inference_mode()
def test_blip2_auto_processor_gives_blipkit_inputs(blip2):
    processor = AutoProcessor.from_pretrained(blip2.out)
    inputs = processor(images=_photo(), text=BLIP2_TEXT, return_tensors="pt")
    pixels = blip2.model.processor(_photo())
    torch.testing.assert_close(inputs["pixel_values"], pixels)
    assert inputs["input_ids"].tolist() == blip2.hf_ids(blip2.ids()).tolist()


# --- LLaVA -------------------------------------------------------------------------------------------------
def _dinov2_llava(
    root, feature_layer: int | tuple[int, ...] = (1, -1), projector: str = "linear", pool: int = 1
):
    """A blipkit LLaVA checkpoint the way default-llava is made: a DINOv2 tower (position embeddings for
    56 px, run at 28) and a causal LM (tied embeddings, a tokenizer with no image token: index -200, and no
    spare embedding row for one), both referenced by path; only the projector is stored."""
    tok = make_tokenizer("llama")
    if not (root / "lm").exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            tower = Dinov2Model(
                Dinov2Config(
                    hidden_size=32,
                    intermediate_size=37,
                    num_hidden_layers=3,
                    num_attention_heads=4,
                    image_size=2 * IMAGE_SIZE,
                    patch_size=14,
                )
            )
            lm = LlamaForCausalLM(
                LlamaConfig(
                    vocab_size=len(tok),
                    hidden_size=32,
                    intermediate_size=37,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    max_position_embeddings=128,
                    tie_word_embeddings=True,
                    pad_token_id=tok.pad_token_id,
                    bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id,
                )
            )
        perturb(tower, 1, 0.5)
        perturb(lm, 2, 0.5)
        tower.save_pretrained(root / "dinov2")
        lm.save_pretrained(root / "lm")
        tok.save_pretrained(root / "lm")
    cfg = LlavaConfig(
        name="tiny-dinov2-llava",
        vision=TowerConfig(kind="dinov2", pretrained=str(root / "dinov2")),
        feature_layer=list(feature_layer) if isinstance(feature_layer, tuple) else feature_layer,
        select="default",
        pool=pool,
        projector=ProjectorConfig(kind=projector),
        llm=LLMConfig(kind="causal", pretrained=str(root / "lm")),
        processor={"image_size": IMAGE_SIZE, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    )
    path = root / f"ckpt-{feature_layer}-{projector}-{pool}"
    blipkit_llava.save_checkpoint(blipkit_llava.build_model(cfg, None), path)
    return path


def _llava_hf(**kw):
    def make(root):
        make_llava(root, **kw)
        return root

    return make


def _llava_original(root):
    make_llava(root / "hf", llm="llama", tower="clip")
    return make_llava_original(root / "original", root / "hf")  # pads images to a square


LLAVA_CASES = {
    "llama-clip": _llava_hf(llm="llama", tower="clip", feature_layer=-2),
    "qwen2-siglip": _llava_hf(llm="qwen2", tower="siglip", feature_layer=-1, select="full"),
    "original-layout": _llava_original,
    "dinov2-linear-padded": _dinov2_llava,
}


class LlavaCase:
    def __init__(self, root, name: str):
        self.name = name
        src = LLAVA_CASES[name](root)
        self.out = root / "out"
        self.model, self.result = _exported(src, self.out, seed=9)
        self.hf = LlavaForConditionalGeneration.from_pretrained(self.out, attn_implementation="sdpa").eval()
        self.P = self.model.model.num_visual_tokens
        self.V = self.model.model.llm.get_output_embeddings().weight.shape[0]  # blipkit's vocabulary

    def ids(self, text: str = LLAVA_TEXT) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([self.model.text.llm_ids(text)[0]])
        return ids, torch.ones_like(ids)

    def hf_inputs(self, ids, mask):
        """transformers' ids (the image token once per feature), mask and blipkit's text columns in them."""
        hf_id = self.hf.config.image_token_id
        ids = ids.masked_fill(ids == self.model.model.config.image_token_index, hf_id)
        return hf_llava_inputs(ids, mask, hf_id, self.P)

    def hf_logits(self, ids, mask, pixels) -> torch.Tensor:
        hid, hmask, cols = self.hf_inputs(ids, mask)
        logits = self.hf(input_ids=hid, attention_mask=hmask, pixel_values=pixels).logits
        return logits.gather(1, cols[..., None].expand(-1, -1, logits.shape[-1]))


@pytest.fixture(scope="module", params=list(LLAVA_CASES))
def llava(request, tmp_path_factory):
    return LlavaCase(tmp_path_factory.mktemp(f"export-{request.param}"), request.param)


@torch.inference_mode()
def test_llava_logits_and_greedy_match_transformers(llava):
    assert llava.result.architecture == LLAVA
    ids, mask = llava.ids()
    pixels = _pixels(seed=3)
    ours = llava.model.model(pixels, ids, mask).logits  # (1, T, V)
    theirs = llava.hf_logits(ids, mask, pixels)
    # an image token added past the LLM's rows gets a zero embedding row: one more, all-zero logit column
    torch.testing.assert_close(ours, theirs[..., : llava.V], atol=1e-4, rtol=1e-4)
    assert not theirs[..., llava.V :].any()
    hid, hmask, _ = llava.hf_inputs(ids, mask)
    out = llava.hf.generate(input_ids=hid, attention_mask=hmask, pixel_values=pixels, **GREEDY)
    mine = llava.model.model.generate(pixels, ids, mask, **GREEDY)
    assert mine.tolist() == out[:, hid.shape[1] :].tolist()


@torch.inference_mode()
def test_llava_auto_processor_gives_blipkit_inputs(llava):
    processor = AutoProcessor.from_pretrained(llava.out)
    inputs = processor(images=_photo(), text=LLAVA_TEXT, return_tensors="pt")
    torch.testing.assert_close(inputs["pixel_values"], llava.model.processor(_photo()))
    ids, mask = llava.ids()
    assert inputs["input_ids"].tolist() == llava.hf_inputs(ids, mask)[0].tolist()


def test_an_added_embedding_row_is_never_generated(llava):
    image_id = llava.hf.config.image_token_id
    padded = image_id >= llava.V  # past the LLM's own rows: only the DINOv2 case's LLM has no spare row
    assert padded == (llava.name == "dinov2-linear-padded")
    assert llava.hf.generation_config.suppress_tokens == ([image_id] if padded else None)
    summary = llava.result.summary()
    assert ("one zero embedding row" in summary) == padded
    assert ("added the token '<image>'" in summary) == (llava.model.model.config.image_token_index < 0)


@torch.inference_mode()
def test_llava_round_trip_through_blipkit(llava):
    back = blipkit.load(llava.out)
    ids, mask = llava.ids()
    # the export's image token: the original layout's -200 became '<image>' in the tokenizer
    back_ids = ids.masked_fill(
        ids == llava.model.model.config.image_token_index, back.model.config.image_token_index
    )
    pixels = _pixels(seed=4)
    want = llava.model.model(pixels, ids, mask).logits
    got = back.model(pixels, back_ids, mask).logits  # an added image-token row may widen the vocabulary
    torch.testing.assert_close(got[..., : want.shape[-1]], want)


# --- refused -----------------------------------------------------------------------------------------------
def _refused(model, out, *named: str) -> None:
    with pytest.raises(NotRepresentable) as error:
        export(model, out)
    for text in named:
        assert text in str(error.value)
    assert not out.exists()  # nothing written


def test_question_aware_qformer_names_instructblip(tmp_path):
    make_instructblip(tmp_path / "src")
    _refused(
        blipkit.load(tmp_path / "src"),
        tmp_path / "out",
        "question-aware Q-Former",
        "InstructBlipForConditionalGeneration represents it",
    )


def test_retrieval_model_names_its_class(retrieval_dir, tmp_path):
    _refused(blipkit.load(retrieval_dir), tmp_path / "out", "retrieval-only", "Blip2ForImageTextRetrieval")


def test_dinov2_under_a_qformer_has_no_class(tmp_path):
    _refused(
        blipkit.load("default"),
        tmp_path / "out",
        "dinov2 vision tower under a Q-Former",
        "no transformers class",
    )


def test_dinov2_after_its_final_layernorm_has_no_class(tmp_path):
    _refused(
        blipkit.load(_dinov2_llava(tmp_path, feature_layer=-1, projector="mlp2x_gelu")),
        tmp_path / "out",
        "after its final LayerNorm",
        "feature_layer 3, the last block without it, exports",
        "no transformers class",
    )


def test_pooled_patches_have_no_class(tmp_path):
    _refused(blipkit.load(_dinov2_llava(tmp_path, feature_layer=-2, pool=2)), tmp_path / "out", "pool 2")


def test_default_llava_is_refused_precisely(tmp_path):
    """default-llava reads DINOv2's last_hidden_state (after the final LayerNorm); transformers' LLaVA reads
    hidden_states, before it, so no exact export exists."""
    _refused(
        blipkit.load("default-llava"),
        tmp_path / "out",
        "dinov2 tower is read after its final LayerNorm",
        "LlavaForConditionalGeneration reads the tower's hidden_states",
        "feature_layer 12",
    )


# --- the output dir, dtypes and the command ----------------------------------------------------------------
def test_out_dir_rules(opt_dir, tmp_path):
    model = blipkit.load(opt_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(UsageError, match="not empty; pass --overwrite"):
        export(model, out)
    export(model, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    with pytest.raises(UsageError, match="is the checkpoint being exported"):
        export(model, opt_dir, overwrite=True)


def test_dtype_of_the_written_weights(opt_dir, tmp_path):
    result = export(blipkit.load(opt_dir), tmp_path / "out", dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(str(tmp_path / "out" / "model.safetensors")).values()} == {
        torch.bfloat16
    }
    assert "bfloat16" in result.summary()


def test_cli_export(opt_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["export", str(opt_dir), "--to", "transformers", str(out)]) == EXIT_OK
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote {out} (Blip2ForConditionalGeneration")
    Blip2ForConditionalGeneration.from_pretrained(out)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--to", "onnx"], "--to 'onnx' is not a format blipkit exports; known: transformers"),
        (["--to", "transformers"], "exists and is not empty; pass --overwrite"),
    ],
)
def test_cli_usage_errors(opt_dir, tmp_path, capsys, argv, message):
    (tmp_path / "taken.txt").write_text("x")
    assert cli.main(["export", str(opt_dir), str(tmp_path), *argv]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_cli_refusal_is_a_usage_error(retrieval_dir, tmp_path, capsys):
    assert (
        cli.main(["export", str(retrieval_dir), str(tmp_path / "out"), "--to", "transformers"]) == EXIT_USAGE
    )
    assert "Blip2ForImageTextRetrieval" in capsys.readouterr().err
