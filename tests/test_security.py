"""Untrusted inputs: checkpoint dirs shipping Python code, pickled resume state, bad weights and configs."""

from __future__ import annotations

import io
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from test_train_loop import _overrides
from tiny_assets import tiny_assets
from transformers import dynamic_module_utils

import blipkit
from blipkit import cli
from blipkit.errors import CheckpointError, ConfigError, ResumeError
from blipkit.loading import BRIDGE_FILE
from blipkit.train import loop
from blipkit.train.config import load_config
from blipkit.train.distributed import DistEnv
from blipkit.train.loop import Trainer

CODE = "from pathlib import Path\nPath({marker!r}).write_text('custom code ran')\n"


@pytest.fixture()
def hf_modules(tmp_path, monkeypatch):
    """Where transformers would copy a dir's custom modules (kept out of the user's cache)."""
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 8))  # answers any "run the custom code?" prompt


def _code_dir(path, marker, config=None, tokenizer_config=None):
    """A dir whose ``auto_map`` names ``custom.py``, a module that writes ``marker`` when imported."""
    path.mkdir()
    (path / "custom.py").write_text(CODE.format(marker=str(marker)))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


def _llm_with_code(path, marker):
    auto_map = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    return _code_dir(path, marker, config={"model_type": "custom-llm", "auto_map": auto_map})


def _tokenizer_with_code(path, marker):
    auto_map = {"AutoTokenizer": ["custom.CustomTokenizer", None]}
    config = {"tokenizer_class": "CustomTokenizer", "auto_map": auto_map}
    return _code_dir(path, marker, tokenizer_config=config)


@pytest.fixture(scope="module")
def checkpoint(opt_dir, tmp_path_factory):
    """A blipkit checkpoint dir (Q-Former + bridge) that references the tiny transformers BLIP-2 dir."""
    loaded = blipkit.load(opt_dir)
    return blipkit.save_checkpoint(loaded.model, tmp_path_factory.mktemp("ck") / "ck", loaded.processor)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(ck, edit):
    raw = json.loads((ck / "config.json").read_text())
    edit(raw["config"])
    (ck / "config.json").write_text(json.dumps(raw))
    return ck


# --- Python code shipped inside a referenced dir ------------------------------------------------------------
def test_chat_never_runs_the_llm_dirs_code(checkpoint, tmp_path, hf_modules, capsys):
    marker = tmp_path / "ran"
    llm = _llm_with_code(tmp_path / "llm", marker)
    ck = _edit_config(_copy(checkpoint, tmp_path / "ck"), lambda c: c["llm"].update(pretrained=str(llm)))
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((28, 28, 3), dtype=np.uint8)).save(image)
    assert cli.main(["chat", str(image), "--model", str(ck)]) == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert str(llm / "config.json") in err and "--trust-remote-code" in err


def test_tokenizer_code_is_refused_unless_trusted(checkpoint, tmp_path, hf_modules):
    marker = tmp_path / "ran"
    tok = _tokenizer_with_code(tmp_path / "tok", marker)
    ck = _edit_config(_copy(checkpoint, tmp_path / "ck"), lambda c: c["llm"].update(tokenizer=str(tok)))
    with pytest.raises(CheckpointError, match="tokenizer_config.json.*trust_remote_code=True"):
        blipkit.load(ck)
    assert not marker.exists()
    with pytest.raises(AttributeError, match="CustomTokenizer"):  # trusted: transformers imports the module
        blipkit.load(ck, trust_remote_code=True)
    assert marker.exists()


def test_training_never_runs_a_tokenizers_code(tiny, tmp_path, hf_modules):
    marker = tmp_path / "ran"
    tok = _tokenizer_with_code(tmp_path / "tok", marker)
    model = json.loads((tiny / "model.json").read_text()) | {"qformer_tokenizer": str(tok)}
    (tmp_path / "model.json").write_text(json.dumps(model))
    cfg = load_config(None, _overrides(tiny, model=tmp_path / "model.json"), stage="stage2")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Trainer(cfg, tmp_path / "run", env=DistEnv())
    assert not marker.exists()


# --- resume state is never unpickled ------------------------------------------------------------------------
class _WritesMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_assets(tmp_path_factory.mktemp("tiny-train"))


def _trainer(tiny, out, **extra):
    cfg = load_config(None, _overrides(tiny, **extra), stage="stage2")
    return Trainer(cfg, out, resume=True, env=DistEnv())


def test_a_pickled_resume_file_is_refused(tiny, tmp_path):
    marker = tmp_path / "ran"
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"step": _WritesMarker(marker), "trainable": {}}, out / "resume.pt")
    with pytest.raises(ResumeError, match="resume.pt"):
        _trainer(tiny, out)
    assert not marker.exists()


