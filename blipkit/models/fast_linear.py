"""Frozen fp32 ``nn.Linear`` layers through oneDNN with a pre-packed weight, where that is faster on this CPU.

torch runs an fp32 ``F.linear`` on the CPU through its BLAS (MKL). On some CPUs (AMD ones among them) MKL's
fp32 GEMM at inference shapes runs at a fraction of what oneDNN reaches once the weight is reordered into
oneDNN's blocked layout: on a 2-core AMD EPYC, a decoding step's (8, 576) x (576, 49152) vocabulary
projection takes 35 ms through MKL and 12 ms packed. ``accelerate`` swaps each frozen fp32 ``nn.Linear`` of
a module for a ``PackedLinear`` when a short timing of that layer's shape, on this CPU with this thread count,
shows the packed path faster (the timings are kept in ``$BLIPKIT_CACHE/kernels.json``); a layer packs its
weight on its fourth call, so a one-off answer does not pay for packing what it uses once. The two paths sum
in different orders, so scores differ in the last bits (about 1e-7 relative), like a change of thread count.

A ``PackedLinear`` is for inference: with autograd recording, or once moved off the CPU or out of fp32, it
runs ``F.linear`` on its dense weight. Its state dict holds the dense weight, so checkpoints are unchanged.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KERNELS = ("auto", "onednn", "default")  # ``blipkit.load(kernels=...)``
_PROBE_ROWS = 8  # rows of the timed input: a decoding batch
_MARGIN = 1.05  # packed must win by this factor to be used
_lock = threading.Lock()


def packing_available() -> bool:
    """True when this torch build packs fp32 linear weights for oneDNN."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _pack(weight: Tensor) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


class PackedLinear(nn.Module):
    """``nn.Linear`` whose weight is reordered for oneDNN on its ``pack_after``-th call; the same ``weight``
    and ``bias`` names in the state dict.

    Packing costs about as much as a few products, so a layer called once or twice (a one-off question)
    keeps torch's kernel. A weight shared with another module (tied embeddings) is kept as it is beside the
    packed copy; an unshared one then lives only in packed form and ``weight`` unpacks it when asked.
    """

    def __init__(self, linear: nn.Linear, shared: bool, pack_after: int = 4):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.shared, self.pack_after, self.calls = shared, max(1, pack_after), 0
        self.packed: Tensor | None = None
        self._dense: Tensor | None = linear.weight
        self.bias = linear.bias

    @property
    def weight(self) -> Tensor:
        """The dense (out, in) weight."""
        if self._dense is not None:
            return self._dense
        assert self.packed is not None
        return self.packed.to_dense()

    def _packable(self, x: Tensor) -> bool:
        """True when this call can take the packed kernel: inference on CPU fp32 input and weight."""
        if torch.is_grad_enabled() and x.requires_grad:
            return False
        w = self._dense
        on_cpu_fp32 = w is None or (w.device.type == "cpu" and w.dtype == torch.float32)
        return on_cpu_fp32 and x.dtype == torch.float32 and x.device.type == "cpu"

    def forward(self, x: Tensor) -> Tensor:
        if not self._packable(x):
            return F.linear(x, self.weight, self.bias)
        packed = self.packed
        if packed is None:
            self.calls += 1
            if self.calls < self.pack_after:
                return F.linear(x, self.weight, self.bias)
            packed = self.pack()
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

    def pack(self) -> Tensor:
        """Reorder the weight for oneDNN now (an unshared dense copy is then dropped)."""
        if self.packed is None:
            self.packed = _pack(self.weight)
            if not self.shared:
                self._dense = None
        return self.packed

    def _apply(self, fn: Callable, recurse: bool = True) -> PackedLinear:
        """``.to()``, ``.half()``, ``.cuda()``: the dense weight follows; it is packed again on CPU fp32."""
        was_packed = self.packed is not None
        own = self.weight.detach() if self._dense is None else None
        super()._apply(fn, recurse)  # the bias, and a dense weight (in place, so ties hold)
        dense = fn(own) if own is not None else self._dense
        assert dense is not None
        if was_packed and dense.device.type == "cpu" and dense.dtype == torch.float32:
            self.packed = _pack(dense)
        else:  # unpacked until called again on the CPU in fp32
            self.packed, self.calls = None, 0
            if self._dense is None:
                self._dense = nn.Parameter(dense, requires_grad=False)
        return self

    def __getstate__(self) -> dict:  # copy and pickle the dense weight: a packed tensor has no storage
        state = super().__getstate__()
        if self.packed is not None:
            state["packed"] = self.packed.to_dense()
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self.packed is not None:
            self.packed = _pack(self.packed)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        key = prefix + "weight"
        if key not in state_dict:
            missing.append(key)
        else:
            weight = state_dict[key]
            if self._dense is not None:
                self._dense.data.copy_(weight)
            if self.packed is not None:
                self.packed = _pack(weight.to(torch.float32))
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                self.bias.data.copy_(state_dict[prefix + "bias"])
            else:
                missing.append(prefix + "bias")

    def extra_repr(self) -> str:
        packed = self.packed is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={packed}"


