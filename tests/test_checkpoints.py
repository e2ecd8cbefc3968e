"""Checkpoint loading is strict; blipkit checkpoints round-trip bit-exactly; key maps invert."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import blipkit
from blipkit.convert import hf_blip2
from blipkit.loading import CheckpointError, read_state_dict


def _copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _weights_file(path):
    return next(path.glob("*.safetensors"))


def test_blipkit_round_trip_is_bit_exact(opt_dir, tmp_path):
    model = blipkit.load(opt_dir)
    out = blipkit.save_checkpoint(model.model, tmp_path / "ck", model.processor)
    assert sorted(p.name for p in out.iterdir()) == ["bridge.safetensors", "config.json"]
    saved = load_file(str(out / "bridge.safetensors"))
    assert all(k.split(".")[0] in ("qformer", "bridge") for k in saved)  # frozen parts are referenced
    again = blipkit.load(out)
    before, after = model.model.state_dict(), again.model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    pixels = torch.randn(1, 3, 28, 28)
    ids = torch.tensor([[2, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model.model(pixels, ids).logits, again.model(pixels, ids).logits)
    assert again.processor == model.processor


def test_missing_key_is_named(opt_dir, tmp_path):
    bad = _copy_dir(opt_dir, tmp_path / "bad")
    f = _weights_file(bad)
    sd = load_file(str(f))
    del sd["qformer.encoder.layer.1.output_query.dense.weight"]
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"layers\.1\.query_ffn\.fc2\.weight"):
        blipkit.load(bad)


def test_wrong_shape_is_named(opt_dir, tmp_path):
    bad = _copy_dir(opt_dir, tmp_path / "bad")
    f = _weights_file(bad)
    sd = load_file(str(f))
    sd["language_projection.weight"] = torch.zeros(3, 3)
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"weight: checkpoint \(3, 3\)"):
        blipkit.load(bad)


def test_unknown_key_is_named(opt_dir, tmp_path):
    bad = _copy_dir(opt_dir, tmp_path / "bad")
    f = _weights_file(bad)
    sd = load_file(str(f))
    sd["qformer.encoder.layer.0.surprise.weight"] = torch.zeros(2)
    save_file(sd, str(f))
    with pytest.raises(KeyError, match="surprise"):
        blipkit.load(bad)


def test_missing_llm_key_is_named(opt_dir, tmp_path):
    bad = _copy_dir(opt_dir, tmp_path / "bad")
    f = _weights_file(bad)
    sd = load_file(str(f))
    del sd["language_model.model.decoder.layers.0.fc1.weight"]
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match="layers.0.fc1.weight"):
        blipkit.load(bad)


def test_blipkit_checkpoint_missing_key(opt_dir, tmp_path):
    model = blipkit.load(opt_dir)
    out = blipkit.save_checkpoint(model.model, tmp_path / "ck")
    sd = load_file(str(out / "bridge.safetensors"))
    del sd["qformer.query_tokens"]
    save_file(sd, str(out / "bridge.safetensors"))
    with pytest.raises(CheckpointError, match="query_tokens"):
        blipkit.load(out)


def test_unknown_config_key(opt_dir, tmp_path):
    model = blipkit.load(opt_dir)
    out = blipkit.save_checkpoint(model.model, tmp_path / "ck")
    cfg = json.loads((out / "config.json").read_text())
    cfg["config"]["qformer"]["num_querys"] = 3
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_querys"):
        blipkit.load(out)


def test_key_maps_invert(opt_dir):
    sd = read_state_dict(opt_dir)
    assert hf_blip2.detect_format(sd) == "transformers"
    ours = hf_blip2.filter_hf(sd)
    back = hf_blip2.to_hf(ours)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k])


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model or checkpoint"):
        blipkit.load(tmp_path)
