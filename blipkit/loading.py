"""Loading and saving checkpoints, as a chain: read -> detect format -> filter -> strict load -> report.

Formats:
- transformers ``Blip2ForConditionalGeneration`` / ``Blip2ForImageTextRetrieval`` ``save_pretrained`` dirs;
- blipkit dirs: ``config.json`` (``{"format": "blipkit", "config": {...}}``) + ``bridge.safetensors`` holding
  the Q-Former and bridge only. Frozen parts (vision encoder, LLM) are referenced by path or asset name.
- blipkit LLaVA dirs: ``{"format": "blipkit", "family": "llava", "config": {...}}`` +
  ``projector.safetensors`` (``blipkit.convert.blipkit_llava``); a blipkit config without ``family`` is
  BLIP-2's.

Loaded tensors are checked (names, shapes, floating point where the model has floats, no NaN/Inf), and a
referenced transformers dir that ships Python code (``auto_map``) is refused unless ``trust_remote_code``.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from blipkit.config import WEIGHTS_DIR, Blip2Config, VisionConfig, list_configs, list_models
from blipkit.convert import hf_blip2, hf_instructblip
from blipkit.errors import CheckpointError, ConfigError, EnvironmentProblem, UsageError
from blipkit.models.blip2 import Blip2
from blipkit.models.fast_linear import accelerate
from blipkit.models.towers import build_tower
from blipkit.models.vision import Dinov2Encoder, EvaViT
from blipkit.parts import (  # noqa: F401  (re-exported: the frozen parts are loading's too)
    REMOTE_CODE_FILES,
    build_llm,
    check_remote_code,
    load_tokenizer,
    read_config,
    resolve,
)
from blipkit.processing import ImageProcessor
from blipkit.state_dicts import check_state_dict, load_strict, read_state_dict
from blipkit.text import TextProcessor

BLIPKIT_FORMAT = "blipkit"
BRIDGE_FILE = "bridge.safetensors"
DTYPES = {  # the names --dtype takes, and their torch dtypes
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass
class Loaded:
    model: Any  # a family model (``blipkit.models.family``): Blip2, Llava, DualEncoder or TextLLM
    text: TextProcessor  # both tokenizers, prompts and windows
    processor: ImageProcessor
    path: Path | None


# --- building the parts -------------------------------------------------------------------------------------
_TOWER_DIRS = {
    "dinov2": "Dinov2Model",
    "clip": "CLIPModel or CLIPVisionModel",
    "siglip": "SiglipModel or SiglipVisionModel",
}


def build_vision(
    cfg: VisionConfig,
    state_dict: dict[str, Tensor] | None,
    base: Path | None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The frozen image encoder of ``cfg`` (see ``VisionConfig``): BLIP-2's EVA ViT, or a transformers tower.

    DINOv2 read at its last layer with every token is ``Dinov2Encoder`` (as it always was); CLIP, SigLIP and
    DINOv2 at other layers or selections are ``blipkit.models.towers.VisionTower``s.
    """
    tower = cfg.kind in ("clip", "siglip") or (
        cfg.kind == "dinov2" and (cfg.feature_layer != -1 or cfg.select != "full")
    )
    if tower or cfg.kind == "dinov2":
        if not cfg.pretrained:
            wanted = _TOWER_DIRS[cfg.kind]
            raise CheckpointError(
                f"vision.kind {cfg.kind!r} needs vision.pretrained (a transformers {wanted} dir)"
            )
        source = resolve(cfg.pretrained, base)
        check_remote_code(source, trust_remote_code)
        if not tower:
            return Dinov2Encoder.from_pretrained(cfg, str(source))
        return build_tower(cfg.kind, source=source, feature_layer=cfg.feature_layer, select=cfg.select)
    if cfg.kind != "eva":
        raise ConfigError(
            f"unknown vision kind {cfg.kind!r}; expected one of {['eva', *sorted(_TOWER_DIRS)]}"
        )
    if cfg.feature_layer != -1 or cfg.select != "full":
        raise ConfigError(
            "vision.feature_layer and vision.select apply to transformers towers (dinov2, clip, siglip); the "
            "EVA ViT gives its last built block (vision.num_layers sets its depth: BLIP-2 builds 39 of 40)"
        )
    if state_dict is None:
        if not cfg.pretrained:
            raise CheckpointError(
                "vision.kind 'eva' needs weights: vision.pretrained (a transformers BLIP-2 dir)"
            )
        source = resolve(cfg.pretrained, base)
        hf = {"vision_model." + k: v for k, v in read_state_dict(source, "vision_model.").items()}
        state_dict = {k.removeprefix("vision."): v for k, v in hf_blip2.filter_hf(hf).items()}
    with torch.device("meta"):
        vision = EvaViT(cfg)
    load_strict(vision, state_dict, "vision encoder")
    return vision