def _time(fn: Callable[[], Tensor], repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _probe(in_features: int, out_features: int) -> float:
    """Seconds of MKL over seconds of packed oneDNN for an (8, in) x (in, out) product (best of 3)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(_PROBE_ROWS, in_features, generator=gen)
    w = torch.randn(out_features, in_features, generator=gen)
    packed = _pack(w)

    def onednn() -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    repeats = max(2, min(50, int(2e7 / (in_features * out_features))))  # ~a few ms per timing
    mkl, dnn = [], []
    for _ in range(3):
        mkl.append(_time(lambda: F.linear(x, w), repeats))
        dnn.append(
            _time(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), repeats)
        )
    return min(mkl) / min(dnn)


def _timings_file() -> Path:
    from blipkit.assets import cache_dir

    return cache_dir() / "kernels.json"


def _machine_key() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}|torch {torch.__version__}|threads {torch.get_num_threads()}"


def speedups(shapes: set[tuple[int, int]]) -> dict[tuple[int, int], float]:
    """MKL / packed-oneDNN time for each (in, out) shape on this CPU, timed once and then read from disk."""
    with _lock:
        path = _timings_file()
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        machine = known.setdefault(_machine_key(), {})
        new = {f"{i}x{o}": _probe(i, o) for i, o in sorted(shapes) if f"{i}x{o}" not in machine}
        if new:
            machine.update(new)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            try:
                tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
                tmp.replace(path)
            except OSError:
                pass  # a read-only cache only costs the timing next time
        return {(i, o): float(machine[f"{i}x{o}"]) for i, o in shapes}


def _frozen_linears(module: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every CPU fp32 ``nn.Linear`` whose parameters need no gradient."""
    found = []
    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) is not nn.Linear:
                continue
            params = [p for p in (child.weight, child.bias) if p is not None]
            if all(
                p.device.type == "cpu" and p.dtype == torch.float32 and not p.requires_grad for p in params
            ):
                found.append((parent, name, child))
    return found


def accelerate(module: nn.Module, kernels: str = "auto", pack_after: int = 4) -> int:
    """Swap ``module``'s frozen CPU fp32 linear layers for ``PackedLinear`` (packed on their ``pack_after``-th
    call) where packed is faster (``"auto"``), everywhere (``"onednn"``) or nowhere (``"default"``); returns
    how many were swapped."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if kernels == "default" or not packing_available():
        return 0
    layers = _frozen_linears(module)
    if not layers:
        return 0
    faster: dict[tuple[int, int], float] = {}
    if kernels == "auto":
        faster = speedups({(lin.in_features, lin.out_features) for _, _, lin in layers})
    counts: dict[int, int] = {}  # how many modules hold each weight
    for m in module.modules():
        for p in m.parameters(recurse=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
    swapped = 0
    for parent, name, lin in layers:
        if kernels == "auto" and faster[(lin.in_features, lin.out_features)] < _MARGIN:
            continue
        setattr(parent, name, PackedLinear(lin, counts.get(id(lin.weight), 0) > 1, pack_after))
        swapped += 1
    return swapped
