"""LLaVA-family training (``blipkit train llava1|llava2``) on tiny random towers and LLMs, its checkpoint
format, and the easy-VQA conversations it trains on."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_assets import tiny_assets

import blipkit
from blipkit.config import LLMConfig
from blipkit.convert import blipkit_llava
from blipkit.data import conversations as conv
from blipkit.data import easy_vqa
from blipkit.errors import CheckpointError, ResumeError
from blipkit.models.llava import LlavaConfig, ProjectorConfig, pool_patches
from blipkit.models.towers import TowerConfig
from blipkit.text import TextProcessor
from blipkit.train.config import load_config
from blipkit.train.llava import LlavaTrainer, conversation_tokens

IMAGES = 6  # easy-VQA train images the tiny runs use


class Killed(Exception):
    pass


def tiny_llava_config(root: Path, pool: int = 1) -> LlavaConfig:
    return LlavaConfig(
        name="tiny-llava",
        vision=TowerConfig(kind="dinov2", pretrained=str(root / "vision")),
        feature_layer=-1,
        select="default",
        pool=pool,
        projector=ProjectorConfig(),
        llm=LLMConfig(kind="causal", pretrained=str(root / "llm")),
        template="plain",
        processor={"image_size": 28},
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tiny_assets(tmp_path_factory.mktemp("tiny-llava"))
    (root / "llava.json").write_text(json.dumps({"config": tiny_llava_config(root).to_dict()}))
    return root


@pytest.fixture
def few_images(monkeypatch):
    """easy-VQA cut to its first ``IMAGES`` train images (the public helpers the trainer reads)."""
    paths = {i: p for i, p in easy_vqa.image_paths("train").items() if i < IMAGES}
    keep = set(paths.values())
    rows = [r for r in easy_vqa.vqa_examples("train") if r.image in keep]
    monkeypatch.setattr(easy_vqa, "image_paths", lambda split: dict(paths))
    monkeypatch.setattr(easy_vqa, "vqa_examples", lambda split: list(rows))
    return keep


def _train(tiny: Path, out: Path, stage: str = "llava2", resume: bool = False, on_step=None, **over):
    settings = {
        "model": str(tiny / "llava.json"),
        "feature_cache": str(tiny / "features"),
        "views": 2,
        "augment_prob": 0.5,
        "batch_size": 4,
        "max_steps": 4,
        "lr": 1e-2,
        "warmup_steps": 1,
        "checkpoint_every": 2,
        "threads": 1,
        "progress": False,
    } | over
    cfg = load_config(None, [f"--{k}={v}" for k, v in settings.items()], stage=stage)
    trainer = LlavaTrainer(cfg, out, resume=resume)
    return trainer, trainer.run(on_step)


def _losses(run: Path) -> list[dict]:
    return list(csv.DictReader((run / "losses.csv").open()))


def test_a_step_trains_only_the_projector(tiny, tmp_path, few_images):
    cfg = load_config(
        None,
        [f"--model={tiny / 'llava.json'}", f"--feature_cache={tiny / 'features'}", "--batch_size=4"],
        stage="llava2",
    )
    trainer = LlavaTrainer(cfg, tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    row = trainer.train_step(0)
    assert torch.isfinite(torch.tensor(row["loss"])) and row["loss"] > 0
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("projector.") for k in changed)
    assert {k for k, v in trainer.model.named_parameters() if v.requires_grad} == {
        f"projector.{k}" for k, _ in trainer.model.projector.named_parameters()
    }
    assert {c.kind for c in trainer.conversations} == {"vqa", "caption", "describe", "chat"}


def test_stage1_is_captions_and_pool_shrinks_the_prompt(tiny, tmp_path, few_images):
    trainer, final = _train(tiny, tmp_path / "s1", stage="llava1", max_steps=2, pool=2)
    assert {c.kind for c in trainer.conversations} == {"caption"}
    assert trainer.model.num_visual_tokens == 1  # a 2 x 2 grid, averaged
    m = blipkit.load(str(final))
    assert m.family == "llava" and m.model.config.pool == 2 and m.model.num_visual_tokens == 1
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in _losses(tmp_path / "s1"))


def test_kill_and_resume_reproduce_the_run(tiny, tmp_path, few_images):
    _train(tiny, tmp_path / "whole")

    def kill_after_step_3(step, row):  # one step after the checkpoint at step 2: that step is lost
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        _train(tiny, tmp_path / "cut", on_step=kill_after_step_3)
    with pytest.raises(ResumeError, match="--resume"):
        _train(tiny, tmp_path / "cut")
    _train(tiny, tmp_path / "cut", resume=True)
    whole, cut = _losses(tmp_path / "whole"), _losses(tmp_path / "cut")
    assert [r["step"] for r in cut] == ["1", "2", "3", "4"]
    assert [r["loss"] for r in whole] == [r["loss"] for r in cut]
    a = load_file(str(tmp_path / "whole" / "final" / blipkit_llava.PROJECTOR_FILE))
    b = load_file(str(tmp_path / "cut" / "final" / blipkit_llava.PROJECTOR_FILE))
    for name, tensor in a.items():
        torch.testing.assert_close(tensor, b[name], rtol=0, atol=0)
    assert (tmp_path / "whole" / "losses.png").exists()
    half = load_file(str(tmp_path / "whole" / "final-fp16" / blipkit_llava.PROJECTOR_FILE))
    assert all(t.dtype == torch.float16 for t in half.values())


# --- the checkpoint format ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory) -> Path:
    model = blipkit_llava.build_model(tiny_llava_config(tiny), None)
    torch.manual_seed(1)
    for p in model.projector.parameters():
        p.data.normal_()
    out = blipkit.save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "llava")
    torch.save(model.projector.state_dict(), out.parent / "expected.pt")
    return out


def test_checkpoint_round_trip(saved):
    raw = json.loads((saved / "config.json").read_text())
    assert raw["format"] == "blipkit" and raw["family"] == "llava"
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", blipkit_llava.PROJECTOR_FILE]
    m = blipkit.load(str(saved))
    assert m.family == "llava"
    expected = torch.load(saved.parent / "expected.pt")
    for k, v in m.model.projector.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
    frozen = {k: v for k, v in m.model.state_dict().items() if not k.startswith("projector.")}
    again = blipkit.load(str(saved)).model.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in frozen.items())  # from the referenced dirs
    assert isinstance(m.ask(Path(easy_vqa.image_paths("test")[0]), "what color is it ?"), str)


def _tampered(saved: Path, tmp_path: Path, change) -> Path:
    out = tmp_path / "bad"
    out.mkdir()
    (out / "config.json").write_text((saved / "config.json").read_text())
    tensors = load_file(str(saved / blipkit_llava.PROJECTOR_FILE))
    change(tensors)
    save_file(tensors, str(out / blipkit_llava.PROJECTOR_FILE))
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("projector.linear_2.bias"), "linear_2.bias"),
        (lambda t: t.update({"projector.extra": torch.zeros(1)}), "extra"),
        (lambda t: t.update({"projector.linear_1.bias": torch.zeros(3)}), "linear_1.bias"),
        (lambda t: t.update({"qformer.x": torch.zeros(1)}), "qformer.x"),
    ],
)
def test_checkpoint_keys_are_strict(saved, tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message):
        blipkit.load(str(_tampered(saved, tmp_path, change)))


def test_unknown_blipkit_family_is_refused(saved, tmp_path):
    raw = json.loads((saved / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(raw | {"family": "other"}))
    with pytest.raises(CheckpointError, match="does not load"):
        blipkit.load(str(tmp_path))


def test_pool_patches_averages_blocks():
    grid = torch.arange(16.0).reshape(1, 16, 1)  # a 4 x 4 grid, row-major
    pooled = pool_patches(grid, 2)
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert torch.equal(pool_patches(grid, 1), grid)


# --- the conversations --------------------------------------------------------------------------------------
def test_conversations_refer_back_and_answer_from_the_attributes():
    attributes = conv.image_attributes("train")
    chats = [c for c in conv.conversations("train", kinds=("chat", "describe")) if c.kind == "chat"]
    assert len(chats) == sum(len(a) == 2 for a in attributes.values())
    for c in chats[:200]:
        a = attributes[c.image]
        (q1, a1), (q2, a2) = c.turns[:2]
        if q1 in conv.SHAPE_QUESTIONS:
            assert (a1, a2) == (a["shape"], a["color"]) and q2 in conv.COLOUR_FOLLOW_UPS
        else:
            assert (a1, a2) == (a["color"], a["shape"]) and q2 in conv.SHAPE_FOLLOW_UPS
        assert {"it", "its"} & set(re.findall(r"[a-z]+", q2.lower()))  # it refers back
    described = conv.conversations("train", kinds=("describe",))[0]
    assert described.turns[0][0] == conv.DESCRIBE
    assert described.turns[0][1] == f"The image shows {easy_vqa.caption_for(attributes[described.image])}."


def test_loss_masks_only_the_answers(tiny):
    cfg = tiny_llava_config(tiny)
    tok = blipkit.loading.load_tokenizer(tiny / "llm")
    text = TextProcessor(cfg, tok, None, 64, 4)
    turns = (("what color is it ?", "red"), ("and is it blue ?", "no"))
    ids, labels = conversation_tokens(text, turns)
    assert len(ids) == len(labels) and ids.count(cfg.image_token_index) == 1
    red, no = (tok(w, add_special_tokens=False)["input_ids"] for w in ("red", "no"))
    # the plain template ends a turn with a newline, not end-of-sequence: only the last answer stops
    assert [label for label in labels if label != -100] == [*red, *no, tok.eos_token_id]
    assert all(label in (-100, i) for i, label in zip(ids, labels, strict=True))
    # every prompt is exactly what chat renders at inference, and the scored tokens follow each
    first, _ = text.llm_ids(text.template.render([], turns[0][0]))
    second, _ = text.llm_ids(text.template.render(turns[:1], turns[1][0]))
    assert ids[: len(first)] == first and ids[: len(second)] == second
    assert all(label == -100 for label in labels[: len(first)])
    assert labels[len(first)] == ids[len(first)] == red[0]