def test_resume_state_is_safetensors_and_json(tiny, tmp_path):
    out = tmp_path / "run"
    _trainer(tiny, out, max_steps=2).run()
    state = json.loads((out / "resume.json").read_text())
    assert state["step"] == 2
    tensors = load_file(str(out / state["tensors"]))
    assert any(k.startswith("optimizer.") for k in tensors) and "rng.torch" in tensors
    assert sorted(p.name for p in out.glob("resume*")) == sorted(["resume.json", state["tensors"]])

    marker = tmp_path / "ran"  # a pickle in place of the tensors file is not read as one
    torch.save({"x": _WritesMarker(marker)}, out / state["tensors"])
    with pytest.raises(ResumeError, match=state["tensors"]):
        _trainer(tiny, out, max_steps=3)
    assert not marker.exists()

    (out / "resume.json").write_text(json.dumps(state | {"tensors": "../elsewhere.safetensors"}))
    with pytest.raises(ResumeError, match="elsewhere"):
        _trainer(tiny, out, max_steps=3)


class _Killed(Exception):
    pass


def test_a_kill_between_the_two_files_keeps_the_previous_state(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    write = loop._write_atomically

    def killed_before_the_json_of_step_4(path, content):
        if path.name == loop.RESUME_FILE and (out / loop.RESUME_TENSORS.format(step=4)).exists():
            raise _Killed
        write(path, content)

    monkeypatch.setattr(loop, "_write_atomically", killed_before_the_json_of_step_4)
    with pytest.raises(_Killed):
        _trainer(tiny, out, max_steps=4).run()
    monkeypatch.undo()
    trainer = _trainer(tiny, out, max_steps=4)
    assert trainer.step == 2  # the JSON still names step 2's tensors, which are still there
    trainer.run()
    assert json.loads((out / "resume.json").read_text())["step"] == 4


# --- weights ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_trained_weights_are_named(checkpoint, tmp_path, bad):
    ck = _copy(checkpoint, tmp_path / "ck")
    sd = load_file(str(ck / BRIDGE_FILE))
    sd["qformer.layers.0.cross_attn.q.weight"][1, 2] = bad
    save_file(sd, str(ck / BRIDGE_FILE))
    with pytest.raises(CheckpointError, match=r"NaN/Inf.*qformer\.layers\.0\.cross_attn\.q\.weight"):
        blipkit.load(ck)


def test_non_finite_weights_of_a_transformers_dir_are_named(opt_dir, tmp_path):
    hf = _copy(opt_dir, tmp_path / "hf")
    sd = load_file(str(hf / "model.safetensors"))
    sd["language_projection.bias"][0] = float("nan")
    save_file(sd, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"NaN/Inf.*bridge\.bias"):
        blipkit.load(hf)


def test_integer_weights_are_named(checkpoint, tmp_path):
    ck = _copy(checkpoint, tmp_path / "ck")
    sd = load_file(str(ck / BRIDGE_FILE))
    sd["bridge.weight"] = sd["bridge.weight"].to(torch.int64)
    save_file(sd, str(ck / BRIDGE_FILE))
    with pytest.raises(CheckpointError, match=r"bridge\.weight.*torch\.int64"):
        blipkit.load(ck)


# --- config.json --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["qformer"].update(num_query_tokens="4"),
            "qformer.num_query_tokens must be an int, got '4'",
        ),
        (lambda c: c.update(qformer=None), "qformer must be an object, got null"),
        (lambda c: c.update(bridge=[1, 2]), r"bridge must be an object, got \[1, 2\]"),
        (lambda c: c["vision"].update(num_layers=True), "vision.num_layers must be an int, got true"),
        (lambda c: c["llm"].update(pretrained=3), "llm.pretrained must be a string or null, got 3"),
        (lambda c: c["prompts"].update(extra=1), r"unknown key\(s\) \['extra'\] in 'prompts' block"),
        (lambda c: c.update(processor="x"), "processor must be an object, got 'x'"),
    ],
)
def test_config_type_errors_name_the_field(checkpoint, tmp_path, edit, message):
    ck = _edit_config(_copy(checkpoint, tmp_path / "ck"), edit)
    with pytest.raises(ConfigError, match=f"config.json: {message}"):
        blipkit.load(ck)


def test_a_config_json_that_is_not_an_object(checkpoint, tmp_path):
    ck = _copy(checkpoint, tmp_path / "ck")
    (ck / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="config.json"):
        blipkit.load(ck)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["qformer_config"].pop("hidden_size"), "qformer_config.hidden_size is missing"),
        (lambda c: c["vision_config"].update(num_hidden_layers="2"), "vision_config.num_hidden_layers must"),
        (lambda c: c.update(num_query_tokens=4.5), "num_query_tokens must be an int, got 4.5"),
        (lambda c: c.update(text_config=None), "text_config must be an object, got null"),
    ],
)
def test_transformers_config_errors_name_the_field(opt_dir, tmp_path, edit, message):
    hf = _copy(opt_dir, tmp_path / "hf")
    raw = json.loads((hf / "config.json").read_text())
    edit(raw)
    (hf / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=f"config.json: {message}"):
        blipkit.load(hf)
