"""Quantized frozen towers: the LLM's and the vision encoder's Linear layers in 8 (or 4) bits; the trained
Q-Former, bridge or projector stay as they are.

* ``"int8"`` (CPU): torch's dynamic quantization (``torch.ao.quantization.quantize_dynamic``: int8 weights
  with per-channel scales, activations quantized per tensor at every call, fbgemm / x86 kernels). Per-tensor
  activation scales crush layers whose inputs carry a few huge channels (small LLMs such as SmolLM2 have
  them at fixed channels of some MLP down-projections): quantizing every layer of the default model changes
  63 of 64 captions. So a calibration pass over one synthetic image and prompt measures, for every layer,
  ``max |x| / rms(x)`` of its input, and layers at or above ``OUTLIER_RATIO``, and the output head, stay in
  fp32. (torchao's CPU int8 paths were 2-4x slower than fp32 here; torch.ao's are 5-20x faster per layer.)
* ``"8bit"`` / ``"4bit"`` (CUDA): bitsandbytes' ``Linear8bitLt`` (LLM.int8(), outliers kept in fp16) and
  ``Linear4bit`` (NF4, fp16 compute).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from blipkit.errors import EnvironmentProblem, UsageError

MODES = ("int8", "8bit", "4bit")
# max |x| / rms(x) of a layer's calibration input at which it stays fp32. Chosen on 400 easy-VQA *train*
# questions with the default model: 20 quantizes 196 of 283 layers and 12% of yes/no answers flip; 12
# quantizes 90 and keeps 399 of 400 answers; 8 keeps all 400 with 23 layers.
OUTLIER_RATIO = 12.0


@dataclass
class Quantized:
    """What ``quantize`` did: the layers it quantized and those it kept, by name (``llm.…``, ``vision.…``)."""

    mode: str
    quantized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def check_mode(mode: str, device: str | torch.device | None, dtype: torch.dtype | None) -> None:
    """Refuse a mode this machine or these options cannot run, before any weights load."""
    if mode not in MODES:
        raise UsageError(f"unknown quantization {mode!r}: choose one of {', '.join(MODES)}")
    cuda = torch.device(device).type == "cuda" if device is not None else False
    if mode == "int8":
        if cuda:
            raise UsageError("--quantize int8 runs on the CPU; on CUDA use --quantize 8bit or 4bit")
        if dtype not in (None, torch.float32):
            raise UsageError("--quantize int8 quantizes fp32 weights: leave --dtype at fp32")
        if "x86" not in torch.backends.quantized.supported_engines and (
            "fbgemm" not in torch.backends.quantized.supported_engines
        ):
            raise EnvironmentProblem("this torch build has no x86/fbgemm int8 kernels for --quantize int8")
        return
    if not cuda:
        raise UsageError(f"--quantize {mode} needs a CUDA device (--device cuda); on CPU use --quantize int8")
    from blipkit.extras import require

    require("bitsandbytes", f"--quantize {mode}", "cuda", package="bitsandbytes")


def frozen_linears(towers: dict[str, nn.Module]) -> dict[str, tuple[nn.Module, str, nn.Linear]]:
    """{name: (parent, attribute, layer)} of every ``nn.Linear`` in the frozen towers."""
    found = {}
    for prefix, tower in towers.items():
        for parent_name, parent in tower.named_modules():
            for attr, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    name = ".".join(p for p in (prefix, parent_name, attr) if p)
                    found[name] = (parent, attr, child)
    return found


def outlier_ratios(layers: dict[str, tuple[nn.Module, str, nn.Linear]], run: Callable[[], object]) -> dict:
    """{name: max |x| / rms(x)} of each layer's input over what ``run()`` feeds the model."""
    ratios: dict[str, float] = {}
    hooks = []
    for name, (_, _, layer) in layers.items():

        def hook(_module, inputs, _output, name=name):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            rms = x.pow(2).mean().sqrt().clamp_min(1e-12)
            ratios[name] = max(ratios.get(name, 0.0), float(x.abs().max() / rms))

        hooks.append(layer.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            run()
    finally:
        for h in hooks:
            h.remove()
    return ratios


def quantize(
    towers: dict[str, nn.Module],
    mode: str,
    calibrate: Callable[[], object] | None = None,
    keep: set[str] = frozenset(),
    threshold: float = OUTLIER_RATIO,
) -> Quantized:
    """Quantize the Linear layers of ``towers`` ({prefix: module}) in place, except those named in ``keep``.

    ``int8``: ``calibrate()`` runs the model once (hooks see every layer's input) and layers whose input
    outliers reach ``threshold`` stay fp32; layers it never reaches stay fp32 too.
    """
    layers = frozen_linears(towers)
    chosen = {n for n in layers if n not in keep}
    if mode == "int8":
        ratios = outlier_ratios(layers, calibrate) if calibrate is not None else {}
        chosen = {n for n in chosen if ratios.get(n, float("inf")) < threshold}
        convert = _int8_linear
    else:
        convert = partial(_bnb_linear, mode=mode)
    with warnings.catch_warnings():  # torch.ao's notes that torchao is its successor (slower here)
        warnings.simplefilter("ignore")
        for name in chosen:
            parent, attr, layer = layers[name]
            setattr(parent, attr, convert(layer))
    return Quantized(mode, sorted(chosen), sorted(set(layers) - chosen))


def _int8_linear(layer: nn.Linear) -> nn.Module:
    """``layer`` as torch.ao's dynamically quantized Linear (per-channel int8 weights)."""
    holder = nn.Sequential(layer)
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    torch.ao.quantization.quantize_dynamic(holder, {nn.Linear: qconfig}, inplace=True)
    return holder[0]


def _bnb_linear(layer: nn.Linear, mode: str) -> nn.Module:
    """A bitsandbytes layer holding ``layer``'s weights; they are quantized when it moves to the GPU."""
    import bitsandbytes as bnb

    device = layer.weight.device
    weight = layer.weight.detach().to("cpu", torch.float16)
    bias = layer.bias is not None
    if mode == "8bit":
        new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias, has_fp16_weights=False)
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(
            layer.in_features, layer.out_features, bias, compute_dtype=torch.float16, quant_type="nf4"
        )
        new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    if bias:
        new.bias = nn.Parameter(layer.bias.detach().to(torch.float16), requires_grad=False)
    return new.to(device)