def build_model(
    cfg: Blip2Config,
    state_dict: dict[str, Tensor],
    base: Path | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> Blip2:
    """Assemble a model from its config and a blipkit-named state dict (vision/llm parts optional)."""
    vision_sd = {k[7:]: v for k, v in state_dict.items() if k.startswith("vision.")} or None
    llm_sd = {k[4:]: v for k, v in state_dict.items() if k.startswith("llm.")} or None
    vision = build_vision(cfg.vision, vision_sd, base, trust_remote_code).requires_grad_(False).eval()
    llm = build_llm(cfg.llm, llm_sd, base, dtype, trust_remote_code)
    with torch.device("meta"):  # only the Q-Former and bridge are new; they are filled below
        model = Blip2(cfg, vision, llm)
    for part in ("qformer", "bridge"):
        if hasattr(model, part):
            module = getattr(model, part)
            got = {k: v for k, v in state_dict.items() if k.startswith(part + ".")}
            expected = {f"{part}.{k}": v for k, v in module.state_dict().items()}
            check_state_dict(expected, got, "checkpoint")
            module.load_state_dict({k[len(part) + 1 :]: v for k, v in got.items()}, strict=True, assign=True)
            module.float()  # trained parts run in fp32 (they may be stored as fp16)
    unknown = sorted(k for k in state_dict if k.split(".")[0] not in ("vision", "llm", "qformer", "bridge"))
    if unknown or (not hasattr(model, "bridge") and any(k.startswith("bridge.") for k in state_dict)):
        raise CheckpointError(f"unexpected keys {unknown or ['bridge.*']}")
    model.vision.to(dtype)
    return model.eval()


def torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """A dtype by name ("bf16") or as it is; float32 by default."""
    return DTYPES[dtype] if isinstance(dtype, str) else dtype or torch.float32


# --- image processors and devices -----------------------------------------------------------------------
def _processor_from_hf_dir(path: Path) -> dict[str, Any]:
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = path / name
        if f.exists():
            d = json.loads(f.read_text())
            d = d.get("image_processor", d)
            return ImageProcessor.from_hf_dict(d).to_dict()
    return {}


def check_device(device: str | None) -> None:
    """A device torch knows and this machine has, checked before anything loads."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EnvironmentProblem(
                f"--device {device}: this torch build or machine has no CUDA GPU; use --device cpu, or "
                "install a CUDA build of torch (pip install torch) on a machine with an NVIDIA GPU"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EnvironmentProblem(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise EnvironmentProblem(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device!r}: blipkit runs on cpu, cuda or mps")


def _not_a_model(name: str) -> str:
    """Why ``name`` does not load, with the names that would."""
    models = list_models()
    if name in list_configs():
        return (
            f"{name!r} is an architecture config for training (blipkit train --model={name}), not a model "
            f"with weights; models by name: {models}, or a checkpoint directory"
        )
    close = difflib.get_close_matches(name.lower(), models + list_configs(), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (
        f"no model or checkpoint at {name!r}{hint} (models by name: {models}; otherwise a directory with "
        "config.json: a transformers BLIP-2 save_pretrained dir or a blipkit checkpoint)"
    )


# --- public entry points ------------------------------------------------------------------------------------
def locate(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """The directory behind a reference: a local dir, a model shipped by name, or a Hugging Face hub id."""
    from blipkit import hub

    path = Path(name_or_path).expanduser()
    if not path.exists() and (WEIGHTS_DIR / str(name_or_path)).exists():
        path = WEIGHTS_DIR / str(name_or_path)
    if not path.exists() and hub.is_hub_id(str(name_or_path)):
        path = hub.snapshot(str(name_or_path), revision)
    elif revision is not None:
        raise UsageError(f"revision {revision!r} is for hub ids; {str(name_or_path)!r} is not one")
    if not (path / "config.json").exists():
        raise FileNotFoundError(_not_a_model(str(name_or_path)))
    return path


@dataclass
class _Parts:
    """A built family model with its tokenizers and image processor, before the text side is made."""

    model: nn.Module
    llm_tokenizer: Any | None
    embed_tokenizer: Any | None  # the Q-Former's text path, or a dual encoder's text tower
    processor: ImageProcessor


def _load_blipkit(path: Path, raw: dict[str, Any], dtype: torch.dtype, trust: bool) -> _Parts:
    cfg = Blip2Config.from_dict(raw.get("config"), source=str(path / "config.json"))
    model = build_model(
        cfg, read_state_dict(path / BRIDGE_FILE), base=path, dtype=dtype, trust_remote_code=trust
    )
    tok_ref = cfg.llm.tokenizer or cfg.llm.pretrained
    llm_tok = load_tokenizer(resolve(tok_ref, path), trust) if model.has_llm and tok_ref else None
    return _blip2_parts(model, llm_tok, path, trust)


def _load_hf_blip2(path: Path, raw: dict[str, Any], dtype: torch.dtype, trust: bool) -> _Parts:
    """transformers BLIP-2 (generation or retrieval) and InstructBLIP dirs."""
    if hf_instructblip.is_instructblip(raw):  # BLIP-2 with the instruction in the Q-Former
        cfg, state_dict = hf_instructblip.read_checkpoint(path, raw)
    else:
        cfg = hf_blip2.config_from_hf(raw, source=str(path / "config.json"))
        state_dict = read_state_dict(path)
        fmt = hf_blip2.detect_format(state_dict)
        if fmt != "transformers":
            raise CheckpointError(f"{path}: a {fmt} state dict in a transformers config dir")
        state_dict = hf_blip2.fill_missing(hf_blip2.filter_hf(state_dict), cfg)
    cfg.processor = _processor_from_hf_dir(path)
    model = build_model(cfg, state_dict, base=path, dtype=dtype, trust_remote_code=trust)
    # the saved blipkit checkpoint will reference these frozen weights instead of copying them
    cfg.vision.pretrained = str(path.resolve())
    if model.has_llm:
        cfg.llm.pretrained, cfg.llm.hf_config = str(path.resolve()), None
    llm_tok = load_tokenizer(path, trust) if model.has_llm else None
    if cfg.qformer.text_path and not cfg.qformer_tokenizer:
        cfg.qformer_tokenizer = str(path.resolve())
    return _blip2_parts(model, llm_tok, path, trust)


def _blip2_parts(model: Blip2, llm_tok: Any | None, path: Path, trust: bool) -> _Parts:
    cfg = model.config
    q_tok = load_tokenizer(resolve(cfg.qformer_tokenizer, path), trust) if cfg.qformer_tokenizer else None
    return _Parts(model, llm_tok, q_tok, ImageProcessor.from_dict(cfg.processor))


def _load_llava(path: Path, raw: dict[str, Any], dtype: torch.dtype, trust: bool) -> _Parts:
    from blipkit.convert import hf_llava, llava_original

    source = hf_llava if hf_llava.detect(raw) else llava_original
    model, tokenizer, processor = source.load(path, dtype, trust_remote_code=trust)
    return _Parts(model, tokenizer, None, processor)


def _load_blipkit_llava(path: Path, raw: dict[str, Any], dtype: torch.dtype, trust: bool) -> _Parts:
    from blipkit.convert import blipkit_llava

    model, tokenizer, processor = blipkit_llava.load(path, raw, dtype, trust_remote_code=trust)
    return _Parts(model, tokenizer, None, processor)


def _is_blipkit(raw: dict[str, Any], family: str) -> bool:
    return raw.get("format") == BLIPKIT_FORMAT and raw.get("family", "blip2") == family


def _load_dual_encoder(path: Path, raw: dict[str, Any], dtype: torch.dtype, trust: bool) -> _Parts:
    from blipkit.convert import hf_clip

    check_remote_code(path, trust)
    model, tokenizer, processor = hf_clip.load(path, dtype)
    return _Parts(model, None, tokenizer, processor)


def _is_llava(raw: dict[str, Any]) -> bool:
    from blipkit.convert import hf_llava, llava_original

    return bool(hf_llava.detect(raw) or llava_original.detect(raw))


def _is_dual_encoder(raw: dict[str, Any]) -> bool:
    from blipkit.convert import hf_clip

    return hf_clip.detect(raw) is not None


# (what it is, detect(config.json), load): the first format whose detector accepts the config loads it
FORMATS = (
    ("blipkit checkpoint", lambda raw: _is_blipkit(raw, "blip2"), _load_blipkit),
    # blipkit caption-then-LLM bridges ({"family": "caption"}) are two models: ``blipkit.load`` builds them
    ("blipkit LLaVA checkpoint", lambda raw: _is_blipkit(raw, "llava"), _load_blipkit_llava),
    ("transformers BLIP-2 / InstructBLIP", lambda raw: "qformer_config" in raw, _load_hf_blip2),
    ("transformers CLIP / SigLIP", _is_dual_encoder, _load_dual_encoder),
    ("LLaVA (transformers or the original repo)", _is_llava, _load_llava),
)


def load_checkpoint(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    kernels: str = "auto",
) -> Loaded:
    """Load a model by name (``"default"``), directory or Hugging Face hub id (``revision``: a branch, tag
    or commit of it), in any of ``FORMATS``.

    ``trust_remote_code`` lets referenced transformers dirs run the Python code they ship (``auto_map``);
    without it such a dir is a ``CheckpointError``. ``kernels`` picks the frozen fp32 layers' CPU kernels
    (``blipkit.models.fast_linear``): ``"auto"`` the faster on this CPU, ``"onednn"`` or ``"default"``.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor bar on every load is noise
    dtype = torch_dtype(dtype)
    check_device(device)
    path = locate(name_or_path, revision)
    raw = read_config(path / "config.json")
    for _, detect, load in FORMATS:
        if detect(raw):
            parts = load(path, raw, dtype, trust_remote_code)
            break
    else:
        known = "; ".join(name for name, _, _ in FORMATS)
        raise CheckpointError(f"{path}/config.json is a format blipkit does not load (it loads: {known})")
    model = parts.model
    if device:
        model.to(device)
    accelerate(model, kernels)
    text = TextProcessor.for_model(model, parts.llm_tokenizer, parts.embed_tokenizer)
    return Loaded(model, text, parts.processor, path)


def save_checkpoint(
    model: Blip2, out_dir: str | os.PathLike, processor: ImageProcessor | None = None
) -> Path:
    """Write ``config.json`` + ``bridge.safetensors`` (Q-Former and bridge; frozen parts by reference); a
    LLaVA-family model writes ``projector.safetensors`` instead (``blipkit.convert.blipkit_llava``)."""
    if getattr(model.config, "family", "blip2") == "llava":
        from blipkit.convert import blipkit_llava

        return blipkit_llava.save_checkpoint(model, out_dir, processor)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if processor is not None:
        cfg.processor = processor.to_dict()
    trained = {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if k.split(".")[0] in ("qformer", "bridge")
    }
    save_file(trained, str(out / BRIDGE_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(
        json.dumps({"format": BLIPKIT_FORMAT, "config": cfg.to_dict()}, indent=2)
    )
    return out
